//! The proxy's mesh file: see `sluice_fuzz::files::mesh_file`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_fuzz::files::mesh_file(data));
