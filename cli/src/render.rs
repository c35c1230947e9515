//! Tables, key/value blocks, JSON and times for humans.

use berth_protocol::time::unix_now;

/// Columns aligned on the widest cell, two spaces apart, no trailing blanks.
#[derive(Debug, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<S: Into<String>>(headers: impl IntoIterator<Item = S>) -> Self {
        Self {
            headers: headers.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let cols = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| width(h)).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(cols) {
                widths[i] = widths[i].max(width(c));
            }
        }
        let mut out = String::new();
        for r in std::iter::once(&self.headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, w) in widths.iter().enumerate() {
                let cell = r.get(i).map_or("", String::as_str);
                line.push_str(cell);
                if i + 1 < cols {
                    line.push_str(&" ".repeat(w - width(cell) + 2));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

fn width(s: &str) -> usize {
    s.chars().count()
}

/// `label:  value` lines with the values aligned.
#[derive(Debug, Default)]
pub struct Fields {
    rows: Vec<(String, String)>,
}

impl Fields {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, label: &str, value: impl Into<String>) -> &mut Self {
        self.rows.push((label.to_owned(), value.into()));
        self
    }

    pub fn render(&self, indent: usize) -> String {
        let w = self.rows.iter().map(|(l, _)| width(l)).max().unwrap_or(0) + 1;
        let pad = " ".repeat(indent);
        let mut out = String::new();
        for (label, value) in &self.rows {
            let label = format!("{label}:");
            // Continuation lines of multi-line values line up under the value column.
            let cont = format!("\n{pad}{}", " ".repeat(w + 2));
            let value = value.replace('\n', &cont);
            out.push_str(&format!("{pad}{label:<w$}  {value}\n", w = w));
        }
        out
    }
}

/// The first 8 characters: enough to tell instances apart in a table, short enough to type.
pub fn short_id(id: &str) -> String {
    id.chars().take(8).collect()
}

pub fn or_dash(v: Option<impl ToString>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

pub fn kv_list(pairs: &[berth_protocol::KeyValue]) -> String {
    if pairs.is_empty() {
        return "-".to_owned();
    }
    pairs
        .iter()
        .map(|kv| format!("{}={}", kv.key, kv.value))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Re-indents JSON text without parsing it into a map, so the controller's field order and
/// number formatting survive: `--json` shows exactly what was answered.
pub fn pretty_json(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    if serde_json::from_str::<serde::de::IgnoredAny>(&text).is_err() {
        return text.trim().to_owned();
    }
    let mut out = String::with_capacity(text.len() * 2);
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut chars = text.trim().chars().peekable();
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.push_str(&"  ".repeat(depth));
    };
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                out.push(c);
                while chars.peek().is_some_and(|c| c.is_whitespace()) {
                    chars.next();
                }
                if matches!(chars.peek(), Some('}' | ']')) {
                    out.push(chars.next().unwrap_or(']'));
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_whitespace() => {}
            c => out.push(c),
        }
    }
    out
}

/// Seconds since the epoch of `2026-11-22T07:51:49Z` (fractions and offsets tolerated).
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    // Days from civil (Howard Hinnant), the inverse of berth_protocol::time.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let mut secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    // An explicit offset such as +02:00 after the seconds (and optional fraction).
    let rest = s[19..].trim_start_matches(|c: char| c == '.' || c.is_ascii_digit());
    if let Some(sign) = rest.chars().next().filter(|c| *c == '+' || *c == '-') {
        let oh = rest.get(1..3)?.parse::<i64>().ok()?;
        let om = rest.get(4..6)?.parse::<i64>().ok()?;
        let off = oh * 3600 + om * 60;
        secs -= if sign == '+' { off } else { -off };
    }
    u64::try_from(secs).ok()
}

/// `12s ago`, `5m ago`, `3h ago`, `2d ago`.
pub fn ago(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{}m ago", s / 60),
        s if s < 172_800 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86_400),
    }
}

/// A timestamp with how long ago it was, which is what one wants to know at 3 a.m.
pub fn when(ts: &str) -> String {
    match parse_rfc3339(ts) {
        Some(t) => format!("{ts} ({})", ago(unix_now().saturating_sub(t))),
        None => ts.to_owned(),
    }
}

/// Only the "ago" part, for table cells.
pub fn ago_of(ts: Option<&str>) -> String {
    match ts {
        None => "never".to_owned(),
        Some(ts) => {
            parse_rfc3339(ts).map_or_else(|| ts.to_owned(), |t| ago(unix_now().saturating_sub(t)))
        }
    }
}

pub fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_without_trailing_spaces() {
        let mut t = Table::new(["ID", "NAME", "STATE"]);
        t.row(vec!["1".into(), "ams-bm-017".into(), "ready".into()]);
        t.row(vec!["12".into(), "x".into(), String::new()]);
        assert_eq!(
            t.render(),
            "ID  NAME        STATE\n1   ams-bm-017  ready\n12  x\n"
        );
    }

    #[test]
    fn fields_align() {
        let mut f = Fields::new();
        f.add("id", "1").add("host name", "a\nb");
        assert_eq!(
            f.render(2),
            "  id:         1\n  host name:  a\n              b\n"
        );
    }

    #[test]
    fn pretty_json_keeps_order_and_strings() {
        let raw = br#"{"z":1,"a":[],"s":"a,b:{c}\"","o":{"k":[1,2.50]},"e":{}}"#;
        let p = pretty_json(raw);
        assert_eq!(
            p,
            "{\n  \"z\": 1,\n  \"a\": [],\n  \"s\": \"a,b:{c}\\\"\",\n  \"o\": {\n    \"k\": [\n      1,\n      2.50\n    ]\n  },\n  \"e\": {}\n}"
        );
        let back: serde_json::Value = serde_json::from_str(&p).unwrap();
        let orig: serde_json::Value = serde_json::from_slice(raw).unwrap();
        assert_eq!(back, orig);
        assert_eq!(pretty_json(b"not json"), "not json");
    }

    #[test]
    fn times() {
        for t in [0u64, 951_782_400, 1_763_797_909, 4_102_444_799] {
            assert_eq!(parse_rfc3339(&berth_protocol::time::rfc3339(t)), Some(t));
        }
        assert_eq!(
            parse_rfc3339("2025-11-22T09:51:49.123+02:00"),
            Some(1_763_797_909)
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
        assert_eq!(ago(5), "5s ago");
        assert_eq!(ago(600), "10m ago");
        assert_eq!(ago(7200), "2h ago");
        assert_eq!(ago(200_000), "2d ago");
    }
}
