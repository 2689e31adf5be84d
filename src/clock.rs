//! Time: the record clock and the parsing of user-supplied instants. It owns
//! the rule that record time never goes back (wall clock nanoseconds,
//! clamped to previous + 1 ns, with steps reported), the TIME syntax of
//! the command line, and the units record time is counted in. It must not
//! sleep or schedule anything.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Nanoseconds since the Unix epoch (UTC).
pub type Nanos = i64;

/// Nanoseconds in a second and in a minute: record times are bucketed
/// into seconds and minutes (retention's tiers, compaction's cuts, diff's
/// seconds) with these.
pub(crate) const NS_PER_SEC: Nanos = 1_000_000_000;
pub(crate) const MINUTE_NS: Nanos = 60 * NS_PER_SEC;

/// A file's modification time from its stat, in Nanos (the time records and
/// manifests carry).
pub(crate) fn mtime_of(st: &rustix::fs::Stat) -> Nanos {
    st.st_mtime * NS_PER_SEC + st.st_mtime_nsec as Nanos
}

/// Nanos as a timespec for futimens/utimensat; the nanoseconds stay in
/// 0..1e9 for times before 1970 too (the seconds round down).
pub(crate) fn timespec(ns: Nanos) -> rustix::fs::Timespec {
    rustix::fs::Timespec {
        tv_sec: ns.div_euclid(NS_PER_SEC),
        tv_nsec: ns.rem_euclid(NS_PER_SEC) as _,
    }
}

pub fn wall_now() -> Nanos {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

/// A clock whose readings strictly increase even when the wall clock steps
/// back. A backward step larger than `STEP_REPORT_NS` is reported once so
/// the caller can record it in the timeline.
pub struct RecordClock {
    last: AtomicI64,
}

/// Backward steps at least this large are worth a timeline entry.
pub const STEP_REPORT_NS: i64 = 1_000_000;

impl RecordClock {
    pub fn new(floor: Nanos) -> RecordClock {
        RecordClock {
            last: AtomicI64::new(floor),
        }
    }

    /// Returns a timestamp > every earlier one, plus the size of a backward
    /// wall-clock step if one was just absorbed.
    pub fn tick(&self) -> (Nanos, Option<i64>) {
        let wall = wall_now();
        let mut prev = self.last.load(Ordering::Relaxed);
        loop {
            let next = wall.max(prev + 1);
            match self
                .last
                .compare_exchange_weak(prev, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    let step = prev - wall;
                    return (next, (step >= STEP_REPORT_NS).then_some(step));
                }
                Err(p) => prev = p,
            }
        }
    }

    pub fn last(&self) -> Nanos {
        self.last.load(Ordering::Acquire)
    }
}

/// A point in time the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    Latest,
    Instant(Nanos),
}

#[derive(Debug, thiserror::Error)]
#[error("cannot read time {input:?}: {why}. Use RFC 3339 (2026-11-24T12:00:05Z, fractions and offsets allowed), @UNIX_SECONDS (e.g. @1795000000.5) or \"latest\"")]
pub struct TimeError {
    pub input: String,
    pub why: String,
}

pub fn parse_at(input: &str) -> Result<At, TimeError> {
    let err = |why: &str| TimeError {
        input: input.to_string(),
        why: why.to_string(),
    };
    let s = input.trim();
    if s.eq_ignore_ascii_case("latest") {
        return Ok(At::Latest);
    }
    if let Some(num) = s.strip_prefix('@') {
        let (int, frac) = num.split_once('.').unwrap_or((num, ""));
        let secs: i64 = int
            .parse()
            .map_err(|_| err("the part after @ is not a whole number of seconds"))?;
        if frac.len() > 9 || !frac.chars().all(|c| c.is_ascii_digit()) {
            return Err(err("at most 9 fractional digits after @SECONDS."));
        }
        let frac_ns: i64 = if frac.is_empty() {
            0
        } else {
            format!("{frac:0<9}").parse().unwrap()
        };
        let ns = secs
            .checked_mul(NS_PER_SEC)
            .and_then(|v| v.checked_add(if secs < 0 { -frac_ns } else { frac_ns }))
            .ok_or_else(|| err("out of range"))?;
        return Ok(At::Instant(ns));
    }
    let dt = OffsetDateTime::parse(s, &Rfc3339).map_err(|e| err(&e.to_string()))?;
    let ns = dt.unix_timestamp_nanos();
    i64::try_from(ns)
        .map(At::Instant)
        .map_err(|_| err("out of range"))
}

/// Formats nanoseconds as RFC 3339 UTC with nanosecond precision.
pub fn fmt_ns(ns: Nanos) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(ns as i128)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("@{ns}ns"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, want: Result<At, ()>) {
        assert_eq!(parse_at(input).map_err(|_| ()), want, "input {input:?}");
    }

    #[test]
    fn parses_the_documented_forms() {
        check("latest", Ok(At::Latest));
        check(
            "2026-11-24T12:00:05Z",
            Ok(At::Instant(1_795_521_605_000_000_000)),
        );
        check(
            "2026-11-24T12:00:05.25Z",
            Ok(At::Instant(1_795_521_605_250_000_000)),
        );
        check(
            "2026-11-24T13:00:05+01:00",
            Ok(At::Instant(1_795_521_605_000_000_000)),
        );
        check(
            "2026-11-24T12:00:05.123456789Z",
            Ok(At::Instant(1_795_521_605_123_456_789)),
        );
        check("@1795521605", Ok(At::Instant(1_795_521_605_000_000_000)));
        check("@1795521605.5", Ok(At::Instant(1_795_521_605_500_000_000)));
        check("yesterday", Err(()));
        check("2026-11-24 12:00", Err(()));
        check("@12x", Err(()));
        check("", Err(()));
    }

    #[test]
    fn clock_never_goes_back() {
        let c = RecordClock::new(wall_now() + 10_000_000_000);
        let (a, step) = c.tick();
        let (b, _) = c.tick();
        assert!(b > a);
        assert!(step.is_some(), "a 10 s backward step is reported");
    }

    #[test]
    fn formats_round_trip() {
        let ns = 1_795_521_605_123_456_789;
        assert_eq!(parse_at(&fmt_ns(ns)).unwrap(), At::Instant(ns));
    }
}
