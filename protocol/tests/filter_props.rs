//! Property tests for the allocation filter language: no text makes the parser panic or
//! misreport a position, and any filter survives printing and parsing, however it was spelled.

#[path = "../fuzz/checks.rs"]
mod checks;

use berth_protocol::filter::{COLUMNS, Condition, Filter, UNSUPPORTED_COLUMNS};
use proptest::collection::vec;
use proptest::prelude::*;

/// Text over all of Unicode, control characters included.
fn any_text() -> impl Strategy<Value = String> {
    vec(any::<char>(), 0..64).prop_map(|chars| chars.into_iter().collect())
}

/// Text made of the language's own pieces, so random inputs reach deep into the grammar
/// (quotes, escapes, keywords, operators, multi-byte whitespace) instead of failing at byte 0.
fn filter_like_text() -> impl Strategy<Value = String> {
    let mut pieces: Vec<&'static str> = COLUMNS.to_vec();
    pieces.extend(UNSUPPORTED_COLUMNS.iter().take(4));
    pieces.extend([
        "and",
        "AND",
        "And",
        "or",
        "not",
        "=",
        "==",
        "!=",
        "<",
        ">",
        "\"",
        "'",
        "\\",
        "\\\"",
        " ",
        "  ",
        "\t",
        "\n",
        "\u{a0}",
        "\u{2003}",
        "0",
        "1",
        "007",
        "true",
        "FALSE",
        "18446744073709551615",
        "18446744073709551616",
        "-1",
        "é",
        "東京",
        "😀",
        "\u{0}",
        "\u{1b}",
        "(",
        ")",
        ",",
        "region",
        "RegionId",
        "a b",
        "eu-west-1",
    ]);
    vec(
        prop_oneof![
            4 => prop::sample::select(pieces),
            1 => prop::sample::select(vec!["x", "\u{85}", "\u{feff}", "\u{10ffff}"]),
        ],
        0..24,
    )
    .prop_map(|parts| parts.concat())
}

/// Names with the characters that need quoting or escaping over-represented.
fn name() -> impl Strategy<Value = String> {
    let tricky = prop::sample::select(vec![
        '"', '\'', '\\', ' ', '\t', '=', '!', '<', '>', 'a', 'Z', '0', 'é', '東', '\u{a0}', '\n',
    ]);
    prop_oneof![vec(any::<char>(), 1..16), vec(tricky, 1..12),]
        .prop_map(|chars| chars.into_iter().collect())
}

/// A valid filter: a random subset of the columns, in random order, with random values.
fn filter() -> impl Strategy<Value = Filter> {
    (
        prop::sample::subsequence((0..COLUMNS.len()).collect::<Vec<_>>(), 0..=COLUMNS.len())
            .prop_shuffle(),
        any::<[u64; 4]>(),
        [name(), name(), name(), name()],
        any::<bool>(),
    )
        .prop_map(|(columns, ids, names, virt)| {
            let [a, b, c, d] = ids;
            let [e, f, g, h] = names;
            let mut all = [
                Some(Condition::DeploymentEnvironmentId(a)),
                Some(Condition::DeploymentEnvironmentName(e)),
                Some(Condition::FleetId(b)),
                Some(Condition::FleetName(f)),
                Some(Condition::RegionId(c)),
                Some(Condition::RegionName(g)),
                Some(Condition::DcLocationId(d)),
                Some(Condition::DcLocationName(h)),
                Some(Condition::IsVirtual(virt)),
            ];
            Filter {
                conditions: columns.into_iter().filter_map(|i| all[i].take()).collect(),
            }
        })
}

/// Writes `filter` in one of the many spellings the grammar allows, chosen by `style`: any
/// whitespace around `=` and `and`, `and` in any case, names bare or in either quotes (escaping
/// more than needed or not), ids with leading zeros or quoted, isVirtual as 0/1 or true/false.
fn spell(filter: &Filter, style: &[u8]) -> String {
    const AROUND_EQ: [&str; 5] = ["", " ", "\t", "  ", "\u{a0}"];
    const AROUND_AND: [&str; 4] = [" ", "\t", "\r\n", "\u{2003}"];
    const AND: [&str; 4] = ["and", "AND", "And", "aNd"];
    let mut pick = style.iter().copied().cycle();
    let mut byte = move || usize::from(pick.next().unwrap_or(0));
    let mut out = String::new();
    out.push_str(AROUND_EQ[byte() % AROUND_EQ.len()]);
    for (i, condition) in filter.conditions.iter().enumerate() {
        if i > 0 {
            out.push_str(AROUND_AND[byte() % AROUND_AND.len()]);
            out.push_str(AND[byte() % AND.len()]);
            out.push_str(AROUND_AND[byte() % AROUND_AND.len()]);
        }
        out.push_str(condition.column());
        out.push_str(AROUND_EQ[byte() % AROUND_EQ.len()]);
        out.push('=');
        out.push_str(AROUND_EQ[byte() % AROUND_EQ.len()]);
        let how = byte();
        let value = match condition {
            Condition::IsVirtual(b) => {
                let words = [["0", "1"], ["false", "true"], ["FALSE", "True"]];
                words[how % 3][usize::from(*b)].to_owned()
            }
            Condition::DeploymentEnvironmentName(_)
            | Condition::FleetName(_)
            | Condition::RegionName(_)
            | Condition::DcLocationName(_) => condition.value_string(),
            _ => format!("{}{}", "0".repeat(how % 3), condition.value_string()),
        };
        if how & 4 == 0 && can_be_bare(&value) {
            out.push_str(&value);
        } else {
            quote(
                &mut out,
                &value,
                if how & 8 == 0 { '"' } else { '\'' },
                how & 16 != 0,
            );
        }
    }
    out.push_str(AROUND_EQ[byte() % AROUND_EQ.len()]);
    out
}

/// What the grammar reads as a bare value (restated here, independently of the parser).
fn can_be_bare(value: &str) -> bool {
    !value.is_empty()
        && !value.starts_with(['=', '!', '<', '>', '~'])
        && !value
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '=' | '"' | '\''))
}

fn quote(out: &mut String, value: &str, q: char, escape_both: bool) {
    out.push(q);
    for c in value.chars() {
        if c == q || c == '\\' || (escape_both && (c == '"' || c == '\'')) {
            out.push('\\');
        }
        out.push(c);
    }
    out.push(q);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// Any string: no panic; an error's position is a char boundary inside the input and its
    /// message is short; a success prints canonically and parses back (see `checks`).
    #[test]
    fn parse_never_panics_on_any_text(text in any_text()) {
        let _ = checks::filter_text(&text);
    }

    /// The same over text built from the language's own tokens.
    #[test]
    fn parse_never_panics_on_filter_like_text(text in filter_like_text()) {
        let _ = checks::filter_text(&text);
    }

    /// Any filter prints to text that parses back to it.
    #[test]
    fn display_roundtrips(filter in filter()) {
        let text = filter.to_string();
        prop_assert_eq!(Filter::parse(&text), Ok(filter.clone()), "{:?}", text);
    }

    /// Every spelling the grammar allows means the same filter, and prints the same canonical
    /// text: whitespace, `and`'s case, quoting and leading zeros carry no meaning.
    #[test]
    fn every_spelling_parses_to_the_same_filter(
        filter in filter(),
        style in vec(any::<u8>(), 1..64),
    ) {
        let text = spell(&filter, &style);
        let parsed = checks::filter_text(&text);
        prop_assert_eq!(parsed, Ok(filter.clone()), "{:?}", text);
        prop_assert_eq!(
            Filter::parse(&text).map(|f| f.to_string()),
            Ok(filter.to_string())
        );
    }
}
