//! Replays the fuzz seed corpora (and anything the fuzzer has added to them) through the exact
//! checks the fuzz targets run, so they are exercised by every `cargo test`, where no fuzzer
//! (which needs nightly) is available. Seed names also promise an outcome, checked here, so a
//! seed that stops reaching the code it was written for is noticed.

#[path = "../fuzz/checks.rs"]
mod checks;

use berth_protocol::arcus::{self, Frame, HEADER_LEN, Role};
use std::path::PathBuf;

/// Every file of one target's corpus, by name. An empty or missing corpus fails the test: it
/// would mean the corpus moved and nothing is being replayed.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("directory entry").path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (name, data)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", dir.display());
    files
}

#[test]
fn arcus_decode_corpus_replays() {
    for (name, data) in corpus("arcus_decode") {
        // Printed first so a panic in the checks names the file (test output shows it).
        println!("arcus_decode/{name}");
        checks::arcus_decode(&data);
        let errors = |bytes: &[u8]| {
            [Role::Agent, Role::Game].map(|role| checks::walk(bytes, role).error.is_some())
        };
        if name.starts_with("invalid_") || name.contains("too_large") {
            assert!(errors(&data).contains(&true), "{name} should be refused");
        } else if name.starts_with("chunked_") {
            assert_eq!(errors(&data[1..]), [false, false], "{name} should decode");
        } else if name.starts_with("vector_") || name.starts_with("stream_") {
            // Wrong-way frames are ignored, not errors, so both roles read every seed.
            assert_eq!(errors(&data), [false, false], "{name} should decode");
        } else if name.starts_with("empty_object_") {
            // `{}` must read exactly as a payload-less frame: each message re-encodes with
            // length 0.
            assert_eq!(errors(&data), [false, false], "{name} should decode");
            let mut messages = 0;
            for role in [Role::Agent, Role::Game] {
                for frame in checks::walk(&data, role).frames {
                    let Frame::Message { packet_id, message } = frame else {
                        continue;
                    };
                    let mut out = Vec::new();
                    arcus::encode_with_id(&message, packet_id, &mut out).expect("re-encode");
                    assert_eq!(out.len(), HEADER_LEN, "{name}: {message:?} has a payload");
                    messages += 1;
                }
            }
            assert!(messages > 0, "{name}: no message read");
        } else {
            panic!("{name}: no expected outcome for this name; see the prefixes above");
        }
    }
}

#[test]
fn filter_parse_corpus_replays() {
    for (name, data) in corpus("filter_parse") {
        println!("filter_parse/{name}");
        checks::filter_parse(&data);
        let parsed = checks::filter_text(&String::from_utf8_lossy(&data));
        if name.starts_with("valid_") {
            assert!(parsed.is_ok(), "{name}: {parsed:?}");
        } else if name.starts_with("invalid_") {
            assert!(parsed.is_err(), "{name}: {parsed:?}");
        } else {
            panic!("{name}: no expected outcome for this name; use valid_ or invalid_");
        }
    }
}
