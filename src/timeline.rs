//! The timeline of a volume as the store shows it: segments, bases,
//! heartbeats and lineage markers, read from object keys alone (never from
//! the store's LastModified). It owns the restore window, gap detection,
//! the choice of lineage and base for a restore time, and the key formats
//! of heartbeats and lineage markers. It must not read object bodies.
//!
//! Keys:
//! - `hb/<ns:020>-<lineage:016x>-<seq:020>`: at time ns, everything up to
//!   seq of lineage was stored and nothing newer had happened.
//! - `lineage/<started_ns:020>-<lineage:016x>-<reason>`: a lineage began
//!   (`first-start`, `machine-crash`, `journal-gap`).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::base::{BaseKind, BaseMeta};
use crate::clock::{fmt_ns, At, Nanos};
use crate::record::Seq;
use crate::segment::SegmentMeta;
use crate::store::{Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Heartbeat {
    pub ns: Nanos,
    pub lineage: u64,
    pub seq: Seq,
}

impl Heartbeat {
    pub fn key(&self) -> String {
        format!(
            "hb/{:020}-{:016x}-{:020}",
            self.ns.max(0),
            self.lineage,
            self.seq
        )
    }
    pub fn from_key(k: &str) -> Option<Heartbeat> {
        let p: Vec<&str> = k.strip_prefix("hb/")?.split('-').collect();
        if p.len() != 3 {
            return None;
        }
        Some(Heartbeat {
            ns: p[0].parse().ok()?,
            lineage: u64::from_str_radix(p[1], 16).ok()?,
            seq: p[2].parse().ok()?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LineageStart {
    pub started_ns: Nanos,
    pub lineage: u64,
    pub reason: String,
}

impl LineageStart {
    pub fn key(&self) -> String {
        format!(
            "lineage/{:020}-{:016x}-{}",
            self.started_ns.max(0),
            self.lineage,
            self.reason
        )
    }
    pub fn from_key(k: &str) -> Option<LineageStart> {
        let rest = k.strip_prefix("lineage/")?;
        let mut p = rest.splitn(3, '-');
        Some(LineageStart {
            started_ns: p.next()?.parse().ok()?,
            lineage: u64::from_str_radix(p.next()?, 16).ok()?,
            reason: p.next()?.to_string(),
        })
    }
}

/// The first component of every key a volume owns.
pub const VOLUME_KEY_KINDS: [&str; 5] = ["seg", "base", "chunk", "hb", "lineage"];

/// Checks a `--volume` name: `/`-separated components, none empty, `.` or
/// `..`, and a last component that is not one of the key kinds (so that no
/// volume's keys can be read as another's).
pub fn check_volume_name(v: &str) -> Result<(), String> {
    if v.is_empty() || v.len() > 512 {
        return Err("a volume name must be 1 to 512 characters".into());
    }
    for c in v.split('/') {
        if c.is_empty() || c == "." || c == ".." {
            return Err(format!(
                "volume name {v:?} has an empty, \".\" or \"..\" component"
            ));
        }
        if !c
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(format!(
                "volume name {v:?} may only use letters, digits, '-', '_', '.' and '/'"
            ));
        }
    }
    let last = v.rsplit('/').next().unwrap();
    if VOLUME_KEY_KINDS.contains(&last) {
        return Err(format!(
            "volume name {v:?} must not end in {last:?}, which names a kind of object"
        ));
    }
    Ok(())
}

pub fn lineage_id(l: u64) -> String {
    format!("{l:016x}")
}

/// Everything the store says about one volume.
#[derive(Debug, Default)]
pub struct Timeline {
    pub segments: Vec<SegmentMeta>,
    pub bases: Vec<BaseMeta>,
    pub heartbeats: Vec<Heartbeat>,
    pub lineages: Vec<LineageStart>,
    pub chunks: usize,
    /// Keys under the volume that no format claims.
    pub unknown: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TimelineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the store holds no restorable data for this volume yet{0}")]
    Empty(String),
    #[error("{time} is outside the restore window: {window}")]
    OutsideWindow { time: String, window: String },
    #[error("{time} falls in a gap of the timeline: {why}")]
    InGap { time: String, why: String },
    #[error("two lineages cover {time}: {ids}. Pick one with --lineage (see `rewind ls`)")]
    Ambiguous { time: String, ids: String },
    #[error("no lineage {0} in this volume (see `rewind ls`)")]
    NoLineage(String),
    #[error("the timeline is broken: {0}")]
    Broken(String),
}

/// The span of one lineage that can be restored.
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    pub lineage: String,
    pub earliest_ns: Nanos,
    pub latest_ns: Nanos,
    pub earliest: String,
    pub latest: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Gap {
    pub lineage: String,
    pub from_ns: Nanos,
    pub to_ns: Nanos,
    pub reason: String,
}

/// What a restore at a time needs.
#[derive(Debug, Clone)]
pub struct Plan {
    pub at_ns: Nanos,
    pub lineage: u64,
    pub base: BaseMeta,
    pub segments: Vec<SegmentMeta>,
}

impl Timeline {
    pub fn load(store: &dyn Store) -> Result<Timeline, StoreError> {
        let mut t = Timeline::default();
        // Only this volume's own kinds of keys: a volume nested under this
        // one ("shop" and "shop/db") must never be read as part of it.
        let mut keys = Vec::new();
        for kind in VOLUME_KEY_KINDS {
            keys.extend(store.list(&format!("{kind}/"))?);
        }
        for k in keys {
            if let Some(s) = SegmentMeta::from_key(&k) {
                t.segments.push(s);
            } else if let Some(b) = BaseMeta::from_key(&k) {
                t.bases.push(b);
            } else if let Some(h) = Heartbeat::from_key(&k) {
                t.heartbeats.push(h);
            } else if let Some(l) = LineageStart::from_key(&k) {
                t.lineages.push(l);
            } else if k.starts_with("chunk/") {
                t.chunks += 1;
            } else {
                t.unknown.push(k);
            }
        }
        t.segments.sort_by_key(|s| (s.lineage, s.first_seq));
        t.bases.sort_by_key(|b| b.completed_ns);
        t.heartbeats.sort_by_key(|h| h.ns);
        Ok(t)
    }

    fn lineage_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.bases.iter().map(|b| b.lineage).collect();
        ids.extend(self.segments.iter().map(|s| s.lineage));
        ids.sort();
        ids.dedup();
        ids
    }

    /// The last instant of `lineage` whose state the store fully knows, and
    /// the last sequence number stored before a break in continuity.
    fn known_until(&self, lineage: u64) -> Option<(Nanos, Seq)> {
        let first_base = self
            .bases
            .iter()
            .filter(|b| b.lineage == lineage)
            .min_by_key(|b| b.start_seq)?;
        let mut next = first_base.start_seq + 1;
        let mut last_ns = first_base.completed_ns;
        for s in self.segments.iter().filter(|s| s.lineage == lineage) {
            if s.last_seq < next {
                continue;
            }
            if s.first_seq > next {
                break;
            }
            next = s.last_seq + 1;
            last_ns = last_ns.max(s.last_ns);
        }
        let last_seq = next - 1;
        for h in self
            .heartbeats
            .iter()
            .filter(|h| h.lineage == lineage && h.seq == last_seq)
        {
            last_ns = last_ns.max(h.ns);
        }
        Some((last_ns, last_seq))
    }

    /// Restore windows, one per lineage with a completed base.
    pub fn windows(&self) -> Vec<Window> {
        let mut out = Vec::new();
        for l in self.lineage_ids() {
            let Some(earliest) = self
                .bases
                .iter()
                .filter(|b| b.lineage == l)
                .map(|b| b.completed_ns)
                .min()
            else {
                continue;
            };
            let Some((latest, _)) = self.known_until(l) else {
                continue;
            };
            out.push(Window {
                lineage: lineage_id(l),
                earliest_ns: earliest,
                latest_ns: latest.max(earliest),
                earliest: fmt_ns(earliest),
                latest: fmt_ns(latest.max(earliest)),
            });
        }
        out
    }

    /// Gaps: breaks in sequence continuity, and the span of each repair
    /// base (between an unclean restart and the base that covers it).
    pub fn gaps(&self) -> Vec<Gap> {
        let mut out = Vec::new();
        for l in self.lineage_ids() {
            let segs: Vec<&SegmentMeta> = self.segments.iter().filter(|s| s.lineage == l).collect();
            for w in segs.windows(2) {
                if w[1].first_seq > w[0].last_seq + 1 {
                    out.push(Gap {
                        lineage: lineage_id(l),
                        from_ns: w[0].last_ns,
                        to_ns: w[1].first_ns,
                        reason: format!(
                            "records {}..{} are missing from the store",
                            w[0].last_seq + 1,
                            w[1].first_seq - 1
                        ),
                    });
                }
            }
            for b in self
                .bases
                .iter()
                .filter(|b| b.lineage == l && b.kind == BaseKind::Repair)
            {
                let from = segs
                    .iter()
                    .find(|s| s.last_seq > b.start_seq)
                    .map(|s| s.first_ns)
                    .unwrap_or(b.completed_ns);
                out.push(Gap {
                    lineage: lineage_id(l),
                    from_ns: from.min(b.completed_ns),
                    to_ns: b.completed_ns,
                    reason: "the sidecar restarted after a crash; a repair base was being taken"
                        .into(),
                });
            }
        }
        out
    }

    fn describe_windows(&self) -> String {
        let w = self.windows();
        if w.is_empty() {
            return "no base has completed yet".into();
        }
        w.iter()
            .map(|w| format!("{} to {} (lineage {})", w.earliest, w.latest, w.lineage))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Resolves a restore time to a lineage, a base and the segments to replay.
    pub fn plan(&self, at: At, lineage: Option<&str>) -> Result<Plan, TimelineError> {
        let windows = self.windows();
        if windows.is_empty() {
            let why = if self.segments.is_empty() {
                String::new()
            } else {
                " (segments exist, but no base has completed)".into()
            };
            return Err(TimelineError::Empty(why));
        }
        let wanted: Option<u64> = match lineage {
            Some(id) => {
                let l =
                    u64::from_str_radix(id, 16).map_err(|_| TimelineError::NoLineage(id.into()))?;
                if !windows.iter().any(|w| w.lineage == lineage_id(l)) {
                    return Err(TimelineError::NoLineage(id.into()));
                }
                Some(l)
            }
            None => None,
        };
        let candidates: Vec<&Window> = windows
            .iter()
            .filter(|w| wanted.is_none_or(|l| w.lineage == lineage_id(l)))
            .collect();
        let at_ns = match at {
            At::Latest => candidates.iter().map(|w| w.latest_ns).max().unwrap(),
            At::Instant(ns) => ns,
        };
        let covering: Vec<&&Window> = candidates
            .iter()
            .filter(|w| w.earliest_ns <= at_ns && at_ns <= w.latest_ns)
            .collect();
        let chosen = match covering.len() {
            0 => {
                return Err(TimelineError::OutsideWindow {
                    time: fmt_ns(at_ns),
                    window: self.describe_windows(),
                });
            }
            1 => covering[0],
            _ if at == At::Latest => covering.iter().max_by_key(|w| w.latest_ns).unwrap(),
            _ => {
                return Err(TimelineError::Ambiguous {
                    time: fmt_ns(at_ns),
                    ids: covering
                        .iter()
                        .map(|w| w.lineage.clone())
                        .collect::<Vec<_>>()
                        .join(", "),
                })
            }
        };
        let l = u64::from_str_radix(&chosen.lineage, 16).unwrap();
        let base = self
            .bases
            .iter()
            .filter(|b| b.lineage == l && b.completed_ns <= at_ns)
            .max_by_key(|b| (b.completed_ns, b.start_seq))
            .cloned()
            .ok_or_else(|| TimelineError::OutsideWindow {
                time: fmt_ns(at_ns),
                window: self.describe_windows(),
            })?;
        // Segments after the base, up to the first that starts after T.
        let mut segments = Vec::new();
        let mut next = base.start_seq + 1;
        let mut last_needed = base.start_seq;
        for s in self.segments.iter().filter(|s| s.lineage == l) {
            if s.last_seq < next {
                continue;
            }
            if s.first_ns > at_ns {
                break;
            }
            if s.first_seq > next {
                return Err(TimelineError::InGap {
                    time: fmt_ns(at_ns),
                    why: format!(
                        "records {}..{} of lineage {} are missing from the store",
                        next,
                        s.first_seq - 1,
                        chosen.lineage
                    ),
                });
            }
            next = s.last_seq + 1;
            last_needed = s.last_seq;
            segments.push(s.clone());
        }
        // A repair base not yet complete at T means the source may have held
        // an unrecorded change when records after its start were made.
        for r in self
            .bases
            .iter()
            .filter(|b| b.lineage == l && b.kind == BaseKind::Repair && b.completed_ns > at_ns)
        {
            if r.start_seq > base.start_seq && r.start_seq < last_needed {
                let needs_after = segments
                    .iter()
                    .any(|s| s.last_seq > r.start_seq && s.first_ns <= at_ns);
                if needs_after {
                    return Err(TimelineError::InGap {
                        time: fmt_ns(at_ns),
                        why: format!(
                            "the sidecar restarted after a crash and its repair base completed at {}; restore a time before the restart or after that",
                            fmt_ns(r.completed_ns)
                        ),
                    });
                }
            }
        }
        Ok(Plan {
            at_ns,
            lineage: l,
            base,
            segments,
        })
    }

    /// Last stored sequence number of a lineage (for resuming shipping).
    pub fn last_seq(&self, lineage: u64) -> Option<Seq> {
        let a = self
            .segments
            .iter()
            .filter(|s| s.lineage == lineage)
            .map(|s| s.last_seq)
            .max();
        let b = self
            .bases
            .iter()
            .filter(|b| b.lineage == lineage)
            .map(|b| b.start_seq)
            .max();
        a.max(b)
    }

    pub fn lineage_summary(&self) -> BTreeMap<String, (usize, usize)> {
        let mut m = BTreeMap::new();
        for s in &self.segments {
            m.entry(lineage_id(s.lineage)).or_insert((0, 0)).0 += 1;
        }
        for b in &self.bases {
            m.entry(lineage_id(b.lineage)).or_insert((0, 0)).1 += 1;
        }
        m
    }
}
