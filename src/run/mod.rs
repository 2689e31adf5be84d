//! `rewind run`: the daemon that wires the pieces together. It owns
//! startup (stale-mount cleanup, the journal lock, crash detection from the
//! state file and the boot id, lineage choice, journal recovery), the base
//! thread (the base a start needs, then periodic incremental bases, one
//! walk at a time), the shipping thread, and shutdown (lazy detach, serve open files
//! until the deadline, final seal and upload, exit status). It must not
//! implement any format or filesystem operation itself.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use parking_lot::Mutex;
use rustix::fs::{Mode, OFlags};
use serde::{Deserialize, Serialize};

use crate::base::{BaseKind, BaseWatch, StoredChunks};
use crate::cli::RunArgs;
use crate::fs::{fuse, Passthrough};
use crate::journal::Journal;
use crate::layout::HIDDEN;
use crate::metrics::Metrics;
use crate::outage::{StoreHealth, Watched};
use crate::restore::INCOMPLETE_MARKER;
use crate::ship::{ShipStats, Shipper};
use crate::store::{self, Prefixed, Store, StoreError, StoreOptions};
use crate::timeline::{LineageStart, Timeline};

mod base_thread;
mod monitor;
mod ship_thread;

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
    base_completed_ns: std::sync::atomic::AtomicI64,
    base_failed: Mutex<Option<String>>,
    /// Chunks confirmed stored during this run (this lineage); see
    /// `base::StoredChunks`.
    known_chunks: StoredChunks,
    health: Arc<StoreHealth>,
    /// `journal.written_bytes()` when the last completed base started.
    written_at_base: AtomicU64,
}

pub fn run(args: RunArgs) -> anyhow::Result<i32> {
    if args.base_interval.is_zero() || args.base_after == 0 {
        bail!("--base-interval and --base-after must be more than zero");
    }
    if args.on_journal_full == crate::cli::OnJournalFull::Gap {
        bail!("--on-journal-full=gap is not available in this build yet; use the default (writers wait for the store)");
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
    let base_thread = base_thread::spawn(
        d.clone(),
        lineage,
        base_kind,
        j0,
        (args.base_interval, args.base_after),
        (last_start, last_seq),
    );
    let ship_thread = ship_thread::spawn(d.clone(), args.segment_interval);
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
            .spawn(move || monitor::monitor(&d, earliest))
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
    while !base_thread.is_finished()
        && !d.base_done.load(Ordering::Acquire)
        && Instant::now() < deadline
    {
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
    let base_ok = d.base_done.load(Ordering::Acquire);
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
                    lineage: format!("{lineage:016x}"),
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
