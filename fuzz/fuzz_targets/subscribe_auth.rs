//! cargo-fuzz entry point for `sockudo::fuzz_targets::subscribe_auth` (see that function for the input format
//! and the invariants checked).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sockudo::fuzz_targets::subscribe_auth(data));
