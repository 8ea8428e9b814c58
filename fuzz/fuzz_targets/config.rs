//! `cargo +nightly fuzz run config`: see `syncd::fuzzing::config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| syncd::fuzzing::config(data));
