//! The checks behind sluice's fuzz targets, one module per input a peer, a pod or an operator
//! controls. Each target (`fuzz_targets/*.rs`) is one line that hands libFuzzer's bytes to a
//! `check` here; the checks assert what must hold for every input (no panic, an error or a
//! value, and where cheap a round trip or an invariant of the result), so a violation is a
//! crash that libFuzzer saves and minimises.
//!
//! Run them with `cargo xtask fuzz` (see CONTRIBUTING.md, "Fuzzing").

pub mod cni;
pub mod files;
pub mod hbone;
pub mod policy;
pub mod zds;
