//! Istio policy objects and the decisions made from them: see `sluice_fuzz::policy`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_fuzz::policy::check(data));
