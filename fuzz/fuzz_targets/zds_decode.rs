//! One ZDS datagram, as either end decodes it: see `sluice_fuzz::zds`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_fuzz::zds::check(data));
