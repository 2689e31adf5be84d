//! Shipping: seals journal records into segments every interval and puts
//! them in the store, in order, retrying until the store takes them; also
//! puts the control objects (lineage markers, base manifests, heartbeats)
//! in the order they were queued. It owns the cursor of what is stored and
//! releases journal space behind it. It must not reorder objects (a
//! segment is stored only after every earlier one) and must never drop a
//! record: an unreachable store makes it wait and retry, nothing else.
//! Records the journal itself dropped (`--on-journal-full=gap`) are skipped,
//! and the gap's markers are stored in their place (`follow_gaps`).

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;

use crate::base::BaseMeta;
use crate::clock::{fmt_ns, wall_now, Nanos};
use crate::gap::GapMark;
use crate::journal::{Journal, JournalReader};
use crate::record::Seq;
use crate::segment;
use crate::store::{Store, StoreError};
use crate::timeline::{Heartbeat, LineageStart};

/// Largest amount of encoded records in one segment. A segment is held
/// about three times while it is sealed (records, raw, compressed), so this
/// bounds the shipper's memory; 16 MiB keeps the daemon's peak well under
/// 128 MiB while a busy volume still makes few objects per second.
const MAX_SEGMENT_BYTES: usize = 16 << 20;
/// An idle volume writes a heartbeat this often so "latest" stays known.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(60);

/// Counters the shipper keeps for logs and metrics.
#[derive(Default)]
pub struct ShipStats {
    pub segments: AtomicU64,
    pub bytes: AtomicU64,
    pub errors: AtomicU64,
    pub stored_seq: AtomicU64,
    pub stored_ns: AtomicI64,
    /// Nanoseconds from the oldest record of the last segment to its upload.
    pub lag_ns: AtomicI64,
}

pub struct Shipper {
    store: Arc<dyn Store>,
    journal: Arc<Journal>,
    /// Where shipping is in the journal, and the segment being built (kept
    /// between rounds for its buffer): one lock, as they move together.
    cursor: Mutex<Cursor>,
    /// Where in the journal the last stored segment ended (the reader's
    /// position after its records), to tell how much waits to ship.
    stored_pos: Mutex<Option<(Seq, u64)>>,
    control: Mutex<VecDeque<(String, Bytes)>>,
    pub stats: Arc<ShipStats>,
    last_put: Mutex<Instant>,
    lineage: AtomicU64,
    /// Set at shutdown so that the background loop stops retrying and the
    /// final, deadline-bound round can take over.
    abort: AtomicBool,
    /// The last round could not prepare a spare journal file.
    spare_failing: AtomicBool,
    /// The protected source, synced before journal space is released:
    /// fsync does not sync the source, so the journal is the only durable
    /// copy of recent changes until this sync (see `redo.rs`).
    source: Option<std::os::fd::OwnedFd>,
    /// Gap markers queued (by key), and the lineages whose `journal-gap`
    /// lineage marker is queued, in this run.
    gaps_queued: Mutex<(HashSet<String>, HashSet<u64>)>,
    /// The gap whose new lineage has no stored base yet.
    gap_open: Mutex<Option<OpenGap>>,
}

/// What the operator is told when protection is whole again after a gap.
struct OpenGap {
    to_lineage: u64,
    bytes: u64,
    /// The newest record time stored before the gap, as far as this run knows.
    before_ns: Nanos,
}

struct Cursor {
    reader: JournalReader,
    builder: segment::Builder,
}

impl Shipper {
    /// `stored` is the last sequence number the store already holds.
    pub fn new(store: Arc<dyn Store>, journal: Arc<Journal>, stored: Seq, lineage: u64) -> Shipper {
        let stats = Arc::new(ShipStats::default());
        stats.stored_seq.store(stored, Ordering::Relaxed);
        Shipper {
            store,
            journal,
            cursor: Mutex::new(Cursor {
                reader: JournalReader::new(stored + 1),
                builder: segment::Builder::default(),
            }),
            stored_pos: Mutex::new(None),
            control: Mutex::new(VecDeque::new()),
            stats,
            last_put: Mutex::new(Instant::now()),
            lineage: AtomicU64::new(lineage),
            abort: AtomicBool::new(false),
            spare_failing: AtomicBool::new(false),
            source: None,
            gaps_queued: Mutex::new((HashSet::new(), HashSet::new())),
            gap_open: Mutex::new(None),
        }
    }

    /// Sets the directory whose filesystem is synced before journal files
    /// are released.
    pub fn with_source(mut self, fd: std::os::fd::OwnedFd) -> Shipper {
        self.source = Some(fd);
        self
    }

    fn release(&self, seq: Seq) {
        if !self.journal.releasable(seq) {
            return;
        }
        if let Some(src) = &self.source {
            if let Err(e) = rustix::fs::syncfs(src) {
                tracing::warn!("cannot sync the source, keeping the journal: {e}");
                return;
            }
        }
        if let Err(e) = self.journal.release_through(seq) {
            tracing::warn!("cannot release journal space: {e}");
        }
    }

    /// Queues a control object; it is put after every segment sealed so far.
    pub fn queue(&self, key: String, data: Bytes) {
        self.control.lock().push_back((key, data));
    }

    fn put_retrying(
        &self,
        key: &str,
        data: &Bytes,
        deadline: Option<Instant>,
    ) -> Result<(), StoreError> {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.store.put(key, data.clone()) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    // Not logged here: the store the daemon gives the
                    // shipper reports to its outage tracker (outage.rs),
                    // which tells the operator once per outage, not once
                    // per retry.
                    tracing::debug!("cannot upload {key}, retrying in {delay:?}: {e}");
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    if !e.is_transient() && !matches!(e, StoreError::Denied { .. }) {
                        return Err(e);
                    }
                    if deadline.is_some_and(|d| Instant::now() + delay > d)
                        || (deadline.is_none() && self.abort.load(Ordering::Acquire))
                    {
                        return Err(e);
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Seals and stores everything journaled so far, then the queued
    /// control objects. Returns Err only when `deadline` passes or the
    /// store refuses for good.
    pub fn ship_once(&self, deadline: Option<Instant>) -> Result<(), ShipError> {
        // Seal only what was journaled when this round began, so that a
        // busy volume still makes one segment per interval (per 32 MiB).
        let upto = self.journal.last_seq();
        let mut shipped = false;
        loop {
            self.follow_gaps();
            let files = self.journal.files();
            let mut cursor = self.cursor.lock();
            let Cursor { reader, builder } = &mut *cursor;
            let before = reader.next_seq();
            // Frames go into the segment as they are: the checksum has
            // vouched for them, and the restore decodes every record.
            let lineage = match reader.read_raw_upto(&files, MAX_SEGMENT_BYTES, upto, |rec| {
                builder.push(rec);
                Ok(())
            }) {
                Ok(l) => l,
                Err(e) => {
                    *reader = JournalReader::new(before);
                    *builder = segment::Builder::default();
                    return Err(ShipError::Journal(e.to_string()));
                }
            };
            tracing::debug!(
                upto,
                files = files.len(),
                first = files.first().map(|f| f.first_seq),
                "ship round read"
            );
            let Some(lineage) = lineage else {
                break;
            };
            if builder.is_empty() {
                break;
            }
            let (meta, data) = builder.finish(lineage);
            let pos = reader.position();
            drop(cursor);
            let len = data.len() as u64;
            if let Err(e) = self.put_retrying(&meta.key(), &data, deadline) {
                // Rewind the cursor so the same records are sealed again.
                self.cursor.lock().reader = JournalReader::new(meta.first_seq);
                return Err(ShipError::Store(e));
            }
            let now = wall_now();
            self.stats.segments.fetch_add(1, Ordering::Relaxed);
            self.stats.bytes.fetch_add(len, Ordering::Relaxed);
            self.stats
                .stored_seq
                .store(meta.last_seq, Ordering::Relaxed);
            self.stats.stored_ns.store(meta.last_ns, Ordering::Relaxed);
            self.stats
                .lag_ns
                .store(now - meta.first_ns, Ordering::Relaxed);
            *self.last_put.lock() = Instant::now();
            *self.stored_pos.lock() = pos;
            self.cursor.lock().builder.recycle(data);
            self.journal.note_stored(meta.last_seq, pos);
            self.release(meta.last_seq);
            shipped = true;
        }
        if !shipped {
            // Writers waiting for disk space may wait for the current
            // file, whose records were stored before they started waiting
            // (a round that shipped released after each segment).
            self.release(self.stats.stored_seq.load(Ordering::Relaxed));
        }
        // Ready the next journal file off the request path.
        match self.journal.keep_spare() {
            // Once per failure streak, not once per round.
            Err(e) if !self.spare_failing.swap(true, Ordering::Relaxed) => {
                tracing::warn!("cannot prepare a spare journal file (retried every round): {e}")
            }
            Err(_) => {}
            Ok(()) => {
                if self.spare_failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("spare journal files are prepared again");
                }
            }
        }
        loop {
            let Some((key, data)) = self.control.lock().front().cloned() else {
                break;
            };
            self.put_retrying(&key, &data, deadline)
                .map_err(ShipError::Store)?;
            self.control.lock().pop_front();
            *self.last_put.lock() = Instant::now();
            self.stored_control(&key);
        }
        Ok(())
    }

    /// Moves the cursor past records the journal dropped, and queues the
    /// markers of gaps the store does not hold yet: a `journal-gap` lineage
    /// marker for each new lineage and the gap marker. Control objects are
    /// put in order, so both precede the manifest of the new lineage's base.
    fn follow_gaps(&self) {
        let through = self.journal.dropped_through();
        {
            let mut c = self.cursor.lock();
            if c.reader.next_seq() <= through {
                c.reader = JournalReader::new(through + 1);
                c.builder = segment::Builder::default();
            }
        }
        let pending = self.journal.pending_gaps();
        if pending.is_empty() {
            return;
        }
        let mut queued = self.gaps_queued.lock();
        for g in pending {
            if !queued.0.insert(g.key()) {
                continue;
            }
            if queued.1.insert(g.to_lineage) {
                let marker = LineageStart {
                    started_ns: g.ns,
                    lineage: g.to_lineage,
                    reason: "journal-gap".into(),
                };
                self.queue(marker.key(), Bytes::new());
            }
            self.queue(g.key(), Bytes::new());
            self.set_lineage(g.to_lineage);
            let mut open = self.gap_open.lock();
            match open.as_mut() {
                Some(o) if o.to_lineage == g.to_lineage => o.bytes += g.bytes,
                _ => {
                    *open = Some(OpenGap {
                        to_lineage: g.to_lineage,
                        bytes: g.bytes,
                        before_ns: self.stats.stored_ns.load(Ordering::Relaxed),
                    })
                }
            }
        }
    }

    /// After a control object is stored: a gap marker's note is settled,
    /// and the first base of a gap's lineage makes protection whole again.
    fn stored_control(&self, key: &str) {
        if let Some(g) = GapMark::from_key(key) {
            if let Err(e) = self.journal.settle_gap(&g) {
                tracing::warn!("the gap marker is stored, but its note stays: {e}");
            }
        } else if let Some(b) = BaseMeta::from_key(key) {
            self.journal.gap_closed(b.lineage);
            let mut open = self.gap_open.lock();
            if open.as_ref().is_some_and(|o| o.to_lineage == b.lineage) {
                let o = open.take().unwrap();
                let before = if o.before_ns > 0 {
                    fmt_ns(o.before_ns)
                } else {
                    "the last record stored before it".into()
                };
                tracing::info!(
                    "protection is whole again after the journal gap: the base of lineage {:016x} is stored, so every instant from {} restores; restores from {before} to then are refused as a gap ({} of changes were dropped; see `rewind ls`)",
                    b.lineage,
                    fmt_ns(b.completed_ns),
                    crate::outage::fmt_bytes(o.bytes),
                );
            }
        }
    }

    /// Writes a heartbeat if nothing was put for a while (or `force`).
    pub fn heartbeat(&self, force: bool, deadline: Option<Instant>) -> Result<(), ShipError> {
        if !force && self.last_put.lock().elapsed() < HEARTBEAT_EVERY {
            return Ok(());
        }
        let seq = self.stats.stored_seq.load(Ordering::Relaxed);
        if seq != self.journal.last_seq() {
            return Ok(());
        }
        let hb = Heartbeat {
            ns: self.heartbeat_time(),
            lineage: self.lineage.load(Ordering::Relaxed),
            seq,
        };
        self.put_retrying(&hb.key(), &Bytes::new(), deadline)
            .map_err(ShipError::Store)?;
        *self.last_put.lock() = Instant::now();
        Ok(())
    }

    fn heartbeat_time(&self) -> Nanos {
        // Every record is stored, so the state is known up to now.
        wall_now().max(self.journal.last_time())
    }

    /// Makes background rounds (those without a deadline) give up retrying.
    pub fn set_abort(&self, on: bool) {
        self.abort.store(on, Ordering::Release);
    }

    /// The lineage heartbeats name: a journal gap moves it to the new one.
    pub(crate) fn set_lineage(&self, l: u64) {
        self.lineage.store(l, Ordering::Relaxed);
    }

    pub fn pending_control(&self) -> usize {
        self.control.lock().len()
    }

    /// Journal bytes not yet in the store.
    pub fn waiting_bytes(&self) -> u64 {
        crate::journal::bytes_after(
            &self.journal.files(),
            *self.stored_pos.lock(),
            self.stats.stored_seq.load(Ordering::Relaxed),
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error(transparent)]
    Store(StoreError),
    #[error("cannot read the journal: {0}")]
    Journal(String),
    #[error("the store did not answer before the shutdown deadline")]
    Timeout,
}
