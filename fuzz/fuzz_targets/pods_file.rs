//! The agent's pods file: see `sluice_fuzz::files::pods_file`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_fuzz::files::pods_file(data));
