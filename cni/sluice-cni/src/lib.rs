//! sluice's CNI plugin, as a library so the agent shares its request format and the tests its
//! parsing.
//!
//! The plugin is chained after the node's primary CNI: the runtime calls it for every pod sandbox
//! with the previous plugins' result, it asks the node agent to enrol the pod, waits until the
//! pod's traffic is captured and the proxy serves it, and passes the result on. It never touches
//! the pod itself; the agent owns every mutation.

#![forbid(unsafe_code)]

pub mod agent_api;
pub mod plugin;
pub mod spec;
