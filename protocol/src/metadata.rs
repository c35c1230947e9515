//! Allocation metadata: `{key, value}` string pairs (DESIGN.md §3.4).

use serde::{Deserialize, Serialize};

/// Longest key, in bytes.
pub const MAX_KEY_LEN: usize = 64;
/// Longest value, in bytes.
pub const MAX_VALUE_LEN: usize = 2048;
/// Most pairs in one metadata list.
pub const MAX_PAIRS: usize = 64;

/// One metadata pair. Values are strings, even for numbers (`"16"`), as Arcus requires.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
// Unknown keys are ignored: ARCUS.md §4 requires it of `data` arrays.
pub struct KeyValue {
    pub key: String,
    pub value: String,
}

impl KeyValue {
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            value: value.into(),
        }
    }
}

/// Why a metadata list was refused; the message names the pair and the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    #[error("metadata has {0} pairs; at most 64 are allowed")]
    TooManyPairs(usize),
    #[error("metadata[{index}].key is empty; every pair needs a key")]
    EmptyKey { index: usize },
    #[error("metadata[{index}].key is {len} bytes; keys are at most 64 bytes")]
    KeyTooLong { index: usize, len: usize },
    #[error("metadata[{index}].value (key {key:?}) is {len} bytes; values are at most 2048 bytes")]
    ValueTooLong {
        index: usize,
        key: String,
        len: usize,
    },
    #[error(
        "metadata encodes to {0} bytes of JSON, over the 131060-byte Arcus frame limit; send fewer or shorter pairs"
    )]
    FrameTooLarge(usize),
}

/// Applies a metadata update: a key already present gets the new value in place, so the pairs
/// keep the order they were first sent in; new keys are appended in order.
pub fn merge(into: &mut Vec<KeyValue>, data: Vec<KeyValue>) {
    for kv in data {
        match into.iter_mut().find(|old| old.key == kv.key) {
            Some(old) => old.value = kv.value,
            None => into.push(kv),
        }
    }
}

/// Checks the limits of DESIGN.md §3.4 and that the list fits in one Arcus frame.
pub fn validate(pairs: &[KeyValue]) -> Result<(), MetadataError> {
    if pairs.len() > MAX_PAIRS {
        return Err(MetadataError::TooManyPairs(pairs.len()));
    }
    for (index, kv) in pairs.iter().enumerate() {
        if kv.key.is_empty() {
            return Err(MetadataError::EmptyKey { index });
        }
        if kv.key.len() > MAX_KEY_LEN {
            return Err(MetadataError::KeyTooLong {
                index,
                len: kv.key.len(),
            });
        }
        if kv.value.len() > MAX_VALUE_LEN {
            return Err(MetadataError::ValueTooLong {
                index,
                key: kv.key.clone(),
                len: kv.value.len(),
            });
        }
    }
    let len = crate::arcus::data_payload_len(pairs);
    if len > crate::arcus::MAX_PAYLOAD_LEN as usize {
        return Err(MetadataError::FrameTooLarge(len));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_replaces_in_place_and_appends_new_keys() {
        let mut into = vec![KeyValue::new("map", "dust"), KeyValue::new("mode", "ctf")];
        merge(
            &mut into,
            vec![
                KeyValue::new("players", "8"),
                KeyValue::new("map", "nuke"),
                KeyValue::new("region", "eu"),
            ],
        );
        assert_eq!(
            into,
            [
                KeyValue::new("map", "nuke"),
                KeyValue::new("mode", "ctf"),
                KeyValue::new("players", "8"),
                KeyValue::new("region", "eu"),
            ]
        );
        merge(&mut into, Vec::new());
        assert_eq!(into.len(), 4);
    }

    #[test]
    fn limits() {
        assert!(validate(&[KeyValue::new("map", "dust")]).is_ok());
        assert!(validate(&[KeyValue::new("", "x")]).is_err());
        assert!(validate(&[KeyValue::new("k".repeat(65), "x")]).is_err());
        assert!(validate(&[KeyValue::new("k", "v".repeat(2049))]).is_err());
        let many: Vec<_> = (0..65).map(|i| KeyValue::new(i.to_string(), "v")).collect();
        assert_eq!(validate(&many), Err(MetadataError::TooManyPairs(65)));
        // 64 maximal pairs stay within the pair limits but not within one frame.
        let big: Vec<_> = (0..64)
            .map(|i| KeyValue::new(format!("{i:064}"), "v".repeat(2048)))
            .collect();
        assert!(matches!(
            validate(&big),
            Err(MetadataError::FrameTooLarge(_))
        ));
    }
}
