//! Arcus bytes from an untrusted game: `decode` for both roles over the whole input, and a
//! `Decoder` fed the rest in chunks chosen by the first byte, which must agree (see checks.rs).
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::arcus_decode(data));
