//! The allocation filter language (DESIGN.md §3.3, §4.1): `column=value` conditions joined by
//! `and`. It is what i3D's `allocateWithErrors?filters=` takes (already URL-decoded), and the
//! native API's `filter` field and `GET /v1/instances?filter=` take the same text.
//!
//! ```text
//! filter    = ws* [ condition ( ws+ "and" ws+ condition )* ] ws*     ("and" in any case)
//! condition = column ws* "=" ws* value
//! value     = bare | '"' … '"' | "'" … "'"       (inside quotes: \" \' \\ are the escapes)
//! ```
//!
//! The language is deliberately this small: i3D supports nothing more, and a matchmaker that
//! writes `status!=5` or `a=1 or b=2` must be told so plainly rather than get a filter that
//! silently means something else. So every error names the byte offset, column or value, and
//! says what to write instead: the text ends up in a 400's `details`, read by whoever wrote the
//! matchmaker, who cannot read our source.
//!
//! Errors are reported for the first problem from the left, so a client fixing them one at a
//! time sees them in reading order.

use std::fmt::{self, Write as _};
use std::str::FromStr;

use crate::ErrorCode;

/// Longest filter accepted, in bytes. The controller parses filters from unauthenticated-size
/// query strings before it touches the store; a cap keeps that cheap.
pub const MAX_LEN: usize = 4096;

/// The columns a filter may name, in the order i3D documents them.
pub const COLUMNS: [&str; 9] = [
    "deploymentEnvironmentId",
    "deploymentEnvironmentName",
    "fleetId",
    "fleetName",
    "regionId",
    "regionName",
    "dcLocationId",
    "dcLocationName",
    "isVirtual",
];

/// Instance fields i3D documents as not filterable. Naming one is a distinct error
/// (`UNSUPPORTED_FILTER_COLUMN`), so a client learns the column exists but cannot be used here,
/// rather than suspecting a typo.
pub const UNSUPPORTED_COLUMNS: [&str; 20] = [
    "autoRestart",
    "liveGameVersion",
    "liveHostName",
    "liveMap",
    "liveRules",
    "manuallyDeployed",
    "markedForDeletion",
    "numPlayers",
    "numPlayersMax",
    "properties",
    "ipAddress",
    "labelReadOnly",
    "labelPublic",
    "metadata",
    "pid",
    "pidChangedAt",
    "startedAt",
    "status",
    "stoppedAt",
    "updatedAt",
];

/// Appended to every error about an operator or joiner we do not have, so the client learns the
/// whole language from one error instead of trying `<>`, `!=` and `NOT` in turn.
const ONLY_EQUALS: &str = "only `column=value` conditions joined by `and` are supported";

/// How far an echoed column or value is shown in a message; the rest is elided so a 4 KiB
/// filter does not produce a 4 KiB error detail.
const ECHO_LEN: usize = 40;

/// One `column=value` condition, with its value already typed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Condition {
    DeploymentEnvironmentId(u64),
    DeploymentEnvironmentName(String),
    FleetId(u64),
    FleetName(String),
    RegionId(u64),
    RegionName(String),
    DcLocationId(u64),
    DcLocationName(String),
    IsVirtual(bool),
}

impl Condition {
    /// The column's name as written in a filter (camelCase).
    pub fn column(&self) -> &'static str {
        match self {
            Self::DeploymentEnvironmentId(_) => "deploymentEnvironmentId",
            Self::DeploymentEnvironmentName(_) => "deploymentEnvironmentName",
            Self::FleetId(_) => "fleetId",
            Self::FleetName(_) => "fleetName",
            Self::RegionId(_) => "regionId",
            Self::RegionName(_) => "regionName",
            Self::DcLocationId(_) => "dcLocationId",
            Self::DcLocationName(_) => "dcLocationName",
            Self::IsVirtual(_) => "isVirtual",
        }
    }

    /// The value in canonical form, unquoted: `1` for ids (no leading zeros), `0`/`1` for
    /// `isVirtual` (the i3D instance object's spelling), the name itself for names. Meant for
    /// messages such as "fleetId=456 matches 40 instances".
    pub fn value_string(&self) -> String {
        match self {
            Self::DeploymentEnvironmentId(n)
            | Self::FleetId(n)
            | Self::RegionId(n)
            | Self::DcLocationId(n) => n.to_string(),
            Self::DeploymentEnvironmentName(s)
            | Self::FleetName(s)
            | Self::RegionName(s)
            | Self::DcLocationName(s) => s.clone(),
            Self::IsVirtual(b) => u8::from(*b).to_string(),
        }
    }
}

impl fmt::Display for Condition {
    /// `column=value`, quoting the value only when a bare value would not parse back the same.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value = self.value_string();
        f.write_str(self.column())?;
        f.write_char('=')?;
        if needs_quotes(&value) {
            write_quoted(f, &value)
        } else {
            f.write_str(&value)
        }
    }
}

/// A parsed filter: its conditions, in input order, each column at most once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Filter {
    pub conditions: Vec<Condition>,
}

impl Filter {
    /// Parses filter text. Empty or whitespace-only text is the filter with no conditions.
    pub fn parse(input: &str) -> Result<Self, FilterError> {
        parse(input)
    }

    /// Whether the filter has no conditions (matches every instance).
    pub fn is_empty(&self) -> bool {
        self.conditions.is_empty()
    }

    /// The `isVirtual` condition, if any. Allocation needs it on its own: an explicit
    /// `isVirtual=1` lifts the bare-metal-first rule (DESIGN.md §3.3 step 2).
    pub fn is_virtual(&self) -> Option<bool> {
        self.conditions.iter().find_map(|c| match c {
            Condition::IsVirtual(b) => Some(*b),
            _ => None,
        })
    }
}

impl FromStr for Filter {
    type Err = FilterError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s)
    }
}

impl fmt::Display for Filter {
    /// Canonical text, e.g. `regionId=1 and fleetName="arena prod"`. For any parsed filter it
    /// parses back to the same filter and is never longer than the text it was parsed from.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, condition) in self.conditions.iter().enumerate() {
            if i > 0 {
                f.write_str(" and ")?;
            }
            write!(f, "{condition}")?;
        }
        Ok(())
    }
}

/// Why a filter was refused. `Display` gives the sentence for an error body's `details`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterError {
    /// The text does not parse, or a value does not fit its column's type. `position` is a byte
    /// offset into the input, always on a character boundary, for tools that underline it; the
    /// message already states it.
    Syntax { position: usize, message: String },
    /// A column that is neither filterable nor a known unsupported field.
    UnknownColumn {
        column: String,
        /// The valid column the client most likely meant (a case or one-letter slip).
        suggestion: Option<&'static str>,
    },
    /// One of [`UNSUPPORTED_COLUMNS`].
    UnsupportedColumn { column: String },
}

impl FilterError {
    /// The error code of ERRORS.md this error is answered with (all are HTTP 400).
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Syntax { .. } => ErrorCode::InvalidFilterSyntax,
            Self::UnknownColumn { .. } => ErrorCode::InvalidFilterColumn,
            Self::UnsupportedColumn { .. } => ErrorCode::UnsupportedFilterColumn,
        }
    }

    fn syntax(position: usize, message: String) -> Self {
        Self::Syntax { position, message }
    }
}

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Syntax { message, .. } => f.write_str(message),
            Self::UnknownColumn { column, suggestion } => {
                write!(f, "unknown filter column {}; ", echo(column))?;
                if let Some(s) = suggestion {
                    write!(f, "did you mean {s}? ")?;
                }
                write!(f, "valid columns: {}", COLUMNS.join(", "))
            }
            Self::UnsupportedColumn { column } => write!(
                f,
                "filtering on `{column}` is not supported; filter on {} or {} instead",
                COLUMNS[..COLUMNS.len() - 1].join(", "),
                COLUMNS[COLUMNS.len() - 1],
            ),
        }
    }
}

impl std::error::Error for FilterError {}

/// What a column's value must be, with the constructor that builds its condition.
#[derive(Clone, Copy)]
enum Kind {
    Id(fn(u64) -> Condition),
    Name(fn(String) -> Condition),
    Bool(fn(bool) -> Condition),
}

/// [`COLUMNS`] with their types; a unit test keeps the two lists in step.
const SCHEMA: [(&str, Kind); 9] = [
    (
        "deploymentEnvironmentId",
        Kind::Id(Condition::DeploymentEnvironmentId),
    ),
    (
        "deploymentEnvironmentName",
        Kind::Name(Condition::DeploymentEnvironmentName),
    ),
    ("fleetId", Kind::Id(Condition::FleetId)),
    ("fleetName", Kind::Name(Condition::FleetName)),
    ("regionId", Kind::Id(Condition::RegionId)),
    ("regionName", Kind::Name(Condition::RegionName)),
    ("dcLocationId", Kind::Id(Condition::DcLocationId)),
    ("dcLocationName", Kind::Name(Condition::DcLocationName)),
    ("isVirtual", Kind::Bool(Condition::IsVirtual)),
];

fn parse(input: &str) -> Result<Filter, FilterError> {
    if input.len() > MAX_LEN {
        return Err(FilterError::syntax(
            floor_char_boundary(input, MAX_LEN),
            format!(
                "filter is {} bytes; at most {MAX_LEN} are allowed (shorten names or drop conditions)",
                input.len()
            ),
        ));
    }
    let mut cur = Cursor { input, pos: 0 };
    let mut conditions: Vec<Condition> = Vec::new();
    // Where each column was first named, to point at both places when it comes again.
    let mut seen: Vec<(&'static str, usize)> = Vec::new();
    cur.skip_ws();
    if cur.at_end() {
        return Ok(Filter::default());
    }
    loop {
        let at = cur.pos;
        let condition = condition(&mut cur)?;
        let column = condition.column();
        if let Some(&(_, first)) = seen.iter().find(|(c, _)| *c == column) {
            // Two values of one column can never both match, and "either" would need `or`;
            // accepting it would turn a client's bug into a silent 404.
            return Err(FilterError::syntax(
                at,
                format!(
                    "column {column} appears twice (at bytes {first} and {at}); name each column once"
                ),
            ));
        }
        seen.push((column, at));
        conditions.push(condition);

        // `condition` has made sure whitespace or the end follows the value.
        cur.skip_ws();
        if cur.at_end() {
            return Ok(Filter { conditions });
        }
        let and_at = cur.pos;
        let word = cur.take_while(is_word_char);
        if !word.eq_ignore_ascii_case("and") {
            return Err(FilterError::syntax(
                and_at,
                format!(
                    "expected `and` or the end of the filter at byte {and_at}, found {}; {ONLY_EQUALS}",
                    found(input.get(and_at..).unwrap_or(""))
                ),
            ));
        }
        let spaced = cur.skip_ws();
        if cur.at_end() {
            return Err(FilterError::syntax(
                and_at,
                format!(
                    "the filter ends with `and` at byte {and_at}; add a condition after it or remove it"
                ),
            ));
        }
        if !spaced {
            return Err(FilterError::syntax(
                cur.pos,
                format!(
                    "expected a space after `and` at byte {}, found {}",
                    cur.pos,
                    found(cur.rest())
                ),
            ));
        }
    }
}

fn condition(cur: &mut Cursor<'_>) -> Result<Condition, FilterError> {
    let at = cur.pos;
    let name = cur.take_while(is_column_char);
    if name.is_empty() {
        let message = match cur.peek() {
            Some('=') => format!(
                "expected a column name before '=' at byte {at}; write column=value, e.g. regionId=1"
            ),
            Some('"' | '\'') => format!(
                "expected a column name at byte {at}, found a quote; only values may be quoted, e.g. fleetName=\"arena prod\""
            ),
            _ => format!(
                "expected a column name at byte {at}, found {}; {ONLY_EQUALS}",
                found(cur.rest())
            ),
        };
        return Err(FilterError::syntax(at, message));
    }
    // Keywords where a column belongs: a doubled or leading `and`, or an `or`/`not` someone
    // hoped would work. These are syntax, not unknown columns.
    if ["and", "or", "not"]
        .iter()
        .any(|k| name.eq_ignore_ascii_case(k))
    {
        return Err(FilterError::syntax(
            at,
            format!("expected a condition at byte {at}, found `{name}`; {ONLY_EQUALS}"),
        ));
    }
    let (column, kind) = lookup(name)?;

    cur.skip_ws();
    let eq_at = cur.pos;
    if cur.peek() == Some('=') {
        cur.bump();
    } else if cur.at_end() {
        return Err(FilterError::syntax(
            eq_at,
            format!(
                "expected '=' after column \"{column}\" at byte {eq_at}, found the end of the filter; write {}",
                example(column, kind)
            ),
        ));
    } else {
        return Err(FilterError::syntax(
            eq_at,
            format!(
                "expected '=' after column \"{column}\" at byte {eq_at}, found {}; {ONLY_EQUALS}",
                found(cur.rest())
            ),
        ));
    }

    cur.skip_ws();
    let value_at = cur.pos;
    let raw = value(cur, column, kind)?;
    typed(column, kind, raw, value_at)
}

/// Reads one value, bare or quoted, and checks that whitespace or the end follows it.
fn value(cur: &mut Cursor<'_>, column: &str, kind: Kind) -> Result<String, FilterError> {
    let at = cur.pos;
    let (raw, quoted) = match cur.peek() {
        None => {
            return Err(FilterError::syntax(
                at,
                format!(
                    "expected a value for {column} after '=' at byte {at}, found the end of the filter; write {}",
                    example(column, kind)
                ),
            ));
        }
        Some(q @ ('"' | '\'')) => {
            cur.bump();
            (quoted_value(cur, q, column, at)?, true)
        }
        // `regionId==1`, `regionId=>1`, `regionId=!1`: an operator someone hoped for. A name
        // that really starts with one of these can still be written quoted.
        Some(c) if is_operator_char(c) => {
            return Err(FilterError::syntax(
                at,
                format!(
                    "expected a value for {column} at byte {at}, found {}; {ONLY_EQUALS} (quote a value that starts with {c:?})",
                    found(cur.rest())
                ),
            ));
        }
        Some(_) => (cur.take_while(is_bare_char).to_owned(), false),
    };
    let after = cur.pos;
    let message = match cur.peek() {
        None => return Ok(raw),
        Some(c) if c.is_whitespace() => return Ok(raw),
        Some(_) if quoted => format!(
            "expected a space or the end of the filter after the quoted value of {column} at byte {after}, found {}",
            found(cur.rest())
        ),
        Some('=') => format!(
            "unexpected '=' at byte {after} in the value of {column}; quote a value that contains '=', e.g. {column}=\"a=b\""
        ),
        // Only a quote can end a bare value otherwise.
        Some(_) => format!(
            "unexpected quote at byte {after} in the value of {column}; quote the whole value instead, e.g. {column}=\"it's\""
        ),
    };
    Err(FilterError::syntax(after, message))
}

/// Reads a quoted value after its opening quote `q` (which was at byte `open_at`).
fn quoted_value(
    cur: &mut Cursor<'_>,
    q: char,
    column: &str,
    open_at: usize,
) -> Result<String, FilterError> {
    let unterminated = || {
        FilterError::syntax(
            open_at,
            format!(
                "the quoted value of {column} starting at byte {open_at} is not closed; end it with {q}"
            ),
        )
    };
    let mut out = String::new();
    loop {
        let at = cur.pos;
        match cur.bump() {
            None => return Err(unterminated()),
            Some('\\') => match cur.bump() {
                // Either quote may be escaped in either kind of quotes, so a client that escapes
                // both out of caution is not refused.
                Some(c @ ('\\' | '"' | '\'')) => out.push(c),
                None => return Err(unterminated()),
                Some(c) => {
                    return Err(FilterError::syntax(
                        at,
                        format!(
                            "unknown escape \\{} at byte {at} in the quoted value of {column}; inside quotes only \\\\, \\\" and \\' are escapes (write \\\\ for a backslash)",
                            c.escape_debug()
                        ),
                    ));
                }
            },
            Some(c) if c == q => return Ok(out),
            Some(c) => out.push(c),
        }
    }
}

fn typed(column: &str, kind: Kind, raw: String, at: usize) -> Result<Condition, FilterError> {
    match kind {
        Kind::Id(make) => {
            // `u64::from_str` also takes a leading `+`; ids are plain digits.
            let n = if !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit()) {
                raw.parse::<u64>().ok()
            } else {
                None
            };
            n.map(make).ok_or_else(|| {
                FilterError::syntax(
                    at,
                    format!(
                        "{column} must be a non-negative integer (at most {}), got {} at byte {at}; e.g. {column}=1",
                        u64::MAX,
                        echo(&raw)
                    ),
                )
            })
        }
        Kind::Name(make) => {
            if raw.is_empty() {
                Err(FilterError::syntax(
                    at,
                    format!(
                        "{column} needs a non-empty value at byte {at}; e.g. {column}=\"arena prod\""
                    ),
                ))
            } else {
                Ok(make(raw))
            }
        }
        Kind::Bool(make) => {
            if raw == "1" || raw.eq_ignore_ascii_case("true") {
                Ok(make(true))
            } else if raw == "0" || raw.eq_ignore_ascii_case("false") {
                Ok(make(false))
            } else {
                Err(FilterError::syntax(
                    at,
                    format!(
                        "{column} must be 0 (bare metal) or 1 (virtual machine), or false/true, got {} at byte {at}",
                        echo(&raw)
                    ),
                ))
            }
        }
    }
}

fn lookup(name: &str) -> Result<(&'static str, Kind), FilterError> {
    if let Some(&(column, kind)) = SCHEMA.iter().find(|(c, _)| *c == name) {
        return Ok((column, kind));
    }
    // Unsupported fields match in any case: `Status=4` deserves "not supported", not "did you
    // mean", since no spelling of it would work.
    if UNSUPPORTED_COLUMNS
        .iter()
        .any(|c| c.eq_ignore_ascii_case(name))
    {
        return Err(FilterError::UnsupportedColumn {
            column: name.to_owned(),
        });
    }
    Err(FilterError::UnknownColumn {
        column: name.to_owned(),
        suggestion: suggest(name),
    })
}

/// The valid column `name` most likely meant: the same name in another case, or else the one
/// column within a small edit distance (1, or 2 for names of 8 characters and more), so
/// `region_id` and i3D's own documented typo `deLocationName` get a hint but `region`, which
/// could mean two columns, does not.
fn suggest(name: &str) -> Option<&'static str> {
    if let Some(c) = COLUMNS.iter().find(|c| c.eq_ignore_ascii_case(name)) {
        return Some(c);
    }
    let len = name.chars().count();
    if len > 40 {
        return None;
    }
    let limit = if len >= 8 { 2 } else { 1 };
    let mut best: Option<(usize, &'static str)> = None;
    let mut tied = false;
    for column in COLUMNS {
        let d = edit_distance(name, column);
        if d > limit {
            continue;
        }
        match best {
            Some((b, _)) if d > b => {}
            Some((b, _)) if d == b => tied = true,
            _ => {
                best = Some((d, column));
                tied = false;
            }
        }
    }
    if tied { None } else { best.map(|(_, c)| c) }
}

/// Levenshtein distance, ignoring ASCII case.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().map(|c| c.to_ascii_lowercase()).collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().map(|c| c.to_ascii_lowercase()).enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

/// A correct condition for `column`, for messages that say what to write.
fn example(column: &str, kind: Kind) -> String {
    match kind {
        Kind::Id(_) => format!("{column}=1"),
        Kind::Name(_) => format!("{column}=\"arena prod\""),
        Kind::Bool(_) => format!("{column}=1"),
    }
}

/// Characters that may form a column name. Operators and quotes end it, so `status!=5` reports
/// the operator rather than an unknown column `status!`.
fn is_column_char(c: char) -> bool {
    !c.is_whitespace()
        && !matches!(
            c,
            '=' | '!' | '<' | '>' | '~' | '"' | '\'' | '(' | ')' | ',' | '&' | '|'
        )
}

/// Characters of a bare value: anything but whitespace, quotes and `=`.
fn is_bare_char(c: char) -> bool {
    !c.is_whitespace() && !matches!(c, '=' | '"' | '\'')
}

/// Characters of the word between two conditions (which must be `and`).
fn is_word_char(c: char) -> bool {
    is_bare_char(c)
}

/// Characters that cannot start a bare value because they look like the start of an operator.
fn is_operator_char(c: char) -> bool {
    matches!(c, '=' | '!' | '<' | '>' | '~')
}

/// Whether `value` must be quoted to parse back as itself. Mirrors what [`value`] reads bare.
fn needs_quotes(value: &str) -> bool {
    value.is_empty()
        || value.starts_with(is_operator_char)
        || value.chars().any(|c| !is_bare_char(c))
}

/// Writes `value` quoted with whichever quote needs fewer escapes, which keeps the canonical
/// form no longer than any quoted form a client could have sent.
fn write_quoted(f: &mut fmt::Formatter<'_>, value: &str) -> fmt::Result {
    let doubles = value.chars().filter(|&c| c == '"').count();
    let singles = value.chars().filter(|&c| c == '\'').count();
    let q = if doubles > singles { '\'' } else { '"' };
    f.write_char(q)?;
    for c in value.chars() {
        if c == q || c == '\\' {
            f.write_char('\\')?;
        }
        f.write_char(c)?;
    }
    f.write_char(q)
}

/// A column or value as shown in a message: debug-quoted (so control characters cannot forge
/// log lines) and cut to [`ECHO_LEN`] bytes.
fn echo(s: &str) -> String {
    if s.len() <= ECHO_LEN {
        format!("{s:?}")
    } else {
        format!("{:?}…", &s[..floor_char_boundary(s, ECHO_LEN)])
    }
}

/// What a message says was found at some place: the next whitespace-delimited token.
fn found(rest: &str) -> String {
    let token = rest.split(char::is_whitespace).next().unwrap_or("");
    if token.is_empty() {
        "the end of the filter".to_owned()
    } else {
        echo(token)
    }
}

/// The largest char boundary of `s` at or below `i`.
fn floor_char_boundary(s: &str, i: usize) -> usize {
    if i >= s.len() {
        return s.len();
    }
    (0..=i).rev().find(|&j| s.is_char_boundary(j)).unwrap_or(0)
}

/// A read position in the input. `pos` only moves by whole characters, so it is always a char
/// boundary and slicing at it cannot panic.
struct Cursor<'a> {
    input: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn rest(&self) -> &'a str {
        self.input.get(self.pos..).unwrap_or("")
    }

    fn at_end(&self) -> bool {
        self.pos >= self.input.len()
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    /// Skips whitespace; says whether there was any.
    fn skip_ws(&mut self) -> bool {
        let start = self.pos;
        while self.peek().is_some_and(char::is_whitespace) {
            self.bump();
        }
        self.pos > start
    }

    fn take_while(&mut self, keep: impl Fn(char) -> bool) -> &'a str {
        let start = self.pos;
        while self.peek().is_some_and(&keep) {
            self.bump();
        }
        self.input.get(start..self.pos).unwrap_or("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Condition::*;

    fn ok(input: &str) -> Vec<Condition> {
        match Filter::parse(input) {
            Ok(f) => f.conditions,
            Err(e) => panic!("{input:?} should parse, got: {e}"),
        }
    }

    fn err(input: &str) -> FilterError {
        match Filter::parse(input) {
            Ok(f) => panic!("{input:?} should be refused, parsed as {f:?}"),
            Err(e) => e,
        }
    }

    /// A syntax error's position and message.
    fn syntax(input: &str) -> (usize, String) {
        match err(input) {
            FilterError::Syntax { position, message } => {
                assert!(
                    input.is_char_boundary(position),
                    "{input:?}: position {position} is not a char boundary"
                );
                (position, message)
            }
            other => panic!("{input:?} should be a syntax error, got {other:?}"),
        }
    }

    #[test]
    fn schema_matches_columns() {
        let names: Vec<&str> = SCHEMA.iter().map(|(c, _)| *c).collect();
        assert_eq!(names, COLUMNS);
        for column in COLUMNS {
            assert!(
                !UNSUPPORTED_COLUMNS
                    .iter()
                    .any(|u| u.eq_ignore_ascii_case(column))
            );
        }
    }

    #[test]
    fn empty_and_blank_filters_have_no_conditions() {
        for input in ["", " ", "\t\n  \r", "\u{3000}"] {
            let f = Filter::parse(input).expect("blank parses");
            assert!(f.is_empty());
            assert_eq!(f.is_virtual(), None);
            assert_eq!(f.to_string(), "");
        }
    }

    #[test]
    fn the_documented_examples() {
        assert_eq!(
            ok("regionId=1 and fleetId=456"),
            vec![RegionId(1), FleetId(456)]
        );
        assert_eq!(
            ok("regionName=eu-west-1 and isVirtual=0"),
            vec![RegionName("eu-west-1".into()), IsVirtual(false)]
        );
    }

    #[test]
    fn every_column_with_its_type() {
        assert_eq!(
            ok(
                "deploymentEnvironmentId=1 and deploymentEnvironmentName=production and fleetId=2 \
                and fleetName=arena-prod and regionId=3 and regionName=eu-west-1 and \
                dcLocationId=4 and dcLocationName=ams1 and isVirtual=1"
            ),
            vec![
                DeploymentEnvironmentId(1),
                DeploymentEnvironmentName("production".into()),
                FleetId(2),
                FleetName("arena-prod".into()),
                RegionId(3),
                RegionName("eu-west-1".into()),
                DcLocationId(4),
                DcLocationName("ams1".into()),
                IsVirtual(true),
            ]
        );
    }

    #[test]
    fn and_is_case_insensitive_and_whitespace_is_free() {
        let want = vec![RegionId(1), FleetId(2), IsVirtual(false)];
        for input in [
            "regionId=1 and fleetId=2 and isVirtual=0",
            "regionId=1 AND fleetId=2 And isVirtual=0",
            "regionId=1 aNd fleetId=2 anD isVirtual=0",
            "  regionId = 1\tand\n fleetId =2  and isVirtual= 0  ",
            "regionId=1\u{a0}and\u{2003}fleetId=2 and isVirtual=0",
        ] {
            assert_eq!(ok(input), want, "{input:?}");
        }
    }

    #[test]
    fn conditions_keep_input_order() {
        assert_eq!(
            ok("isVirtual=1 and regionId=9 and fleetName=a"),
            vec![IsVirtual(true), RegionId(9), FleetName("a".into())]
        );
    }

    #[test]
    fn quoted_values() {
        assert_eq!(
            ok(r#"fleetName="arena prod""#),
            vec![FleetName("arena prod".into())]
        );
        assert_eq!(
            ok("fleetName='arena prod'"),
            vec![FleetName("arena prod".into())]
        );
        assert_eq!(
            ok(r#"fleetName="a \"b\" c""#),
            vec![FleetName(r#"a "b" c"#.into())]
        );
        assert_eq!(ok(r"fleetName='it\'s'"), vec![FleetName("it's".into())]);
        assert_eq!(
            ok(r#"fleetName='say "hi"'"#),
            vec![FleetName(r#"say "hi""#.into())]
        );
        assert_eq!(ok(r#"fleetName="c:\\x""#), vec![FleetName(r"c:\x".into())]);
        // Either quote may be escaped in either quotes.
        assert_eq!(ok(r#"fleetName="\'""#), vec![FleetName("'".into())]);
        // Quotes make `=`, `and` and operators plain text.
        assert_eq!(
            ok(r#"fleetName="a=b and c" and regionName='!x'"#),
            vec![FleetName("a=b and c".into()), RegionName("!x".into())]
        );
        // Ids and isVirtual may be quoted too.
        assert_eq!(
            ok(r#"regionId="7" and isVirtual='true'"#),
            vec![RegionId(7), IsVirtual(true)]
        );
        // A bare value keeps a backslash as it is.
        assert_eq!(ok(r"fleetName=a\b"), vec![FleetName(r"a\b".into())]);
    }

    #[test]
    fn bad_quoting() {
        let (pos, msg) = syntax(r#"fleetName="arena"#);
        assert_eq!(pos, 10);
        assert!(
            msg.contains("not closed") && msg.contains("byte 10"),
            "{msg}"
        );
        let (pos, msg) = syntax(r#"fleetName="arena\"#);
        assert_eq!(pos, 10, "{msg}");
        let (pos, msg) = syntax(r#"fleetName="a\nb""#);
        assert_eq!(pos, 12);
        assert!(msg.contains(r"unknown escape \n"), "{msg}");
        let (pos, msg) = syntax(r#"fleetName="a"b"#);
        assert_eq!(pos, 13);
        assert!(msg.contains("after the quoted value of fleetName"), "{msg}");
        let (pos, msg) = syntax(r#"fleetName="a"and regionId=1"#);
        assert_eq!(pos, 13, "{msg}");
        let (pos, msg) = syntax("fleetName=it's");
        assert_eq!(pos, 12);
        assert!(msg.contains("quote the whole value"), "{msg}");
        let (pos, msg) = syntax(r#"regionId="1"#);
        assert_eq!(pos, 9, "{msg}");
        let (pos, msg) = syntax(r#""fleetName"=a"#);
        assert_eq!(pos, 0);
        assert!(msg.contains("only values may be quoted"), "{msg}");
    }

    #[test]
    fn id_values_are_unsigned_integers() {
        assert_eq!(ok("fleetId=0"), vec![FleetId(0)]);
        assert_eq!(ok("fleetId=007"), vec![FleetId(7)]);
        assert_eq!(ok("fleetId=18446744073709551615"), vec![FleetId(u64::MAX)]);
        for bad in [
            "abc",
            "-1",
            "+1",
            "1.0",
            "1e3",
            "0x10",
            "18446744073709551616",
            "１",
        ] {
            let input = format!("fleetId={bad}");
            let (pos, msg) = syntax(&input);
            assert_eq!(pos, 8, "{input}");
            assert!(
                msg.contains("fleetId must be a non-negative integer")
                    && msg.contains(&format!("{bad:?}"))
                    && msg.contains("byte 8"),
                "{msg}"
            );
        }
        let (_, msg) = syntax(r#"regionId="""#);
        assert!(msg.contains(r#"got """#), "{msg}");
    }

    #[test]
    fn is_virtual_values() {
        for (v, want) in [
            ("0", false),
            ("1", true),
            ("true", true),
            ("false", false),
            ("TRUE", true),
            ("False", false),
        ] {
            let f = Filter::parse(&format!("isVirtual={v}")).expect("valid");
            assert_eq!(f.is_virtual(), Some(want), "{v}");
            assert_eq!(f.to_string(), format!("isVirtual={}", u8::from(want)));
        }
        for bad in ["2", "yes", "01", "-0", "t"] {
            let (pos, msg) = syntax(&format!("isVirtual={bad}"));
            assert_eq!(pos, 10);
            assert!(
                msg.contains("isVirtual must be 0") && msg.contains(bad),
                "{msg}"
            );
        }
        assert_eq!(
            Filter::parse("regionId=1 and isVirtual=1")
                .expect("valid")
                .is_virtual(),
            Some(true)
        );
        assert_eq!(
            Filter::parse("regionId=1").expect("valid").is_virtual(),
            None
        );
    }

    #[test]
    fn names_must_not_be_empty() {
        for input in [r#"fleetName="""#, "regionName=''"] {
            let (_, msg) = syntax(input);
            assert!(msg.contains("needs a non-empty value"), "{msg}");
        }
        assert_eq!(ok("regionName=東京"), vec![RegionName("東京".into())]);
    }

    #[test]
    fn missing_value_or_equals() {
        let (pos, msg) = syntax("regionId");
        assert_eq!(pos, 8);
        assert!(
            msg.starts_with(r#"expected '=' after column "regionId" at byte 8"#),
            "{msg}"
        );
        assert!(msg.contains("regionId=1"), "{msg}");
        let (pos, msg) = syntax("regionId and fleetId=1");
        assert_eq!(pos, 9);
        assert!(msg.contains(r#"found "and""#), "{msg}");
        let (pos, msg) = syntax("regionId=");
        assert_eq!(pos, 9);
        assert!(msg.contains("expected a value for regionId"), "{msg}");
        let (pos, msg) = syntax("regionId=   ");
        assert_eq!(pos, 12, "{msg}");
        let (pos, msg) = syntax("=1");
        assert_eq!(pos, 0);
        assert!(msg.contains("expected a column name before '='"), "{msg}");
    }

    #[test]
    fn other_operators_and_joiners_are_refused_plainly() {
        for (input, pos) in [
            ("regionId!=1", 8),
            ("regionId<1", 8),
            ("regionId>1", 8),
            ("regionId<=1", 8),
            ("regionId>=1", 8),
            ("regionId<>1", 8),
            ("regionId==1", 9),
            ("regionId=>1", 9),
            ("regionId=!1", 9),
            ("regionName like 'eu%'", 11),
            ("regionId in (1,2)", 9),
            ("regionId=1 or fleetId=2", 11),
            ("regionId=1 OR fleetId=2", 11),
            ("regionId=1 || fleetId=2", 11),
            ("regionId=1 && fleetId=2", 11),
            ("regionId=1 fleetId=2", 11),
            ("regionId=1, fleetId=2", 9),
            ("not regionId=1", 0),
            ("or regionId=1", 0),
            ("(regionId=1)", 0),
            ("regionId=1 and (fleetId=2)", 15),
            ("regionId=1 and and fleetId=2", 15),
            ("and regionId=1", 0),
        ] {
            let e = err(input);
            assert_eq!(e.code(), ErrorCode::InvalidFilterSyntax, "{input}: {e}");
            let (got, msg) = syntax(input);
            assert_eq!(got, pos, "{input}: {msg}");
            assert!(
                msg.contains(ONLY_EQUALS) || input.contains(','),
                "{input}: {msg}"
            );
        }
        // The column is looked up before the operator is read, and no operator would make
        // `status` filterable, so that is the error to report.
        for input in ["status!=5", "status != 5", "numPlayers<10"] {
            assert!(
                matches!(err(input), FilterError::UnsupportedColumn { .. }),
                "{input}"
            );
        }
    }

    #[test]
    fn stray_and() {
        let (pos, msg) = syntax("regionId=1 and");
        assert_eq!(pos, 11);
        assert!(msg.contains("ends with `and`"), "{msg}");
        let (pos, msg) = syntax("regionId=1 and   ");
        assert_eq!(pos, 11, "{msg}");
        let (pos, msg) = syntax(r#"regionId=1 and"fleetName"=x"#);
        assert_eq!(pos, 14, "{msg}");
        // `andfleetId` is one word, not `and` + a column.
        let (pos, msg) = syntax("regionId=1 andfleetId=2");
        assert_eq!(pos, 11);
        assert!(msg.contains(r#"found "andfleetId=2""#), "{msg}");
    }

    #[test]
    fn a_column_may_appear_once() {
        let (pos, msg) = syntax("regionId=1 and fleetId=2 and regionId=3");
        assert_eq!(pos, 29);
        assert!(
            msg.contains("column regionId appears twice (at bytes 0 and 29)"),
            "{msg}"
        );
        // Different columns about the same entity are fine.
        assert_eq!(
            ok("regionId=1 and regionName=eu-west-1"),
            vec![RegionId(1), RegionName("eu-west-1".into())]
        );
    }

    #[test]
    fn unknown_columns_name_themselves_and_the_valid_ones() {
        let e = err("region=1");
        assert_eq!(e.code(), ErrorCode::InvalidFilterColumn);
        assert_eq!(
            e,
            FilterError::UnknownColumn {
                column: "region".into(),
                suggestion: None
            }
        );
        assert_eq!(
            e.to_string(),
            "unknown filter column \"region\"; valid columns: deploymentEnvironmentId, \
             deploymentEnvironmentName, fleetId, fleetName, regionId, regionName, dcLocationId, \
             dcLocationName, isVirtual"
        );
        for (input, want) in [
            ("RegionId=1", "regionId"),
            ("regionid=1", "regionId"),
            ("ISVIRTUAL=1", "isVirtual"),
            ("region_id=1", "regionId"),
            ("deLocationName=x", "dcLocationName"),
            ("fleetNam=x", "fleetName"),
            ("dc_location_id=1", "dcLocationId"),
        ] {
            match err(input) {
                FilterError::UnknownColumn { suggestion, .. } => {
                    assert_eq!(suggestion, Some(want), "{input}")
                }
                other => panic!("{input}: {other:?}"),
            }
        }
        let msg = err("RegionId=1").to_string();
        assert!(
            msg.starts_with("unknown filter column \"RegionId\"; did you mean regionId? valid columns: deploymentEnvironmentId"),
            "{msg}"
        );
        for input in ["foo=1", "labels.map=x", "x=1", "région=1"] {
            assert!(
                matches!(
                    err(input),
                    FilterError::UnknownColumn {
                        suggestion: None,
                        ..
                    }
                ),
                "{input}"
            );
        }
    }

    #[test]
    fn unsupported_columns_are_their_own_error() {
        for column in UNSUPPORTED_COLUMNS {
            let e = err(&format!("{column}=1"));
            assert_eq!(e.code(), ErrorCode::UnsupportedFilterColumn);
            assert_eq!(
                e.to_string(),
                format!(
                    "filtering on `{column}` is not supported; filter on deploymentEnvironmentId, \
                     deploymentEnvironmentName, fleetId, fleetName, regionId, regionName, \
                     dcLocationId, dcLocationName or isVirtual instead"
                )
            );
        }
        assert_eq!(
            err("regionId=1 and Status=4"),
            FilterError::UnsupportedColumn {
                column: "Status".into()
            }
        );
    }

    #[test]
    fn error_codes_are_all_400() {
        for e in [err("regionId"), err("foo=1"), err("pid=1")] {
            assert_eq!(e.code().http_status(), 400);
        }
    }

    #[test]
    fn length_limit() {
        // Exactly 4096 bytes parses.
        let name = "n".repeat(MAX_LEN - "fleetName=".len());
        let input = format!("fleetName={name}");
        assert_eq!(input.len(), MAX_LEN);
        assert_eq!(ok(&input), vec![FleetName(name)]);
        let (pos, msg) = syntax(&format!("{input} "));
        assert!(pos <= MAX_LEN);
        assert_eq!(
            msg,
            "filter is 4097 bytes; at most 4096 are allowed (shorten names or drop conditions)"
        );
        // The limit falls inside a multi-byte character: still no panic, boundary position.
        let wide = format!("fleetName={}", "é".repeat(3000));
        let (pos, _) = syntax(&wide);
        assert!(wide.is_char_boundary(pos) && pos <= MAX_LEN);
    }

    #[test]
    fn long_echoes_are_cut() {
        let input = format!("fleetId={}", "9".repeat(1000));
        let (_, msg) = syntax(&input);
        assert!(msg.len() < 300, "{msg}");
        assert!(msg.contains('…'), "{msg}");
        let input = format!("{}=1", "é".repeat(100));
        let msg = err(&input).to_string();
        assert!(msg.len() < 400, "{msg}");
    }

    #[test]
    fn control_characters_are_escaped_in_messages() {
        let msg = err("fleetId=1\u{1b}[31m").to_string();
        assert!(!msg.contains('\u{1b}'), "{msg}");
        let msg = err("a\u{7}b=1").to_string();
        assert!(!msg.contains('\u{7}'), "{msg}");
    }

    #[test]
    fn multibyte_input_never_lands_between_bytes() {
        for input in [
            "é",
            "é=1",
            "regionId=é",
            "regionId é",
            "regionId=1 é",
            "regionId=1 andé",
            "fleetName=\"é",
            "fleetName=\"\\é\"",
            "fleetName=\"a\"é",
            "fleetName=a'é",
            "isVirtual=é",
            "😀😀😀",
            "regionId=1 and 😀=2",
            "regionId\u{2003}=\u{2003}1",
        ] {
            if let Err(FilterError::Syntax { position, .. }) = Filter::parse(input) {
                assert!(input.is_char_boundary(position), "{input:?} at {position}");
            }
        }
        assert_eq!(ok("regionId\u{2003}=\u{2003}1"), vec![RegionId(1)]);
    }

    #[test]
    fn display_is_canonical_and_parses_back() {
        for (input, canonical) in [
            ("regionId=1 and fleetId=456", "regionId=1 and fleetId=456"),
            (
                " regionId = 01  AND isVirtual=true ",
                "regionId=1 and isVirtual=1",
            ),
            (r#"fleetName="arena prod""#, r#"fleetName="arena prod""#),
            (r#"fleetName="arena""#, "fleetName=arena"),
            ("fleetName='a=b'", r#"fleetName="a=b""#),
            (r#"fleetName="say \"hi\"""#, r#"fleetName='say "hi"'"#),
            (r#"fleetName="it's""#, r#"fleetName="it's""#),
            (r#"fleetName="a\\ b""#, r#"fleetName="a\\ b""#),
            (r"fleetName=a\b", r"fleetName=a\b"),
            (r#"fleetName="!x""#, r#"fleetName="!x""#),
            (r#"fleetName="and""#, "fleetName=and"),
            ("regionName=東京", "regionName=東京"),
            ("", ""),
        ] {
            let f = Filter::parse(input).expect("valid");
            assert_eq!(f.to_string(), canonical, "{input:?}");
            assert_eq!(Filter::parse(canonical), Ok(f.clone()), "{canonical:?}");
            assert!(canonical.len() <= input.len() || input.is_empty());
        }
        let both = FleetName(r#"'a' "b" ""#.into());
        let f = Filter {
            conditions: vec![both.clone()],
        };
        assert_eq!(f.to_string(), r#"fleetName='\'a\' "b" "'"#);
        assert_eq!(Filter::parse(&f.to_string()), Ok(f));
    }

    #[test]
    fn condition_accessors() {
        assert_eq!(RegionId(1).column(), "regionId");
        assert_eq!(RegionId(1).value_string(), "1");
        assert_eq!(FleetName("a b".into()).value_string(), "a b");
        assert_eq!(FleetName("a b".into()).to_string(), r#"fleetName="a b""#);
        assert_eq!(IsVirtual(false).value_string(), "0");
        assert_eq!(
            "regionId=1".parse::<Filter>(),
            Ok(Filter {
                conditions: vec![RegionId(1)]
            })
        );
    }

    #[test]
    fn edit_distance_basics() {
        assert_eq!(edit_distance("", ""), 0);
        assert_eq!(edit_distance("abc", ""), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("RegionID", "regionId"), 0);
    }
}
