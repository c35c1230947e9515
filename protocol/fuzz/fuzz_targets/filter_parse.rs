//! Filter text from an untrusted matchmaker: parsing never panics, and what parses prints to
//! canonical text that parses back to the same filter (see checks.rs).
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::filter_parse(data));
