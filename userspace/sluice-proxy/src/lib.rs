//! sluice's node proxy as a library: the binary (`main.rs`) wires these together, and the
//! in-process tests drive them directly.
//!
//! - [`inpod`]: one enrolled pod's listeners and connections;
//! - [`hbone`], [`pool`], [`tls`], [`ca`], [`identity`]: mutual-TLS HTTP/2 tunnels between proxies;
//! - [`mesh`], [`route`], [`policy`]: the mesh file, routing, and authorization / PeerAuthentication;
//! - [`socket`], [`copy`], [`stats`]: sockets in a pod's netns, byte moving, counters.

pub mod access;
pub mod admin;
pub mod ca;
pub mod copy;
pub mod hbone;
pub mod identity;
pub mod inpod;
pub mod kube_policies;
pub mod limits;
pub mod mesh;
pub mod metrics;
pub mod policy;
pub mod pool;
pub mod route;
pub mod socket;
pub mod stats;
pub mod tls;
pub mod zds;
