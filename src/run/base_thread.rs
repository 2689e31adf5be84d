//! The base thread of `rewind run`: the base a start needs, then periodic
//! incremental bases, one walk at a time, each announced to prune and
//! confirmed chunk by chunk before its manifest is queued. It owns the
//! retry loop of a base and the reload of the previous base after a
//! restart. It must not decide which kind of base a start needs (the
//! caller passes it) nor touch the mount or the journal's lifecycle.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{decide, ns_time, Daemon};
use crate::base::{self, BaseError, BaseKind, BaseMeta, BaseRequest, Previous};
use crate::clock::fmt_ns;
use crate::record::{Ino, Seq};
use crate::timeline::Timeline;

/// A base given up: the daemon is stopping, or a journal drop
/// (`--on-journal-full=gap`) superseded it.
#[derive(Debug, thiserror::Error)]
#[error("base snapshot given up: {0}")]
struct Interrupted(BaseError);

fn superseded(why: &str) -> Interrupted {
    Interrupted(BaseError::Inconsistent(format!("superseded: {why}")))
}

/// What the base thread carries from one base to the next.
struct Incremental {
    /// The last completed base of this lineage, whose objects a periodic
    /// base reuses for files no record changed since its start_seq.
    previous: Option<Previous>,
    /// Identities changed since `previous` started: every set taken from
    /// the filesystem since (attempts that failed included).
    pending: HashSet<Ino>,
    /// After a restart without a base at start: records up to this seq
    /// came from earlier runs, so the previous base and what changed after
    /// it are read back from the store before the first periodic base.
    reload: Option<Seq>,
    /// The catalog's base when `previous` is not it: its chunks count as
    /// stored for the next base if the store still holds its manifest.
    seed: Option<Previous>,
    /// The journal's gap epoch this thread has taken a base for.
    gaps_seen: u64,
}

/// The longest pause between two attempts of a base, so that a base
/// resumes soon after the store returns.
const BASE_RETRY_MAX: Duration = Duration::from_secs(10);

impl Daemon {
    /// Makes sure every chunk `m` names is confirmed stored in this run
    /// before its manifest may be stored. The walk confirms each chunk it
    /// captures, so this finds nothing unless a capture path skipped the
    /// store; then it asks the store, and a chunk it lacks fails the
    /// attempt (the base is walked again) instead of a manifest naming it.
    fn confirm_chunks(&self, m: &base::Manifest) -> Result<u64, BaseError> {
        let missing = self.known_chunks.unconfirmed(m);
        if missing.is_empty() {
            return Ok(0);
        }
        let mut absent = 0;
        for h in &missing {
            if self.store.exists(&base::chunk_key(h))? {
                self.known_chunks.confirm(*h);
            } else {
                absent += 1;
            }
        }
        if absent == 0 {
            tracing::warn!(
                chunks = missing.len(),
                "the base named chunks it had not confirmed; the store holds them all"
            );
            return Ok(missing.len() as u64);
        }
        Err(BaseError::Inconsistent(format!(
            "the base names {absent} chunks the store does not hold; its manifest is held back and the base is taken again"
        )))
    }

    fn take_base(
        &self,
        kind: BaseKind,
        inc: &mut Incremental,
        why: &str,
    ) -> Result<(), Interrupted> {
        if kind != BaseKind::Periodic {
            // A first or repair base must read everything: after a crash
            // the source may hold changes no record describes. What an
            // earlier run's base would have given is moot from here on.
            inc.previous = None;
            inc.reload = None;
        } else if let Some(j0) = inc.reload.take() {
            match self.reload_previous(j0) {
                Ok((prev, changed, records)) => {
                    tracing::info!(
                        base = %prev.meta.key(),
                        records,
                        changed = changed.len(),
                        "incremental base: reusing the newest stored base of this lineage and the records after it; the catalog is rebuilt from it"
                    );
                    inc.pending.extend(changed);
                    self.note_base(&prev);
                    inc.previous = Some(prev);
                }
                Err(e) => {
                    tracing::info!("the next base reads every file: {e}");
                    inc.previous = None;
                }
            }
        }
        // The lineage the journal writes now: a journal gap moves it on.
        let lineage = self.journal.lineage();
        let mut delay = Duration::from_secs(1);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            // A journal drop (--on-journal-full=gap) ends this lineage's
            // continuity: a base of it would name records that are gone.
            let epoch = self.journal.gap_epoch();
            if epoch != inc.gaps_seen || self.journal.lineage() != lineage {
                return Err(superseded(
                    "the journal dropped changes and a base of the new lineage follows",
                ));
            }
            self.watch.activate();
            // Taken before start_seq is read; see `fs::touched` for why no
            // change racing the take is lost.
            inc.pending.extend(self.core.touched().take());
            let start_seq = self.journal.last_seq();
            let started_ns = self.journal.now();
            let written = self.journal.written_bytes();
            if attempt == 1 {
                tracing::info!(?kind, start_seq, why, "taking a base snapshot");
            } else if self.health.is_down() {
                // Retries during an outage are the outage's business.
                tracing::debug!(?kind, start_seq, attempt, "taking a base snapshot again");
            } else {
                tracing::info!(?kind, start_seq, attempt, "taking a base snapshot again");
            }
            self.metrics.set_base_in_progress(true);
            let t0 = Instant::now();
            let (pending, core) = (&inc.pending, &self.core);
            let touched = |ino: Ino| pending.contains(&ino) || core.touched().contains(ino);
            let req = BaseRequest {
                source: &self.source_fd,
                store: self.store.as_ref(),
                lineage,
                start_seq,
                started_ns,
                kind,
                watch: &self.watch,
                unseen: &|seen| self.core.unseen_handles(seen),
                known_chunks: &self.known_chunks,
                previous: inc.previous.as_ref(),
                touched: &touched,
            };
            // The in-flight marker keeps prune from sweeping the chunks
            // this base uploads or reuses (crate::prune's module docs). It
            // protects only what this walk checks: chunks remembered from
            // an earlier base may have been swept since, so forget them.
            self.known_chunks.forget_all();
            let announced = crate::prune::announce_base(
                self.store.as_ref(),
                lineage,
                start_seq,
                started_ns,
                &|| self.stop.load(Ordering::Relaxed),
            );
            let seed = inc.previous.as_ref().or(inc.seed.as_ref());
            let walked = match announced {
                Ok(true) => seed
                    .map_or(Ok(0), |p| {
                        base::trust_chunks_of(self.store.as_ref(), &self.known_chunks, p)
                    })
                    .map_err(BaseError::from)
                    .and_then(|trusted| {
                        let (m, mut stats) = base::walk(&req)?;
                        stats.chunks_checked += self.confirm_chunks(&m)?;
                        stats.chunks_trusted = trusted as u64;
                        Ok((m, stats))
                    }),
                Ok(false) => Err(base::BaseError::Inconsistent(
                    "shutdown while waiting for a prune".into(),
                )),
                Err(e) => Err(e.into()),
            };
            match walked {
                Ok((mut m, stats)) => {
                    // Every operation the walk may have seen is journaled
                    // before the completion time is taken.
                    m.completed_ns = self.core.barrier(|| {
                        self.watch.deactivate();
                        self.journal.now()
                    });
                    // The manifest is the last object of a base, and the
                    // restore window opens on it: it is queued only now
                    // that every chunk it names is confirmed stored.
                    // The manifest reaches the store only after the records
                    // up to its start_seq: a start resumes shipping after the
                    // highest stored start_seq, so a manifest that overtook
                    // them would leave those records unshipped for good
                    // after a crash. The final round at shutdown seals every
                    // record before it puts control objects.
                    while self.shipper.stats.stored_seq.load(Ordering::Acquire) < start_seq
                        && !self.stop.load(Ordering::Acquire)
                        && self.journal.gap_epoch() == epoch
                    {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    if self.journal.gap_epoch() != epoch {
                        self.metrics.set_base_in_progress(false);
                        self.watch.deactivate();
                        return Err(superseded("the journal dropped changes this base needed"));
                    }
                    self.shipper
                        .queue(m.meta().key(), base::encode_manifest(&m));
                    self.metrics.set_base_in_progress(false);
                    if kind != BaseKind::Periodic {
                        self.base_completed_ns
                            .store(m.completed_ns, Ordering::Release);
                        self.base_epoch.store(epoch, Ordering::Release);
                    }
                    self.metrics.add_shipped_bytes(stats.bytes);
                    let took = t0.elapsed();
                    self.metrics.set_last_base(
                        ns_time(m.completed_ns),
                        took,
                        stats.files,
                        stats.files_reused,
                        stats.bytes,
                    );
                    self.written_at_base.store(written, Ordering::Relaxed);
                    tracing::info!(
                        kind = ?kind,
                        files_read = stats.files,
                        files_reused = stats.files_reused,
                        bytes_read = stats.bytes,
                        chunks_uploaded = stats.chunks_uploaded,
                        chunks_reused = stats.chunks_reused,
                        chunks_trusted = stats.chunks_trusted,
                        chunks_checked = stats.chunks_checked,
                        secs = took.as_secs_f64(),
                        start_seq,
                        why,
                        previous = %inc.previous.as_ref().map_or("none (full read)".into(), |p| p.meta.key()),
                        completed = %fmt_ns(m.completed_ns),
                        "base walk finished; usable once its manifest is stored"
                    );
                    inc.pending.clear();
                    let prev = Previous::new(m);
                    self.note_base(&prev);
                    inc.previous = Some(prev);
                    inc.seed = None;
                    return Ok(());
                }
                Err(e) => {
                    self.metrics.set_base_in_progress(false);
                    self.watch.deactivate();
                    if self.stop.load(Ordering::Relaxed) {
                        return Err(Interrupted(e));
                    }
                    if matches!(&e, BaseError::Store(se) if se.is_transient())
                        && self.health.is_down()
                    {
                        // The outage line says it; a line per retry would
                        // bury it.
                        tracing::debug!("base snapshot failed, retrying in {delay:?}: {e}");
                    } else {
                        tracing::warn!("base snapshot failed, retrying in {delay:?}: {e}");
                    }
                    self.sleep_unless_stopped(delay);
                    delay = (delay * 2).min(BASE_RETRY_MAX);
                }
            }
        }
    }

    /// Makes the catalog describe `prev`; a failure costs only the next
    /// restart's shortcut.
    fn note_base(&self, prev: &Previous) {
        if let Some(c) = self.catalog.lock().as_mut() {
            if let Err(e) = c.record_base(prev) {
                tracing::warn!("cannot update the catalog: {e}; a restart reads the previous base back from the store");
            }
        }
    }

    /// As the base thread ends: records in the catalog which identities
    /// changed after the previous base, so that the next start needs no
    /// records from the store. `through` is read before the set is taken,
    /// so the set covers every record up to it (see `fs::touched`).
    fn note_changes(&self, inc: &mut Incremental) {
        let (None, Some(prev)) = (inc.reload, &inc.previous) else {
            return;
        };
        let through = self.journal.last_seq();
        inc.pending.extend(self.core.touched().take());
        if let Some(c) = self.catalog.lock().as_mut() {
            match c.record_touched(&prev.meta.key(), through, &inc.pending) {
                Ok(true) => tracing::debug!(through, changed = inc.pending.len(), "catalog: recorded the changes since the last base"),
                Ok(false) => {}
                Err(e) => tracing::warn!("cannot update the catalog: {e}; a restart reads the records after the last base back from the store"),
            }
        }
    }

    /// Sleeps up to `d`, returning early once the daemon stops.
    fn sleep_unless_stopped(&self, d: Duration) {
        let until = Instant::now() + d;
        while !self.stop.load(Ordering::Acquire) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50).min(until - Instant::now()));
        }
    }

    /// After a restart: the newest stored base of this lineage and the
    /// identities that the stored records after its start_seq, up to `j0`
    /// (the last record of earlier runs), change. Records after `j0` were
    /// made through this run's mount and are in its touched set. Any doubt
    /// is an error, and the caller reads every file instead.
    fn reload_previous(&self, j0: Seq) -> Result<(Previous, HashSet<Ino>, u64), String> {
        let lineage = self.journal.lineage();
        let t = Timeline::load(self.store.as_ref())
            .map_err(|e| format!("cannot list the store: {e}"))?;
        let meta: BaseMeta = t
            .bases
            .iter()
            .filter(|b| b.lineage == lineage && b.start_seq <= j0)
            .max_by_key(|b| (b.completed_ns, b.start_seq))
            .cloned()
            .ok_or("the store holds no base of this lineage")?;
        let stored = self.shipper.stats.stored_seq.load(Ordering::Acquire);
        if stored < j0 {
            return Err(format!(
                "records up to {j0} from before this start are not all stored yet (stored up to {stored})"
            ));
        }
        let m = base::load_manifest(self.store.as_ref(), &meta)
            .map_err(|e| format!("cannot load base {}: {e}", meta.key()))?;
        let mut changed = HashSet::new();
        let mut next = meta.start_seq + 1;
        let mut records = 0u64;
        for s in t.segments.iter().filter(|s| s.lineage == lineage) {
            if next > j0 {
                break;
            }
            if s.last_seq < next {
                continue;
            }
            if s.first_seq > next {
                return Err(format!(
                    "records {next}..{} are not in the store",
                    s.first_seq - 1
                ));
            }
            let data = self
                .store
                .get(&s.key())
                .map_err(|e| format!("cannot read segment {}: {e}", s.key()))?;
            let (_, recs) = crate::segment::decode(&data)
                .map_err(|e| format!("segment {} is damaged: {e}", s.key()))?;
            for r in recs.iter().filter(|r| r.seq >= next) {
                records += 1;
                changed.extend(crate::fs::changed_object(&r.op));
            }
            next = s.last_seq + 1;
        }
        if next <= j0 {
            return Err(format!("records {next}..={j0} are not in the store"));
        }
        Ok((Previous::new(m), changed, records))
    }

    /// Takes a periodic base whenever `interval` passed since the last one
    /// started or `after` journal bytes were appended since, until the
    /// daemon stops. Bases run one at a time on this thread, so two walks
    /// never overlap; none is taken while nothing was appended.
    fn periodic_bases(
        &self,
        inc: &mut Incremental,
        interval: Duration,
        after: u64,
        mut last_start: Instant,
        mut last_seq: Seq,
    ) {
        while !self.stop.load(Ordering::Acquire) {
            // After a journal gap: the new lineage's first base (a full read).
            let epoch = self.journal.gap_epoch();
            if epoch != inc.gaps_seen {
                inc.gaps_seen = epoch;
                let (t0, seq) = (Instant::now(), self.journal.last_seq());
                let why =
                    "the journal dropped changes the store had not taken (--on-journal-full=gap)";
                match self.take_base(BaseKind::Initial, inc, why) {
                    Ok(()) => {
                        self.base_done.store(true, Ordering::Release);
                        (last_start, last_seq) = (t0, seq);
                    }
                    Err(e) => tracing::debug!("the base after a journal gap: {e}"),
                }
                continue;
            }
            let since = self
                .journal
                .written_bytes()
                .saturating_sub(self.written_at_base.load(Ordering::Relaxed));
            let seq = self.journal.last_seq();
            let why = match decide::periodic(
                since,
                after,
                last_start.elapsed(),
                interval,
                seq != last_seq,
            ) {
                decide::Periodic::Wait => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                decide::Periodic::Idle => {
                    // A restore from the last base replays nothing.
                    last_start = Instant::now();
                    continue;
                }
                decide::Periodic::Take(why) => why,
            };
            let t0 = Instant::now();
            match self.take_base(BaseKind::Periodic, inc, &why) {
                Ok(()) => {
                    last_start = t0;
                    last_seq = seq;
                }
                Err(e) => {
                    if !self.stop.load(Ordering::Acquire) {
                        tracing::warn!("periodic base failed: {e}");
                    }
                }
            }
        }
    }
}

/// Starts the base thread: first the base `kind` a start needs (if any),
/// then periodic bases every `interval` or `after` journal bytes until the
/// daemon stops. `last` is when the newest stored base started and its
/// start_seq, which schedule the first periodic base after a restart; `j0`
/// is the last record of earlier runs.
pub(super) fn spawn(
    d: std::sync::Arc<Daemon>,
    kind: Option<BaseKind>,
    j0: Seq,
    (found, resume_from): (crate::catalog::Found, Option<BaseMeta>),
    (interval, after): (Duration, u64),
    (mut last_start, mut last_seq): (Instant, Seq),
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("rewind-base".into())
        .spawn(move || {
            let r =
                crate::catalog::resume(found, kind, d.journal.lineage(), resume_from.as_ref(), j0);
            let mut inc = Incremental {
                previous: r.previous,
                pending: r.pending,
                reload: r.reload.then_some(j0),
                seed: r.seed,
                gaps_seen: 0,
            };
            match kind {
                Some(kind) => {
                    let t0 = Instant::now();
                    last_seq = d.journal.last_seq();
                    match d.take_base(kind, &mut inc, "needed at start") {
                        Ok(()) => d.base_done.store(true, Ordering::Release),
                        // Superseded by a journal gap: the periodic loop
                        // takes the new lineage's base.
                        Err(_) if d.journal.gap_epoch() != 0 && !d.stop.load(Ordering::Acquire) => {
                        }
                        Err(e) => {
                            *d.base_failed.lock() = Some(e.to_string());
                            return;
                        }
                    }
                    last_start = t0;
                }
                // The catalog or the store gives the previous base.
                None => {}
            }
            d.periodic_bases(&mut inc, interval, after, last_start, last_seq);
            d.note_changes(&mut inc);
        })
        .unwrap()
}
