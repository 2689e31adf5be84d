//! The daemon's decisions, as pure functions of what it has read: which
//! lineage a start continues or begins and which base it needs, where the
//! journal resumes in the store, when a periodic base is due, and which
//! exit status a shutdown gives. It must not do I/O or log; the wiring in
//! `run` reads the inputs, logs the outcome and acts on it.

use std::time::Duration;

use crate::base::BaseKind;
use crate::clock::Nanos;
use crate::layout::LocalState;
use crate::record::Seq;
use crate::timeline::{LineageId, Timeline};

/// Why a start chose its lineage and base; the wiring logs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Why {
    /// No state file: this journal directory was never used.
    FirstStart,
    /// The previous run did not stop cleanly and the machine restarted
    /// since: fsync waited for the journal alone, so the source may have
    /// lost what the journal holds.
    MachineCrash,
    /// The previous run did not stop cleanly on this boot: the source holds
    /// everything, but maybe changes no record describes.
    ProcessCrash,
    /// The previous run stopped cleanly and the store holds a base of its
    /// lineage.
    Clean,
    /// The previous run stopped cleanly, but the store holds no base of its
    /// lineage (or did not answer): a repair base makes it restorable.
    CleanWithoutBase,
}

/// What a start does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Start {
    pub why: Why,
    pub lineage: LineageId,
    /// The lineage the journal's existing files belong to: the previous
    /// run's, or `lineage` when there was none.
    pub journal_lineage: LineageId,
    /// The base the start needs before the volume counts as protected;
    /// None when the stored bases and the journal already cover it.
    pub base: Option<BaseKind>,
}

impl Start {
    /// The reason a new lineage's marker records, when the start begins one.
    pub(crate) fn new_lineage(&self) -> Option<&'static str> {
        match self.why {
            Why::FirstStart => Some("first-start"),
            Why::MachineCrash => Some("machine-crash"),
            _ => None,
        }
    }

    /// After a machine crash the journal is redone onto the source before
    /// anything reads it.
    pub(crate) fn redo(&self) -> bool {
        self.why == Why::MachineCrash
    }
}

/// Chooses the lineage and base of a start: continue the lineage after a
/// clean stop or a process crash (with a repair base after a crash), begin
/// `fresh` after a machine crash or on first use. `based` lists the
/// lineages with a stored base, None when the store did not answer.
pub(crate) fn start(
    prev: Option<&LocalState>,
    boot_id: &str,
    based: Option<&[LineageId]>,
    fresh: LineageId,
) -> Start {
    let Some(p) = prev else {
        return Start {
            why: Why::FirstStart,
            lineage: fresh,
            journal_lineage: fresh,
            base: Some(BaseKind::Initial),
        };
    };
    let (why, lineage, base) = if !p.clean && p.boot_id != boot_id {
        (Why::MachineCrash, fresh, Some(BaseKind::Initial))
    } else if !p.clean {
        (Why::ProcessCrash, p.lineage, Some(BaseKind::Repair))
    } else if based.is_some_and(|b| b.contains(&p.lineage)) {
        (Why::Clean, p.lineage, None)
    } else {
        (Why::CleanWithoutBase, p.lineage, Some(BaseKind::Repair))
    };
    Start {
        why,
        lineage,
        journal_lineage: p.lineage,
        base,
    }
}

/// Where shipping resumes: the highest seq the store holds (of segments,
/// or covered by a base), and the newest time it has seen, below which the
/// journal's clock must not go.
pub(crate) fn resume(t: &Timeline) -> (Seq, Nanos) {
    let stored = t
        .segments
        .iter()
        .map(|s| s.last_seq)
        .chain(t.bases.iter().map(|b| b.start_seq))
        .max()
        .unwrap_or(0);
    let floor = t
        .segments
        .iter()
        .map(|s| s.last_ns)
        .chain(t.heartbeats.iter().map(|h| h.ns))
        .max()
        .unwrap_or(0);
    (stored, floor)
}

/// What the base thread does next between periodic bases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Periodic {
    /// Neither the interval nor the byte budget has run out.
    Wait,
    /// A base is due but nothing was appended since the last one: a restore
    /// from it replays nothing, so the interval starts again.
    Idle,
    /// Take a base; the reason goes to the log.
    Take(String),
}

/// `since` journal bytes were appended and `elapsed` passed since the last
/// base started; `appended` says whether any record was appended since.
pub(crate) fn periodic(
    since: u64,
    after: u64,
    elapsed: Duration,
    interval: Duration,
    appended: bool,
) -> Periodic {
    let why = if since >= after {
        format!("{since} journal bytes since the last base (--base-after {after})")
    } else if elapsed >= interval {
        format!("{elapsed:?} since the last base (--base-interval)")
    } else {
        return Periodic::Wait;
    };
    if appended {
        Periodic::Take(why)
    } else {
        Periodic::Idle
    }
}

/// How a shutdown ended; each has its own exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stopped {
    /// Everything is stored and a base covers the lineage: the next start
    /// continues without redo or repair.
    Clean,
    /// Records did not all reach the store; the journal keeps them.
    Unshipped,
    /// Every record is stored, but the base the start needed did not
    /// complete; the next start takes one.
    WithoutBase,
    /// The journal failed during the run: what it held is stored, but the
    /// source may hold changes it lost, so the next start takes a repair
    /// base.
    JournalFailed,
}

impl Stopped {
    pub(crate) fn exit_code(self) -> i32 {
        match self {
            Stopped::Clean => 0,
            Stopped::Unshipped => 2,
            Stopped::WithoutBase => 3,
            Stopped::JournalFailed => 4,
        }
    }
}

/// `shipped`: the final round succeeded and the store holds the journal's
/// last record.
pub(crate) fn stopped(shipped: bool, journal_failed: bool, base_done: bool) -> Stopped {
    match (shipped, journal_failed, base_done) {
        (false, _, _) => Stopped::Unshipped,
        (true, true, _) => Stopped::JournalFailed,
        (true, false, true) => Stopped::Clean,
        (true, false, false) => Stopped::WithoutBase,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::BaseMeta;
    use crate::segment::SegmentMeta;
    use crate::timeline::Heartbeat;

    const OLD: LineageId = LineageId(0xa);
    const FRESH: LineageId = LineageId(0xf);
    const OTHER: LineageId = LineageId(0xb);

    fn state(clean: bool, boot: &str) -> LocalState {
        LocalState {
            volume: "v".into(),
            lineage: OLD,
            boot_id: boot.into(),
            clean,
        }
    }

    #[test]
    fn start_chooses_lineage_and_base() {
        use BaseKind::*;
        // (previous state, store's lineages with a base, expected why,
        //  lineage, base); this boot is "b1".
        let cases: &[(
            Option<LocalState>,
            Option<&[LineageId]>,
            Why,
            LineageId,
            Option<BaseKind>,
        )] = &[
            (None, Some(&[]), Why::FirstStart, FRESH, Some(Initial)),
            (None, None, Why::FirstStart, FRESH, Some(Initial)),
            (None, Some(&[OLD]), Why::FirstStart, FRESH, Some(Initial)),
            (
                Some(state(false, "b0")),
                Some(&[OLD]),
                Why::MachineCrash,
                FRESH,
                Some(Initial),
            ),
            (
                Some(state(false, "b0")),
                None,
                Why::MachineCrash,
                FRESH,
                Some(Initial),
            ),
            (
                Some(state(false, "b1")),
                Some(&[OLD]),
                Why::ProcessCrash,
                OLD,
                Some(Repair),
            ),
            (
                Some(state(false, "b1")),
                None,
                Why::ProcessCrash,
                OLD,
                Some(Repair),
            ),
            (Some(state(true, "b1")), Some(&[OLD]), Why::Clean, OLD, None),
            // A clean stop on an earlier boot is still a clean stop.
            (
                Some(state(true, "b0")),
                Some(&[OTHER, OLD]),
                Why::Clean,
                OLD,
                None,
            ),
            (
                Some(state(true, "b1")),
                Some(&[OTHER]),
                Why::CleanWithoutBase,
                OLD,
                Some(Repair),
            ),
            (
                Some(state(true, "b1")),
                None,
                Why::CleanWithoutBase,
                OLD,
                Some(Repair),
            ),
        ];
        for (i, (prev, based, why, lineage, base)) in cases.iter().enumerate() {
            let s = start(prev.as_ref(), "b1", *based, FRESH);
            assert_eq!(
                (s.why, s.lineage, s.base),
                (*why, *lineage, *base),
                "case {i}"
            );
            let journal = if prev.is_some() { OLD } else { FRESH };
            assert_eq!(s.journal_lineage, journal, "case {i}");
            assert_eq!(s.redo(), *why == Why::MachineCrash, "case {i}");
            assert_eq!(
                s.new_lineage(),
                match why {
                    Why::FirstStart => Some("first-start"),
                    Why::MachineCrash => Some("machine-crash"),
                    _ => None,
                },
                "case {i}"
            );
        }
    }

    #[test]
    fn resume_after_the_newest_stored_record_and_time() {
        let seg = |first_seq, last_seq, last_ns| SegmentMeta {
            lineage: OLD.0,
            first_seq,
            last_seq,
            first_ns: 0,
            last_ns,
        };
        let base = |start_seq| BaseMeta {
            lineage: OLD.0,
            start_seq,
            completed_ns: 0,
            kind: BaseKind::Periodic,
        };
        let hb = |ns| Heartbeat {
            ns,
            lineage: OLD.0,
            seq: 0,
        };
        let t = |segments, bases, heartbeats| {
            let mut t = Timeline::default();
            (t.segments, t.bases, t.heartbeats) = (segments, bases, heartbeats);
            t
        };
        let cases = [
            (t(vec![], vec![], vec![]), (0, 0)),
            (t(vec![seg(1, 10, 50)], vec![], vec![]), (10, 50)),
            (t(vec![seg(1, 10, 50)], vec![base(12)], vec![]), (12, 50)),
            (
                t(vec![seg(1, 10, 50)], vec![base(3)], vec![hb(70)]),
                (10, 70),
            ),
            (t(vec![], vec![base(7)], vec![hb(5)]), (7, 5)),
        ];
        for (i, (t, want)) in cases.iter().enumerate() {
            assert_eq!(resume(t), *want, "case {i}");
        }
    }

    #[test]
    fn periodic_bases_come_by_bytes_or_interval_and_never_idle() {
        let s = Duration::from_secs;
        // (bytes since, elapsed, appended) with --base-after 100 and
        // --base-interval 60s.
        let cases = [
            (0, s(0), true, "wait"),
            (99, s(59), true, "wait"),
            (100, s(0), true, "bytes"),
            (5, s(60), true, "interval"),
            (500, s(600), true, "bytes"),
            (5, s(60), false, "idle"),
            (100, s(0), false, "idle"),
            (0, s(1), false, "wait"),
        ];
        for (since, elapsed, appended, want) in cases {
            let got = match periodic(since, 100, elapsed, s(60), appended) {
                Periodic::Wait => "wait",
                Periodic::Idle => "idle",
                Periodic::Take(why) if why.contains("--base-after") => "bytes",
                Periodic::Take(why) if why.contains("--base-interval") => "interval",
                Periodic::Take(why) => panic!("unexplained base: {why}"),
            };
            assert_eq!(
                got, want,
                "since {since}, elapsed {elapsed:?}, appended {appended}"
            );
        }
    }

    #[test]
    fn exit_status_follows_what_the_shutdown_achieved() {
        // (shipped, journal failed, base done) -> status
        let cases = [
            (true, false, true, 0),
            (false, false, true, 2),
            (false, true, false, 2),
            (false, false, false, 2),
            (true, false, false, 3),
            (true, true, true, 4),
            (true, true, false, 4),
        ];
        for (shipped, failed, based, code) in cases {
            assert_eq!(
                stopped(shipped, failed, based).exit_code(),
                code,
                "shipped {shipped}, journal failed {failed}, base done {based}"
            );
        }
    }
}
