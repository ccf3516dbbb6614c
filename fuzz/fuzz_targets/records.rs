//! Fuzz target: see `conveyor_fuzz::records`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| conveyor_fuzz::records(data));
