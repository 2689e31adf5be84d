//! `--on-journal-full=gap`: what Rewind decides and records when the journal
//! passes `--max-journal-bytes` before the store has taken its records and
//! the operator chose a declared gap over writers waiting. It owns the
//! decision at a full journal ([`when_full`]), which lineage a drop
//! continues into ([`drop_lineages`]), which lineage a restart takes while a
//! gap is not yet recorded in the store ([`after_restart`]), and the gap
//! marker ([`GapMark`]): its key in the store and its name as a note in the
//! journal directory, where it keeps the gap across a crash until the store
//! holds the marker. It does no I/O: the journal drops and writes notes,
//! the shipper stores markers, the timeline reads them.
//!
//! Why a new lineage: records after a drop do not follow the stored ones
//! (the ones between are gone), so they cannot replay onto any earlier
//! base. A new lineage with its own first base is a timeline restore
//! already understands; the marker only says why there is no continuity
//! between the two lineages and how much was dropped.

use crate::base::BaseKind;
use crate::clock::Nanos;
use crate::record::Seq;

/// What a journal that reached its bound does with a writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// Append: the journal is within its bound (or dropping would free nothing).
    Append,
    /// Wait until the shipper releases journal space.
    Wait,
    /// Drop every record the store has not taken, record a gap, go on.
    Drop,
}

/// What an append in gap mode does when the journal holds `bytes`
/// (preallocated files included) against a bound of `max`, `unshipped` of
/// them not yet in the store, in `files` journal files. (Without gap mode
/// writers past the bound simply wait; the journal decides that itself.)
///
/// In gap mode a drop needs something to drop, and more than the one
/// current file: a drop leaves one fresh file, so with a bound below one
/// file's size every append would drop again. The journal then holds at
/// most the bound plus one file. With nothing unshipped the excess is
/// stored records whose file is about to be released: a short wait.
pub fn when_full(bytes: u64, max: u64, unshipped: u64, files: usize) -> Full {
    if bytes <= max || files <= 1 {
        Full::Append
    } else if unshipped == 0 {
        Full::Wait
    } else {
        Full::Drop
    }
}

/// The lineages of a drop: (`from`, `to`). A drop while the lineage that an
/// earlier gap began has no stored base yet (`open`, that gap's (from, to))
/// continues that gap: its records replay onto nothing either, and a
/// lineage without a base would be damage in `rewind verify`. Otherwise the
/// drop leaves `current` for `fresh`.
pub fn drop_lineages(current: u64, open: Option<(u64, u64)>, fresh: u64) -> (u64, u64) {
    match open {
        Some((from, to)) if to == current => (from, to),
        _ => (current, fresh),
    }
}

/// The lineage a start continues, the reason for a lineage marker and the
/// base it needs, as `run` decided them from its state file, adjusted for a
/// gap whose marker the store does not hold yet (`pending`, the newest such
/// note): the journal's records after that drop belong to the gap's new
/// lineage, which needs its first base. A machine crash keeps its reason
/// (its redo still runs) but not a lineage of its own: the records the
/// journal holds are the gap lineage's.
pub fn after_restart(
    decided: (u64, Option<&'static str>, Option<BaseKind>),
    pending: Option<&GapMark>,
) -> (u64, Option<&'static str>, Option<BaseKind>) {
    match pending {
        None => decided,
        Some(g) => (g.to_lineage, decided.1, Some(BaseKind::Initial)),
    }
}

/// One drop: at `ns` the journal of `from_lineage` dropped records
/// `from_seq..=to_seq` (about `bytes` of journal frames) that the store had
/// not taken, and `to_lineage` went on from the next record.
///
/// Key (the object is empty):
/// `gap/<ns:020>-<from_lineage:016x>-<to_lineage:016x>-<from_seq:020>-<to_seq:020>-<bytes:020>`.
/// In the journal directory the same name without `gap/` and with the
/// extension `.gap` is the note that keeps the gap until the store holds
/// the marker.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GapMark {
    pub ns: Nanos,
    pub from_lineage: u64,
    pub to_lineage: u64,
    pub from_seq: Seq,
    pub to_seq: Seq,
    pub bytes: u64,
}

/// Extension of a gap note in the journal directory.
pub const NOTE_EXT: &str = "gap";

impl GapMark {
    fn name(&self) -> String {
        format!(
            "{:020}-{:016x}-{:016x}-{:020}-{:020}-{:020}",
            self.ns.max(0),
            self.from_lineage,
            self.to_lineage,
            self.from_seq,
            self.to_seq,
            self.bytes
        )
    }

    fn from_name(n: &str) -> Option<GapMark> {
        let p: Vec<&str> = n.split('-').collect();
        if p.len() != 6 {
            return None;
        }
        Some(GapMark {
            ns: p[0].parse().ok()?,
            from_lineage: u64::from_str_radix(p[1], 16).ok()?,
            to_lineage: u64::from_str_radix(p[2], 16).ok()?,
            from_seq: p[3].parse().ok()?,
            to_seq: p[4].parse().ok()?,
            bytes: p[5].parse().ok()?,
        })
    }

    pub fn key(&self) -> String {
        format!("gap/{}", self.name())
    }

    pub fn from_key(k: &str) -> Option<GapMark> {
        GapMark::from_name(k.strip_prefix("gap/")?)
    }

    /// The file name of this gap's note in the journal directory.
    pub fn note_name(&self) -> String {
        format!("{}.{NOTE_EXT}", self.name())
    }

    pub fn from_note_name(n: &str) -> Option<GapMark> {
        GapMark::from_name(n.strip_suffix(&format!(".{NOTE_EXT}"))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_full_journal_does() {
        use Full::*;
        const M: u64 = 100;
        // (bytes, unshipped, files, expected)
        let cases: &[(u64, u64, usize, Full)] = &[
            (50, 50, 1, Append),
            (100, 100, 2, Append),
            // Past the bound with unshipped records in several files: drop.
            (101, 101, 2, Drop),
            (500, 10, 5, Drop),
            // Nothing unshipped: stored files are released soon.
            (101, 0, 2, Wait),
            // One file over a bound smaller than a file: a drop would leave
            // one file again, so go on within it.
            (101, 101, 1, Append),
        ];
        for &(bytes, unshipped, files, want) in cases {
            assert_eq!(
                when_full(bytes, M, unshipped, files),
                want,
                "bytes {bytes} unshipped {unshipped} files {files}"
            );
        }
    }

    #[test]
    fn which_lineages_a_drop_joins() {
        // (current, open gap, fresh, expected (from, to))
        let cases: &[(u64, Option<(u64, u64)>, u64, (u64, u64))] = &[
            (1, None, 9, (1, 9)),
            // The open gap's lineage has no base yet: the drop extends it.
            (2, Some((1, 2)), 9, (1, 2)),
            // The open gap was another lineage's (a restart moved on).
            (3, Some((1, 2)), 9, (3, 9)),
        ];
        for &(cur, open, fresh, want) in cases {
            assert_eq!(drop_lineages(cur, open, fresh), want, "{cur} {open:?}");
        }
    }

    #[test]
    fn a_pending_gap_decides_the_restart() {
        let g = GapMark {
            ns: 5,
            from_lineage: 1,
            to_lineage: 2,
            from_seq: 10,
            to_seq: 20,
            bytes: 300,
        };
        use BaseKind::*;
        type D = (u64, Option<&'static str>, Option<BaseKind>);
        let cases: &[(D, Option<&GapMark>, D)] = &[
            ((1, None, None), None, (1, None, None)),
            ((1, None, Some(Repair)), None, (1, None, Some(Repair))),
            // After a clean stop or a process crash the gap's lineage goes on
            // and takes its first base.
            ((1, None, None), Some(&g), (2, None, Some(Initial))),
            ((1, None, Some(Repair)), Some(&g), (2, None, Some(Initial))),
            // The state file already names the gap's lineage.
            ((2, None, Some(Repair)), Some(&g), (2, None, Some(Initial))),
            // A machine crash keeps its reason (the redo runs) but takes the
            // gap's lineage, whose records the journal holds.
            (
                (7, Some("machine-crash"), Some(Initial)),
                Some(&g),
                (2, Some("machine-crash"), Some(Initial)),
            ),
        ];
        for (decided, pending, want) in cases {
            assert_eq!(after_restart(*decided, *pending), *want, "{decided:?}");
        }
    }

    #[test]
    fn marker_key_and_note_name_round_trip() {
        let g = GapMark {
            ns: 1_764_000_000_000_000_000,
            from_lineage: 0x1234,
            to_lineage: 0x7fff_ffff_ffff_ffff,
            from_seq: 1,
            to_seq: 99,
            bytes: 64 << 20,
        };
        assert_eq!(
            g.key(),
            "gap/01764000000000000000-0000000000001234-7fffffffffffffff-00000000000000000001-00000000000000000099-00000000000067108864"
        );
        assert_eq!(GapMark::from_key(&g.key()), Some(g.clone()));
        assert_eq!(GapMark::from_note_name(&g.note_name()), Some(g.clone()));
        assert_eq!(GapMark::from_key("gap/1-2-3"), None);
        assert_eq!(GapMark::from_note_name("00000000000000000001.rwj"), None);
    }
}
