//! The CNI plugin's environment and stdin, with the agent unreachable: see `sluice_fuzz::cni`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_fuzz::cni::check(data));
