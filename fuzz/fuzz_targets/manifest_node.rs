//! `cargo +nightly fuzz run manifest_node`: see `syncd::fuzzing::manifest_node`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| syncd::fuzzing::manifest_node(data));
