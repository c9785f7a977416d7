//! The sluice node agent (`sluice-cni-agent`), as a library for its tests.
//!
//! - [`install`]: the plugin binary and its entry in the node's CNI configuration;
//! - [`standalone`]: the pods file (standalone mode's source of namespaces and pods);
//! - [`cluster`]: Kubernetes mode's source (kube-rs watchers) and annotations;
//! - [`selection`]: which pods are meshed (Istio ambient's labels and opt-outs);
//! - [`find`]: a running pod's cgroup and netns, from its uid;
//! - [`node`]: the event loop that captures, releases and hands pods to the proxy;
//! - [`handoff`]: the ZDS side towards the proxy; [`cni_server`]: the plugin's socket;
//! - [`record`]: what survives an agent restart; [`health`]: liveness and readiness.

pub mod cluster;
pub mod cni_server;
pub mod find;
pub mod handoff;
pub mod health;
pub mod install;
pub mod node;
pub mod record;
pub mod selection;
pub mod standalone;
