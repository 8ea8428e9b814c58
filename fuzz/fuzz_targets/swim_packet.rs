//! `cargo +nightly fuzz run swim_packet`: see `syncd::fuzzing::swim_packet`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| syncd::fuzzing::swim_packet(data));
