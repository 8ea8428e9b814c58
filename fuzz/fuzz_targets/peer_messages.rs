//! `cargo +nightly fuzz run peer_messages`: see `syncd::fuzzing::peer_messages`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| syncd::fuzzing::peer_messages(data));
