//! Fuzz target: see `conveyor_fuzz::duration`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| conveyor_fuzz::duration(data));
