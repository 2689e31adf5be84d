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
//! - `gap/<ns:020>-<from:016x>-<to:016x>-<from_seq:020>-<to_seq:020>-<bytes:020>`:
//!   the journal dropped records the store had not taken
//!   (`--on-journal-full=gap`, `crate::gap::GapMark`); the time from lineage
//!   `from`'s last restorable instant to lineage `to`'s first base is a
//!   declared gap, which restore refuses by name and verify accepts.
//! - `condemned/<ns:020>-seg-<lineage:016x>-<from_seq:020>-<to_seq:020>`,
//!   `condemned/<ns:020>-delta-<lineage:016x>-<from_seq:020>-<to_seq:020>` and
//!   `condemned/<ns:020>-base-<the base key's name>`: `rewind prune` decided
//!   at ns that these segments, deltas or this base are no longer needed. The
//!   timeline treats them as gone at once (so no restore planned after the
//!   condemnation reads them); a later prune deletes them after a grace
//!   period. `condemned/<ns:020>-chunks-<id:016x>` lists chunks and is read
//!   by prune alone.
//!
//! After a prune a lineage is a continuous *window* (any instant from its
//! first base to its latest stored record) plus isolated *points*: older
//! bases kept with the records that complete them, restorable exactly at
//! their completion instant, and the boundaries of deltas (delta.rs) that
//! chain from such a base, restorable from the delta's last record to the
//! instant before the next one; nowhere between. Deltas never make a
//! window: only segments can be replayed up to any instant.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::base::{BaseKind, BaseMeta};
use crate::clock::{fmt_ns, At, Nanos};
use crate::delta::DeltaMeta;
use crate::gap::GapMark;
use crate::record::Seq;
use crate::retention::PolicyMark;
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

/// What `rewind prune` marked as no longer needed (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condemned {
    /// Every segment of `lineage` whose records all lie in from..=to.
    Segments {
        ns: Nanos,
        lineage: u64,
        from_seq: Seq,
        to_seq: Seq,
    },
    /// Every delta of `lineage` that applies after from_seq or later and
    /// ends at to_seq or earlier.
    Deltas {
        ns: Nanos,
        lineage: u64,
        from_seq: Seq,
        to_seq: Seq,
    },
    Base {
        ns: Nanos,
        base: BaseMeta,
    },
    /// An object listing chunk hashes (its body is for prune alone).
    Chunks {
        ns: Nanos,
        id: u64,
    },
}

impl Condemned {
    pub fn ns(&self) -> Nanos {
        match self {
            Condemned::Segments { ns, .. }
            | Condemned::Deltas { ns, .. }
            | Condemned::Base { ns, .. }
            | Condemned::Chunks { ns, .. } => *ns,
        }
    }

    pub fn key(&self) -> String {
        match self {
            Condemned::Segments {
                ns,
                lineage,
                from_seq,
                to_seq,
            } => format!(
                "condemned/{:020}-seg-{lineage:016x}-{from_seq:020}-{to_seq:020}",
                ns.max(&0)
            ),
            Condemned::Deltas {
                ns,
                lineage,
                from_seq,
                to_seq,
            } => format!(
                "condemned/{:020}-delta-{lineage:016x}-{from_seq:020}-{to_seq:020}",
                ns.max(&0)
            ),
            Condemned::Base { ns, base } => {
                let k = base.key();
                let name = k
                    .strip_prefix("base/")
                    .and_then(|n| n.strip_suffix(".rwb"))
                    .expect("base keys are base/<name>.rwb");
                format!("condemned/{:020}-base-{name}", ns.max(&0))
            }
            Condemned::Chunks { ns, id } => {
                format!("condemned/{:020}-chunks-{id:016x}", ns.max(&0))
            }
        }
    }

    pub fn from_key(k: &str) -> Option<Condemned> {
        let rest = k.strip_prefix("condemned/")?;
        let (ns, rest) = rest.split_once('-')?;
        let ns: Nanos = ns.parse().ok()?;
        let (what, rest) = rest.split_once('-')?;
        match what {
            "seg" | "delta" => {
                let p: Vec<&str> = rest.split('-').collect();
                if p.len() != 3 {
                    return None;
                }
                let (lineage, from_seq, to_seq) = (
                    u64::from_str_radix(p[0], 16).ok()?,
                    p[1].parse().ok()?,
                    p[2].parse().ok()?,
                );
                Some(if what == "seg" {
                    Condemned::Segments {
                        ns,
                        lineage,
                        from_seq,
                        to_seq,
                    }
                } else {
                    Condemned::Deltas {
                        ns,
                        lineage,
                        from_seq,
                        to_seq,
                    }
                })
            }
            "base" => Some(Condemned::Base {
                ns,
                base: BaseMeta::from_key(&format!("base/{rest}.rwb"))?,
            }),
            "chunks" => Some(Condemned::Chunks {
                ns,
                id: u64::from_str_radix(rest, 16).ok()?,
            }),
            _ => None,
        }
    }

    /// Whether this marker condemns segment `s`.
    pub fn covers_segment(&self, s: &SegmentMeta) -> bool {
        matches!(self, Condemned::Segments { lineage, from_seq, to_seq, .. }
            if *lineage == s.lineage && *from_seq <= s.first_seq && s.last_seq <= *to_seq)
    }

    /// Whether this marker condemns delta `d`.
    pub fn covers_delta(&self, d: &DeltaMeta) -> bool {
        matches!(self, Condemned::Deltas { lineage, from_seq, to_seq, .. }
            if *lineage == d.lineage && *from_seq <= d.from_seq && d.to_seq <= *to_seq)
    }
}

/// A stored object a restore replays after its base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Replayed record by record, up to the restore instant.
    Segment(SegmentMeta),
    /// Applied whole (every record in it is at or before the instant).
    Delta(DeltaMeta),
}

impl Piece {
    pub fn key(&self) -> String {
        match self {
            Piece::Segment(s) => s.key(),
            Piece::Delta(d) => d.key(),
        }
    }
    pub fn last_seq(&self) -> Seq {
        match self {
            Piece::Segment(s) => s.last_seq,
            Piece::Delta(d) => d.to_seq,
        }
    }
    pub fn first_ns(&self) -> Nanos {
        match self {
            Piece::Segment(s) => s.first_ns,
            Piece::Delta(d) => d.first_ns,
        }
    }
}

/// The first component of every key a volume owns.
pub const VOLUME_KEY_KINDS: [&str; 11] = [
    "seg",
    "gap",
    "delta",
    "base",
    "chunk",
    "hb",
    "lineage",
    "condemned",
    "inflight",
    "lock",
    "policy",
];

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
    if VOLUME_KEY_KINDS.contains(&last) || last == crate::store::sealed::KEYS_DIR {
        return Err(format!(
            "volume name {v:?} must not end in {last:?}, which names a kind of object"
        ));
    }
    Ok(())
}

/// A lineage's id: a u64 below 2^63, written as 16 lowercase hex digits in
/// object keys, the local state file and everything a user reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LineageId(pub u64);

impl LineageId {
    /// A fresh id for a new lineage. The top bit stays clear so that the id
    /// fits an i64 wherever one is wanted.
    pub(crate) fn random() -> LineageId {
        LineageId(rand::random::<u64>() >> 1)
    }
}

impl std::fmt::Display for LineageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a lineage id (16 hex digits, as `rewind ls` prints them)")]
pub struct BadLineageId(String);

impl std::str::FromStr for LineageId {
    type Err = BadLineageId;
    fn from_str(s: &str) -> Result<LineageId, BadLineageId> {
        if s.is_empty() || s.len() > 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BadLineageId(s.into()));
        }
        u64::from_str_radix(s, 16)
            .map(LineageId)
            .map_err(|_| BadLineageId(s.into()))
    }
}

/// `LineageId(l).to_string()`, for the modules that still carry lineages
/// as bare u64.
pub fn lineage_id(l: u64) -> String {
    LineageId(l).to_string()
}

/// Everything the store says about one volume.
#[derive(Debug, Default)]
pub struct Timeline {
    /// Segments and bases that are not condemned, the only ones a restore
    /// may use.
    pub segments: Vec<SegmentMeta>,
    /// Deltas that are not condemned, by lineage and sequence.
    pub deltas: Vec<DeltaMeta>,
    pub bases: Vec<BaseMeta>,
    pub heartbeats: Vec<Heartbeat>,
    pub lineages: Vec<LineageStart>,
    /// Markers of records the journal dropped (`--on-journal-full=gap`).
    pub journal_gaps: Vec<GapMark>,
    pub chunks: usize,
    /// Prune's condemnation markers, and what they hide.
    pub condemned: Vec<Condemned>,
    pub condemned_segments: Vec<SegmentMeta>,
    pub condemned_deltas: Vec<DeltaMeta>,
    pub condemned_bases: Vec<BaseMeta>,
    /// The newest retention policy a prune applied, if any.
    pub policy: Option<PolicyMark>,
    /// Keys of prune's and the sidecar's coordination markers (`inflight/`,
    /// `lock/`, `policy/`): known, but no part of the timeline.
    pub markers: Vec<String>,
    /// Keys under the volume that no format claims.
    pub unknown: Vec<String>,
    /// For each segment, the highest last_seq of its lineage's segments up
    /// to it: lets `tail` skip to a base's first record in O(log n). Built
    /// by `from_keys`; the segments must not change after it.
    seg_max_last: Vec<Seq>,
}

/// Restorable instants that are not inside a continuous window: a base
/// kept by a coarse retention tier, restorable exactly at its completion,
/// or a delta boundary, restorable from `ns` to `until_ns` (no record
/// falls between, so every instant there is the same state).
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub lineage: String,
    pub ns: Nanos,
    pub until_ns: Nanos,
    pub at: String,
    pub until: String,
}

/// How a restore time was resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    /// The instant asked for.
    Exact,
    /// The nearest kept point before the instant asked for (`--or-earlier`).
    Earlier { asked_ns: Nanos },
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
    #[error("{time} falls between two kept points of lineage {lineage} (this part of the timeline was thinned by `rewind prune`): the nearest are {before} and {after}. Restore one of them, or add --or-earlier to take {before}")]
    BetweenPoints {
        time: String,
        lineage: String,
        before: String,
        after: String,
    },
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
    /// Recorded on purpose (`--on-journal-full=gap`), not damage.
    pub declared: bool,
}

/// A gap the journal declared: the time from the last restorable instant
/// before it to the first base after it, which no restore can give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JournalGap {
    pub from_lineage: u64,
    pub to_lineage: u64,
    /// The last restorable instant before the gap (the dropping lineage's
    /// latest), or the first drop's time when nothing before it restores.
    pub from_ns: Nanos,
    /// The completion of the new lineage's first base; None while the store
    /// holds none (the gap is still open).
    pub to_ns: Option<Nanos>,
    pub bytes: u64,
    pub first_seq: Seq,
    pub last_seq: Seq,
}

impl JournalGap {
    fn covers(&self, ns: Nanos) -> bool {
        self.from_ns < ns && self.to_ns.is_none_or(|t| ns < t)
    }

    fn reason(&self) -> String {
        let after = match self.to_ns {
            Some(t) => format!(
                "lineage {} restores from {} (its first base)",
                lineage_id(self.to_lineage),
                fmt_ns(t)
            ),
            None => format!(
                "lineage {} has no stored base yet, so nothing after the gap restores until it has",
                lineage_id(self.to_lineage)
            ),
        };
        format!(
            "declared by --on-journal-full=gap: the journal reached --max-journal-bytes before the store took its changes, and up to {} of them (records {}..={} of lineage {}) were dropped; lineage {} restores up to {}, {after}",
            crate::outage::fmt_bytes(self.bytes),
            self.first_seq,
            self.last_seq,
            lineage_id(self.from_lineage),
            lineage_id(self.from_lineage),
            fmt_ns(self.from_ns),
        )
    }
}

/// What a restore at a time needs.
#[derive(Debug, Clone)]
pub struct Plan {
    pub at_ns: Nanos,
    pub lineage: u64,
    pub base: BaseMeta,
    /// What to replay after the base, in order.
    pub pieces: Vec<Piece>,
    pub resolved: Resolved,
}

/// One lineage as restore sees it: the continuous window and the isolated
/// points before it.
#[derive(Debug, Clone)]
pub(crate) struct LineageView {
    pub lineage: u64,
    /// The oldest base from which records run without a break to the
    /// lineage's latest stored record.
    pub window_base: BaseMeta,
    pub earliest_ns: Nanos,
    pub latest_ns: Nanos,
    /// Restorable instants before the window, oldest first.
    pub points: Vec<PointView>,
}

/// One isolated restorable span: every instant in `ns..=until_ns`
/// restores from `base` to the same state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PointView {
    pub base: BaseMeta,
    pub ns: Nanos,
    pub until_ns: Nanos,
}

impl LineageView {
    fn first_ns(&self) -> Nanos {
        self.points
            .first()
            .map(|p| p.ns)
            .unwrap_or(self.earliest_ns)
    }
}

/// Why a base's replay records up to an instant are not all in the store:
/// missing, or stored only in a delta that ends after the instant (a delta
/// is applied whole), in which case `compacted_to` is its last record's time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MissingRecords {
    pub from: Seq,
    pub to: Seq,
    pub compacted_to: Option<Nanos>,
}

impl MissingRecords {
    fn describe(&self, lineage: u64) -> String {
        match self.compacted_to {
            None => format!(
                "records {}..{} of lineage {} are missing from the store",
                self.from,
                self.to,
                lineage_id(lineage)
            ),
            Some(ns) => format!(
                "records {}..{} of lineage {} are kept only compacted, as one step that ends at {}",
                self.from,
                self.to,
                lineage_id(lineage),
                fmt_ns(ns)
            ),
        }
    }
}

/// The replay of a base up to an instant: the pieces in order, and whether
/// the store shows that no record after them is at or before the instant
/// (a later record is stored), rather than having simply run out.
#[derive(Debug, Clone)]
pub(crate) struct Chain {
    pub pieces: Vec<Piece>,
    pub evident: bool,
}

impl Timeline {
    pub fn load(store: &dyn Store) -> Result<Timeline, StoreError> {
        Ok(Timeline::from_keys(list_volume(store)?))
    }

    /// The timeline that a listing of the volume's keys describes.
    pub fn from_keys(keys: impl IntoIterator<Item = String>) -> Timeline {
        let mut t = Timeline::default();
        let mut segments = Vec::new();
        let mut deltas = Vec::new();
        let mut bases = Vec::new();
        for k in keys {
            if let Some(s) = SegmentMeta::from_key(&k) {
                segments.push(s);
            } else if let Some(d) = DeltaMeta::from_key(&k) {
                deltas.push(d);
            } else if let Some(b) = BaseMeta::from_key(&k) {
                bases.push(b);
            } else if let Some(h) = Heartbeat::from_key(&k) {
                t.heartbeats.push(h);
            } else if let Some(l) = LineageStart::from_key(&k) {
                t.lineages.push(l);
            } else if let Some(g) = GapMark::from_key(&k) {
                t.journal_gaps.push(g);
            } else if k.starts_with("chunk/") {
                t.chunks += 1;
            } else if let Some(c) = Condemned::from_key(&k) {
                t.condemned.push(c);
            } else if let Some(p) = PolicyMark::from_key(&k) {
                if t.policy
                    .as_ref()
                    .is_none_or(|q| q.applied_ns < p.applied_ns)
                {
                    t.policy = Some(p);
                }
                t.markers.push(k);
            } else if k.starts_with("inflight/") || k.starts_with("lock/") {
                t.markers.push(k);
            } else {
                t.unknown.push(k);
            }
        }
        let condemned_base: std::collections::HashSet<String> = t
            .condemned
            .iter()
            .filter_map(|c| match c {
                Condemned::Base { base, .. } => Some(base.key()),
                _ => None,
            })
            .collect();
        let ranges: Vec<&Condemned> = t
            .condemned
            .iter()
            .filter(|c| matches!(c, Condemned::Segments { .. } | Condemned::Deltas { .. }))
            .collect();
        for d in deltas {
            if ranges.iter().any(|c| c.covers_delta(&d)) {
                t.condemned_deltas.push(d);
            } else {
                t.deltas.push(d);
            }
        }
        for s in segments {
            if ranges.iter().any(|c| c.covers_segment(&s)) {
                t.condemned_segments.push(s);
            } else {
                t.segments.push(s);
            }
        }
        for b in bases {
            if condemned_base.contains(&b.key()) {
                t.condemned_bases.push(b);
            } else {
                t.bases.push(b);
            }
        }
        t.segments.sort_by_key(|s| (s.lineage, s.first_seq));
        t.deltas.sort_by_key(|d| (d.lineage, d.from_seq, d.to_seq));
        t.bases.sort_by_key(|b| b.completed_ns);
        t.heartbeats.sort_by_key(|h| h.ns);
        t.journal_gaps.sort_by_key(|g| g.ns);
        t.condemned.sort_by_key(|c| c.ns());
        let mut prev: Option<(u64, Seq)> = None;
        for s in &t.segments {
            let m = match prev {
                Some((l, m)) if l == s.lineage => m.max(s.last_seq),
                _ => s.last_seq,
            };
            t.seg_max_last.push(m);
            prev = Some((s.lineage, m));
        }
        t
    }

    /// The index range of one lineage's segments in `segments`.
    fn lineage_range(&self, l: u64) -> std::ops::Range<usize> {
        self.segments.partition_point(|s| s.lineage < l)
            ..self.segments.partition_point(|s| s.lineage <= l)
    }

    /// The deltas of lineage `l` that apply after record `after`.
    fn deltas_after(&self, l: u64, after: Seq) -> &[DeltaMeta] {
        let lo = self
            .deltas
            .partition_point(|d| (d.lineage, d.from_seq) < (l, after));
        let hi = self
            .deltas
            .partition_point(|d| (d.lineage, d.from_seq) <= (l, after));
        &self.deltas[lo..hi]
    }

    /// The stored segment of lineage `l` that holds record `seq`, or else
    /// the first one after it.
    pub(crate) fn segment_from(&self, l: u64, seq: Seq) -> Option<&SegmentMeta> {
        let r = self.lineage_range(l);
        // Every segment before `from` ends before `seq`.
        let from = if self.seg_max_last.len() == self.segments.len() {
            r.start + self.seg_max_last[r.clone()].partition_point(|&m| m < seq)
        } else {
            r.start
        };
        self.segments[from..r.end]
            .iter()
            .find(|s| s.last_seq >= seq)
    }

    /// The replay of `base` up to `at_ns`: the stored pieces a restore
    /// reads, in order (whole deltas where they end at or before `at_ns`,
    /// segments elsewhere), or the first range of records that is missing
    /// or only stored in a delta that ends after `at_ns`. This is the one
    /// definition restore, verify and prune use.
    pub(crate) fn tail(&self, base: &BaseMeta, at_ns: Nanos) -> Result<Chain, MissingRecords> {
        let l = base.lineage;
        let mut pieces = Vec::new();
        let mut next = base.start_seq + 1;
        // The time of record `next`, when the delta before it says.
        let mut next_ns: Option<Nanos> = None;
        loop {
            let ds = self.deltas_after(l, next - 1);
            if let Some(d) = ds
                .iter()
                .filter(|d| d.last_ns <= at_ns)
                .max_by_key(|d| d.to_seq)
            {
                pieces.push(Piece::Delta(d.clone()));
                next = d.to_seq + 1;
                next_ns = Some(d.next_ns);
                continue;
            }
            if next_ns.is_some_and(|n| n > at_ns) {
                return Ok(Chain {
                    pieces,
                    evident: true,
                });
            }
            let seg = self.segment_from(l, next);
            if let Some(s) = seg.filter(|s| s.first_seq <= next) {
                if s.first_ns > at_ns {
                    return Ok(Chain {
                        pieces,
                        evident: true,
                    });
                }
                pieces.push(Piece::Segment(s.clone()));
                next = s.last_seq + 1;
                next_ns = None;
                if s.last_ns > at_ns {
                    return Ok(Chain {
                        pieces,
                        evident: true,
                    });
                }
                continue;
            }
            if let Some(d) = ds.iter().min_by_key(|d| d.first_ns) {
                if d.first_ns > at_ns {
                    return Ok(Chain {
                        pieces,
                        evident: true,
                    });
                }
                return Err(MissingRecords {
                    from: next,
                    to: d.to_seq,
                    compacted_to: Some(d.last_ns),
                });
            }
            return match seg {
                Some(s) if s.first_ns <= at_ns => Err(MissingRecords {
                    from: next,
                    to: s.first_seq - 1,
                    compacted_to: None,
                }),
                _ => Ok(Chain {
                    pieces,
                    evident: false,
                }),
            };
        }
    }

    /// The delta boundaries reachable from `b` before `limit`: spans where
    /// the replay of `b` ends exactly on a delta (see the module docs).
    fn delta_points(&self, b: &BaseMeta, limit: Nanos) -> Vec<PointView> {
        let l = b.lineage;
        let mut out = Vec::new();
        let mut next = b.start_seq + 1;
        loop {
            if let Some(d) = self
                .deltas_after(l, next - 1)
                .iter()
                .filter(|d| d.last_ns < limit)
                .max_by_key(|d| d.to_seq)
            {
                if d.last_ns >= b.completed_ns {
                    let until = (d.next_ns - 1).min(limit - 1).max(d.last_ns);
                    out.push(PointView {
                        base: b.clone(),
                        ns: d.last_ns,
                        until_ns: until,
                    });
                }
                next = d.to_seq + 1;
                continue;
            }
            match self.segment_from(l, next) {
                Some(s) if s.first_seq <= next && s.last_ns < limit => next = s.last_seq + 1,
                _ => return out,
            }
        }
    }

    /// Each lineage with a base: its window and its isolated points.
    pub(crate) fn views(&self) -> Vec<LineageView> {
        let mut hb_at: std::collections::HashMap<(u64, Seq), Nanos> = Default::default();
        for h in &self.heartbeats {
            let e = hb_at.entry((h.lineage, h.seq)).or_insert(h.ns);
            *e = (*e).max(h.ns);
        }
        let mut out = Vec::new();
        for l in self.lineage_ids() {
            let bases: Vec<&BaseMeta> = self.bases.iter().filter(|b| b.lineage == l).collect();
            // Runs of segments without a break in sequence numbers:
            // (first_seq, last_seq, last_ns).
            let mut runs: Vec<(Seq, Seq, Nanos)> = Vec::new();
            for s in &self.segments[self.lineage_range(l)] {
                match runs.last_mut() {
                    Some(r) if s.first_seq <= r.1 + 1 => {
                        r.1 = r.1.max(s.last_seq);
                        r.2 = r.2.max(s.last_ns);
                    }
                    _ => runs.push((s.first_seq, s.last_seq, s.last_ns)),
                }
            }
            // How far the records run without a break after a base: the
            // last instant whose state the store knows, and the last seq.
            let reach = |b: &BaseMeta| -> (Nanos, Seq) {
                let next = b.start_seq + 1;
                let i = runs.partition_point(|r| r.0 <= next);
                let (mut ns, seq) = match i.checked_sub(1).map(|i| runs[i]) {
                    Some(r) if r.1 >= next => (b.completed_ns.max(r.2), r.1),
                    _ => (b.completed_ns, b.start_seq),
                };
                if let Some(h) = hb_at.get(&(l, seq)) {
                    ns = ns.max(*h);
                }
                (ns, seq)
            };
            let reaches: Vec<(Nanos, Seq)> = bases.iter().map(|b| reach(b)).collect();
            // The window starts at the oldest base whose records reach
            // furthest; bases are sorted by completion.
            let Some(far) = reaches.iter().map(|r| r.1).max() else {
                continue;
            };
            let w = reaches.iter().position(|r| r.1 == far).unwrap();
            let window_base = bases[w].clone();
            let latest_ns = bases[w..]
                .iter()
                .zip(&reaches[w..])
                .filter(|(_, r)| r.1 == far)
                .map(|(_, r)| r.0)
                .max()
                .unwrap()
                .max(window_base.completed_ns);
            let mut points: Vec<PointView> = Vec::new();
            let before: Vec<&&BaseMeta> = bases[..w]
                .iter()
                .filter(|b| b.completed_ns < window_base.completed_ns)
                .collect();
            for (i, b) in before.iter().enumerate() {
                // A delta boundary restores from the newest base before it.
                let limit = before
                    .get(i + 1)
                    .map_or(window_base.completed_ns, |n| n.completed_ns);
                if let Ok(c) = self.tail(b, b.completed_ns) {
                    // With nothing to replay, the base's state lasts until
                    // the first record after its start, if a stored object
                    // shows when that came.
                    let next = c.pieces.is_empty().then(|| {
                        let d = self
                            .deltas_after(l, b.start_seq)
                            .iter()
                            .map(|d| d.first_ns)
                            .min();
                        let s = self
                            .segment_from(l, b.start_seq + 1)
                            .filter(|s| s.first_seq <= b.start_seq + 1)
                            .map(|s| s.first_ns);
                        d.into_iter().chain(s).min()
                    });
                    let until = match next.flatten() {
                        Some(n) if n > b.completed_ns => (n - 1).min(limit - 1),
                        _ => b.completed_ns,
                    };
                    points.push(PointView {
                        base: (**b).clone(),
                        ns: b.completed_ns,
                        until_ns: until.max(b.completed_ns),
                    });
                }
                points.extend(self.delta_points(b, limit));
            }
            // Spans that overlap describe one state (no record between):
            // each instant is listed once, under the first span that has it.
            points.sort_by_key(|p| (p.ns, p.until_ns));
            let mut disjoint: Vec<PointView> = Vec::new();
            for mut p in points {
                if let Some(m) = disjoint.last() {
                    if p.until_ns <= m.until_ns {
                        continue;
                    }
                    p.ns = p.ns.max(m.until_ns + 1);
                }
                disjoint.push(p);
            }
            let points = disjoint;
            out.push(LineageView {
                lineage: l,
                earliest_ns: window_base.completed_ns,
                latest_ns,
                window_base,
                points,
            });
        }
        out
    }

    /// Bases that no restore can use: neither in a window nor a complete
    /// point (their replay records are missing).
    pub fn unusable_bases(&self) -> Vec<(BaseMeta, String)> {
        let views = self.views();
        let mut out = Vec::new();
        for b in &self.bases {
            let Some(v) = views.iter().find(|v| v.lineage == b.lineage) else {
                continue;
            };
            if b.completed_ns >= v.earliest_ns {
                continue;
            }
            // A base whose point another span lists is still usable.
            if let Err(m) = self.tail(b, b.completed_ns) {
                out.push((
                    b.clone(),
                    format!("{} and it needs them", m.describe(b.lineage)),
                ));
            }
        }
        out
    }

    /// Isolated restorable points, oldest first, per lineage.
    pub fn points(&self) -> Vec<Point> {
        self.views()
            .iter()
            .flat_map(|v| {
                v.points.iter().map(|p| Point {
                    lineage: lineage_id(v.lineage),
                    ns: p.ns,
                    until_ns: p.until_ns,
                    at: fmt_ns(p.ns),
                    until: fmt_ns(p.until_ns),
                })
            })
            .collect()
    }

    fn lineage_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.bases.iter().map(|b| b.lineage).collect();
        ids.extend(self.segments.iter().map(|s| s.lineage));
        ids.sort();
        ids.dedup();
        ids
    }

    /// Restore windows, one per lineage with a completed base.
    pub fn windows(&self) -> Vec<Window> {
        self.views()
            .iter()
            .map(|v| Window {
                lineage: lineage_id(v.lineage),
                earliest_ns: v.earliest_ns,
                latest_ns: v.latest_ns,
                earliest: fmt_ns(v.earliest_ns),
                latest: fmt_ns(v.latest_ns),
            })
            .collect()
    }

    /// Gaps in the continuous part of each lineage: breaks in sequence
    /// continuity, and the span of each repair base (between an unclean
    /// restart and the base that covers it). What lies before a lineage's
    /// window is isolated points, whose own records `unusable_bases` checks.
    pub fn gaps(&self) -> Vec<Gap> {
        let mut out = Vec::new();
        let views = self.views();
        for l in self.lineage_ids() {
            let from_seq = views
                .iter()
                .find(|v| v.lineage == l)
                .map(|v| v.window_base.start_seq)
                .unwrap_or(0);
            let window_ns = views
                .iter()
                .find(|v| v.lineage == l)
                .map(|v| v.earliest_ns)
                .unwrap_or(Nanos::MIN);
            let segs: Vec<&SegmentMeta> = self
                .segments
                .iter()
                .filter(|s| s.lineage == l && s.last_seq > from_seq)
                .collect();
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
                        declared: false,
                    });
                }
            }
            for b in self.bases.iter().filter(|b| {
                b.lineage == l && b.kind == BaseKind::Repair && b.completed_ns >= window_ns
            }) {
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
                    declared: false,
                });
            }
        }
        for g in self.journal_gaps_with(&views) {
            out.push(Gap {
                lineage: lineage_id(g.to_lineage),
                from_ns: g.from_ns,
                to_ns: g.to_ns.unwrap_or(g.from_ns),
                reason: g.reason(),
                declared: true,
            });
        }
        out
    }

    /// The declared gaps, one per new lineage (drops that continued an
    /// open gap are merged into it), oldest first.
    fn journal_gaps_with(&self, views: &[LineageView]) -> Vec<JournalGap> {
        let mut out: Vec<JournalGap> = Vec::new();
        for m in &self.journal_gaps {
            if let Some(g) = out.iter_mut().find(|g| g.to_lineage == m.to_lineage) {
                g.bytes += m.bytes;
                g.first_seq = g.first_seq.min(m.from_seq);
                g.last_seq = g.last_seq.max(m.to_seq);
                continue;
            }
            // Before the gap: the dropping lineage's latest instant, or, when
            // it never restored (an earlier gap's lineage without a base),
            // where that earlier gap began.
            let from_ns = views
                .iter()
                .find(|v| v.lineage == m.from_lineage)
                .map(|v| v.latest_ns)
                .or_else(|| {
                    out.iter()
                        .find(|g| g.to_lineage == m.from_lineage)
                        .map(|g| g.from_ns)
                })
                .unwrap_or(m.ns);
            out.push(JournalGap {
                from_lineage: m.from_lineage,
                to_lineage: m.to_lineage,
                from_ns,
                to_ns: views
                    .iter()
                    .find(|v| v.lineage == m.to_lineage)
                    .map(|v| v.first_ns()),
                bytes: m.bytes,
                first_seq: m.from_seq,
                last_seq: m.to_seq,
            });
        }
        out
    }

    fn describe_windows(&self) -> String {
        let views = self.views();
        if views.is_empty() {
            return "no base has completed yet".into();
        }
        views
            .iter()
            .map(|v| {
                let points = match v.points.len() {
                    0 => String::new(),
                    1 => format!(", and the earlier point {}", fmt_ns(v.points[0].ns)),
                    n => format!(
                        ", and {n} earlier points from {} to {}",
                        fmt_ns(v.points[0].ns),
                        fmt_ns(v.points[n - 1].until_ns)
                    ),
                };
                format!(
                    "{} to {} (lineage {}){points}",
                    fmt_ns(v.earliest_ns),
                    fmt_ns(v.latest_ns),
                    lineage_id(v.lineage)
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Resolves a restore time to a lineage, a base and the segments to
    /// replay. The time must name a restorable instant exactly.
    pub fn plan(&self, at: At, lineage: Option<&str>) -> Result<Plan, TimelineError> {
        self.plan_at(at, lineage, false)
    }

    /// Like `plan`; with `or_earlier`, a time between two kept points
    /// resolves to the nearest point before it (and the plan says so).
    pub fn plan_at(
        &self,
        at: At,
        lineage: Option<&str>,
        or_earlier: bool,
    ) -> Result<Plan, TimelineError> {
        let views = self.views();
        if views.is_empty() {
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
                if !views.iter().any(|v| v.lineage == l) {
                    return Err(TimelineError::NoLineage(id.into()));
                }
                Some(l)
            }
            None => None,
        };
        let candidates: Vec<&LineageView> = views
            .iter()
            .filter(|v| wanted.is_none_or(|l| v.lineage == l))
            .collect();
        let at_ns = match at {
            At::Latest => candidates.iter().map(|v| v.latest_ns).max().unwrap(),
            At::Instant(ns) => ns,
        };
        // A lineage covers T from its oldest kept point to its latest record.
        let covering: Vec<&&LineageView> = candidates
            .iter()
            .filter(|v| v.first_ns() <= at_ns && at_ns <= v.latest_ns)
            .collect();
        let chosen = match covering.len() {
            0 => {
                if let Some(g) = self
                    .journal_gaps_with(&views)
                    .into_iter()
                    .find(|g| g.covers(at_ns))
                {
                    return Err(TimelineError::InGap {
                        time: fmt_ns(at_ns),
                        why: format!(
                            "{}. Restore a time at or before {}{}",
                            g.reason(),
                            fmt_ns(g.from_ns),
                            g.to_ns
                                .map(|t| format!(" or at or after {}", fmt_ns(t)))
                                .unwrap_or_default()
                        ),
                    });
                }
                return Err(TimelineError::OutsideWindow {
                    time: fmt_ns(at_ns),
                    window: self.describe_windows(),
                });
            }
            1 => covering[0],
            _ if at == At::Latest => covering.iter().max_by_key(|v| v.latest_ns).unwrap(),
            _ => {
                return Err(TimelineError::Ambiguous {
                    time: fmt_ns(at_ns),
                    ids: covering
                        .iter()
                        .map(|v| lineage_id(v.lineage))
                        .collect::<Vec<_>>()
                        .join(", "),
                })
            }
        };
        let l = chosen.lineage;
        let (base, plan_ns, resolved) = if at_ns >= chosen.earliest_ns {
            let base = self
                .bases
                .iter()
                .filter(|b| b.lineage == l && b.completed_ns <= at_ns)
                .filter(|b| b.completed_ns >= chosen.earliest_ns)
                .max_by_key(|b| (b.completed_ns, b.start_seq))
                .cloned()
                .expect("the window starts at a base");
            (base, at_ns, Resolved::Exact)
        } else if let Some(p) = chosen
            .points
            .iter()
            .find(|p| p.ns <= at_ns && at_ns <= p.until_ns)
        {
            (p.base.clone(), at_ns, Resolved::Exact)
        } else {
            // Between two kept points: the first covers T, so one is before.
            let before = chosen
                .points
                .iter()
                .rfind(|p| p.until_ns < at_ns)
                .expect("the oldest point is at or before T");
            let after = chosen
                .points
                .iter()
                .find(|p| p.ns > at_ns)
                .map(|p| p.ns)
                .unwrap_or(chosen.earliest_ns);
            if !or_earlier {
                return Err(TimelineError::BetweenPoints {
                    time: fmt_ns(at_ns),
                    lineage: lineage_id(l),
                    before: fmt_ns(before.until_ns),
                    after: fmt_ns(after),
                });
            }
            (
                before.base.clone(),
                before.until_ns,
                Resolved::Earlier { asked_ns: at_ns },
            )
        };
        let pieces: Vec<Piece> = match self.tail(&base, plan_ns) {
            Ok(c) => c.pieces,
            Err(m) => {
                return Err(TimelineError::InGap {
                    time: fmt_ns(plan_ns),
                    why: m.describe(l),
                })
            }
        };
        let last_needed = pieces
            .last()
            .map(|p| p.last_seq())
            .unwrap_or(base.start_seq);
        // A repair base not yet complete at T means the source may have held
        // an unrecorded change when records after its start were made.
        for r in self
            .bases
            .iter()
            .filter(|b| b.lineage == l && b.kind == BaseKind::Repair && b.completed_ns > plan_ns)
        {
            if r.start_seq > base.start_seq && r.start_seq < last_needed {
                let needs_after = pieces
                    .iter()
                    .any(|p| p.last_seq() > r.start_seq && p.first_ns() <= plan_ns);
                if needs_after {
                    return Err(TimelineError::InGap {
                        time: fmt_ns(plan_ns),
                        why: format!(
                            "the sidecar restarted after a crash and its repair base completed at {}; restore a time before the restart or after that",
                            fmt_ns(r.completed_ns)
                        ),
                    });
                }
            }
        }
        Ok(Plan {
            at_ns: plan_ns,
            lineage: l,
            base,
            pieces,
            resolved,
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

/// Lists every key the volume owns, and only those: a volume nested under
/// this one ("shop" and "shop/db") must never be read as part of it.
pub fn list_volume(store: &dyn Store) -> Result<Vec<String>, StoreError> {
    let mut keys = Vec::new();
    for kind in VOLUME_KEY_KINDS {
        keys.extend(store.list(&format!("{kind}/"))?);
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: u64 = 0xa;
    const B: u64 = 0xb;

    fn seg(l: u64, first: Seq, last: Seq, first_ns: Nanos, last_ns: Nanos) -> String {
        SegmentMeta {
            lineage: l,
            first_seq: first,
            last_seq: last,
            first_ns,
            last_ns,
        }
        .key()
    }

    fn base(l: u64, start_seq: Seq, completed_ns: Nanos) -> String {
        BaseMeta {
            lineage: l,
            start_seq,
            completed_ns,
            kind: BaseKind::Initial,
        }
        .key()
    }

    /// Lineage A restores 100..=110; its journal dropped records 11..=20
    /// at 150; lineage B's first base completed at 200 (when `b_base`) and
    /// its records run to 210.
    fn dropped(b_base: bool) -> Timeline {
        let mut keys = vec![
            base(A, 0, 100),
            seg(A, 1, 10, 101, 110),
            GapMark {
                ns: 150,
                from_lineage: A,
                to_lineage: B,
                from_seq: 11,
                to_seq: 20,
                bytes: 4096,
            }
            .key(),
            seg(B, 21, 30, 160, 210),
        ];
        if b_base {
            keys.push(base(B, 25, 200));
        }
        Timeline::from_keys(keys)
    }

    #[test]
    fn a_declared_gap_is_refused_by_name_and_both_sides_restore() {
        // (B's base stored, time, Ok(lineage) or Err(part of the message))
        let cases: &[(bool, Nanos, Result<u64, &str>)] = &[
            (true, 100, Ok(A)),
            (true, 110, Ok(A)),
            (true, 111, Err("--on-journal-full=gap")),
            (true, 150, Err("Restore a time at or before")),
            (true, 199, Err("lineage 000000000000000b restores from")),
            (true, 200, Ok(B)),
            (true, 210, Ok(B)),
            // Not in the gap: outside every window, as before.
            (true, 99, Err("outside the restore window")),
            (true, 211, Err("outside the restore window")),
            // Before B's base is stored the gap is open: nothing after it restores.
            (false, 110, Ok(A)),
            (false, 111, Err("has no stored base yet")),
            (false, 5000, Err("falls in a gap")),
        ];
        for &(b_base, at, ref want) in cases {
            let got = dropped(b_base).plan(At::Instant(at), None);
            match (want, got) {
                (Ok(l), Ok(p)) => assert_eq!(p.lineage, *l, "at {at}"),
                (Err(part), Err(e)) => {
                    let msg = e.to_string();
                    assert!(msg.contains(part), "at {at}: {msg:?} lacks {part:?}");
                    if part.contains("gap") || part.contains("lineage") {
                        assert!(matches!(e, TimelineError::InGap { .. }), "at {at}: {e:?}");
                    }
                }
                (want, got) => panic!("at {at} (B base {b_base}): want {want:?}, got {got:?}"),
            }
        }
        assert_eq!(dropped(true).plan(At::Latest, None).unwrap().lineage, B);
    }

    #[test]
    fn a_declared_gap_is_listed_and_is_not_damage() {
        for (b_base, to_ns) in [(true, 200), (false, 110)] {
            let gaps = dropped(b_base).gaps();
            assert_eq!(gaps.len(), 1, "{gaps:?}");
            let g = &gaps[0];
            assert_eq!((g.from_ns, g.to_ns), (110, to_ns));
            assert!(g.declared);
            assert_eq!(g.lineage, lineage_id(B));
            assert!(g.reason.contains("up to 4.0 KiB"), "{}", g.reason);
            assert!(g.reason.contains("records 11..=20"), "{}", g.reason);
        }
    }

    #[test]
    fn drops_that_continue_an_open_gap_make_one_gap() {
        let mut keys = vec![
            base(A, 0, 100),
            seg(A, 1, 10, 101, 110),
            base(B, 45, 300),
            seg(B, 41, 50, 290, 310),
        ];
        for (ns, from, to, bytes) in [(150, 11, 20, 1000), (250, 21, 40, 3000)] {
            keys.push(
                GapMark {
                    ns,
                    from_lineage: A,
                    to_lineage: B,
                    from_seq: from,
                    to_seq: to,
                    bytes,
                }
                .key(),
            );
        }
        let t = Timeline::from_keys(keys);
        let gaps = t.gaps();
        assert_eq!(gaps.len(), 1, "{gaps:?}");
        assert_eq!((gaps[0].from_ns, gaps[0].to_ns), (110, 300));
        assert!(
            gaps[0].reason.contains("records 11..=40"),
            "{}",
            gaps[0].reason
        );
        assert!(gaps[0].reason.contains("3.9 KiB"), "{}", gaps[0].reason);
        assert!(matches!(
            t.plan(At::Instant(260), None),
            Err(TimelineError::InGap { .. })
        ));
    }

    #[test]
    fn lineage_ids_print_as_16_hex_digits_and_parse_back() {
        for (text, id) in [
            ("0000000000000000", Some(0)),
            ("00000000000000ff", Some(255)),
            ("7fffffffffffffff", Some(i64::MAX as u64)),
            ("ff", Some(255)),
            ("", None),
            ("+1", None),
            ("0x10", None),
            ("00000000000000001", None),
            ("zz", None),
        ] {
            assert_eq!(text.parse::<LineageId>().ok().map(|l| l.0), id, "{text:?}");
        }
        assert_eq!(LineageId(255).to_string(), "00000000000000ff");
        assert!(LineageId::random().0 < 1 << 63);
    }
}
