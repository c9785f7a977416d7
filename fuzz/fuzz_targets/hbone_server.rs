//! The HBONE server fed by an authenticated peer's HTTP/2 bytes: see `sluice_fuzz::hbone`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_fuzz::hbone::check(data));
