//! `rewind prune`: applies a retention policy (`retention::plan_prune`) to
//! a volume in the store, and is the only code that deletes. It owns the
//! prune lock, the compaction of the minutes tier into deltas (read the
//! segments, cut and compact with `compact`, store the deltas, and only
//! then plan again and condemn what they replace), the deferred deletes
//! (condemn now, delete after a grace period), the mark and sweep of
//! chunks, the in-flight base markers that keep a base's chunks safe while
//! it is being uploaded, and the report.
//! It must not decide what to keep (that is `retention`) and must never
//! delete an object that a kept instant, a base in flight, or a restore
//! started within the grace period may read.
//!
//! Keys it writes (docs/FORMAT.md):
//! - `lock/<acquired_ns:020>-<expires_ns:020>-<id:016x>-<pid>-<host>`: a
//!   prune holds the volume. Conditional PUTs are not used (Garage ignores
//!   them): a prune writes its lock, lists `lock/`, and goes on only if its
//!   lock is the only unexpired one. With strong read-after-write
//!   consistency two prunes cannot both see themselves alone.
//! - `condemned/...` (see `timeline`), including chunk lists:
//!   `condemned/<ns:020>-chunks-<id:016x>` whose body is
//!   `"RWCND001" version:u16=1 count:u64 hash:[32]* blake3:[32]`.
//! - `policy/...` (see `retention`).
//!
//! The sidecar writes `inflight/<started_ns:020>-<lineage:016x>-<start_seq:020>`
//! before a base uploads its first chunk (`announce_base`), then waits
//! while a prune holds the lock. A prune lists `inflight/` after writing
//! its lock: either the prune sees the marker, or the base sees the lock,
//! so a chunk a base decides to reuse is never swept under it.
//!
//! Test knobs: `REWIND_TEST_PRUNE_PAUSE=<duration>` pauses before every
//! change prune makes to the store (a put, or a batch of deletes), so tests
//! can race it and kill it at chosen moments; `REWIND_TEST_PRUNE_HOLD=<path>`
//! keeps the finished prune, lock held, until that file exists, so a test
//! knows the prune is still running when its racing reader ends, however
//! slow the machine.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use bytes::{BufMut, Bytes};
use serde::Serialize;

use crate::base::{chunk_key, load_manifest, BaseError, BaseMeta};
use crate::clock::{fmt_ns, wall_now, Nanos};
use crate::codec::{seal, unseal, DecodeError, Reader};
use crate::compact::{Cutter, Piece};
use crate::delta;
use crate::record::Seq;
use crate::retention::{plan_prune, CompactJob, Policy, PolicyMark, PrunePlan, Tier};
use crate::segment::{self, SegmentError};
use crate::store::{Store, StoreError, Undeleted};
use crate::timeline::{lineage_id, Condemned, Timeline, VOLUME_KEY_KINDS};

/// A delta is cut once the records it stands for reach this much payload,
/// which bounds the memory one compaction needs.
const PIECE_MAX_BYTES: usize = 64 << 20;

/// How long a lock is valid before others may ignore it; a running prune
/// renews it when half is left.
pub(crate) const LOCK_TTL: Duration = Duration::from_secs(600);
/// An in-flight marker without its manifest blocks the chunk sweep this
/// long; after that the base is taken to have failed for good.
pub(crate) const INFLIGHT_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

const CHUNK_LIST_MAGIC: &[u8; 8] = b"RWCND001";
const CHUNK_LIST_VERSION: u16 = 1;

#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("another prune holds this volume's lock: {0}. Try again later")]
    Held(String),
    #[error("{0}")]
    Base(#[from] BaseError),
    #[error("condemned chunk list {key} is damaged: {source}")]
    ChunkList {
        key: String,
        #[source]
        source: DecodeError,
    },
    #[error("the store refused to delete {count} object(s), for example {}: {}; run prune again once that is fixed (it repeats what is left)", .first.key, .first.error)]
    Undeleted { count: usize, first: Undeleted },
    #[error("segment {key}, read to compact it: {source}")]
    Segment {
        key: String,
        #[source]
        source: SegmentError,
    },
    #[error("the prune lock expired while pruning (paused for longer than {0:?}?); stopped before changing anything else")]
    LockLost(Duration),
}

/// A prune's claim on a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LockKey {
    pub acquired_ns: Nanos,
    pub expires_ns: Nanos,
    pub id: u64,
    pub pid: u32,
    pub host: String,
}

impl LockKey {
    pub fn key(&self) -> String {
        format!(
            "lock/{:020}-{:020}-{:016x}-{}-{}",
            self.acquired_ns.max(0),
            self.expires_ns.max(0),
            self.id,
            self.pid,
            self.host
        )
    }

    pub fn from_key(k: &str) -> Option<LockKey> {
        let mut p = k.strip_prefix("lock/")?.splitn(5, '-');
        Some(LockKey {
            acquired_ns: p.next()?.parse().ok()?,
            expires_ns: p.next()?.parse().ok()?,
            id: u64::from_str_radix(p.next()?, 16).ok()?,
            pid: p.next()?.parse().ok()?,
            host: p.next()?.to_string(),
        })
    }

    fn describe(&self) -> String {
        format!(
            "prune {} on host {} (pid {}) since {}; its lock expires at {} if it died",
            self.id_str(),
            self.host,
            self.pid,
            fmt_ns(self.acquired_ns),
            fmt_ns(self.expires_ns)
        )
    }

    fn id_str(&self) -> String {
        format!("{:016x}", self.id)
    }
}

/// A base being uploaded (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InFlight {
    pub started_ns: Nanos,
    pub lineage: u64,
    pub start_seq: Seq,
}

impl InFlight {
    pub fn key(&self) -> String {
        format!(
            "inflight/{:020}-{:016x}-{:020}",
            self.started_ns.max(0),
            self.lineage,
            self.start_seq
        )
    }

    pub fn from_key(k: &str) -> Option<InFlight> {
        let p: Vec<&str> = k.strip_prefix("inflight/")?.split('-').collect();
        if p.len() != 3 {
            return None;
        }
        Some(InFlight {
            started_ns: p[0].parse().ok()?,
            lineage: u64::from_str_radix(p[1], 16).ok()?,
            start_seq: p[2].parse().ok()?,
        })
    }

    /// A manifest of the same lineage from this start on means this
    /// attempt ended (completed, or failed and was taken again later).
    fn resolved_by(&self, bases: &[BaseMeta]) -> bool {
        bases
            .iter()
            .any(|b| b.lineage == self.lineage && b.start_seq >= self.start_seq)
    }
}

/// Called by the sidecar before a base uploads its first chunk: writes the
/// in-flight marker, then waits while an unexpired prune lock exists (so
/// that no chunk the base reuses is swept while it decides). `stop` ends
/// the wait early (shutdown); the caller then gives up on the base.
pub(crate) fn announce_base(
    store: &dyn Store,
    lineage: u64,
    start_seq: Seq,
    started_ns: Nanos,
    stop: &dyn Fn() -> bool,
) -> Result<bool, StoreError> {
    let marker = InFlight {
        started_ns,
        lineage,
        start_seq,
    };
    store.put(&marker.key(), Bytes::new())?;
    let mut warned = false;
    loop {
        let now = wall_now();
        let holder = store
            .list("lock/")?
            .iter()
            .filter_map(|k| LockKey::from_key(k))
            .find(|l| l.expires_ns > now);
        let Some(holder) = holder else {
            return Ok(true);
        };
        if !warned {
            tracing::info!(
                "a prune holds the store ({}); the base waits for it before reusing stored chunks",
                holder.describe()
            );
            warned = true;
        }
        if stop() {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// What one prune does.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    pub policy: Policy,
    pub grace: Duration,
    pub dry_run: bool,
}

/// Objects and bytes.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Tally {
    pub objects: u64,
    pub bytes: u64,
}

impl Tally {
    fn add(&mut self, bytes: u64) {
        self.objects += 1;
        self.bytes += bytes;
    }
}

/// Per kind of object: what this prune condemned and deleted, and what the
/// store holds (not condemned) when it is done.
#[derive(Debug, Default, Clone, Serialize)]
pub struct KindReport {
    pub condemned: Tally,
    pub deleted: Tally,
    pub kept: Tally,
}

/// What compaction read and wrote.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct CompactReport {
    /// Segments read, and their stored bytes.
    pub segments_read: Tally,
    /// Records compacted, and the payload bytes they carried.
    pub records_in: u64,
    pub payload_in: u64,
    /// Deltas written, their stored bytes, and the records they hold.
    pub deltas_written: Tally,
    pub records_out: u64,
    /// Compaction jobs the plan named (in a dry run, none is carried out).
    pub jobs: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub now_ns: Nanos,
    pub points: Vec<crate::retention::KeptPoint>,
    pub compaction: CompactReport,
    /// Keyed by kind: segments, bases, chunks, heartbeats, markers.
    pub kinds: BTreeMap<&'static str, KindReport>,
    /// Things a person should know (a skipped chunk sweep, a broken lock).
    pub notes: Vec<String>,
}

fn kind_of(key: &str) -> &'static str {
    match key.split('/').next().unwrap_or("") {
        "seg" => "segments",
        "delta" => "deltas",
        "base" => "bases",
        "chunk" => "chunks",
        "hb" => "heartbeats",
        _ => "markers",
    }
}

fn encode_chunk_list(hashes: &[[u8; 32]]) -> Bytes {
    let mut out = Vec::with_capacity(hashes.len() * 32 + 64);
    out.extend_from_slice(CHUNK_LIST_MAGIC);
    out.put_u16_le(CHUNK_LIST_VERSION);
    out.put_u64_le(hashes.len() as u64);
    for h in hashes {
        out.extend_from_slice(h);
    }
    seal(&mut out);
    Bytes::from(out)
}

fn decode_chunk_list(data: &[u8]) -> Result<Vec<[u8; 32]>, DecodeError> {
    let body = unseal(data)?;
    let mut r = Reader::new(body);
    if r.take(8)? != CHUNK_LIST_MAGIC {
        return Err(r.err("not a condemned chunk list (bad magic)"));
    }
    let v = r.u16()?;
    if v != CHUNK_LIST_VERSION {
        return Err(r.err(format!("chunk list version {v} is not supported")));
    }
    let n = r.u64()?;
    if n > (r.remaining() / 32) as u64 {
        return Err(r.err("chunk count larger than the list"));
    }
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        out.push(r.hash()?);
    }
    r.end()?;
    Ok(out)
}

fn hash_of_chunk_key(k: &str) -> Option<[u8; 32]> {
    let hex = k.strip_prefix("chunk/")?;
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn hostname() -> String {
    let raw = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    let h: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if h.is_empty() {
        "unknown".into()
    } else {
        h
    }
}

/// Carries out a prune: every change to the store goes through `put` and
/// `delete_all` here, which keep the lock fresh, honour the test pause, and
/// change nothing in a dry run.
struct Pruner<'a> {
    store: &'a dyn Store,
    opts: &'a PruneOptions,
    lock: Option<LockKey>,
    pause: Option<Duration>,
    sizes: HashMap<String, u64>,
    deleted: HashSet<String>,
    report: PruneReport,
    manifests: HashMap<String, Vec<[u8; 32]>>,
}

impl<'a> Pruner<'a> {
    fn pause(&self) {
        if let Some(p) = self.pause {
            std::thread::sleep(p);
        }
    }

    /// Renews the lock when half its time is gone; refuses to go on if it
    /// already expired (another prune may be running by now).
    fn keep_lock(&mut self) -> Result<(), PruneError> {
        let Some(lock) = self.lock.clone() else {
            return Ok(());
        };
        let now = wall_now();
        if now >= lock.expires_ns {
            return Err(PruneError::LockLost(LOCK_TTL));
        }
        let ttl = LOCK_TTL.as_nanos() as i64;
        if lock.expires_ns - now < ttl / 2 {
            let fresh = LockKey {
                acquired_ns: lock.acquired_ns,
                expires_ns: now + ttl,
                ..lock.clone()
            };
            self.store.put(&fresh.key(), Bytes::new())?;
            self.store.delete(&lock.key())?;
            self.lock = Some(fresh);
        }
        Ok(())
    }

    fn put(&mut self, key: &str, data: Bytes) -> Result<(), PruneError> {
        if self.opts.dry_run {
            return Ok(());
        }
        self.pause();
        self.keep_lock()?;
        self.sizes.insert(key.to_string(), data.len() as u64);
        self.store.put(key, data)?;
        Ok(())
    }

    fn delete(&mut self, key: &str) -> Result<(), PruneError> {
        self.delete_all(&[key.to_string()])
    }

    /// Deletes `keys` in batches (`Store::delete_many`); a key the store
    /// refuses stops the prune, as a failed request does.
    fn delete_all(&mut self, keys: &[String]) -> Result<(), PruneError> {
        let todo: Vec<String> = keys
            .iter()
            .filter(|k| !self.deleted.contains(*k))
            .cloned()
            .collect();
        for batch in todo.chunks(crate::store::DELETE_BATCH) {
            if !self.opts.dry_run {
                self.pause();
                self.keep_lock()?;
                let mut refused = self.store.delete_many(batch)?;
                if !refused.is_empty() {
                    return Err(PruneError::Undeleted {
                        count: refused.len(),
                        first: refused.swap_remove(0),
                    });
                }
            }
            for key in batch {
                let size = self.sizes.get(key).copied().unwrap_or(0);
                self.report
                    .kinds
                    .entry(kind_of(key))
                    .or_default()
                    .deleted
                    .add(size);
                self.deleted.insert(key.clone());
            }
        }
        Ok(())
    }

    fn condemned(&mut self, key: &str) {
        let size = self.sizes.get(key).copied().unwrap_or(0);
        self.report
            .kinds
            .entry(kind_of(key))
            .or_default()
            .condemned
            .add(size);
    }

    /// The chunk hashes a manifest names (read once per prune).
    fn refs(&mut self, b: &BaseMeta) -> Result<&Vec<[u8; 32]>, PruneError> {
        let key = b.key();
        if !self.manifests.contains_key(&key) {
            let m = load_manifest(self.store, b)?;
            let mut hashes: Vec<[u8; 32]> = m
                .objects
                .iter()
                .flat_map(|o| o.extents.iter().map(|e| e.hash))
                .collect();
            hashes.sort();
            hashes.dedup();
            self.manifests.insert(key.clone(), hashes);
        }
        Ok(&self.manifests[&key])
    }

    fn listing(&mut self) -> Result<Vec<String>, PruneError> {
        let mut keys = Vec::new();
        for kind in VOLUME_KEY_KINDS {
            for (k, size) in self.store.list_sized(&format!("{kind}/"))? {
                self.sizes.insert(k.clone(), size);
                keys.push(k);
            }
        }
        Ok(keys)
    }
}

/// Takes the volume's prune lock (see the module docs), or says who holds it.
fn acquire(
    store: &dyn Store,
    pause: Option<Duration>,
) -> Result<(LockKey, Vec<String>), PruneError> {
    let host = hostname();
    let mut notes = Vec::new();
    for attempt in 0..3 {
        let now = wall_now();
        // A lock whose process is gone from this very host is stale now,
        // not only at its expiry.
        for k in store.list("lock/")? {
            if let Some(l) = LockKey::from_key(&k) {
                if l.host == host && l.pid != std::process::id() && !pid_alive(l.pid) {
                    store.delete(&k)?;
                    notes.push(format!(
                        "removed the lock of a prune that died on this host ({})",
                        l.describe()
                    ));
                }
            }
        }
        let mine = LockKey {
            acquired_ns: now,
            expires_ns: now + LOCK_TTL.as_nanos() as i64,
            id: rand::random::<u64>(),
            pid: std::process::id(),
            host: host.clone(),
        };
        if let Some(p) = pause {
            std::thread::sleep(p);
        }
        store.put(&mine.key(), Bytes::new())?;
        let others = |store: &dyn Store| -> Result<Vec<LockKey>, StoreError> {
            let now = wall_now();
            let mut v: Vec<LockKey> = store
                .list("lock/")?
                .iter()
                .filter_map(|k| LockKey::from_key(k))
                .filter(|l| l.id != mine.id && l.expires_ns > now)
                .collect();
            v.sort_by_key(|l| l.acquired_ns);
            Ok(v)
        };
        let seen = others(store)?;
        if seen.is_empty() {
            return Ok((mine, notes));
        }
        store.delete(&mine.key())?;
        // Two prunes that started together both back off; each waits a
        // random while and tries again only if no one holds the lock then.
        if attempt < 2 {
            std::thread::sleep(Duration::from_millis(200 + rand::random::<u64>() % 800));
            let still = others(store)?;
            if let Some(h) = still.first() {
                return Err(PruneError::Held(h.describe()));
            }
            continue;
        }
        return Err(PruneError::Held(seen[0].describe()));
    }
    unreachable!("the last attempt returns")
}

/// Runs one prune (see the module docs and docs/SEMANTICS.md).
pub fn prune(store: &dyn Store, opts: &PruneOptions) -> Result<PruneReport, PruneError> {
    let pause = std::env::var("REWIND_TEST_PRUNE_PAUSE")
        .ok()
        .and_then(|v| humantime::parse_duration(&v).ok());
    let mut p = Pruner {
        store,
        opts,
        lock: None,
        pause,
        sizes: HashMap::new(),
        deleted: HashSet::new(),
        report: PruneReport {
            dry_run: opts.dry_run,
            ..Default::default()
        },
        manifests: HashMap::new(),
    };
    if !opts.dry_run {
        let (lock, notes) = acquire(store, pause)?;
        p.report.notes.extend(notes);
        p.lock = Some(lock);
    }
    let res = run(&mut p);
    if let Some(hold) = std::env::var_os("REWIND_TEST_PRUNE_HOLD") {
        let hold = std::path::PathBuf::from(hold);
        while !hold.exists() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    if let Some(lock) = p.lock.take() {
        // Best effort: a lock left behind expires on its own.
        if let Err(e) = store.delete(&lock.key()) {
            p.report.notes.push(format!(
                "could not remove the prune lock {} ({e}); it expires at {}",
                lock.key(),
                fmt_ns(lock.expires_ns)
            ));
        }
    }
    res?;
    Ok(p.report)
}

/// Carries out the plan's compaction jobs: reads each job's segments one
/// at a time, cuts and compacts the records, and stores each delta as soon
/// as it is cut. Returns how many deltas were stored. A job stops early,
/// with a note, at a record that is not stored (the next prune retries).
fn compact_jobs(p: &mut Pruner<'_>, t: &Timeline, jobs: &[CompactJob]) -> Result<u64, PruneError> {
    let mut written = 0;
    for job in jobs {
        let mut cutter = Cutter::new(&job.cuts, job.lineage, job.after_seq, PIECE_MAX_BYTES);
        let mut next = job.after_seq + 1;
        let mut next_ns = None;
        let segs: Vec<_> = t
            .segments
            .iter()
            .filter(|s| {
                s.lineage == job.lineage && s.last_seq >= next && s.first_seq <= job.through_seq
            })
            .cloned()
            .collect();
        'segments: for s in segs {
            if s.last_seq < next {
                continue;
            }
            if s.first_seq > next {
                p.report.notes.push(format!(
                    "compaction of lineage {} stopped at record {next}, which is not stored",
                    lineage_id(job.lineage)
                ));
                break;
            }
            let key = s.key();
            let data = p.store.get(&key)?;
            p.report.compaction.segments_read.add(data.len() as u64);
            let (_, recs) = segment::decode(&data).map_err(|source| PruneError::Segment {
                key: key.clone(),
                source,
            })?;
            for r in recs {
                if r.seq < next {
                    continue;
                }
                if r.seq > job.through_seq || r.time > job.until_ns {
                    next_ns = Some(r.time);
                    break 'segments;
                }
                next = r.seq + 1;
                p.report.compaction.records_in += 1;
                p.report.compaction.payload_in += r.op.payload_len() as u64;
                if let Some(piece) = cutter.push(r) {
                    store_piece(p, piece)?;
                    written += 1;
                }
            }
        }
        // The job ended at a segment's end: the next record is the first
        // of the segment that follows, whose key gives its time. Without it
        // the last piece's span would end right after its last record, and
        // a kept minute in the idle time after it would not restore.
        if next_ns.is_none() {
            next_ns = t
                .segment_from(job.lineage, next)
                .filter(|s| s.first_seq == next)
                .map(|s| s.first_ns);
        }
        if let Some(piece) = cutter.finish(next_ns) {
            store_piece(p, piece)?;
            written += 1;
        }
    }
    Ok(written)
}

fn store_piece(p: &mut Pruner<'_>, piece: Piece) -> Result<(), PruneError> {
    let records = piece.stored();
    let body = delta::encode(&piece.meta, piece.raw, &records);
    p.report.compaction.records_out += records.len() as u64;
    p.report.compaction.deltas_written.add(body.len() as u64);
    p.put(&piece.meta.key(), body)
}

fn run(p: &mut Pruner<'_>) -> Result<(), PruneError> {
    let mut keys = p.listing()?;
    let mut t = Timeline::from_keys(keys.clone());
    let now = wall_now();
    p.report.now_ns = now;
    let mut plan: PrunePlan = plan_prune(&t, &p.opts.policy, now);
    p.report.compaction.jobs = plan.jobs.len() as u64;
    // 0. Compact first; only a plan made after the deltas are stored may
    // condemn the segments they replace, so a prune killed at any moment
    // leaves every kept instant restorable from what is stored.
    if !p.opts.dry_run && !plan.jobs.is_empty() && compact_jobs(p, &t, &plan.jobs)? > 0 {
        keys = p.listing()?;
        t = Timeline::from_keys(keys.clone());
        plan = plan_prune(&t, &p.opts.policy, now);
    }
    p.report.points = plan.points.clone();
    for l in &plan.untouched_lineages {
        p.report.notes.push(format!(
            "lineage {} has no completed base yet; left as it is",
            lineage_id(*l)
        ));
    }

    // 1. Condemn what no kept point needs. Markers first: from the moment
    // one is stored, no restore plans with what it names.
    for m in &plan.condemn {
        p.put(&m.key(), Bytes::new())?;
    }
    for k in &plan.condemned_keys {
        p.condemned(k);
    }
    p.delete_all(&plan.delete_now)?;
    let mark = PolicyMark {
        applied_ns: now,
        policy: p.opts.policy,
    };
    p.put(&mark.key(), Bytes::new())?;
    for k in keys
        .iter()
        .filter(|k| k.starts_with("policy/") && **k != mark.key())
    {
        p.delete(k)?;
    }

    // 2. Chunks: those no live manifest names are condemned in one list.
    let condemned_bases: HashSet<String> = plan
        .condemn
        .iter()
        .filter_map(|c| match c {
            Condemned::Base { base, .. } => Some(base.key()),
            _ => None,
        })
        .collect();
    let mut live: HashSet<[u8; 32]> = HashSet::new();
    // A manifest that cannot be read names chunks no one can know: then
    // no chunk is condemned or deleted (verify reports the damage).
    let mut unreadable: Option<String> = None;
    for b in t
        .bases
        .iter()
        .filter(|b| !condemned_bases.contains(&b.key()))
    {
        match p.refs(b) {
            Ok(h) => live.extend(h.iter().copied()),
            Err(PruneError::Base(e)) if !matches!(e, BaseError::Store(ref s) if s.is_transient()) =>
            {
                unreadable.get_or_insert(format!("{}: {e}", b.key()));
            }
            Err(e) => return Err(e),
        }
    }
    if let Some(why) = &unreadable {
        p.report.notes.push(format!(
            "no chunk was condemned or deleted: a base manifest cannot be read ({why}); run `rewind verify`"
        ));
    }
    let mut lists: Vec<(Condemned, Vec<[u8; 32]>)> = Vec::new();
    for c in t
        .condemned
        .iter()
        .filter(|c| matches!(c, Condemned::Chunks { .. }))
    {
        let key = c.key();
        let data = p.store.get(&key)?;
        let hashes =
            decode_chunk_list(&data).map_err(|source| PruneError::ChunkList { key, source })?;
        lists.push((c.clone(), hashes));
    }
    let pending: HashSet<[u8; 32]> = lists.iter().flat_map(|(_, h)| h.iter().copied()).collect();
    let mut fresh: Vec<[u8; 32]> = keys
        .iter()
        .filter_map(|k| hash_of_chunk_key(k))
        .filter(|h| !live.contains(h) && !pending.contains(h))
        .collect();
    fresh.sort();
    if unreadable.is_some() {
        fresh.clear();
    }
    if !fresh.is_empty() {
        let list = Condemned::Chunks {
            ns: now,
            id: rand::random::<u64>(),
        };
        p.put(&list.key(), encode_chunk_list(&fresh))?;
        for h in &fresh {
            p.condemned(&chunk_key(h));
        }
        lists.push((list, fresh));
    }

    // 3. Delete what was condemned more than the grace period ago: the
    // objects first, the marker last, so an interrupted prune leaves the
    // marker to say what remains to do.
    let due_ns = wall_now().saturating_sub(p.opts.grace.as_nanos() as i64);
    let mut markers: Vec<Condemned> = t.condemned.clone();
    markers.extend(plan.condemn.iter().cloned());
    let segments: Vec<_> = t
        .segments
        .iter()
        .chain(&t.condemned_segments)
        .cloned()
        .collect();
    for m in markers.iter().filter(|m| m.ns() <= due_ns) {
        match m {
            Condemned::Segments { .. } => {
                let covered: Vec<String> = segments
                    .iter()
                    .filter(|s| m.covers_segment(s))
                    .map(|s| s.key())
                    .collect();
                p.delete_all(&covered)?;
                p.delete(&m.key())?;
            }
            Condemned::Deltas { .. } => {
                let covered: Vec<String> = t
                    .deltas
                    .iter()
                    .chain(&t.condemned_deltas)
                    .filter(|d| m.covers_delta(d))
                    .map(|d| d.key())
                    .collect();
                p.delete_all(&covered)?;
                p.delete(&m.key())?;
            }
            Condemned::Base { base, .. } => {
                p.delete(&base.key())?;
                p.delete(&m.key())?;
            }
            Condemned::Chunks { .. } => {}
        }
    }
    if unreadable.is_none() {
        sweep_chunks(p, &lists, due_ns)?;
    }

    // 4. Others' expired locks are litter.
    for k in keys.iter().filter(|k| k.starts_with("lock/")) {
        if let Some(l) = LockKey::from_key(k) {
            if l.expires_ns <= now && Some(&l) != p.lock.as_ref() {
                p.delete(k)?;
            }
        }
    }

    // What remains: everything listed, less what was deleted or condemned.
    let mut condemned_now: HashSet<String> = t
        .condemned_segments
        .iter()
        .map(|s| s.key())
        .chain(t.condemned_bases.iter().map(|b| b.key()))
        .chain(t.condemned_deltas.iter().map(|d| d.key()))
        .chain(plan.condemned_keys.iter().cloned())
        .collect();
    for (_, hashes) in &lists {
        condemned_now.extend(hashes.iter().map(chunk_key));
    }
    let mut kept: BTreeMap<&'static str, Tally> = BTreeMap::new();
    for k in keys.iter().chain(
        plan.condemn
            .iter()
            .map(|c| c.key())
            .collect::<Vec<_>>()
            .iter(),
    ) {
        if p.deleted.contains(k) || condemned_now.contains(k) {
            continue;
        }
        let size = p.sizes.get(k).copied().unwrap_or(0);
        kept.entry(kind_of(k)).or_default().add(size);
    }
    for kind in [
        "segments",
        "deltas",
        "bases",
        "chunks",
        "heartbeats",
        "markers",
    ] {
        p.report.kinds.entry(kind).or_default().kept = kept.get(kind).copied().unwrap_or_default();
    }
    Ok(())
}

/// Deletes the chunks of due lists that no manifest in the store names
/// (condemned manifests included: a restore may still be reading one),
/// unless a base is being uploaded.
fn sweep_chunks(
    p: &mut Pruner<'_>,
    lists: &[(Condemned, Vec<[u8; 32]>)],
    due_ns: Nanos,
) -> Result<(), PruneError> {
    let due: Vec<&(Condemned, Vec<[u8; 32]>)> =
        lists.iter().filter(|(c, _)| c.ns() <= due_ns).collect();
    // In-flight markers first, manifests second: a base whose manifest is
    // not in the second listing shows in the first.
    let inflight: Vec<(String, InFlight)> = p
        .store
        .list("inflight/")?
        .into_iter()
        .filter_map(|k| InFlight::from_key(&k).map(|i| (k, i)))
        .collect();
    let bases: Vec<BaseMeta> = p
        .store
        .list("base/")?
        .iter()
        .filter_map(|k| BaseMeta::from_key(k))
        .filter(|b| !p.deleted.contains(&b.key()))
        .collect();
    let now = wall_now();
    let max_age = INFLIGHT_MAX_AGE.as_nanos() as i64;
    let blocking: Vec<&InFlight> = inflight
        .iter()
        .map(|(_, i)| i)
        .filter(|i| !i.resolved_by(&bases) && now - i.started_ns < max_age)
        .collect();
    if !due.is_empty() {
        if let Some(b) = blocking.first() {
            p.report.notes.push(format!(
                "no chunk was deleted: a base of lineage {} started at {} is being uploaded (in-flight marker without its manifest, younger than {} days); the next prune sweeps",
                lineage_id(b.lineage),
                fmt_ns(b.started_ns),
                INFLIGHT_MAX_AGE.as_secs() / 86_400
            ));
        } else {
            let mut named: HashSet<[u8; 32]> = HashSet::new();
            let mut unreadable = None;
            for b in &bases {
                match p.refs(b) {
                    Ok(h) => named.extend(h.iter().copied()),
                    // Deleted between the listing and the read: by this
                    // prune's own sweep, which only deletes condemned bases.
                    Err(PruneError::Base(BaseError::Store(StoreError::NotFound { .. }))) => {}
                    Err(PruneError::Base(e)) if !matches!(e, BaseError::Store(ref s) if s.is_transient()) =>
                    {
                        unreadable.get_or_insert(format!("{}: {e}", b.key()));
                    }
                    Err(e) => return Err(e),
                }
            }
            if let Some(why) = unreadable {
                p.report.notes.push(format!(
                    "no chunk was deleted: a base manifest cannot be read ({why}); run `rewind verify`"
                ));
                return Ok(());
            }
            for (list, hashes) in due {
                let unnamed: Vec<String> = hashes
                    .iter()
                    .filter(|h| !named.contains(*h))
                    .map(chunk_key)
                    .collect();
                p.delete_all(&unnamed)?;
                p.delete(&list.key())?;
            }
        }
    }
    // Markers of bases that ended (or were given up on) are done with.
    for (k, i) in &inflight {
        if i.resolved_by(&bases) || now - i.started_ns >= max_age {
            p.delete(k)?;
        }
    }
    Ok(())
}

/// The report as people read it.
pub fn render(report: &PruneReport, volume: &str, opts: &PruneOptions) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let pol = &opts.policy;
    let d = |x: Duration| humantime::format_duration(x).to_string();
    let _ = writeln!(
        s,
        "{}volume {volume}: policy every instant for {}, a point a minute for {}, an hour for {}, a day for {}; grace {}",
        if report.dry_run { "dry run (nothing changed) for " } else { "pruned " },
        d(pol.seconds),
        d(pol.minutes),
        d(pol.hours),
        d(pol.days),
        d(opts.grace)
    );
    let mut by: BTreeMap<(String, Tier), Vec<&crate::retention::KeptPoint>> = BTreeMap::new();
    for pt in &report.points {
        by.entry((lineage_id(pt.lineage), pt.tier))
            .or_default()
            .push(pt);
    }
    for ((l, tier), pts) in &by {
        if *tier == Tier::Seconds {
            let pt = pts[0];
            let _ = writeln!(
                s,
                "  lineage {l}: {} tier {} .. {} ({})",
                tier.name(),
                fmt_ns(pt.ns),
                fmt_ns(pt.until_ns.unwrap_or(pt.ns)),
                tier.granularity()
            );
        } else {
            let _ = writeln!(
                s,
                "  lineage {l}: {} tier {} points {} .. {} ({})",
                tier.name(),
                pts.len(),
                fmt_ns(pts[0].ns),
                fmt_ns(pts[pts.len() - 1].ns),
                tier.granularity()
            );
            if report.dry_run {
                for pt in pts {
                    let _ = writeln!(s, "    point {}", fmt_ns(pt.ns));
                }
            }
        }
    }
    let c = &report.compaction;
    if report.dry_run && c.jobs > 0 {
        let _ = writeln!(
            s,
            "  would compact the minutes tier's records in {} run(s) into deltas",
            c.jobs
        );
    } else if c.deltas_written.objects > 0 {
        let _ = writeln!(
            s,
            "  compacted {} records ({} bytes of data) from {} segments ({} bytes) into {} deltas ({} bytes, {} records)",
            c.records_in,
            c.payload_in,
            c.segments_read.objects,
            c.segments_read.bytes,
            c.deltas_written.objects,
            c.deltas_written.bytes,
            c.records_out
        );
    }
    let verb = if report.dry_run { "would be " } else { "" };
    let _ = writeln!(
        s,
        "  {:<11} {:>26} {:>26} {:>26}",
        "",
        format!("{verb}condemned"),
        format!("{verb}deleted"),
        "kept"
    );
    let t = |x: &Tally| format!("{} ({} bytes)", x.objects, x.bytes);
    for (kind, r) in &report.kinds {
        let _ = writeln!(
            s,
            "  {kind:<11} {:>26} {:>26} {:>26}",
            t(&r.condemned),
            t(&r.deleted),
            t(&r.kept)
        );
    }
    for n in &report.notes {
        let _ = writeln!(s, "note: {n}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let l = LockKey {
            acquired_ns: 5,
            expires_ns: 9,
            id: 0xabc,
            pid: 42,
            host: "pod-a-1.example".into(),
        };
        assert_eq!(LockKey::from_key(&l.key()), Some(l));
        let i = InFlight {
            started_ns: 3,
            lineage: 0xdead,
            start_seq: 17,
        };
        assert_eq!(InFlight::from_key(&i.key()), Some(i));
        let hashes = vec![[1u8; 32], [2u8; 32]];
        assert_eq!(
            decode_chunk_list(&encode_chunk_list(&hashes)).unwrap(),
            hashes
        );
        let h = [0xabu8; 32];
        assert_eq!(hash_of_chunk_key(&chunk_key(&h)), Some(h));
        let mut bad = encode_chunk_list(&hashes).to_vec();
        bad[12] ^= 1;
        assert!(decode_chunk_list(&bad).is_err());
    }

    #[test]
    fn an_inflight_marker_is_resolved_by_a_later_manifest_of_its_lineage() {
        let i = InFlight {
            started_ns: 3,
            lineage: 7,
            start_seq: 10,
        };
        let b = |l, s| BaseMeta {
            lineage: l,
            start_seq: s,
            completed_ns: 100,
            kind: crate::base::BaseKind::Repair,
        };
        assert!(!i.resolved_by(&[b(7, 9), b(8, 20)]));
        assert!(i.resolved_by(&[b(7, 10)]));
        assert!(i.resolved_by(&[b(7, 30)]));
    }
}
