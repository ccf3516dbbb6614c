//! Fuzz target: see `conveyor_fuzz::header_block`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| conveyor_fuzz::header_block(data));
