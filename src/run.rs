//! `rewind run`: the daemon that wires the pieces together. It owns
//! startup (stale-mount cleanup, the journal lock, crash detection from the
//! state file and the boot id, lineage choice, journal recovery), the base
//! thread (the base a start needs, then periodic incremental bases, one
//! walk at a time), the shipping thread, and shutdown (lazy detach, serve open files
//! until the deadline, final seal and upload, exit status). It must not
//! implement any format or filesystem operation itself.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use parking_lot::Mutex;
use rustix::fs::{Mode, OFlags};
use serde::{Deserialize, Serialize};

use crate::base::{
    self, BaseError, BaseKind, BaseMeta, BaseRequest, BaseWatch, Previous, StoredChunks,
};
use crate::cli::RunArgs;
use crate::clock::fmt_ns;
use crate::fs::{fuse, Passthrough};
use crate::journal::Journal;
use crate::layout::HIDDEN;
use crate::metrics::Metrics;
use crate::outage::{self, StoreHealth, Watched};
use crate::record::{Ino, Seq};
use crate::restore::INCOMPLETE_MARKER;
use crate::ship::{ShipStats, Shipper};
use crate::store::{self, Prefixed, Store, StoreError, StoreOptions};
use crate::timeline::{LineageStart, Timeline};

/// How long startup waits for the store before protecting without it.
const STORE_STARTUP_WAIT: Duration = Duration::from_secs(5);

fn opts_clone(args: &RunArgs) -> StoreOptions {
    StoreOptions {
        s3_endpoint: args.store.s3_endpoint.clone(),
        s3_path_style: args.store.s3_path_style,
        tolerate_unreachable: true,
        skip_check: true,
    }
}

/// What the journal directory remembers between runs.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    volume: String,
    lineage: String,
    boot_id: String,
    clean: bool,
}

fn boot_id() -> String {
    std::env::var("REWIND_BOOT_ID")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn write_state(dir: &Path, st: &State) -> std::io::Result<()> {
    let tmp = dir.join("state.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(st).unwrap())?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join("state.json"))?;
    std::fs::File::open(dir)?.sync_all()
}

/// What the daemon makes durable before the journal drops records in gap
/// mode: the source (which holds their effects, and which fsync did not
/// sync), and the gap's lineage in the state file, so that a start after a
/// crash continues it.
fn prepare_drop(
    source: &Path,
    jdir: &Path,
    volume: &str,
    boot: &str,
) -> anyhow::Result<crate::journal::PrepareDrop> {
    let src = rustix::fs::open(
        source,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let (jdir, volume, boot) = (jdir.to_path_buf(), volume.to_string(), boot.to_string());
    Ok(Box::new(move |g| {
        rustix::fs::syncfs(&src).map_err(|e| format!("cannot sync the source: {e}"))?;
        let st = State {
            volume: volume.clone(),
            lineage: format!("{:016x}", g.to_lineage),
            boot_id: boot.clone(),
            clean: false,
        };
        write_state(&jdir, &st).map_err(|e| format!("cannot write the state file: {e}"))
    }))
}

fn read_state(dir: &Path) -> Option<State> {
    serde_json::from_slice(&std::fs::read(dir.join("state.json")).ok()?).ok()
}

fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .is_some_and(|m| m.replace("\\040", " ") == want)
    })
}

/// A previous daemon that died leaves a dead FUSE mount ("Transport
/// endpoint is not connected"); detach it so a new mount can take its place.
fn clear_stale_mount(mount: &Path) -> anyhow::Result<()> {
    for _ in 0..8 {
        if !is_mounted(mount) {
            return Ok(());
        }
        tracing::warn!(mount = %mount.display(), "detaching a stale mount left by an earlier run");
        rustix::mount::unmount(mount, rustix::mount::UnmountFlags::DETACH)
            .with_context(|| format!("cannot detach the stale mount at {}", mount.display()))?;
    }
    Ok(())
}

/// Everything the threads share.
struct Daemon {
    metrics: Arc<Metrics>,
    store: Arc<dyn Store>,
    journal: Arc<Journal>,
    shipper: Arc<Shipper>,
    core: Arc<Passthrough>,
    watch: Arc<BaseWatch>,
    source_fd: std::os::fd::OwnedFd,
    stop: AtomicBool,
    base_done: AtomicBool,
    /// The journal's gap epoch when the last start or after-gap base was
    /// taken: a later drop leaves the current lineage without a base.
    base_epoch: AtomicU64,
    base_completed_ns: std::sync::atomic::AtomicI64,
    base_failed: Mutex<Option<String>>,
    /// Chunks confirmed stored during this run (this lineage); see
    /// `base::StoredChunks`.
    known_chunks: StoredChunks,
    health: Arc<StoreHealth>,
    /// `journal.written_bytes()` when the last completed base started.
    written_at_base: AtomicU64,
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
    /// The journal's gap epoch this thread has taken a base for.
    gaps_seen: u64,
}

/// The longest pause between two attempts of a base, so that a base
/// resumes soon after the store returns.
const BASE_RETRY_MAX: Duration = Duration::from_secs(10);

impl Daemon {
    /// Whether the current lineage has its base (the one a start needs, or
    /// the first after a journal gap).
    fn based(&self) -> bool {
        self.base_done.load(Ordering::Acquire)
            && self.base_epoch.load(Ordering::Acquire) == self.journal.gap_epoch()
    }

    /// Makes sure every chunk `m` names is confirmed stored in this run
    /// before its manifest may be stored. The walk confirms each chunk it
    /// captures, so this finds nothing unless a capture path skipped the
    /// store; then it asks the store, and a chunk it lacks fails the
    /// attempt (the base is walked again) instead of a manifest naming it.
    fn confirm_chunks(&self, m: &base::Manifest) -> Result<(), BaseError> {
        let missing = self.known_chunks.unconfirmed(m);
        if missing.is_empty() {
            return Ok(());
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
            return Ok(());
        }
        Err(BaseError::Inconsistent(format!(
            "the base names {absent} chunks the store does not hold; its manifest is held back and the base is taken again"
        )))
    }

    fn take_base(
        &self,
        lineage: u64,
        kind: BaseKind,
        inc: &mut Incremental,
        why: &str,
    ) -> anyhow::Result<()> {
        if kind != BaseKind::Periodic {
            // A first or repair base must read everything: after a crash
            // the source may hold changes no record describes.
            inc.previous = None;
        } else if let Some(j0) = inc.reload.take() {
            match self.reload_previous(lineage, j0) {
                Ok((prev, changed, records)) => {
                    tracing::info!(
                        base = %prev.meta.key(),
                        records,
                        changed = changed.len(),
                        "incremental base: reusing the newest stored base of this lineage and the records after it"
                    );
                    inc.pending.extend(changed);
                    inc.previous = Some(prev);
                }
                Err(e) => {
                    tracing::info!("the next base reads every file: {e}");
                    inc.previous = None;
                }
            }
        }
        let mut delay = Duration::from_secs(1);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            // A journal drop (--on-journal-full=gap) ends this lineage's
            // continuity: a base of it would name records that are gone.
            let epoch = self.journal.gap_epoch();
            if epoch != inc.gaps_seen || self.journal.lineage() != lineage {
                bail!(
                    "superseded: the journal dropped changes and a base of the new lineage follows"
                );
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
            let walked = match announced {
                Ok(true) => base::walk(&req).and_then(|(m, stats)| {
                    self.confirm_chunks(&m)?;
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
                        bail!("superseded: the journal dropped changes this base needed");
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
                        secs = took.as_secs_f64(),
                        start_seq,
                        why,
                        previous = %inc.previous.as_ref().map_or("none (full read)".into(), |p| p.meta.key()),
                        completed = %fmt_ns(m.completed_ns),
                        "base walk finished; usable once its manifest is stored"
                    );
                    inc.pending.clear();
                    inc.previous = Some(Previous::new(m));
                    return Ok(());
                }
                Err(e) => {
                    self.metrics.set_base_in_progress(false);
                    self.watch.deactivate();
                    if self.stop.load(Ordering::Relaxed) {
                        bail!("base snapshot interrupted by shutdown: {e}");
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

    /// Sleeps up to `d`, returning early once the daemon stops.
    fn sleep_unless_stopped(&self, d: Duration) {
        let until = Instant::now() + d;
        while !self.stop.load(Ordering::Acquire) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50).min(until - Instant::now()));
        }
    }

    /// After a restart: the newest stored base of `lineage` and the
    /// identities that the stored records after its start_seq, up to `j0`
    /// (the last record of earlier runs), change. Records after `j0` were
    /// made through this run's mount and are in its touched set. Any doubt
    /// is an error, and the caller reads every file instead.
    fn reload_previous(
        &self,
        lineage: u64,
        j0: Seq,
    ) -> Result<(Previous, HashSet<Ino>, u64), String> {
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
        lineage: u64,
        inc: &mut Incremental,
        interval: Duration,
        after: u64,
        mut last_start: Instant,
        mut last_seq: Seq,
    ) {
        let mut lineage = lineage;
        while !self.stop.load(Ordering::Acquire) {
            // After a journal gap: the new lineage's first base (a full read).
            let epoch = self.journal.gap_epoch();
            if epoch != inc.gaps_seen {
                inc.gaps_seen = epoch;
                lineage = self.journal.lineage();
                let (t0, seq) = (Instant::now(), self.journal.last_seq());
                let why =
                    "the journal dropped changes the store had not taken (--on-journal-full=gap)";
                match self.take_base(lineage, BaseKind::Initial, inc, why) {
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
            let why = if since >= after {
                format!("{since} journal bytes since the last base (--base-after {after})")
            } else if last_start.elapsed() >= interval {
                format!(
                    "{:?} since the last base (--base-interval)",
                    last_start.elapsed()
                )
            } else {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            };
            let seq = self.journal.last_seq();
            if seq == last_seq {
                // Idle: a restore from the last base replays nothing.
                last_start = Instant::now();
                continue;
            }
            let t0 = Instant::now();
            match self.take_base(lineage, BaseKind::Periodic, inc, &why) {
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

pub fn run(args: RunArgs) -> anyhow::Result<i32> {
    if args.base_interval.is_zero() || args.base_after == 0 {
        bail!("--base-interval and --base-after must be more than zero");
    }
    let source = std::fs::canonicalize(&args.source)
        .with_context(|| format!("--source {} does not exist", args.source.display()))?;
    if !source.is_dir() {
        bail!("--source {} is not a directory", source.display());
    }
    let mount = std::path::absolute(&args.mount)?;
    clear_stale_mount(&mount)?;
    if !mount.exists() {
        std::fs::create_dir_all(&mount)
            .with_context(|| format!("cannot create --mount {}", mount.display()))?;
    }
    let mount = std::fs::canonicalize(&mount)?;
    if mount.starts_with(&source) || source.starts_with(&mount) {
        bail!(
            "--mount {} and --source {} must not contain each other",
            mount.display(),
            source.display()
        );
    }
    if source.join(HIDDEN).join(INCOMPLETE_MARKER).exists() {
        bail!(
            "{} holds an unfinished restore ({}); finish it with `rewind restore --force` or empty the directory before protecting it",
            source.display(),
            source.join(HIDDEN).join(INCOMPLETE_MARKER).display()
        );
    }
    let jdir = args
        .journal_dir
        .clone()
        .unwrap_or_else(|| source.join(HIDDEN).join("journal"));
    std::fs::create_dir_all(&jdir)
        .with_context(|| format!("cannot create the journal directory {}", jdir.display()))?;
    let lock = std::fs::File::create(jdir.join("lock"))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
        |_| {
            anyhow::anyhow!(
                "another `rewind run` holds the journal {}; stop it first",
                jdir.display()
            )
        },
    )?;

    crate::timeline::check_volume_name(&args.store.volume)
        .map_err(|e| anyhow::anyhow!("--volume: {e}"))?;
    // An unreachable store must not stop protection (the journal holds
    // changes meanwhile); a missing bucket or refused credentials must. A
    // store that hangs gets a few seconds, then protection starts without
    // its answer (a repair base is taken, which is always safe).
    let opts = StoreOptions {
        s3_endpoint: args.store.s3_endpoint.clone(),
        s3_path_style: args.store.s3_path_style,
        tolerate_unreachable: true,
        skip_check: false,
    };
    let (tx, rx) = crossbeam_channel::bounded(1);
    {
        let url = args.store.store.clone();
        let volume = args.store.volume.clone();
        std::thread::spawn(move || {
            type Opened = (Arc<dyn Store>, Option<Timeline>, Option<StoreError>);
            let res = (|| -> anyhow::Result<Opened> {
                let root = store::open(&url, &opts)?;
                let store: Arc<dyn Store> = Arc::new(Prefixed::new(root, &volume));
                // An unreachable store is reported as the start of an
                // outage, once the outage tracker exists (below).
                let (timeline, down) = match Timeline::load(store.as_ref()) {
                    Ok(t) => (Some(t), None),
                    Err(e) if e.is_transient() => (None, Some(e)),
                    Err(e) => return Err(e).context("cannot use the store"),
                };
                // A daemon killed mid-upload cannot abort its own multipart
                // uploads; only this volume's own kinds of keys are touched.
                if timeline.is_some() {
                    for kind in crate::timeline::VOLUME_KEY_KINDS {
                        match store.abort_incomplete_uploads(&format!("{kind}/")) {
                            Ok(0) => {}
                            Ok(n) => tracing::info!(
                                "aborted {n} incomplete uploads left by an earlier run"
                            ),
                            Err(e) => tracing::warn!("cannot list incomplete uploads: {e}"),
                        }
                    }
                }
                Ok((store, timeline, down))
            })();
            let _ = tx.send(res);
        });
    }
    let (store, timeline, down_at_start) = match rx.recv_timeout(STORE_STARTUP_WAIT) {
        Ok(r) => r?,
        Err(_) => {
            tracing::warn!("the store did not answer within {STORE_STARTUP_WAIT:?}; protecting anyway, the journal holds changes until it returns");
            let root = store::open(&args.store.store, &opts_clone(&args))
                .context("cannot open the store")?;
            (
                Arc::new(Prefixed::new(root, &args.store.volume)) as Arc<dyn Store>,
                None,
                None,
            )
        }
    };
    let known = timeline.is_some();
    let timeline = timeline.unwrap_or_default();

    // Decide the lineage: continue it after a clean stop or a process crash
    // (with a repair base), start a new one after a machine crash.
    let boot = boot_id();
    let prev = read_state(&jdir);
    if let Some(p) = &prev {
        if p.volume != args.store.volume {
            bail!("the journal in {} belongs to volume {:?}, not {:?}; use that --volume or another --journal-dir", jdir.display(), p.volume, args.store.volume);
        }
    }
    let (lineage, new_lineage, mut base_kind) = match &prev {
        None => (
            rand::random::<u64>() >> 1,
            Some("first-start"),
            Some(BaseKind::Initial),
        ),
        Some(p) => {
            let l = u64::from_str_radix(&p.lineage, 16)
                .context("state.json has a malformed lineage")?;
            if p.boot_id != boot && !p.clean {
                tracing::warn!("the machine restarted without a clean stop: shipping the journal's intact prefix, then starting a new lineage");
                (
                    rand::random::<u64>() >> 1,
                    Some("machine-crash"),
                    Some(BaseKind::Initial),
                )
            } else if !p.clean {
                tracing::warn!("the previous run did not stop cleanly: taking a repair base");
                (l, None, Some(BaseKind::Repair))
            } else {
                (l, None, None)
            }
        }
    };
    if base_kind.is_none() && (!known || !timeline.bases.iter().any(|b| b.lineage == lineage)) {
        base_kind = Some(if prev.is_some() {
            BaseKind::Repair
        } else {
            BaseKind::Initial
        });
    }
    let stored = timeline
        .segments
        .iter()
        .map(|s| s.last_seq)
        .chain(timeline.bases.iter().map(|b| b.start_seq))
        .max()
        .unwrap_or(0);
    let floor = timeline
        .segments
        .iter()
        .map(|s| s.last_ns)
        .chain(timeline.heartbeats.iter().map(|h| h.ns))
        .max()
        .unwrap_or(0);
    let old_lineage = prev
        .as_ref()
        .and_then(|p| u64::from_str_radix(&p.lineage, 16).ok())
        .unwrap_or(lineage);
    let (journal, rec) = Journal::open(
        &jdir,
        old_lineage,
        stored + 1,
        floor,
        args.max_journal_bytes,
    )
    .context("cannot open the journal")?;
    for (p, n) in &rec.torn {
        tracing::warn!("journal {}: cut a torn tail of {n} bytes", p.display());
    }
    if rec.records > 0 {
        tracing::info!(
            records = rec.records,
            "journal holds records not yet confirmed stored; shipping them first"
        );
    }
    // A journal gap whose marker the store does not hold yet: the journal's
    // records belong to the gap's lineage (src/gap.rs).
    let (lineage, new_lineage, base_kind) = crate::gap::after_restart(
        (lineage, new_lineage, base_kind),
        journal.pending_gaps().last(),
    );
    if let Some(g) = journal.pending_gaps().last() {
        tracing::warn!(lineage = %format!("{lineage:016x}"), "a journal gap of an earlier run is not yet recorded in the store (its note is in the journal directory): continuing its lineage, which takes its first base; the gap marker is stored once the store takes objects ({})", g.key());
    }
    if new_lineage == Some("machine-crash") {
        // fsync waited for the journal alone: put back into the source
        // whatever the crash took from it before anything reads it.
        let t0 = Instant::now();
        let st = crate::redo::redo(&source, &journal)
            .context("cannot redo the journal onto the source after the machine crash")?;
        tracing::info!(
            records = st.records,
            skipped = st.skipped,
            recreated = st.recreated,
            secs = t0.elapsed().as_secs_f64(),
            "redid the journal onto the source"
        );
    }
    if lineage != old_lineage {
        journal.set_lineage(lineage)?;
    }
    let journal = Arc::new(journal);
    if args.on_journal_full == crate::cli::OnJournalFull::Gap {
        journal.set_gap_mode(prepare_drop(&source, &jdir, &args.store.volume, &boot)?);
    }
    write_state(
        &jdir,
        &State {
            volume: args.store.volume.clone(),
            lineage: format!("{lineage:016x}"),
            boot_id: boot.clone(),
            clean: false,
        },
    )?;

    let source_for_sync = rustix::fs::open(
        &source,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("cannot open {}", source.display()))?;
    // Everything the daemon stores from now on goes through the outage
    // tracker, which tells the operator when an outage begins and ends.
    let health = Arc::new(StoreHealth::new(store.describe()));
    let store: Arc<dyn Store> = Arc::new(Watched::new(store, health.clone()));
    if let Some(e) = &down_at_start {
        // Protection goes on without the store: the journal holds changes.
        health.failed(e);
    }
    let shipper = Arc::new(
        Shipper::new(store.clone(), journal.clone(), stored, lineage).with_source(source_for_sync),
    );
    if let Some(reason) = new_lineage {
        let marker = LineageStart {
            started_ns: journal.now(),
            lineage,
            reason: reason.into(),
        };
        shipper.queue(marker.key(), bytes::Bytes::new());
        tracing::info!(lineage = %format!("{lineage:016x}"), reason, "starting a new lineage");
    }
    // What the journal already holds ships first, in order, from the ship
    // thread: the mount never waits for the store.

    // Records up to here came from earlier runs; later ones are made
    // through this run's mount and land in its touched set.
    let j0 = journal.last_seq();
    let watch = Arc::new(BaseWatch::default());
    let src_dir = rustix::fs::open(
        &source,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut core = Passthrough::new(
        rustix::io::fcntl_dupfd_cloexec(&src_dir, 0)?,
        journal.clone(),
        watch.clone(),
    )?;
    core.set_read_passthrough(args.read_passthrough);
    core.set_cached_writes(args.cached_writes);
    let core = Arc::new(core);
    // SIGTERM/SIGINT are caught from before the mount goes live: a stop
    // sent as soon as the mount answers (a quick test, a pod deleted at
    // once) must get the clean shutdown, not the default disposition.
    let term = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, term.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, term.clone())?;
    let session =
        fuse::mount(fuse::FuseFs::new(core.clone()), &mount, args.threads).with_context(|| {
            format!(
                "cannot mount at {} (is /dev/fuse available and fusermount3 installed?)",
                mount.display()
            )
        })?;
    tracing::info!(source = %source.display(), mount = %mount.display(), store = %store.describe(), "protecting");

    let metrics = Arc::new(Metrics::new(&args.store.volume));
    metrics.set_lineage(&format!("{lineage:016x}"));
    metrics.set_mount_live(true);
    metrics.set_journal_writable(true);
    let d = Arc::new(Daemon {
        metrics: metrics.clone(),
        store: store.clone(),
        journal: journal.clone(),
        shipper: shipper.clone(),
        core: core.clone(),
        watch,
        source_fd: src_dir,
        stop: AtomicBool::new(false),
        base_done: AtomicBool::new(base_kind.is_none()),
        base_epoch: AtomicU64::new(0),
        base_completed_ns: std::sync::atomic::AtomicI64::new(0),
        base_failed: Mutex::new(None),
        known_chunks: StoredChunks::default(),
        health,
        written_at_base: AtomicU64::new(0),
    });
    // The newest base already stored for this lineage schedules the first
    // periodic base after a restart.
    let newest = timeline
        .bases
        .iter()
        .filter(|b| b.lineage == lineage)
        .max_by_key(|b| b.completed_ns);
    let (mut last_start, mut last_seq) = (Instant::now(), 0);
    if let (None, Some(b)) = (base_kind, newest) {
        let age = crate::clock::wall_now()
            .saturating_sub(b.completed_ns)
            .max(0) as u64;
        last_start = Instant::now()
            .checked_sub(Duration::from_nanos(age))
            .unwrap_or_else(Instant::now);
        last_seq = b.start_seq;
        metrics.set_last_base_completed(ns_time(b.completed_ns));
    }
    let base_thread = {
        let d = d.clone();
        let (interval, after) = (args.base_interval, args.base_after);
        std::thread::Builder::new()
            .name("rewind-base".into())
            .spawn(move || {
                let mut inc = Incremental {
                    previous: None,
                    pending: HashSet::new(),
                    reload: None,
                    gaps_seen: 0,
                };
                match base_kind {
                    Some(kind) => {
                        let t0 = Instant::now();
                        last_seq = d.journal.last_seq();
                        match d.take_base(lineage, kind, &mut inc, "needed at start") {
                            Ok(()) => d.base_done.store(true, Ordering::Release),
                            // Superseded by a journal gap: the periodic
                            // loop takes the new lineage's base.
                            Err(_)
                                if d.journal.gap_epoch() != 0
                                    && !d.stop.load(Ordering::Acquire) => {}
                            Err(e) => {
                                *d.base_failed.lock() = Some(e.to_string());
                                return;
                            }
                        }
                        last_start = t0;
                    }
                    None => inc.reload = Some(j0),
                }
                d.periodic_bases(lineage, &mut inc, interval, after, last_start, last_seq);
            })
            .unwrap()
    };
    let ship_thread = {
        let d = d.clone();
        let interval = args.segment_interval;
        std::thread::Builder::new()
            .name("rewind-ship".into())
            .spawn(move || {
                while !d.stop.load(Ordering::Acquire) {
                    let t0 = Instant::now();
                    if let Err(e) = d.shipper.ship_once(None) {
                        tracing::error!("shipping failed: {e}");
                    }
                    let _ = d.shipper.heartbeat(false, None);
                    let spent = t0.elapsed();
                    if spent < interval {
                        std::thread::sleep(interval - spent);
                    }
                }
            })
            .unwrap()
    };
    let _ = &d.store;
    let monitor = {
        let d = d.clone();
        let earliest = timeline
            .windows()
            .iter()
            .filter(|w| w.lineage == format!("{lineage:016x}"))
            .map(|w| w.earliest_ns)
            .min();
        std::thread::Builder::new()
            .name("rewind-metrics".into())
            .spawn(move || monitor(&d, earliest, lineage))
            .unwrap()
    };
    let _status = match &args.listen {
        Some(listen) => Some(
            crate::http::StatusServer::start(listen, metrics.clone())
                .with_context(|| format!("cannot serve health and metrics on {listen}"))?,
        ),
        None => None,
    };

    // Wait for SIGTERM/SIGINT (or the mount going away under us).
    while !term.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
        if !is_mounted(&mount) {
            tracing::warn!("the mount went away; shutting down");
            break;
        }
    }
    let deadline = Instant::now() + args.shutdown_timeout;
    tracing::info!("shutting down: detaching the mount lazily; open files are served until they close or {:?} pass", args.shutdown_timeout);
    if let Err(e) = rustix::mount::unmount(&mount, rustix::mount::UnmountFlags::DETACH) {
        tracing::debug!("lazy unmount: {e}");
    }
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = session.join();
        let _ = tx.send(());
    });
    if rx.recv_deadline(deadline).is_err() {
        tracing::warn!("files still open at the shutdown deadline; stopping anyway");
    }
    metrics.set_mount_live(false);
    d.stop.store(true, Ordering::Release);
    shipper.set_abort(true);
    let _ = ship_thread.join();
    let _ = monitor.join();
    // The base a start needs finishes or fails on its own; it is bounded
    // by the volume size, not by the deadline, so give up on it at the
    // deadline and let the next start take it again. A periodic base in
    // progress is abandoned: the previous base keeps the volume restorable.
    while !base_thread.is_finished() && !d.based() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // The final round runs apart, so that a store that hangs inside one
    // request cannot hold the exit past the deadline.
    let (tx, rx) = crossbeam_channel::bounded(1);
    {
        let shipper = shipper.clone();
        let store = store.clone();
        std::thread::spawn(move || {
            let r = shipper
                .ship_once(Some(deadline))
                .and_then(|_| shipper.heartbeat(true, Some(deadline)));
            if r.is_ok() {
                // Uploads a failed attempt could not abort during an outage.
                for kind in crate::timeline::VOLUME_KEY_KINDS {
                    if let Err(e) = store.abort_incomplete_uploads(&format!("{kind}/")) {
                        tracing::warn!(
                            "cannot abort incomplete uploads: {e}; the next start retries"
                        );
                    }
                }
            }
            let _ = tx.send(r);
        });
    }
    let shipped = rx
        .recv_deadline(deadline + Duration::from_secs(1))
        .unwrap_or_else(|_| Err(crate::ship::ShipError::Timeout));
    let base_ok = d.based();
    let stats: &ShipStats = &shipper.stats;
    // Whatever the final round says, the store must hold the journal's
    // last record before the stop counts as clean.
    let shipped = shipped.and_then(|()| {
        let (stored, last) = (
            shipper.stats.stored_seq.load(Ordering::Acquire),
            journal.last_seq(),
        );
        if stored < last {
            tracing::error!(
                stored,
                last,
                "the final upload round left records unshipped"
            );
            Err(crate::ship::ShipError::Journal(format!(
                "records {}..={last} were not shipped",
                stored + 1
            )))
        } else {
            Ok(())
        }
    });
    match shipped {
        Ok(()) if d.journal.has_failed() => {
            // Not a clean stop: the source may hold changes the journal lost
            // (pages a failed flush dropped, an operation applied before its
            // append failed), so the next start must take a repair base.
            tracing::error!("the journal failed during this run (see above); what it held is stored, and the next start takes a repair base");
            Ok(4)
        }
        Ok(()) if base_ok => {
            // A clean stop means no redo at the next start, so the source
            // must hold everything fsync acknowledged (fsync waited for the
            // journal alone).
            rustix::fs::syncfs(&d.source_fd).context("cannot sync the source at shutdown; the journal is kept and redone at the next start")?;
            write_state(
                &jdir,
                &State {
                    volume: args.store.volume.clone(),
                    lineage: format!("{:016x}", journal.lineage()),
                    boot_id: boot,
                    clean: true,
                },
            )?;
            tracing::info!(
                segments = stats.segments.load(Ordering::Relaxed),
                bytes = stats.bytes.load(Ordering::Relaxed),
                "stopped cleanly: everything is in the store"
            );
            Ok(0)
        }
        Ok(()) => {
            let why = d.base_failed.lock().clone().unwrap_or_else(|| {
                "the base snapshot did not finish by the shutdown deadline".into()
            });
            tracing::error!("stopped with every record stored, but without a completed base ({why}); the next start takes one");
            Ok(3)
        }
        Err(e) => {
            tracing::error!("stopped before everything was stored ({e}); the journal in {} keeps it for the next start", jdir.display());
            Ok(2)
        }
    }
}

fn ns_time(ns: crate::clock::Nanos) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64)
}

/// Samples the daemon's state into the metrics twice a second, and logs
/// replication lag once a minute. It runs apart from the shipper so that
/// metrics stay current while an upload is stuck in retries.
fn monitor(d: &Daemon, mut earliest: Option<crate::clock::Nanos>, mut lineage: u64) {
    let m = &d.metrics;
    let s = &d.shipper.stats;
    let (mut written, mut segments, mut bytes, mut errors) = (0u64, 0u64, 0u64, 0u64);
    let mut unshipped_since: Option<crate::clock::Nanos> = None;
    let mut last_log = Instant::now();
    while !d.stop.load(Ordering::Acquire) {
        let w = d.journal.written_bytes();
        m.add_journal_written(w - written);
        written = w;
        m.set_journal_bytes(d.journal.bytes());
        let segs = s.segments.load(Ordering::Relaxed);
        let b = s.bytes.load(Ordering::Relaxed);
        if segs > segments {
            // Per-segment sizes are not kept; spread the bytes evenly.
            let per = (b - bytes) / (segs - segments);
            for _ in segments..segs {
                m.record_segment_shipped(per);
            }
        }
        segments = segs;
        bytes = b;
        let e = s.errors.load(Ordering::Relaxed);
        for _ in errors..e {
            m.add_upload_error();
        }
        errors = e;
        let stored_seq = s.stored_seq.load(Ordering::Relaxed);
        let stored_ns = s.stored_ns.load(Ordering::Relaxed);
        let last_seq = d.journal.last_seq();
        d.health.tick(outage::Progress {
            stored_seq,
            last_seq,
            waiting_bytes: d.shipper.waiting_bytes(),
        });
        if last_seq > stored_seq {
            let since = *unshipped_since.get_or_insert_with(crate::clock::wall_now);
            m.set_oldest_unshipped(Some(ns_time(since.max(stored_ns))));
        } else {
            unshipped_since = None;
            m.set_oldest_unshipped(None);
        }
        let current = d.journal.lineage();
        if current != lineage {
            // A journal gap began a new lineage: its window opens on its base.
            lineage = current;
            earliest = None;
            m.set_lineage(&format!("{lineage:016x}"));
        }
        m.set_journal_gaps(d.journal.gap_epoch(), d.journal.dropped_bytes());
        if d.based() && earliest.is_none() && d.shipper.pending_control() == 0 {
            earliest = Some(d.base_completed_ns.load(Ordering::Acquire));
        }
        if let Some(e) = earliest {
            m.set_restore_window(ns_time(e), ns_time(stored_ns.max(e)));
        }
        m.set_journal_writable(!d.journal.writers_waiting() && !d.journal.has_failed());
        m.set_journal_bytes_since_base(w.saturating_sub(d.written_at_base.load(Ordering::Relaxed)));
        m.set_store_outage(d.health.is_down());
        // During an outage its own reminders say how far behind shipping is.
        if last_log.elapsed() >= Duration::from_secs(60) && !d.health.is_down() {
            last_log = Instant::now();
            tracing::info!(
                segments = segs,
                bytes = b,
                lag_ms = s.lag_ns.load(Ordering::Relaxed) / 1_000_000,
                journal_bytes = d.journal.bytes(),
                "shipping"
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
