//! `rewind run`: the daemon that wires the pieces together. `run` is
//! `start`, wait for a stop signal, `shutdown`. Start checks the arguments,
//! decides what to do at the mountpoint (`guard::prepare`), locks the
//! journal, opens the store, applies the start decision (`decide::start`:
//! lineage and base from the state file, the boot id and the store),
//! recovers the journal, mounts, and starts the
//! base thread (`base_thread`), the shipping thread (`ship_thread`) and the
//! metrics thread (`monitor`). Shutdown detaches the mount lazily, serves
//! open files until the deadline, runs the final seal and upload, and turns
//! the outcome into an exit status (`decide::stopped`). It must not
//! implement any format or filesystem operation itself, nor decide anything
//! that `decide` can decide from plain inputs.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rustix::fs::{Mode, OFlags};

use crate::base::{BaseWatch, StoredChunks};
use crate::cli::{LockModeArg, RunArgs};
use crate::fs::{fuse, Passthrough};
use crate::http::{HttpError, StatusServer};
use crate::journal::{Journal, JournalError};
use crate::layout::{self, LocalState, StateError};
use crate::metrics::Metrics;
use crate::outage::{StoreHealth, Watched};
use crate::redo::RedoError;
use crate::ship::{ShipError, Shipper};
use crate::store::sealed::{read_key_file, Encryption};
use crate::store::{self, LockMode, ObjectLock, Store, StoreError, StoreOptions};
use crate::timeline::{LineageId, LineageStart, Timeline};

mod base_thread;
mod decide;
mod monitor;
mod ship_thread;

/// Keeps the daemon's memory bounded: glibc raises its mmap threshold
/// after large buffers are freed, so the multi-MiB segments of a busy
/// volume end up in arenas that never shrink (peak anonymous memory
/// tripled under fio). A fixed 4 MiB threshold gives segment buffers back
/// when they are freed while 1 MiB records still come from the heap (an
/// mmap per record cost the shipper 13% of its CPU in page faults), and
/// two arenas stop each FUSE thread from keeping its own. The shipper
/// keeps one sealed segment's buffer for the next
/// (`segment::Builder::recycle`), so a busy volume does not map and fault
/// in a fresh one per segment. Every command
/// calls it first (main.rs), and the criterion benches too, so they
/// measure the allocator the daemon runs with.
pub fn bound_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning and takes glibc's own
    // locks; main calls it before any other thread exists, the benches
    // from criterion's configuration, before they allocate their data.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Why `rewind run` could not start or stop. A stop that loses nothing but
/// is not clean is an exit status, not an error (see `decide::Stopped`).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A flag or a directory the operator must fix; the message says how.
    #[error("{0}")]
    Usage(String),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}")]
    Store {
        what: &'static str,
        #[source]
        source: StoreError,
    },
    #[error("the state file {}", path.display())]
    State {
        path: PathBuf,
        #[source]
        source: StateError,
    },
    #[error(transparent)]
    Guard(#[from] crate::guard::GuardError),
    #[error("cannot open the journal")]
    Journal(#[source] JournalError),
    #[error("cannot redo the journal onto the source after the machine crash")]
    Redo(#[source] RedoError),
    #[error("cannot serve health and metrics on {listen}")]
    Http {
        listen: String,
        #[source]
        source: HttpError,
    },
}

/// Adds what was being done to an I/O error.
fn io<E: Into<std::io::Error>>(what: impl Into<String>) -> impl FnOnce(E) -> RunError {
    let what = what.into();
    move |e| RunError::Io {
        what,
        source: e.into(),
    }
}

/// How long startup waits for the store before protecting without it.
const STORE_STARTUP_WAIT: Duration = Duration::from_secs(5);

fn boot_id() -> String {
    std::env::var("REWIND_BOOT_ID")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
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
    base_completed_ns: AtomicI64,
    base_failed: Mutex<Option<String>>,
    /// Chunks confirmed stored during this run (this lineage); see
    /// `base::StoredChunks`.
    known_chunks: StoredChunks,
    health: Arc<StoreHealth>,
    /// `journal.written_bytes()` when the last completed base started.
    written_at_base: AtomicU64,
    /// The current lineage's window start as the store's timeline last
    /// showed it (0 until read): a prune elsewhere moves it forward.
    listed_earliest: AtomicI64,
    /// The local catalog (`crate::catalog`), if one could be opened.
    catalog: Mutex<Option<crate::catalog::Catalog>>,
}

impl Daemon {
    /// Whether the current lineage has its base (the one a start needs, or
    /// the first after a journal gap).
    fn based(&self) -> bool {
        self.base_done.load(Ordering::Acquire)
            && self.base_epoch.load(Ordering::Acquire) == self.journal.gap_epoch()
    }
}

/// What the daemon makes durable before the journal drops records in gap
/// mode: the source (which holds their effects, and which fsync did not
/// sync), and the gap's lineage in the state file, so that a start after a
/// crash continues it.
fn prepare_drop(
    dirs: &Dirs,
    volume: &str,
    boot: &str,
) -> Result<crate::journal::PrepareDrop, RunError> {
    let src = open_source(&dirs.source)?;
    let (jdir, volume, boot) = (dirs.journal.clone(), volume.to_string(), boot.to_string());
    Ok(Box::new(move |g| {
        rustix::fs::syncfs(&src).map_err(|e| format!("cannot sync the source: {e}"))?;
        let st = LocalState {
            volume: volume.clone(),
            lineage: LineageId(g.to_lineage),
            boot_id: boot.clone(),
            clean: false,
        };
        layout::write_state(&jdir, &st).map_err(|e| format!("cannot write the state file: {e}"))
    }))
}

/// A started daemon: the mount is live and the threads run until
/// `shutdown`.
struct Running {
    d: Arc<Daemon>,
    session: fuse::Served,
    base_thread: JoinHandle<()>,
    ship_thread: JoinHandle<()>,
    monitor: JoinHandle<()>,
    _status: Option<StatusServer>,
    /// Set by SIGTERM or SIGINT.
    term: Arc<AtomicBool>,
    mount: PathBuf,
    journal_dir: PathBuf,
    /// Held for the daemon's life: no second daemon opens this journal.
    _lock: File,
    volume: String,
    boot_id: String,
    shutdown_timeout: Duration,
}

pub fn run(args: RunArgs) -> Result<i32, RunError> {
    let daemon = start(&args)?;
    daemon.wait_for_stop();
    daemon.shutdown()
}

/// The checked, absolute directories a daemon works on.
struct Dirs {
    source: PathBuf,
    mount: PathBuf,
    journal: PathBuf,
    /// What the start does at the mountpoint (`guard::plan`).
    at_mount: crate::guard::Plan,
}

fn check_args(args: &RunArgs) -> Result<Dirs, RunError> {
    let usage = |m: String| Err(RunError::Usage(m));
    for (flag, zero) in [
        ("--base-interval", args.base_interval.is_zero()),
        ("--base-after", args.base_after == 0),
        ("--timeline-interval", args.timeline_interval.is_zero()),
    ] {
        if zero {
            return usage(format!("{flag} must be more than zero"));
        }
    }
    let source = std::fs::canonicalize(&args.source).map_err(io(format!(
        "--source {} does not exist",
        args.source.display()
    )))?;
    if !source.is_dir() {
        return usage(format!("--source {} is not a directory", source.display()));
    }
    let mount = resolve_mount(&args.mount)?;
    let at_mount = crate::guard::prepare(&mount)?;
    // A dead mount on top answers every stat with ENOTCONN; mount(2) goes
    // over it without asking it anything.
    if at_mount.over_dead == 0 {
        std::fs::create_dir_all(&mount)
            .map_err(io(format!("cannot create --mount {}", mount.display())))?;
    }
    if mount.starts_with(&source) || source.starts_with(&mount) {
        return usage(format!(
            "--mount {} and --source {} must not contain each other",
            mount.display(),
            source.display()
        ));
    }
    let marker = layout::incomplete_marker(&source);
    if marker.exists() {
        return usage(format!(
            "{} holds an unfinished restore ({}); finish it with `rewind restore --force` or empty the directory before protecting it",
            source.display(),
            marker.display()
        ));
    }
    crate::timeline::check_volume_name(&args.store.volume)
        .map_err(|e| RunError::Usage(format!("--volume: {e}")))?;
    let journal = args
        .journal_dir
        .clone()
        .unwrap_or_else(|| layout::default_journal_dir(&source));
    Ok(Dirs {
        source,
        mount,
        journal,
        at_mount,
    })
}

/// The absolute mountpoint as mountinfo names it, without a stat of the
/// mountpoint itself, which fails on a dead mount an earlier run left
/// there: its parent is made and resolved, and the last component is
/// resolved too only when it is a symbolic link (an lstat that meets a
/// mount reports the mount's root, never a link).
fn resolve_mount(arg: &Path) -> Result<PathBuf, RunError> {
    let what = || format!("--mount {}", arg.display());
    let abs = std::path::absolute(arg).map_err(io(what()))?;
    let link = abs
        .symlink_metadata()
        .is_ok_and(|m| m.file_type().is_symlink());
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) if !link => {
            std::fs::create_dir_all(parent)
                .map_err(io(format!("cannot create {}", parent.display())))?;
            Ok(std::fs::canonicalize(parent)
                .map_err(io(what()))?
                .join(name))
        }
        _ => std::fs::canonicalize(&abs).map_err(io(what())),
    }
}

fn lock_journal(dir: &Path) -> Result<File, RunError> {
    std::fs::create_dir_all(dir).map_err(io(format!(
        "cannot create the journal directory {}",
        dir.display()
    )))?;
    let path = layout::journal_lock(dir);
    let lock = File::create(&path).map_err(io(format!("cannot create {}", path.display())))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
        |_| {
            RunError::Usage(format!(
                "another `rewind run` holds the journal {}; stop it first",
                dir.display()
            ))
        },
    )?;
    Ok(lock)
}

/// The volume's store and what it holds. An unreachable store must not
/// stop protection (the journal holds changes meanwhile); a missing bucket
/// or refused credentials must. A store that hangs gets a few seconds, then
/// protection starts without its answer (a repair base is taken, which is
/// always safe). The timeline is None when the store did not answer; the
/// error is the transient one it answered with, if any.
fn open_store(
    args: &RunArgs,
) -> Result<(Arc<dyn Store>, Option<Timeline>, Option<StoreError>), RunError> {
    let opts = |skip_check| StoreOptions {
        s3_endpoint: args.store.s3_endpoint.clone(),
        s3_path_style: args.store.s3_path_style,
        tolerate_unreachable: true,
        skip_check,
        object_lock: args.object_lock_days.map(|days| ObjectLock {
            days,
            mode: match args.object_lock_mode {
                Some(LockModeArg::Governance) => LockMode::Governance,
                Some(LockModeArg::Compliance) | None => LockMode::Compliance,
            },
        }),
    };
    // The key file is read before anything else: a missing or malformed
    // key stops the start, whatever the store's state.
    let encryption = || -> Result<Encryption, RunError> {
        Ok(match &args.store.encryption_key_file {
            Some(path) => Encryption::Key {
                kek: read_key_file(path).map_err(|source| RunError::Store {
                    what: "cannot use the encryption key",
                    source: StoreError::Key {
                        store: args.store.store.clone(),
                        source,
                    },
                })?,
                create: true,
            },
            None => Encryption::Off,
        })
    };
    let (tx, rx) = crossbeam_channel::bounded(1);
    {
        let encryption = encryption()?;
        let url = args.store.store.clone();
        let volume = args.store.volume.clone();
        let opts = opts(false);
        std::thread::spawn(move || {
            let res = (|| {
                let store =
                    store::open_volume(&url, &volume, &opts, encryption).map_err(|source| {
                        RunError::Store {
                            what: "cannot open the store",
                            source,
                        }
                    })?;
                // An unreachable store is reported as the start of an
                // outage, once the outage tracker exists. The volume's
                // encryption is settled first (`sealed::Volume`): a key
                // that does not fit the volume stops the start here, and
                // while the store cannot say, nothing is read or written
                // until it can.
                let checked = store.check();
                let store: Arc<dyn Store> = store;
                let (timeline, down) = match checked.and_then(|()| Timeline::load(store.as_ref())) {
                    Ok(t) => (Some(t), None),
                    Err(e) if e.is_transient() => (None, Some(e)),
                    Err(source) => {
                        return Err(RunError::Store {
                            what: "cannot use the store",
                            source,
                        })
                    }
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
    match rx.recv_timeout(STORE_STARTUP_WAIT) {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!("the store did not answer within {STORE_STARTUP_WAIT:?}; protecting anyway, the journal holds changes until it returns");
            let store = store::open_volume(
                &args.store.store,
                &args.store.volume,
                &opts(true),
                encryption()?,
            )
            .map_err(|source| RunError::Store {
                what: "cannot open the store",
                source,
            })?;
            Ok((store as Arc<dyn Store>, None, None))
        }
    }
}

fn open_source(source: &Path) -> Result<std::os::fd::OwnedFd, RunError> {
    rustix::fs::open(
        source,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io(format!("cannot open {}", source.display())))
}

fn start(args: &RunArgs) -> Result<Running, RunError> {
    let dirs = check_args(args)?;
    let lock = lock_journal(&dirs.journal)?;
    let (store, timeline, down_at_start) = open_store(args)?;
    let known = timeline.is_some();
    let timeline = timeline.unwrap_or_default();

    let boot = boot_id();
    let state_err = |source| RunError::State {
        path: layout::state_file(&dirs.journal),
        source,
    };
    let prev = layout::read_state(&dirs.journal).map_err(state_err)?;
    if let Some(p) = &prev {
        if p.volume != args.store.volume {
            return Err(RunError::Usage(format!("the journal in {} belongs to volume {:?}, not {:?}; use that --volume or another --journal-dir", dirs.journal.display(), p.volume, args.store.volume)));
        }
    }
    let based: Vec<LineageId> = timeline
        .bases
        .iter()
        .map(|b| LineageId(b.lineage))
        .collect();
    let decided = decide::start(
        prev.as_ref(),
        &boot,
        known.then_some(&based[..]),
        LineageId::random(),
    );
    match decided.why {
        decide::Why::MachineCrash => tracing::warn!("the machine restarted without a clean stop: shipping the journal's intact prefix, then starting a new lineage"),
        decide::Why::ProcessCrash => tracing::warn!("the previous run did not stop cleanly: taking a repair base"),
        decide::Why::FirstStart | decide::Why::Clean | decide::Why::CleanWithoutBase => {}
    }
    let lineage = decided.lineage;
    let (stored, floor) = decide::resume(&timeline);
    let (journal, rec) = Journal::open(
        &dirs.journal,
        decided.journal_lineage.0,
        stored + 1,
        floor,
        args.max_journal_bytes,
    )
    .map_err(RunError::Journal)?;
    for (p, n) in &rec.torn {
        tracing::warn!("journal {}: cut a torn tail of {n} bytes", p.display());
    }
    if rec.unstored > 0 {
        tracing::info!(
            records = rec.unstored,
            "journal holds records not yet confirmed stored; shipping them first"
        );
    }
    // A journal gap whose marker the store does not hold yet: the journal's
    // records belong to the gap's lineage, which takes its first base
    // (src/gap.rs).
    let pending_gap = journal.pending_gaps().last().cloned();
    let (gap_lineage, _, start_base) = crate::gap::after_restart(
        (lineage.0, decided.new_lineage(), decided.base),
        pending_gap.as_ref(),
    );
    let lineage = LineageId(gap_lineage);
    if let Some(g) = &pending_gap {
        tracing::warn!(%lineage, "a journal gap of an earlier run is not yet recorded in the store (its note is in the journal directory): continuing its lineage, which takes its first base; the gap marker is stored once the store takes objects ({})", g.key());
    }
    if decided.redo() {
        // fsync waited for the journal alone: put back into the source
        // whatever the crash took from it before anything reads it.
        let t0 = Instant::now();
        let st = crate::redo::redo(&dirs.source, &journal).map_err(RunError::Redo)?;
        tracing::info!(
            records = st.records,
            skipped = st.skipped,
            recreated = st.recreated,
            secs = t0.elapsed().as_secs_f64(),
            "redid the journal onto the source"
        );
    }
    if lineage != decided.journal_lineage {
        journal.set_lineage(lineage.0).map_err(RunError::Journal)?;
    }
    let journal = Arc::new(journal);
    if args.on_journal_full == crate::cli::OnJournalFull::Gap {
        journal.set_gap_mode(prepare_drop(&dirs, &args.store.volume, &boot)?);
    }
    let state = LocalState {
        volume: args.store.volume.clone(),
        lineage,
        boot_id: boot.clone(),
        clean: false,
    };
    layout::write_state(&dirs.journal, &state).map_err(|e| state_err(e.into()))?;

    let source_for_sync = open_source(&dirs.source)?;
    // Everything the daemon stores from now on goes through the outage
    // tracker, which tells the operator when an outage begins and ends.
    let health = Arc::new(StoreHealth::new(store.describe()));
    let store: Arc<dyn Store> = Arc::new(Watched::new(store, health.clone()));
    if let Some(e) = &down_at_start {
        // Protection goes on without the store: the journal holds changes.
        health.failed(e);
    }
    let shipper = Arc::new(
        Shipper::new(store.clone(), journal.clone(), stored, lineage.0)
            .with_source(source_for_sync),
    );
    if let Some(reason) = decided.new_lineage() {
        let marker = LineageStart {
            started_ns: journal.now(),
            lineage: lineage.0,
            reason: reason.into(),
        };
        shipper.queue(marker.key(), bytes::Bytes::new());
        tracing::info!(%lineage, reason, "starting a new lineage");
    }
    // What the journal already holds ships first, in order, from the ship
    // thread: the mount never waits for the store.

    // Records up to here came from earlier runs; later ones are made
    // through this run's mount and land in its touched set.
    let j0 = journal.last_seq();
    let (catalog, found) = crate::catalog::Catalog::open(&dirs.journal);
    // The base a restart's first periodic base continues from.
    let resume_from = timeline
        .bases
        .iter()
        .filter(|b| b.lineage == lineage.0 && b.start_seq <= j0)
        .max_by_key(|b| (b.completed_ns, b.start_seq))
        .cloned();
    let watch = Arc::new(BaseWatch::default());
    let src_dir = open_source(&dirs.source)?;
    let dup = rustix::io::fcntl_dupfd_cloexec(&src_dir, 0)
        .map_err(io(format!("cannot open {}", dirs.source.display())))?;
    let mut core = Passthrough::new(dup, journal.clone(), watch.clone())
        .map_err(io(format!("cannot serve {}", dirs.source.display())))?;
    core.set_read_passthrough(args.read_passthrough);
    core.set_cached_writes(args.cached_writes);
    let core = Arc::new(core);
    // SIGTERM/SIGINT are caught from before the mount goes live: a stop
    // sent as soon as the mount answers (a quick test, a pod deleted at
    // once) must get the clean shutdown, not the default disposition.
    let term = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, term.clone())
            .map_err(io("cannot catch SIGTERM and SIGINT"))?;
    }
    let metrics = Arc::new(Metrics::new(&args.store.volume));
    metrics.set_lineage(&lineage.to_string());
    // Everything that can fail comes before the mount: the mount is never
    // dropped (`fuse::Served`), so a start failing after it would leave a
    // dead mount over the guard.
    let status = match &args.listen {
        Some(listen) => Some(
            StatusServer::start(listen, metrics.clone()).map_err(|source| RunError::Http {
                listen: listen.clone(),
                source,
            })?,
        ),
        None => None,
    };
    if dirs.at_mount.mount_guard {
        crate::guard::mount_guard(&dirs.mount);
    }
    if dirs.at_mount.over_dead > 0 {
        tracing::warn!(
            mount = %dirs.mount.display(),
            layers = dirs.at_mount.over_dead,
            "mounting over the dead mount an earlier run left: every copy of it (an application's container included) reaches the new mount on its next lookup; the dead layers stay beneath"
        );
    }
    let session = fuse::mount(fuse::FuseFs::new(core.clone()), &dirs.mount, args.threads).map_err(
        io(format!(
            "cannot mount at {} (is /dev/fuse available and fusermount3 installed?)",
            dirs.mount.display()
        )),
    )?;
    tracing::info!(source = %dirs.source.display(), mount = %dirs.mount.display(), store = %store.describe(), "protecting");

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
        base_done: AtomicBool::new(start_base.is_none()),
        base_epoch: AtomicU64::new(0),
        base_completed_ns: AtomicI64::new(0),
        base_failed: Mutex::new(None),
        known_chunks: StoredChunks::default(),
        health,
        written_at_base: AtomicU64::new(0),
        listed_earliest: AtomicI64::new(0),
        catalog: Mutex::new(catalog),
    });
    // The newest base already stored for this lineage schedules the first
    // periodic base after a restart.
    let newest = timeline
        .bases
        .iter()
        .filter(|b| b.lineage == lineage.0)
        .max_by_key(|b| b.completed_ns);
    let (mut last_start, mut last_seq) = (Instant::now(), 0);
    if let (None, Some(b)) = (start_base, newest) {
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
        start_base,
        j0,
        (found, resume_from),
        (args.base_interval, args.base_after),
        (last_start, last_seq),
    );
    let ship_thread = ship_thread::spawn(d.clone(), args.segment_interval);
    monitor::spawn_timeline_reader(d.clone(), args.timeline_interval);
    let monitor = {
        let d = d.clone();
        let id = lineage.to_string();
        let earliest = timeline
            .windows()
            .iter()
            .filter(|w| w.lineage == id)
            .map(|w| w.earliest_ns)
            .min();
        std::thread::Builder::new()
            .name("rewind-metrics".into())
            .spawn(move || monitor::monitor(&d, earliest, lineage.0))
            .unwrap()
    };
    Ok(Running {
        d,
        session,
        base_thread,
        ship_thread,
        monitor,
        _status: status,
        term,
        mount: dirs.mount,
        journal_dir: dirs.journal,
        _lock: lock,
        volume: args.store.volume.clone(),
        boot_id: boot,
        shutdown_timeout: args.shutdown_timeout,
    })
}

impl Running {
    /// Returns on SIGTERM or SIGINT, or when the mount goes away under us.
    fn wait_for_stop(&self) {
        while !self.term.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
            if !crate::guard::fuse_on_top(&self.mount) {
                tracing::warn!("the mount went away; shutting down");
                break;
            }
        }
    }

    /// Stops the daemon and returns its exit status (`decide::Stopped`).
    fn shutdown(self) -> Result<i32, RunError> {
        let Running {
            d,
            session,
            base_thread,
            ship_thread,
            monitor,
            ..
        } = self;
        let deadline = Instant::now() + self.shutdown_timeout;
        tracing::info!("shutting down: detaching the mount lazily; open files are served until they close or {:?} pass", self.shutdown_timeout);
        crate::guard::detach_fuse(&self.mount);
        if !session.wait_ended(deadline) {
            tracing::warn!(
                open = d.core.open_handles(),
                "files still open at the shutdown deadline; from now on writes through them fail with EIO"
            );
        }
        // Nothing may be acknowledged after the final round has counted
        // what to upload: a write answered later would be journaled but not
        // stored, and "stopped cleanly" would be false. Waits for
        // operations in flight.
        d.core.stop_mutations();
        d.metrics.set_mount_live(false);
        d.stop.store(true, Ordering::Release);
        d.shipper.set_abort(true);
        let _ = ship_thread.join();
        let _ = monitor.join();
        // The base a start needs finishes or fails on its own; it is bounded
        // by the volume size, not by the deadline, so give up on it at the
        // deadline and let the next start take it again. A periodic base in
        // progress is abandoned: the previous base keeps the volume
        // restorable.
        while !base_thread.is_finished() && !d.based() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // As it ends, the base thread queues the manifest of a periodic base
        // that finishes now and records in the catalog what changed since
        // its last base; a second is given for that before the final round.
        let until = (Instant::now() + Duration::from_secs(1)).min(deadline);
        while !base_thread.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        let shipped = ship_thread::final_round(&d, deadline);
        let base_ok = d.based();
        // Whatever the final round says, the store must hold the journal's
        // last record before the stop counts as clean.
        let shipped = shipped.and_then(|()| {
            let (stored, last) = (
                d.shipper.stats.stored_seq.load(Ordering::Acquire),
                d.journal.last_seq(),
            );
            if stored < last {
                tracing::error!(
                    stored,
                    last,
                    "the final upload round left records unshipped"
                );
                Err(ShipError::Journal(format!(
                    "records {}..={last} were not shipped",
                    stored + 1
                )))
            } else {
                Ok(())
            }
        });
        let stopped = decide::stopped(shipped.is_ok(), d.journal.has_failed(), base_ok);
        match (stopped, shipped) {
            (decide::Stopped::JournalFailed, _) => {
                tracing::error!("the journal failed during this run (see above); what it held is stored, and the next start takes a repair base");
            }
            (decide::Stopped::Clean, _) => {
                // A clean stop means no redo at the next start, so the
                // source must hold everything fsync acknowledged (fsync
                // waited for the journal alone).
                rustix::fs::syncfs(&d.source_fd).map_err(io(
                    "cannot sync the source at shutdown; the journal is kept and redone at the next start",
                ))?;
                let state = LocalState {
                    volume: self.volume.clone(),
                    lineage: LineageId(d.journal.lineage()),
                    boot_id: self.boot_id.clone(),
                    clean: true,
                };
                layout::write_state(&self.journal_dir, &state).map_err(|e| RunError::State {
                    path: layout::state_file(&self.journal_dir),
                    source: e.into(),
                })?;
                let stats = &d.shipper.stats;
                tracing::info!(
                    segments = stats.segments.load(Ordering::Relaxed),
                    bytes = stats.bytes.load(Ordering::Relaxed),
                    "stopped cleanly: everything is in the store"
                );
            }
            (decide::Stopped::WithoutBase, _) => {
                let why = d.base_failed.lock().clone().unwrap_or_else(|| {
                    "the base snapshot did not finish by the shutdown deadline".into()
                });
                tracing::error!("stopped with every record stored, but without a completed base ({why}); the next start takes one");
            }
            (decide::Stopped::Unshipped, r) => {
                let e = r.err().map_or_else(String::new, |e| e.to_string());
                tracing::error!("stopped before everything was stored ({e}); the journal in {} keeps it for the next start", self.journal_dir.display());
            }
        }
        Ok(stopped.exit_code())
    }
}

fn ns_time(ns: crate::clock::Nanos) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64)
}
