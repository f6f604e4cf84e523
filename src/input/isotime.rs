//! Timestamps as the reference reads and prints them.
//!
//! `created` and `mtime` go through Python 3.11's `datetime.fromisoformat`;
//! `created` is printed back with `datetime.isoformat()` (so `...Z` becomes
//! `...+00:00`, microseconds appear only when non-zero) and file mtimes are
//! `int(dt.timestamp())` (truncated toward zero; a naive time is local time).
//! `"now"` is one instant shared by both keys, as in the reference.

use std::fmt::Write as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    pub year: i32,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    pub micro: u32,
    /// UTC offset in microseconds; `None` for a naive time.
    pub offset_us: Option<i64>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid ISO 8601 time {0:?} (expected e.g. 1970-01-01T00:00:01Z or \"now\")")]
pub struct TimeError(pub String);

impl DateTime {
    /// The current time in UTC with microsecond precision.
    pub fn now_utc() -> DateTime {
        let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let us = d.as_micros() as i64;
        from_unix_micros(us)
    }

    /// `datetime.fromisoformat` for the forms Python 3.11 accepts that make
    /// sense here: `YYYY-MM-DD` or `YYYYMMDD`, optionally followed by any one
    /// separator character and `HH[:MM[:SS[.f...]]]` (or the compact forms),
    /// optionally followed by `Z` or `±HH[:MM[:SS[.ffffff]]]`.
    pub fn parse_iso(s: &str) -> Result<DateTime, TimeError> {
        let err = || TimeError(s.to_string());
        let b = s.as_bytes();
        // `get`, not indexing: a multi-byte character may sit at the cut
        // (found by fuzzing: "2024-05-0\u{1ab}12:34:56Z" panicked).
        let (year, month, day, rest) = if b.len() >= 10 && b[4] == b'-' && b[7] == b'-' {
            (num(&b[0..4]), num(&b[5..7]), num(&b[8..10]), s.get(10..).ok_or_else(err)?)
        } else if b.len() >= 8 && b[..8].iter().all(u8::is_ascii_digit) {
            (num(&b[0..4]), num(&b[4..6]), num(&b[6..8]), s.get(8..).ok_or_else(err)?)
        } else {
            return Err(err());
        };
        let (year, month, day) = (year.ok_or_else(err)?, month.ok_or_else(err)?, day.ok_or_else(err)?);
        if !(1..=9999).contains(&year)
            || !(1..=12).contains(&month)
            || day == 0
            || day > days_in_month(year as i32, month)
        {
            return Err(err());
        }
        let mut dt =
            DateTime { year: year as i32, month, day, hour: 0, minute: 0, second: 0, micro: 0, offset_us: None };
        let mut chars = rest.chars();
        if chars.next().is_none() {
            return Ok(dt);
        }
        let time = chars.as_str();
        let tz_at = time.find(['Z', '+', '-']).unwrap_or(time.len());
        let (clock, tz) = time.split_at(tz_at);
        let (h, m, sec, us) = parse_clock(clock).ok_or_else(err)?;
        if h > 23 || m > 59 || sec > 59 {
            return Err(err());
        }
        dt.hour = h;
        dt.minute = m;
        dt.second = sec;
        dt.micro = us;
        if !tz.is_empty() {
            dt.offset_us = Some(if tz == "Z" {
                0
            } else {
                let sign = if tz.starts_with('-') { -1 } else { 1 };
                let (oh, om, os, ous) = parse_clock(&tz[1..]).ok_or_else(err)?;
                if oh > 23 || om > 59 || os > 59 {
                    return Err(err());
                }
                sign * ((i64::from(oh) * 3600 + i64::from(om) * 60 + i64::from(os)) * 1_000_000 + i64::from(ous))
            });
        }
        Ok(dt)
    }

    /// `datetime.isoformat()`.
    pub fn isoformat(&self) -> String {
        let mut s = format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        );
        if self.micro != 0 {
            let _ = write!(s, ".{:06}", self.micro);
        }
        if let Some(off) = self.offset_us {
            let sign = if off < 0 { '-' } else { '+' };
            let a = off.unsigned_abs();
            let (secs, us) = (a / 1_000_000, a % 1_000_000);
            let _ = write!(s, "{sign}{:02}:{:02}", secs / 3600, secs / 60 % 60);
            if secs % 60 != 0 || us != 0 {
                let _ = write!(s, ":{:02}", secs % 60);
            }
            if us != 0 {
                let _ = write!(s, ".{us:06}");
            }
        }
        s
    }

    /// `int(dt.timestamp())`; a naive time is taken as local time, as Python does.
    pub fn timestamp_secs(&self) -> i64 {
        let days = days_from_civil(self.year, self.month, self.day);
        let local_us =
            ((days * 86_400 + i64::from(self.hour) * 3600 + i64::from(self.minute) * 60 + i64::from(self.second))
                * 1_000_000)
                + i64::from(self.micro);
        let offset = match self.offset_us {
            Some(o) => o,
            None => local_offset_us(local_us / 1_000_000),
        };
        (local_us - offset) / 1_000_000 // truncates toward zero, like int()
    }
}

fn num(b: &[u8]) -> Option<u32> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// `HH`, `HH:MM`, `HH:MM:SS`, `HHMM`, `HHMMSS`, each with an optional
/// `.fff` / `,fff` fraction (digits past six are dropped, as in 3.11).
fn parse_clock(s: &str) -> Option<(u32, u32, u32, u32)> {
    let (main, frac) = match s.find(['.', ',']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let b = main.as_bytes();
    let parts: Vec<&[u8]> = if main.contains(':') { b.split(|&c| c == b':').collect() } else { b.chunks(2).collect() };
    if parts.is_empty() || parts.len() > 3 || parts.iter().any(|p| p.len() != 2) {
        return None;
    }
    let mut v = [0u32; 3];
    for (i, p) in parts.iter().enumerate() {
        v[i] = num(p)?;
    }
    let mut us = 0;
    if let Some(f) = frac {
        if parts.len() != 3 || f.is_empty() || !f.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let six = &f[..f.len().min(6)];
        us = six.parse::<u32>().ok()? * 10u32.pow(6 - six.len() as u32);
    }
    Some((v[0], v[1], v[2], us))
}

fn is_leap(y: i32) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i32, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if is_leap(y) => 29,
        _ => 28,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i32, m: u32, d: u32) -> i64 {
    let y = i64::from(y) - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn from_unix_micros(us: i64) -> DateTime {
    let secs = us.div_euclid(1_000_000);
    let micro = us.rem_euclid(1_000_000) as u32;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
    DateTime {
        year,
        month,
        day,
        hour: (sod / 3600) as u32,
        minute: (sod / 60 % 60) as u32,
        second: (sod % 60) as u32,
        micro,
        offset_us: Some(0),
    }
}

/// The local UTC offset at a local wall-clock time, from the C library
/// (honours `TZ`; UTC in a Nix build sandbox).
fn local_offset_us(local_secs: i64) -> i64 {
    // SAFETY: localtime_r writes into the tm we own; the input is a plain integer.
    unsafe {
        let t = local_secs as libc::time_t;
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return 0;
        }
        // First guess at the offset, then evaluate it at the corrected instant.
        let guess = tm.tm_gmtoff;
        let t2 = (local_secs - guess) as libc::time_t;
        if libc::localtime_r(&t2, &mut tm).is_null() {
            return guess * 1_000_000;
        }
        tm.tm_gmtoff * 1_000_000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> DateTime {
        DateTime::parse_iso(s).unwrap()
    }

    #[test]
    fn z_becomes_plus_zero_and_timestamp() {
        let d = p("1970-01-01T00:00:01Z");
        assert_eq!(d.isoformat(), "1970-01-01T00:00:01+00:00");
        assert_eq!(d.timestamp_secs(), 1);
        assert_eq!(p("2024-05-01T12:34:56Z").timestamp_secs(), 1_714_566_896);
    }

    #[test]
    fn offsets_and_fractions() {
        let d = p("2024-05-01T12:34:56.5+02:00");
        assert_eq!(d.isoformat(), "2024-05-01T12:34:56.500000+02:00");
        assert_eq!(d.timestamp_secs(), 1_714_566_896 - 7200);
        assert_eq!(p("2024-05-01T12:34:56-0130").isoformat(), "2024-05-01T12:34:56-01:30");
        assert_eq!(p("2024-05-01 12:34").isoformat(), "2024-05-01T12:34:00");
        assert_eq!(p("20240501T123456Z").isoformat(), "2024-05-01T12:34:56+00:00");
        assert_eq!(p("2024-05-01").isoformat(), "2024-05-01T00:00:00");
    }

    #[test]
    fn negative_timestamps_truncate_toward_zero() {
        assert_eq!(p("1969-12-31T23:59:59.5Z").timestamp_secs(), 0);
        assert_eq!(p("1969-12-31T23:59:58Z").timestamp_secs(), -2);
    }

    #[test]
    fn rejects_garbage() {
        for s in
            ["", "yesterday", "2024-13-01", "2024-02-30", "2024-05-01T25:00", "2024-05-01T12:34:56+", "2024-05-01T12:3"]
        {
            assert!(DateTime::parse_iso(s).is_err(), "{s}");
        }
    }

    #[test]
    fn multibyte_characters_at_the_cut_are_errors_not_panics() {
        // Fuzzing found the first: a two-byte character across byte 10.
        for s in
            ["2024-05-0\u{1ab}12:34:56Z", "2024050\u{1ab}T1234", "2024-05-01\u{e9}12:00", "2024-05-01T12:00\u{1ab}"]
        {
            let _ = DateTime::parse_iso(s);
        }
        assert!(DateTime::parse_iso("2024-05-0\u{1ab}12:34:56Z").is_err());
    }

    #[test]
    fn now_round_trips_through_civil_conversion() {
        let n = DateTime::now_utc();
        let again = p(&n.isoformat());
        assert_eq!(n, again);
        assert_eq!(from_unix_micros(0).isoformat(), "1970-01-01T00:00:00+00:00");
        assert_eq!(from_unix_micros(951_782_400_000_000).isoformat(), "2000-02-29T00:00:00+00:00");
    }
}
