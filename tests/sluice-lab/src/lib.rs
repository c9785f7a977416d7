//! The lab sluice is tested, demonstrated and benchmarked in: real network namespaces joined by
//! veths, real cgroups, the real proxy binary and real capture, all created with unique names and
//! removed by guards when they drop, even when a test fails.

pub mod agent;
pub mod ambient;
pub mod app;
pub mod bench;
pub mod cluster;
pub mod daemon;
pub mod demo;
pub mod hostile;
pub mod lab;
pub mod proxy;
pub mod soak;

/// Bounds every wait in the lab, so no test or benchmark can hang.
pub const WAIT: std::time::Duration = std::time::Duration::from_secs(10);
