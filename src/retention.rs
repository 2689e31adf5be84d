//! Retention: which instants of a volume's timeline a tiered policy keeps,
//! and which stored objects those instants need. It owns the policy (its
//! tiers, their defaults and the `policy/` marker that records the last one
//! applied) and `plan_prune`, a pure function of the timeline, the policy
//! and the current time. It must not do I/O, read a clock or look inside
//! objects: chunks, which only manifests name, are `prune`'s business.
//!
//! The rules (docs/SEMANTICS.md, "Retention"):
//! - Tiers follow one another by age: the seconds tier covers the newest
//!   `seconds` span, the minutes tier the `minutes` span before it, then
//!   hours, then days; anything older is not kept.
//! - The seconds tier is continuous: per lineage, the newest base completed
//!   at or before the tier's start (the *anchor*), every base after it and
//!   every segment after the anchor's start are kept. A lineage that ended
//!   before the tier's start keeps its newest base and everything after it
//!   (its *head*): a volume's last state is never thinned away, and a
//!   sidecar that resumes the lineage continues a continuous timeline. Only
//!   a lineage that ended before every tier and is not the volume's newest
//!   loses its head.
//! - A coarse tier keeps, in each of its minute, hour or day buckets (UTC),
//!   the newest base completed in that bucket, with the records that
//!   complete it (sequence numbers after its start up to its completion).
//!   A tier's real granularity is the coarser of its bucket and the
//!   interval between bases.
//! - The minutes tier also keeps every whole UTC minute T before the
//!   seconds tier's anchor completed (the state of every record timed at or
//!   before T), restored from the newest kept base completed at or before
//!   T. The plan names the records those minutes need that are not yet in
//!   deltas (`CompactJob`); prune compacts them into deltas cut at every
//!   such minute and every kept base's start and completion (with the
//!   records a kept base's walk raced stored raw, see `compact`), stores
//!   them, and plans again: from then on the minutes need only deltas.
//! - Deltas that no kept instant's replay uses are condemned like segments.
//! - Bases and segments that no kept instant needs are condemned;
//!   heartbeats that no longer extend a window, and the lineage marker of
//!   a lineage with nothing kept, are deleted outright (nothing reads them
//!   once a restore is planned). A lineage with no base yet is left alone:
//!   its first base may be on its way.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde::Serialize;

use crate::base::BaseMeta;
use crate::clock::{Nanos, MINUTE_NS, NS_PER_SEC};
use crate::compact::Cuts;
use crate::delta::DeltaMeta;
use crate::record::Seq;
use crate::segment::SegmentMeta;
use crate::timeline::{lineage_id, Chain, Condemned, Piece, Timeline};

/// How long each tier lasts; a zero span turns a tier off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub seconds: Duration,
    pub minutes: Duration,
    pub hours: Duration,
    pub days: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            seconds: Duration::from_secs(24 * 3600),
            minutes: Duration::from_secs(7 * 24 * 3600),
            hours: Duration::from_secs(30 * 24 * 3600),
            days: Duration::from_secs(365 * 24 * 3600),
        }
    }
}

fn ns_of(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX / 4)
}

/// A retention tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Seconds,
    Minutes,
    Hours,
    Days,
}

impl Tier {
    pub const ALL: [Tier; 4] = [Tier::Seconds, Tier::Minutes, Tier::Hours, Tier::Days];

    /// The bucket width; the seconds tier keeps every instant.
    pub fn bucket_ns(self) -> i64 {
        match self {
            Tier::Seconds => NS_PER_SEC,
            Tier::Minutes => MINUTE_NS,
            Tier::Hours => 3600 * NS_PER_SEC,
            Tier::Days => 86_400 * NS_PER_SEC,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Tier::Seconds => "seconds",
            Tier::Minutes => "minutes",
            Tier::Hours => "hours",
            Tier::Days => "days",
        }
    }

    /// What the tier keeps, for people.
    pub fn granularity(self) -> &'static str {
        match self {
            Tier::Seconds => "every instant",
            Tier::Minutes => "each whole minute, from deltas",
            Tier::Hours => "the newest base of each hour",
            Tier::Days => "the newest base of each day",
        }
    }
}

impl Policy {
    fn span(&self, t: Tier) -> i64 {
        ns_of(match t {
            Tier::Seconds => self.seconds,
            Tier::Minutes => self.minutes,
            Tier::Hours => self.hours,
            Tier::Days => self.days,
        })
    }

    /// The ages (now - instant) a tier covers: [from, to).
    pub fn ages(&self, t: Tier) -> (i64, i64) {
        let mut from = 0i64;
        for x in Tier::ALL {
            let to = from.saturating_add(self.span(x));
            if x == t {
                return (from, to);
            }
            from = to;
        }
        unreachable!()
    }

    /// The tier an instant of this age falls in, if any.
    pub fn tier_of_age(&self, age: i64) -> Option<Tier> {
        Tier::ALL.into_iter().find(|&t| {
            let (from, to) = self.ages(t);
            // Instants from the future (a skewed clock) count as newest.
            (age < to) && (age >= from || t == Tier::Seconds) && from < to
        })
    }
}

/// What one lineage keeps in one tier: the continuous window (`Seconds`),
/// or the isolated points the newest prune's policy put in a coarse tier
/// by their age at that prune (`tier` None: points no policy places, such
/// as those of a prune whose marker is gone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierSpan {
    pub lineage: String,
    pub tier: Option<Tier>,
    pub points: usize,
    pub from_ns: Nanos,
    pub to_ns: Nanos,
}

/// Each lineage's window, then its kept points grouped by tier, coarsest
/// first (points no policy places last, tier None): what `rewind ls` shows and what the sidecar exports as the oldest
/// restorable point of each tier.
pub fn tier_spans(t: &Timeline) -> Vec<TierSpan> {
    let mut out = Vec::new();
    let points = t.points();
    for w in t.windows() {
        out.push(TierSpan {
            lineage: w.lineage.clone(),
            tier: Some(Tier::Seconds),
            points: 0,
            from_ns: w.earliest_ns,
            to_ns: w.latest_ns,
        });
        let mut groups: BTreeMap<Option<Tier>, Vec<Nanos>> = BTreeMap::new();
        for p in points.iter().filter(|p| p.lineage == w.lineage) {
            let tier = t
                .policy
                .as_ref()
                .and_then(|m| m.policy.tier_of_age(m.applied_ns - p.ns));
            groups.entry(tier).or_default().push(p.ns);
        }
        // The coarsest (oldest) tier first, as `rewind ls` has always shown.
        for (tier, ns) in groups.iter().rev() {
            out.push(TierSpan {
                lineage: w.lineage.clone(),
                tier: *tier,
                points: ns.len(),
                from_ns: ns[0],
                to_ns: ns[ns.len() - 1],
            });
        }
    }
    out
}

/// `policy/<applied_ns:020>-<seconds>-<minutes>-<hours>-<days>`, spans in
/// whole seconds: the policy the newest prune applied, so that `rewind ls`
/// can show each tier's span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyMark {
    pub applied_ns: Nanos,
    pub policy: Policy,
}

impl PolicyMark {
    pub fn key(&self) -> String {
        let p = &self.policy;
        format!(
            "policy/{:020}-{}-{}-{}-{}",
            self.applied_ns.max(0),
            p.seconds.as_secs(),
            p.minutes.as_secs(),
            p.hours.as_secs(),
            p.days.as_secs()
        )
    }

    pub fn from_key(k: &str) -> Option<PolicyMark> {
        let p: Vec<&str> = k.strip_prefix("policy/")?.split('-').collect();
        if p.len() != 5 {
            return None;
        }
        let secs = |s: &str| s.parse::<u64>().ok().map(Duration::from_secs);
        Some(PolicyMark {
            applied_ns: p[0].parse().ok()?,
            policy: Policy {
                seconds: secs(p[1])?,
                minutes: secs(p[2])?,
                hours: secs(p[3])?,
                days: secs(p[4])?,
            },
        })
    }
}

/// One instant (or, in the seconds tier, span) a prune keeps restorable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeptPoint {
    #[serde(serialize_with = "ser_lineage")]
    pub lineage: u64,
    pub tier: Tier,
    /// The base's completion; for the seconds tier, the window's start.
    pub ns: Nanos,
    /// The seconds tier's window runs to the lineage's latest record.
    pub until_ns: Option<Nanos>,
}

fn ser_lineage<S: serde::Serializer>(l: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&lineage_id(*l))
}

/// What a prune keeps, condemns and deletes (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct PrunePlan {
    pub points: Vec<KeptPoint>,
    /// Keys of segments, bases, heartbeats and lineage markers kept.
    pub keep: Vec<String>,
    /// Markers to write, stamped with the plan's `now`.
    pub condemn: Vec<Condemned>,
    /// The segment and base keys those markers condemn.
    pub condemned_keys: Vec<String>,
    /// Heartbeats and lineage markers to delete without a grace period.
    pub delete_now: Vec<String>,
    /// Lineages left alone because none of their bases has completed.
    pub untouched_lineages: Vec<u64>,
    /// Records to compact into deltas before condemning anything.
    pub jobs: Vec<CompactJob>,
}

/// Records of one lineage that kept minutes need and no delta holds yet:
/// those after `after_seq` up to `through_seq`, and no later than
/// `until_ns`, to be cut at `cuts` and stored as deltas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CompactJob {
    pub lineage: u64,
    pub after_seq: Seq,
    pub through_seq: Seq,
    pub until_ns: Nanos,
    pub cuts: Cuts,
}

/// What a kept instant's replay needs: segment ranges (after, through] in
/// the sense of `condemn_segments`, and delta keys.
fn needs_of(
    b: &BaseMeta,
    chain: &Chain,
    needed: &mut Vec<(Seq, Seq)>,
    deltas: &mut HashSet<String>,
) {
    let has_delta = chain.pieces.iter().any(|p| matches!(p, Piece::Delta(_)));
    if !has_delta {
        let last = chain.pieces.last().map_or(b.start_seq, |p| p.last_seq());
        needed.push((b.start_seq, last));
        return;
    }
    for p in &chain.pieces {
        match p {
            Piece::Segment(s) => needed.push((s.first_seq.saturating_sub(1), s.last_seq)),
            Piece::Delta(d) => {
                deltas.insert(d.key());
            }
        }
    }
}

/// The parts of (lo, hi] that no delta of the lineage covers.
fn uncovered(deltas: &[&DeltaMeta], lo: Seq, hi: Seq) -> Vec<(Seq, Seq)> {
    let mut out = Vec::new();
    let mut at = lo;
    for d in deltas {
        if d.to_seq <= at || d.from_seq >= hi {
            continue;
        }
        if d.from_seq > at {
            out.push((at, d.from_seq));
        }
        at = at.max(d.to_seq);
    }
    if at < hi {
        out.push((at, hi));
    }
    out
}

/// Applies `policy` at `now` to the (non-condemned part of the) timeline.
pub(crate) fn plan_prune(t: &Timeline, policy: &Policy, now: Nanos) -> PrunePlan {
    let mut plan = PrunePlan::default();
    let mut ids: Vec<u64> = t.bases.iter().map(|b| b.lineage).collect();
    ids.extend(t.segments.iter().map(|s| s.lineage));
    ids.extend(t.heartbeats.iter().map(|h| h.lineage));
    ids.sort();
    ids.dedup();
    let views = t.views();
    let seconds_start = now.saturating_sub(policy.span(Tier::Seconds));
    let total = policy.ages(Tier::Days).1;
    let newest = views.iter().max_by_key(|v| v.latest_ns).map(|v| v.lineage);
    for l in ids {
        let segs: Vec<&SegmentMeta> = t.segments.iter().filter(|s| s.lineage == l).collect();
        let hbs = t.heartbeats.iter().filter(|h| h.lineage == l);
        let Some(view) = views.iter().find(|v| v.lineage == l) else {
            plan.untouched_lineages.push(l);
            plan.keep.extend(segs.iter().map(|s| s.key()));
            plan.keep.extend(hbs.map(|h| h.key()));
            plan.keep.extend(
                t.lineages
                    .iter()
                    .filter(|m| m.lineage == l)
                    .map(|m| m.key()),
            );
            continue;
        };
        let bases: Vec<&BaseMeta> = t.bases.iter().filter(|b| b.lineage == l).collect();
        let window: Vec<&BaseMeta> = bases
            .iter()
            .copied()
            .filter(|b| b.completed_ns >= view.earliest_ns)
            .collect();
        // Bases before the window whose records are all stored: each is a
        // restorable point (the timeline may list it inside a delta's span).
        let complete: Vec<&BaseMeta> = bases
            .iter()
            .copied()
            .filter(|b| b.completed_ns < view.earliest_ns && t.tail(b, b.completed_ns).is_ok())
            .collect();
        let mut kept: HashSet<String> = HashSet::new();
        let mut needed_deltas: HashSet<String> = HashSet::new();
        let mut anchor_base: Option<&BaseMeta> = None;
        // Sequence ranges (after, through] whose segments are needed.
        let mut needed: Vec<(Seq, Seq)> = Vec::new();
        let mut candidates: Vec<&BaseMeta> = Vec::new();
        // The head: from the anchor (the newest base at or before the
        // seconds tier's start) to the lineage's latest record, every
        // instant. A lineage that ended before the tier keeps its newest
        // base and what follows, so a volume's last state is never thinned
        // away and a stopped sidecar resumes onto a continuous timeline;
        // only a lineage that ended before every tier, and is not the
        // newest, loses its head.
        let expired = now.saturating_sub(view.latest_ns) >= total && Some(l) != newest;
        if !expired {
            let anchor = window
                .iter()
                .copied()
                .filter(|b| b.completed_ns <= seconds_start)
                .max_by_key(|b| (b.completed_ns, b.start_seq))
                .unwrap_or(&view.window_base);
            anchor_base = Some(anchor);
            for b in window
                .iter()
                .filter(|b| b.completed_ns >= anchor.completed_ns)
            {
                kept.insert(b.key());
            }
            needed.push((anchor.start_seq, Seq::MAX));
            plan.points.push(KeptPoint {
                lineage: l,
                tier: Tier::Seconds,
                ns: anchor.completed_ns,
                until_ns: Some(view.latest_ns),
            });
            candidates.extend(complete.iter().copied());
            candidates.extend(
                window
                    .iter()
                    .copied()
                    .filter(|b| b.completed_ns < anchor.completed_ns),
            );
        } else {
            candidates.extend(complete.iter().copied());
            candidates.extend(window.iter().copied());
        }
        // Coarse tiers: the newest base of each bucket.
        let mut buckets: BTreeMap<(Tier, i64), &BaseMeta> = BTreeMap::new();
        for b in candidates {
            let Some(tier) = policy.tier_of_age(now.saturating_sub(b.completed_ns)) else {
                continue;
            };
            if tier == Tier::Seconds {
                // Only a base newer than the tier's start can be here, and
                // the continuous window keeps those already.
                continue;
            }
            let slot = buckets
                .entry((tier, b.completed_ns.div_euclid(tier.bucket_ns())))
                .or_insert(b);
            if (b.completed_ns, b.start_seq) > (slot.completed_ns, slot.start_seq) {
                *slot = b;
            }
        }
        for ((tier, _), b) in buckets {
            let Ok(chain) = t.tail(b, b.completed_ns) else {
                continue;
            };
            kept.insert(b.key());
            needs_of(b, &chain, &mut needed, &mut needed_deltas);
            plan.points.push(KeptPoint {
                lineage: l,
                tier,
                ns: b.completed_ns,
                until_ns: None,
            });
        }
        // The minutes tier's whole minutes, each from the newest kept base
        // at or before it, while the store shows exactly which records
        // precede it.
        let mut kept_bases: Vec<&BaseMeta> = bases
            .iter()
            .copied()
            .filter(|b| kept.contains(&b.key()))
            .collect();
        kept_bases.sort_by_key(|b| (b.completed_ns, b.start_seq));
        let (young, old) = policy.ages(Tier::Minutes);
        // Records the minutes replay from segments: (after, through, until).
        let mut to_compact: Vec<(Seq, Seq, Nanos)> = Vec::new();
        if let (Some(anchor), true) = (anchor_base, old > young) {
            let oldest = now.saturating_sub(old);
            let newest = now.saturating_sub(young).min(anchor.completed_ns - 1);
            let mut m = (oldest.div_euclid(MINUTE_NS) + 1) * MINUTE_NS;
            let base_points: HashSet<Nanos> = plan
                .points
                .iter()
                .filter(|p| p.lineage == l)
                .map(|p| p.ns)
                .collect();
            while m <= newest {
                if base_points.contains(&m) {
                    // A base completed on the minute: that point is kept.
                    m += MINUTE_NS;
                    continue;
                }
                let i = kept_bases.partition_point(|b| b.completed_ns <= m);
                if let Some(b) = i.checked_sub(1).map(|i| kept_bases[i]) {
                    if let Ok(chain) = t.tail(b, m).map_err(|_| ()).and_then(|c| {
                        if c.evident {
                            Ok(c)
                        } else {
                            Err(())
                        }
                    }) {
                        needs_of(b, &chain, &mut needed, &mut needed_deltas);
                        if chain.pieces.is_empty() {
                            // Nothing since the base: the object holding the
                            // next record shows the state lasted past m.
                            needed.push((b.start_seq, b.start_seq + 1));
                            needed_deltas.extend(
                                t.deltas
                                    .iter()
                                    .filter(|d| d.lineage == l && d.from_seq == b.start_seq)
                                    .map(|d| d.key()),
                            );
                        }
                        plan.points.push(KeptPoint {
                            lineage: l,
                            tier: Tier::Minutes,
                            ns: m,
                            until_ns: None,
                        });
                        let mut at = b.start_seq;
                        for p in &chain.pieces {
                            if let Piece::Segment(s) = p {
                                to_compact.push((at, s.last_seq, m));
                            }
                            at = p.last_seq();
                        }
                    }
                }
                m += MINUTE_NS;
            }
        }
        let deltas: Vec<&DeltaMeta> = t.deltas.iter().filter(|d| d.lineage == l).collect();
        to_compact.sort();
        let mut runs: Vec<(Seq, Seq, Nanos)> = Vec::new();
        for r in to_compact {
            match runs.last_mut() {
                Some(last) if r.0 <= last.1 => {
                    last.1 = last.1.max(r.1);
                    last.2 = last.2.max(r.2);
                }
                _ => runs.push(r),
            }
        }
        if !runs.is_empty() {
            let cuts = Cuts {
                after_seqs: kept_bases.iter().map(|b| b.start_seq).collect(),
                at_times: kept_bases.iter().map(|b| b.completed_ns).collect(),
                minutes: Some((now.saturating_sub(old), now.saturating_sub(young) + 1)),
                bases: kept_bases
                    .iter()
                    .map(|b| (b.start_seq, b.completed_ns))
                    .collect(),
            };
            for (lo, hi, until_ns) in runs {
                for (after_seq, through_seq) in uncovered(&deltas, lo, hi) {
                    plan.jobs.push(CompactJob {
                        lineage: l,
                        after_seq,
                        through_seq,
                        until_ns,
                        cuts: cuts.clone(),
                    });
                }
            }
        }
        condemn_deltas(&mut plan, l, &deltas, &needed_deltas, now);
        for b in &bases {
            if kept.contains(&b.key()) {
                plan.keep.push(b.key());
            } else {
                plan.condemned_keys.push(b.key());
                plan.condemn.push(Condemned::Base {
                    ns: now,
                    base: (*b).clone(),
                });
            }
        }
        condemn_segments(&mut plan, l, &segs, &needed, now);
        // Heartbeats only ever extend a live window past its last segment.
        let last_seq = t.last_seq(l).unwrap_or(0);
        for h in hbs {
            if !expired && h.seq >= last_seq {
                plan.keep.push(h.key());
            } else {
                plan.delete_now.push(h.key());
            }
        }
        for m in t.lineages.iter().filter(|m| m.lineage == l) {
            if kept.is_empty() {
                plan.delete_now.push(m.key());
            } else {
                plan.keep.push(m.key());
            }
        }
    }
    plan.points.sort_by_key(|p| (p.lineage, p.ns));
    plan
}

/// Condemns the deltas no kept instant uses, one marker per run of
/// consecutive ones (deltas never overlap: prune only compacts records no
/// delta holds).
fn condemn_deltas(
    plan: &mut PrunePlan,
    lineage: u64,
    deltas: &[&DeltaMeta],
    needed: &HashSet<String>,
    now: Nanos,
) {
    condemn_runs(plan, lineage, deltas, |d| needed.contains(&d.key()), now);
}

/// Condemns the segments that no range in `needed` touches, with one
/// marker per run of consecutive unneeded segments.
fn condemn_segments(
    plan: &mut PrunePlan,
    lineage: u64,
    segs: &[&SegmentMeta],
    needed: &[(Seq, Seq)],
    now: Nanos,
) {
    let mut sorted: Vec<&SegmentMeta> = segs.to_vec();
    sorted.sort_by_key(|s| (s.first_seq, s.last_seq));
    let is_needed = |s: &SegmentMeta| {
        needed
            .iter()
            .any(|&(after, through)| s.last_seq > after && s.first_seq <= through)
    };
    condemn_runs(plan, lineage, &sorted, is_needed, now);
}

/// A stored piece that prune condemns by its range of sequence numbers: a
/// segment or a delta.
trait Condemnable {
    fn key(&self) -> String;
    /// The first and the last sequence number it holds.
    fn seqs(&self) -> (Seq, Seq);
    /// The marker that condemns the pieces of `lineage` within `seqs`.
    fn marker(ns: Nanos, lineage: u64, seqs: (Seq, Seq)) -> Condemned;
    fn covered_by(&self, marker: &Condemned) -> bool;
}

impl Condemnable for SegmentMeta {
    fn key(&self) -> String {
        SegmentMeta::key(self)
    }
    fn seqs(&self) -> (Seq, Seq) {
        (self.first_seq, self.last_seq)
    }
    fn marker(ns: Nanos, lineage: u64, (from_seq, to_seq): (Seq, Seq)) -> Condemned {
        Condemned::Segments {
            ns,
            lineage,
            from_seq,
            to_seq,
        }
    }
    fn covered_by(&self, marker: &Condemned) -> bool {
        marker.covers_segment(self)
    }
}

impl Condemnable for DeltaMeta {
    fn key(&self) -> String {
        DeltaMeta::key(self)
    }
    fn seqs(&self) -> (Seq, Seq) {
        (self.from_seq, self.to_seq)
    }
    fn marker(ns: Nanos, lineage: u64, (from_seq, to_seq): (Seq, Seq)) -> Condemned {
        Condemned::Deltas {
            ns,
            lineage,
            from_seq,
            to_seq,
        }
    }
    fn covered_by(&self, marker: &Condemned) -> bool {
        marker.covers_delta(self)
    }
}

/// Keeps the pieces of `items` (in sequence order) that `needed` says a
/// kept instant uses and condemns the others, with one marker per run of
/// consecutive unneeded pieces, so that a prune writes a handful of
/// markers however many pieces it condemns.
fn condemn_runs<T: Condemnable>(
    plan: &mut PrunePlan,
    lineage: u64,
    items: &[&T],
    needed: impl Fn(&T) -> bool,
    now: Nanos,
) {
    let mut runs: Vec<Vec<&T>> = vec![Vec::new()];
    for &item in items {
        if needed(item) {
            plan.keep.push(item.key());
            if !runs.last().unwrap().is_empty() {
                runs.push(Vec::new());
            }
        } else {
            runs.last_mut().unwrap().push(item);
        }
    }
    let kept: Vec<&T> = items.iter().copied().filter(|i| needed(i)).collect();
    for run in runs.into_iter().filter(|r| !r.is_empty()) {
        let from = run.iter().map(|i| i.seqs().0).min().unwrap();
        let to = run.iter().map(|i| i.seqs().1).max().unwrap();
        let whole = T::marker(now, lineage, (from, to));
        // Overlapping segments (a journal prefix shipped again) could put a
        // needed one inside the range: then each piece gets its own marker,
        // and one whose marker would still cover a needed piece stays.
        let markers = if kept.iter().any(|k| k.covered_by(&whole)) {
            run.iter()
                .map(|i| T::marker(now, lineage, i.seqs()))
                .filter(|m| !kept.iter().any(|k| k.covered_by(m)))
                .collect()
        } else {
            vec![whole]
        };
        for m in markers {
            plan.condemned_keys
                .extend(run.iter().filter(|i| i.covered_by(&m)).map(|i| i.key()));
            plan.condemn.push(m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::BaseKind;
    use crate::timeline::{Heartbeat, LineageStart};

    const S: i64 = NS_PER_SEC;
    const MIN: i64 = 60 * S;
    const H: i64 = 3600 * S;
    const D: i64 = 86_400 * S;
    /// A "now" on a day boundary, so bucket arithmetic in the cases is plain.
    const NOW: i64 = 20_000 * D;
    const A: u64 = 0xa;
    const B: u64 = 0xb;

    fn seg(l: u64, first: Seq, last: Seq, first_ns: i64, last_ns: i64) -> String {
        SegmentMeta {
            lineage: l,
            first_seq: first,
            last_seq: last,
            first_ns,
            last_ns,
        }
        .key()
    }

    fn base(l: u64, start: Seq, completed: i64, kind: BaseKind) -> String {
        BaseMeta {
            lineage: l,
            start_seq: start,
            completed_ns: completed,
            kind,
        }
        .key()
    }

    /// A lineage written once per `step` from `from` to `to` (one segment
    /// of one record each), with a base every `base_every` records.
    fn lineage(l: u64, from: i64, to: i64, step: i64, base_every: u64) -> Vec<String> {
        let mut keys = vec![LineageStart {
            started_ns: from - 1,
            lineage: l,
            reason: "first-start".into(),
        }
        .key()];
        let mut seq = 0;
        let mut ns = from;
        while ns <= to {
            if seq % base_every == 0 {
                let kind = if seq == 0 {
                    BaseKind::Initial
                } else {
                    BaseKind::Periodic
                };
                keys.push(base(l, seq, ns, kind));
            }
            seq += 1;
            // The record comes after the base's completion.
            keys.push(seg(l, seq, seq, ns + 1, ns + 1));
            ns += step;
        }
        keys
    }

    fn policy(s: i64, m: i64, h: i64, d: i64) -> Policy {
        let dur = |n: i64| Duration::from_nanos(n as u64);
        Policy {
            seconds: dur(s),
            minutes: dur(m),
            hours: dur(h),
            days: dur(d),
        }
    }

    /// Applies the plan's condemnations and deletions to the keys.
    fn after(keys: &[String], plan: &PrunePlan) -> Timeline {
        let mut k: Vec<String> = keys
            .iter()
            .filter(|k| !plan.delete_now.contains(k))
            .cloned()
            .collect();
        k.extend(plan.condemn.iter().map(|c| c.key()));
        Timeline::from_keys(k)
    }

    /// The time of record `seq` of a segment in these fixtures: records are
    /// spread evenly over the segment's time range.
    fn time_of(s: &SegmentMeta, seq: Seq) -> Nanos {
        if s.last_seq == s.first_seq {
            return s.first_ns;
        }
        s.first_ns
            + ((seq - s.first_seq) as i64) * (s.last_ns - s.first_ns)
                / ((s.last_seq - s.first_seq) as i64)
    }

    /// The last record a plan replays.
    fn replayed(pl: &crate::timeline::Plan) -> Seq {
        let mut last = pl.base.start_seq;
        for p in &pl.pieces {
            match p {
                Piece::Delta(d) => last = last.max(d.to_seq),
                Piece::Segment(s) => {
                    for seq in s.first_seq..=s.last_seq {
                        if time_of(s, seq) <= pl.at_ns {
                            last = last.max(seq);
                        }
                    }
                }
            }
        }
        last
    }

    /// What prune's compaction stores for the plan's jobs, as keys: the
    /// real cutter over the fixtures' records.
    fn with_deltas(keys: &[String], plan: &PrunePlan) -> Vec<String> {
        use crate::compact::Cutter;
        use crate::record::{Op, Record};
        let t = Timeline::from_keys(keys.to_vec());
        let mut out = keys.to_vec();
        for job in &plan.jobs {
            let mut cutter = Cutter::new(&job.cuts, job.lineage, job.after_seq, usize::MAX);
            let mut next = job.after_seq + 1;
            let mut next_ns = None;
            let mut pieces = Vec::new();
            'segments: for s in t.segments.iter().filter(|s| s.lineage == job.lineage) {
                for seq in s.first_seq..=s.last_seq {
                    if seq < next {
                        continue;
                    }
                    let time = time_of(s, seq);
                    if seq != next || seq > job.through_seq || time > job.until_ns {
                        next_ns = (seq == next).then_some(time);
                        break 'segments;
                    }
                    next += 1;
                    let op = Op::ClockStep { back_ns: 0 };
                    pieces.extend(cutter.push(Record { seq, time, op }));
                }
            }
            pieces.extend(cutter.finish(next_ns));
            out.extend(pieces.iter().map(|p| p.meta.key()));
        }
        out
    }

    /// Every kept point restores from what the plan leaves, with exactly
    /// the records the full timeline would have replayed.
    fn check_points_restorable(original: &[String], keys: &[String], plan: &PrunePlan) {
        let before = Timeline::from_keys(original.to_vec());
        let t = after(keys, plan);
        for p in &plan.points {
            let id = lineage_id(p.lineage);
            let mut instants = vec![p.ns];
            if let Some(u) = p.until_ns {
                instants.push(u);
                instants.push(p.ns + (u - p.ns) / 2);
            }
            for at in instants {
                let got = t
                    .plan(crate::clock::At::Instant(at), Some(&id))
                    .unwrap_or_else(|e| panic!("{p:?} at {at}: {e}"));
                let want = before
                    .plan(crate::clock::At::Instant(at), Some(&id))
                    .unwrap();
                // The same records replay onto a base at or after the one
                // the unpruned store would use.
                // (a minute restores from the newest *kept* base before it).
                assert!(
                    p.tier == Tier::Minutes
                        || got.base.completed_ns >= want.base.completed_ns
                        || got.base == want.base
                );
                assert_eq!(replayed(&got), replayed(&want), "{p:?} at {at}");
                if p.tier == Tier::Minutes {
                    assert!(
                        got.pieces.iter().all(|x| matches!(x, Piece::Delta(_))),
                        "{p:?} replays deltas only: {:?}",
                        got.pieces
                    );
                }
            }
        }
    }

    #[test]
    fn policy_ages_follow_one_another() {
        let p = Policy::default();
        assert_eq!(p.ages(Tier::Seconds), (0, D));
        assert_eq!(p.ages(Tier::Minutes), (D, 8 * D));
        assert_eq!(p.ages(Tier::Hours), (8 * D, 38 * D));
        assert_eq!(p.ages(Tier::Days), (38 * D, 403 * D));
        assert_eq!(p.tier_of_age(-5), Some(Tier::Seconds));
        assert_eq!(p.tier_of_age(D), Some(Tier::Minutes));
        assert_eq!(p.tier_of_age(403 * D), None);
        let no_minutes = policy(H, 0, D, 0);
        assert_eq!(no_minutes.tier_of_age(2 * H), Some(Tier::Hours));
        assert_eq!(no_minutes.tier_of_age(D + 2 * H), None);
        let m = PolicyMark {
            applied_ns: 7,
            policy: p,
        };
        assert_eq!(PolicyMark::from_key(&m.key()), Some(m));
    }

    struct Case {
        name: &'static str,
        keys: Vec<String>,
        policy: Policy,
        /// (lineage, tier, completion) of every kept point, oldest first.
        points: Vec<(u64, Tier, i64)>,
        /// Keys that must be condemned, and keys that must be kept.
        condemned: Vec<String>,
        kept: Vec<String>,
        deleted: Vec<String>,
    }

    fn cases() -> Vec<Case> {
        let mut out = Vec::new();
        // One lineage, a base every 10 minutes for 3 hours, a record a minute.
        {
            let keys = lineage(A, NOW - 3 * H, NOW - MIN, MIN, 10);
            out.push(Case {
                name: "seconds tier only: everything from the newest base before its start",
                policy: policy(H, 0, 0, 0),
                points: vec![(A, Tier::Seconds, NOW - H)],
                condemned: vec![
                    base(A, 0, NOW - 3 * H, BaseKind::Initial),
                    base(A, 110, NOW - H - 10 * MIN, BaseKind::Periodic),
                    seg(A, 1, 1, NOW - 3 * H + 1, NOW - 3 * H + 1),
                    seg(A, 120, 120, NOW - H - MIN + 1, NOW - H - MIN + 1),
                ],
                kept: vec![
                    base(A, 120, NOW - H, BaseKind::Periodic),
                    seg(A, 121, 121, NOW - H + 1, NOW - H + 1),
                    seg(A, 180, 180, NOW - MIN + 1, NOW - MIN + 1),
                ],
                deleted: vec![],
                keys,
            });
        }
        {
            let keys = lineage(A, NOW - 3 * H, NOW - MIN, MIN, 10);
            out.push(Case {
                name: "hours tier keeps the newest base of each hour and the records that complete it",
                policy: policy(H, 0, 2 * H, 0),
                points: vec![
                    (A, Tier::Hours, NOW - 2 * H - 10 * MIN),
                    (A, Tier::Hours, NOW - H - 10 * MIN),
                    (A, Tier::Seconds, NOW - H),
                ],
                condemned: vec![
                    base(A, 0, NOW - 3 * H, BaseKind::Initial),
                    base(A, 60, NOW - 2 * H, BaseKind::Periodic),
                    seg(A, 52, 52, NOW - 2 * H - 9 * MIN + 1, NOW - 2 * H - 9 * MIN + 1),
                ],
                kept: vec![
                    base(A, 50, NOW - 2 * H - 10 * MIN, BaseKind::Periodic),
                    // The record at the base's completion instant + 1 ns is
                    // after it, so the tail is empty; the next is condemned.
                ],
                deleted: vec![],
                keys,
            });
        }
        {
            // Minutes tier with bases every 30 s: one point per minute.
            let keys = lineage(A, NOW - 10 * MIN, NOW - S, 15 * S, 2);
            out.push(Case {
                name: "minutes tier: each whole minute from deltas, and the newest base of each minute",
                policy: policy(2 * MIN, 5 * MIN, 0, 0),
                points: vec![
                    (A, Tier::Minutes, NOW - 7 * MIN + 30 * S),
                    (A, Tier::Minutes, NOW - 6 * MIN),
                    (A, Tier::Minutes, NOW - 5 * MIN),
                    (A, Tier::Minutes, NOW - 4 * MIN),
                    (A, Tier::Minutes, NOW - 3 * MIN),
                    (A, Tier::Minutes, NOW - 6 * MIN + 30 * S),
                    (A, Tier::Minutes, NOW - 5 * MIN + 30 * S),
                    (A, Tier::Minutes, NOW - 4 * MIN + 30 * S),
                    (A, Tier::Minutes, NOW - 3 * MIN + 30 * S),
                    (A, Tier::Seconds, NOW - 2 * MIN),
                ],
                condemned: vec![
                    base(A, 20, NOW - 5 * MIN, BaseKind::Periodic),
                    // Replaced by the delta that ends at the minute after it.
                    seg(A, 15, 15, NOW - 7 * MIN + 30 * S + 1, NOW - 7 * MIN + 30 * S + 1),
                ],
                kept: vec![],
                deleted: vec![],
                keys,
            });
        }
        {
            // Two lineages: A ended (machine crash) 2 days ago, B is live.
            let mut keys = lineage(A, NOW - 3 * D, NOW - 2 * D, H, 6);
            keys.extend(lineage(B, NOW - 2 * D + MIN, NOW - MIN, H, 6));
            keys.push(
                Heartbeat {
                    ns: NOW - 2 * D + 30 * MIN,
                    lineage: A,
                    seq: 25,
                }
                .key(),
            );
            keys.push(
                Heartbeat {
                    ns: NOW - 10 * S,
                    lineage: B,
                    seq: 48,
                }
                .key(),
            );
            keys.push(
                Heartbeat {
                    ns: NOW - 5 * H,
                    lineage: B,
                    seq: 43,
                }
                .key(),
            );
            out.push(Case {
                name: "two lineages: the ended one keeps daily points and its head, the live one its window",
                policy: policy(D, 0, 0, 30 * D),
                points: vec![
                    (A, Tier::Days, NOW - 3 * D + 18 * H),
                    (A, Tier::Seconds, NOW - 2 * D),
                    (B, Tier::Days, NOW - 2 * D + MIN + 12 * H),
                    (B, Tier::Seconds, NOW - D - 6 * H + MIN),
                ],
                condemned: vec![base(A, 0, NOW - 3 * D, BaseKind::Initial)],
                kept: vec![
                    Heartbeat {
                        ns: NOW - 10 * S,
                        lineage: B,
                        seq: 48,
                    }
                    .key(),
                    Heartbeat {
                        ns: NOW - 2 * D + 30 * MIN,
                        lineage: A,
                        seq: 25,
                    }
                    .key(),
                ],
                deleted: vec![
                    Heartbeat {
                        ns: NOW - 5 * H,
                        lineage: B,
                        seq: 43,
                    }
                    .key(),
                ],
                keys,
            });
        }
        {
            // An expired lineage: everything goes, its marker too, once a
            // newer lineage exists.
            let mut keys = lineage(A, NOW - 40 * D, NOW - 39 * D, H, 6);
            let marker = keys[0].clone();
            keys.extend(lineage(B, NOW - 2 * H, NOW - H, H, 1));
            out.push(Case {
                name: "a lineage older than every tier is condemned whole when a newer one exists",
                policy: policy(D, D, D, D),
                points: vec![(B, Tier::Seconds, NOW - 2 * H)],
                condemned: vec![
                    base(A, 0, NOW - 40 * D, BaseKind::Initial),
                    base(A, 24, NOW - 39 * D, BaseKind::Periodic),
                    seg(A, 25, 25, NOW - 39 * D + 1, NOW - 39 * D + 1),
                ],
                kept: vec![],
                deleted: vec![marker],
                keys,
            });
        }
        {
            let keys = lineage(A, NOW - 40 * D, NOW - 39 * D, H, 6);
            out.push(Case {
                name: "the volume's newest lineage keeps its head however old",
                policy: policy(D, D, D, D),
                points: vec![(A, Tier::Seconds, NOW - 39 * D)],
                condemned: vec![base(A, 0, NOW - 40 * D, BaseKind::Initial)],
                kept: vec![
                    base(A, 24, NOW - 39 * D, BaseKind::Periodic),
                    seg(A, 25, 25, NOW - 39 * D + 1, NOW - 39 * D + 1),
                    keys[0].clone(),
                ],
                deleted: vec![],
                keys,
            });
        }
        {
            // A gap: records 5..6 missing. The base before the gap cannot
            // complete any instant after it; the base after starts the window.
            let keys = vec![
                base(A, 0, NOW - 3 * H, BaseKind::Initial),
                seg(A, 1, 4, NOW - 3 * H + 1, NOW - 2 * H),
                seg(A, 7, 9, NOW - H, NOW - 10 * S),
                base(A, 6, NOW - H - S, BaseKind::Repair),
            ];
            out.push(Case {
                name: "gaps and repair bases: the window starts after the gap, the old base stays a point",
                policy: policy(10 * MIN, 0, 5 * H, 0),
                points: vec![
                    (A, Tier::Hours, NOW - 3 * H),
                    (A, Tier::Seconds, NOW - H - S),
                ],
                condemned: vec![seg(A, 1, 4, NOW - 3 * H + 1, NOW - 2 * H)],
                kept: vec![
                    base(A, 0, NOW - 3 * H, BaseKind::Initial),
                    seg(A, 7, 9, NOW - H, NOW - 10 * S),
                ],
                deleted: vec![],
                keys,
            });
        }
        {
            // A lineage whose first base has not completed: untouched.
            let keys = vec![
                seg(B, 1, 5, NOW - 40 * D, NOW - 40 * D + 5),
                Heartbeat {
                    ns: NOW - 40 * D,
                    lineage: B,
                    seq: 5,
                }
                .key(),
            ];
            out.push(Case {
                name: "a lineage with no base is left alone, however old",
                policy: policy(S, 0, 0, 0),
                points: vec![],
                condemned: vec![],
                kept: keys.clone(),
                deleted: vec![],
                keys,
            });
        }
        {
            // The tail of a coarse point spans into the next segment.
            let keys = vec![
                base(A, 0, NOW - 2 * H, BaseKind::Initial),
                seg(A, 1, 3, NOW - 2 * H - 5 * S, NOW - 2 * H + 5 * S),
                seg(A, 4, 4, NOW - 2 * H + 10 * S, NOW - 2 * H + 10 * S),
                base(A, 4, NOW - 30 * MIN, BaseKind::Periodic),
                seg(A, 5, 5, NOW - 20 * MIN, NOW - 20 * MIN),
            ];
            out.push(Case {
                name: "a coarse point keeps the segments its walk overlapped",
                policy: policy(MIN, 0, 3 * H, 0),
                points: vec![
                    (A, Tier::Hours, NOW - 2 * H),
                    (A, Tier::Seconds, NOW - 30 * MIN),
                ],
                condemned: vec![seg(A, 4, 4, NOW - 2 * H + 10 * S, NOW - 2 * H + 10 * S)],
                kept: vec![seg(A, 1, 3, NOW - 2 * H - 5 * S, NOW - 2 * H + 5 * S)],
                deleted: vec![],
                keys,
            });
        }
        out
    }

    #[test]
    fn plan_prune_table() {
        for mut c in cases() {
            // As prune does: compact what the plan asks, then plan again.
            let first = plan_prune(&Timeline::from_keys(c.keys.clone()), &c.policy, NOW);
            let original = c.keys.clone();
            c.keys = with_deltas(&c.keys, &first);
            let t = Timeline::from_keys(c.keys.clone());
            let plan = plan_prune(&t, &c.policy, NOW);
            assert_eq!(plan.points, first.points, "{}: the same points", c.name);
            assert!(plan.jobs.is_empty(), "{}: {:?}", c.name, plan.jobs);
            let want: Vec<(Tier, i64)> = c.points.iter().map(|p| (p.1, p.2)).collect();
            let got: Vec<(Tier, i64)> = plan.points.iter().map(|p| (p.tier, p.ns)).collect();
            let mut want_sorted = c.points.clone();
            want_sorted.sort_by_key(|p| (p.0, p.2));
            let want_sorted: Vec<(Tier, i64)> = want_sorted.iter().map(|p| (p.1, p.2)).collect();
            assert_eq!(
                got, want_sorted,
                "{}: kept points (wanted {want:?})",
                c.name
            );
            for k in &c.condemned {
                assert!(
                    plan.condemned_keys.contains(k),
                    "{}: {k} must be condemned",
                    c.name
                );
            }
            for k in &c.kept {
                assert!(plan.keep.contains(k), "{}: {k} must be kept", c.name);
            }
            for k in &c.deleted {
                assert!(
                    plan.delete_now.contains(k),
                    "{}: {k} must be deleted",
                    c.name
                );
            }
            // Every key is accounted for exactly once.
            let mut all: Vec<&String> = plan
                .keep
                .iter()
                .chain(&plan.condemned_keys)
                .chain(&plan.delete_now)
                .collect();
            all.sort();
            let mut input: Vec<&String> = c.keys.iter().collect();
            input.sort();
            let missing: Vec<&&String> = input.iter().filter(|k| !all.contains(k)).collect();
            let extra: Vec<&&String> = all.iter().filter(|k| !input.contains(k)).collect();
            assert_eq!(
                all, input,
                "{}: every key kept, condemned or deleted once; unaccounted {missing:?}, twice or unknown {extra:?}",
                c.name
            );
            // The markers hide exactly the condemned keys.
            let pruned = after(&c.keys, &plan);
            let mut hidden: Vec<String> = pruned
                .condemned_segments
                .iter()
                .map(|s| s.key())
                .chain(pruned.condemned_bases.iter().map(|b| b.key()))
                .chain(pruned.condemned_deltas.iter().map(|d| d.key()))
                .collect();
            hidden.sort();
            let mut condemned = plan.condemned_keys.clone();
            condemned.sort();
            assert_eq!(hidden, condemned, "{}", c.name);
            check_points_restorable(&original, &c.keys, &plan);
            // The pruned timeline shows the kept coarse points as points and
            // the seconds tier as the window.
            for p in plan.points.iter().filter(|p| p.tier != Tier::Seconds) {
                let w = pruned.windows();
                let in_window = w.iter().any(|w| {
                    w.lineage == lineage_id(p.lineage)
                        && w.earliest_ns <= p.ns
                        && p.ns <= w.latest_ns
                });
                assert!(
                    in_window
                        || pruned
                            .points()
                            .iter()
                            .any(|q| q.ns <= p.ns && p.ns <= q.until_ns),
                    "{}: {p:?} is shown",
                    c.name
                );
            }
            // A second prune at the same instant changes nothing.
            let again = plan_prune(&pruned, &c.policy, NOW);
            assert!(again.condemn.is_empty(), "{}: {:?}", c.name, again.condemn);
            assert!(again.jobs.is_empty(), "{}: {:?}", c.name, again.jobs);
            assert!(
                again.delete_now.is_empty(),
                "{}: {:?}",
                c.name,
                again.delete_now
            );
            assert_eq!(again.points, plan.points, "{}", c.name);
        }
    }

    /// A year of history at the default policy, as one prune every hour
    /// would leave it plus the last day unpruned: a day of one-second
    /// segments, hourly bases. Planning must stay fast (no quadratic walk
    /// over segments per base).
    #[test]
    fn a_year_of_history_plans_quickly() {
        let mut keys = Vec::new();
        let mut seq = 0;
        // Older tiers: one base a day for a year, one an hour for 37 days.
        for d in (2..=365).rev() {
            keys.push(base(A, seq, NOW - d * D, BaseKind::Periodic));
            seq += 10;
        }
        for h in (25..=37 * 24).rev() {
            keys.push(base(A, seq, NOW - h * H, BaseKind::Periodic));
            seq += 10;
        }
        // The last day: a segment a second, a base an hour.
        for s in 0..86_400 {
            let ns = NOW - D + s * S;
            if s % 3600 == 0 {
                keys.push(base(A, seq, ns, BaseKind::Periodic));
            }
            keys.push(seg(A, seq + 1, seq + 1, ns + 1, ns + 1));
            seq += 1;
        }
        let t0 = std::time::Instant::now();
        let t = Timeline::from_keys(keys);
        let plan = plan_prune(&t, &Policy::default(), NOW);
        let pruned_views = t.views();
        let took = t0.elapsed();
        assert_eq!(pruned_views.len(), 1);
        assert!(plan.points.len() > 1000, "{}", plan.points.len());
        // Generous, so that a debug build on a busy machine passes; a walk
        // over every segment per base takes minutes.
        assert!(
            took < std::time::Duration::from_secs(30),
            "planning took {took:?}"
        );
        eprintln!(
            "a year of history: {} points planned in {took:?}",
            plan.points.len()
        );
    }

    #[test]
    fn between_points_is_refused_and_or_earlier_takes_the_earlier() {
        let keys = lineage(A, NOW - 3 * H, NOW - MIN, MIN, 10);
        let plan = plan_prune(
            &Timeline::from_keys(keys.clone()),
            &policy(H, 0, 2 * H, 0),
            NOW,
        );
        let t = after(&keys, &plan);
        let between = NOW - 2 * H;
        let err = t
            .plan(crate::clock::At::Instant(between), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&crate::clock::fmt_ns(NOW - 2 * H - 10 * MIN))
                && err.contains(&crate::clock::fmt_ns(NOW - H - 10 * MIN))
                && err.contains("--or-earlier"),
            "{err}"
        );
        let p = t
            .plan_at(crate::clock::At::Instant(between), None, true)
            .unwrap();
        assert_eq!(p.at_ns, NOW - 2 * H - 10 * MIN);
        assert_eq!(
            p.resolved,
            crate::timeline::Resolved::Earlier { asked_ns: between }
        );
        // Before the oldest point: outside, and the message names the points.
        let err = t
            .plan_at(crate::clock::At::Instant(NOW - 4 * H), None, true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("outside") && err.contains("earlier point"),
            "{err}"
        );
    }
}
