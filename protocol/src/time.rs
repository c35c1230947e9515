//! Unix times and their RFC 3339 formatting, so neither daemon needs a date crate for one
//! function.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch; a clock set before 1970 reads as 0 rather than failing.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `2026-11-22T07:51:49Z` for a count of seconds since the Unix epoch.
pub fn rfc3339(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let secs = unix_secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// Seconds since the Unix epoch of a UTC date and time; `None` for fields out of range.
pub fn unix_from_utc(
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    min: u32,
    sec: u32,
) -> Option<i64> {
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + i64::from(hour * 3600 + min * 60 + sec))
}

/// The inverse of [`civil_from_days`] (Howard Hinnant's days-from-civil).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from(if m > 2 { m - 3 } else { m + 9 });
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_763_797_909), "2025-11-22T07:51:49Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn civil_times_round_trip() {
        assert_eq!(unix_from_utc(1970, 1, 1, 0, 0, 0), Some(0));
        assert_eq!(unix_from_utc(2025, 11, 22, 7, 51, 49), Some(1_763_797_909));
        assert_eq!(unix_from_utc(2000, 2, 29, 0, 0, 0), Some(951_782_400));
        assert_eq!(unix_from_utc(2099, 12, 31, 23, 59, 59), Some(4_102_444_799));
        assert_eq!(unix_from_utc(2026, 13, 1, 0, 0, 0), None);
        for t in (0..5_000_000_000u64).step_by(86_399 * 37) {
            let text = rfc3339(t);
            let n = |r: std::ops::Range<usize>| text[r].parse::<u32>().expect("digits");
            let back = unix_from_utc(
                i64::from(n(0..4)),
                n(5..7),
                n(8..10),
                n(11..13),
                n(14..16),
                n(17..19),
            );
            assert_eq!(back, Some(t as i64), "{text}");
        }
    }
}
