//! The command line: every subcommand's flags, their defaults and their
//! `--help` text. It lives in the library (not in `main.rs`) so that tests
//! can parse the command lines the webhook injects with the real parser.
//! This module only describes and parses; it must not do any work.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "rewind",
    version,
    about = "Continuous data protection for a directory: journal every change, ship it every second, restore any second",
    long_about = "Rewind protects a directory by serving it through a FUSE passthrough mount. Every change made \
through the mount is journaled before it is acknowledged, sealed into a segment every second and \
shipped to an object store (a local directory or S3). `rewind restore --at TIME` rebuilds the \
directory exactly as the mount showed it at TIME."
)]
pub struct Cli {
    /// Log filter (also RUST_LOG), e.g. "info" or "rewind=debug".
    #[arg(
        long,
        global = true,
        env = "REWIND_LOG",
        default_value = "info,fuser=error"
    )]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mount SOURCE at MOUNT, journal every change and ship it to the store until SIGTERM.
    Run(RunArgs),
    /// Rebuild the volume as it was at TIME into an empty directory.
    Restore(RestoreArgs),
    /// Browse the volume as it was at TIME: a read-only mount served from the store, without a
    /// restore.
    ///
    /// The tree (names, kinds, modes, owners, sizes, mtimes, symlinks, hard links, xattrs) is built
    /// from the base's manifest and the records up to TIME when the command starts; file contents
    /// are fetched when they are read, chunk by chunk, verified, and kept in a bounded in-memory
    /// cache (--cache-size), with readahead for sequential reads. It shows exactly the tree that
    /// `rewind restore --at TIME` would give. Every change is refused with EROFS. A read that
    /// needs the store while it is unreachable fails with EIO (and a log line); it works again
    /// once the store is back. Runs in the foreground until SIGTERM or SIGINT, then unmounts.
    /// Needs root (or CAP_SYS_ADMIN) and /dev/fuse.
    Mount(MountArgs),
    /// Show the restore window, each retention tier's kept points, bases, segments, deltas,
    /// gaps, lineages and clock steps.
    Ls(LsArgs),
    /// Show what changed between two instants, file by file, and the writes of each second.
    ///
    /// Both instants are rebuilt in memory from the store (no file contents are fetched), under
    /// the same lineage and window rules as restore. A file is one identity: its hard links are
    /// one file, and a file renamed keeps its identity. Reported per file: created, deleted,
    /// renamed (its own name changed, not a directory above it), modified (with the bytes the
    /// records between the instants wrote to it, and its size before and after), mode, owner
    /// and xattrs. Then, per second between the instants: bytes written, how many files were
    /// rewritten in full (every byte), and the compression ratio of the stored writes: a burst
    /// of full rewrites at a ratio near 1.0 is what ransomware encrypting files looks like.
    Diff(DiffArgs),
    /// Check every object's checksum and the continuity of the timeline.
    Verify(VerifyArgs),
    /// Thin out old history by a tiered retention policy and delete what no kept instant needs.
    ///
    /// Tiers follow one another by age: every instant of the newest --keep-seconds span stays
    /// restorable; before that, one point per minute for --keep-minutes, then one per hour for
    /// --keep-hours, then one per day for --keep-days; older history is deleted. The minutes
    /// tier keeps every whole minute: prune compacts the records of that span into deltas cut at
    /// each minute (overwritten bytes collapse), then condemns the segments they replace. A point
    /// in the hours and days tiers is the newest base snapshot completed in its hour or day, so
    /// those tiers are never finer than the interval between bases. A zero span turns a tier off.
    /// Each lineage's newest base and everything after it are always kept.
    ///
    /// Deletes are deferred: a prune first condemns objects (restores planned after that no
    /// longer use them) and a later prune deletes what was condemned more than --grace ago, so a
    /// restore or verify that was already running completes. Chunks of a base that is still
    /// being uploaded are never deleted. One prune runs at a time per volume: a second one exits
    /// with status 1 naming the holder (a killed prune's lock expires after 10 minutes). This is
    /// the only command that deletes: it needs s3:DeleteObject (docs/S3.md), the sidecar does not.
    Prune(PruneArgs),
    /// Serve the Kubernetes admission webhook that injects the sidecar (HTTPS, POST /mutate).
    Webhook(WebhookArgs),
    /// Manage an encrypted volume's keys (docs/SECURITY.md).
    #[command(subcommand)]
    Key(KeyCommand),
    /// Inspect local state (for tests and troubleshooting).
    #[command(hide = true, subcommand)]
    Debug(DebugCommand),
}

#[derive(Debug, Subcommand)]
pub enum DebugCommand {
    /// Print the journal's records, one JSON object per line.
    Journal {
        #[arg(long)]
        journal_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Print every record of a volume's segments (Debug format).
    Records {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Print a volume's base manifests (objects and links).
    Bases {
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// Where the protected data lives in object storage.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Object store: file:///abs/path, a plain directory path, or s3://bucket/prefix.
    #[arg(long, env = "REWIND_STORE")]
    pub store: String,
    /// The volume's name in the store; several volumes can share one store.
    #[arg(long, env = "REWIND_VOLUME", default_value = "default")]
    pub volume: String,
    /// S3 endpoint URL for S3-compatible stores (also AWS_ENDPOINT_URL).
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    pub s3_endpoint: Option<String>,
    /// Use path-style S3 addressing (most self-hosted S3 servers need it).
    #[arg(long, env = "REWIND_S3_PATH_STYLE", value_parser = clap::builder::BoolishValueParser::new(), default_value = "false")]
    pub s3_path_style: bool,
    /// Encrypt the volume (client-side, XChaCha20-Poly1305): FILE holds the 32-byte
    /// key-encryption key, raw or as 64 hex digits (e.g. a Kubernetes Secret mounted as a
    /// file). `rewind run` gives an empty volume a random data key wrapped by this key; every
    /// command then needs it for that volume, and refuses a plaintext volume with it. A
    /// missing, unreadable or wrong key is an error before anything is read or uploaded.
    #[arg(long, env = "REWIND_ENCRYPTION_KEY_FILE", value_name = "FILE")]
    pub encryption_key_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Re-wrap an encrypted volume's data key for a new key-encryption key and remove the old
    /// key's wrapping: no data is rewritten, and afterwards only the new key opens the volume.
    /// Needs delete permission on the volume's keys/ objects (docs/SECURITY.md). An interrupted
    /// rotation leaves both keys working; run it again.
    Rotate(RotateArgs),
}

#[derive(Debug, Clone, Args)]
pub struct RotateArgs {
    /// Object store: file:///abs/path, a plain directory path, or s3://bucket/prefix.
    #[arg(long, env = "REWIND_STORE")]
    pub store: String,
    /// The volume whose key to rotate.
    #[arg(long, env = "REWIND_VOLUME", default_value = "default")]
    pub volume: String,
    /// S3 endpoint URL for S3-compatible stores (also AWS_ENDPOINT_URL).
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    pub s3_endpoint: Option<String>,
    /// Use path-style S3 addressing (most self-hosted S3 servers need it).
    #[arg(long, env = "REWIND_S3_PATH_STYLE", value_parser = clap::builder::BoolishValueParser::new(), default_value = "false")]
    pub s3_path_style: bool,
    /// The key the volume is encrypted with now.
    #[arg(long, value_name = "FILE")]
    pub old_key_file: PathBuf,
    /// The key that replaces it (32 bytes, raw or as 64 hex digits).
    #[arg(long, value_name = "FILE")]
    pub new_key_file: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnJournalFull {
    /// Writers wait until the store catches up (nothing is ever dropped).
    Wait,
    /// Writers never wait: the journal drops the changes the store has not taken, the timeline
    /// records an explicit gap (restores inside it are refused by name) and a new lineage
    /// begins with a new base once the store takes it.
    Gap,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// The directory to protect (the real data; the application must not use it directly).
    #[arg(long)]
    pub source: PathBuf,
    /// Where to mount the protected view; the application uses this path.
    #[arg(long)]
    pub mount: PathBuf,
    #[command(flatten)]
    pub store: StoreArgs,
    /// How often the journal is sealed into a segment and shipped.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub segment_interval: Duration,
    /// Journal directory (default: SOURCE/.rewind/journal, hidden from the mount, so a
    /// restarted pod finds what it had not yet shipped).
    #[arg(long)]
    pub journal_dir: Option<PathBuf>,
    /// Address for /healthz, /readyz and /metrics, e.g. 0.0.0.0:9746 (off when absent).
    #[arg(long)]
    pub listen: Option<String>,
    /// Journal size past which writers wait for the store, or with --on-journal-full=gap the
    /// changes the store has not taken are dropped (the journal then holds at most this plus one
    /// 64 MiB journal file).
    #[arg(long, default_value = "1073741824")]
    pub max_journal_bytes: u64,
    /// How often the sidecar reads the store's timeline back for its metrics: the restore
    /// window's start and the oldest restorable point of each retention tier move when
    /// `rewind prune` runs elsewhere (one LIST of the volume each time, 1,000 keys a request).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub timeline_interval: Duration,
    /// Take a periodic base snapshot this long after the previous one started (default 1h), so
    /// that a restore replays at most about this much journal. Periodic bases are incremental:
    /// only files changed since the previous base are read and only new chunks uploaded. No base
    /// is taken while nothing was written.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub base_interval: Duration,
    /// Also take a periodic base once this many bytes were appended to the journal since the
    /// previous base started (default 1073741824, 1 GiB), whichever of this and --base-interval
    /// comes first. Counted from the start of this run after a restart.
    #[arg(long, default_value = "1073741824")]
    pub base_after: u64,
    /// What happens when the journal is full.
    #[arg(long, value_enum, default_value = "wait")]
    pub on_journal_full: OnJournalFull,
    /// How long shutdown may take to serve open files, seal and upload before giving up.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,
    /// FUSE worker threads.
    #[arg(long, default_value = "4")]
    pub threads: usize,
    /// Serve reads of read-only opens straight from the source file (kernel FUSE passthrough,
    /// Linux 6.9+): cold reads run at the native filesystem's speed. The kernel keeps a file in one
    /// io mode at a time, so while such a reader has a file open, opening that file for writing
    /// fails with ETXTBSY (read-only opens while a writer has it open are served normally). Off by
    /// default because an application's writable open must never fail because of a reader.
    #[arg(long)]
    pub read_passthrough: bool,
    /// Serve files opened for writing through the mount's page cache. By default they bypass it:
    /// every write goes to the journal anyway, and the kernel asks the daemon for the file's
    /// security.capability attribute before every cached write, which doubles the round trips
    /// of small writes. The price of the default is that reads through a writable open always
    /// reach the daemon (served from the source's page cache). Set this when an application
    /// rereads much of what it reads through files it also has open for writing and relies on the
    /// page cache for it (PostgreSQL with small shared_buffers).
    #[arg(long)]
    pub cached_writes: bool,
    /// Put every object with an S3 Object Lock retention of this many days (the bucket must have
    /// Object Lock enabled; docs/SECURITY.md): until it ends, no credential can delete or replace
    /// the stored versions. The sidecar never overwrites or deletes an object, so it needs no
    /// more permissions for this than s3:PutObject and s3:PutObjectRetention.
    #[arg(long, value_name = "DAYS", value_parser = clap::value_parser!(u32).range(1..))]
    pub object_lock_days: Option<u32>,
    /// The retention mode for --object-lock-days (default compliance): compliance (nobody, the
    /// account's root included, can shorten it) or governance (principals allowed
    /// s3:BypassGovernanceRetention can).
    #[arg(long, value_enum, requires = "object_lock_days")]
    pub object_lock_mode: Option<LockModeArg>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LockModeArg {
    Compliance,
    Governance,
}

#[derive(Debug, Clone, Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The instant to restore: RFC 3339 (2026-11-24T12:00:05.25Z), @UNIX_SECONDS, or "latest".
    #[arg(long)]
    pub at: String,
    /// The directory to restore into; must be empty (or absent) unless --force.
    #[arg(long)]
    pub target: PathBuf,
    /// Restore only this file or sub-tree (relative to the volume root), with its metadata, the
    /// hard links among the paths given and the directories above them; repeatable. A path that
    /// did not exist at TIME is an error. Only these files' data is fetched.
    #[arg(long = "path", value_name = "PATH")]
    pub paths: Vec<String>,
    /// Restore into a non-empty target, replacing what is there.
    #[arg(long)]
    pub force: bool,
    /// Which lineage to restore when two overlap in time (see `rewind ls`).
    #[arg(long)]
    pub lineage: Option<String>,
    /// Where `rewind prune` has thinned the history to isolated points, a TIME between two of
    /// them is refused (naming both); with this flag the nearest point at or before TIME is
    /// restored instead, and the output says which instant that was.
    #[arg(long)]
    pub or_earlier: bool,
    /// Do not print progress.
    #[arg(long, short)]
    pub quiet: bool,
    /// How many store reads run at once (chunks of the base are fetched, verified and written
    /// in parallel; segments are fetched ahead while earlier ones are applied). Memory grows by
    /// about 2 MiB per job. Raise it for a remote store with high latency.
    #[arg(long, short = 'j', default_value_t = crate::fetch::DEFAULT_JOBS as u16, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub jobs: u16,
    #[command(flatten)]
    pub progress: ProgressArgs,
    /// Make the restore one-shot: if PATH exists, do nothing and exit 0; otherwise restore and,
    /// only once the restore is complete, create PATH (and its parent directories). Used by the
    /// injected `rewind.dev/restore-at` init container with PATH inside TARGET, so a recreated
    /// pod does not restore again over newer data.
    #[arg(long, value_name = "PATH")]
    pub once_marker: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct DiffArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The earlier instant: RFC 3339, @UNIX_SECONDS, or "latest".
    #[arg(long)]
    pub from: String,
    /// The later instant (not before --from).
    #[arg(long)]
    pub to: String,
    /// Only changes at this path or under it (relative to the volume root); it must exist at
    /// --from or at --to.
    #[arg(long)]
    pub path: Option<String>,
    /// Which lineage, when two overlap in time (see `rewind ls`).
    #[arg(long)]
    pub lineage: Option<String>,
    /// Output format.
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Debug, Clone, Args)]
pub struct MountArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The instant to show: RFC 3339 (2026-11-24T12:00:05.25Z), @UNIX_SECONDS, or "latest".
    #[arg(long)]
    pub at: String,
    /// Which lineage to show when two overlap in time (see `rewind ls`).
    #[arg(long)]
    pub lineage: Option<String>,
    /// Where `rewind prune` has thinned the history to isolated points, show the nearest point at
    /// or before TIME instead of refusing a TIME between two of them.
    #[arg(long)]
    pub or_earlier: bool,
    /// Bytes of file contents kept in memory (default 256 MiB); reads beyond it fetch again.
    #[arg(long, default_value = "268435456")]
    pub cache_size: u64,
    /// FUSE worker threads.
    #[arg(long, default_value = "4")]
    pub threads: usize,
    #[command(flatten)]
    pub progress: ProgressArgs,
    /// Where to mount the view (an existing directory).
    pub mountpoint: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct LsArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Print machine-readable JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct PruneArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Keep every instant for this span (the newest history).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub keep_seconds: Duration,
    /// Then keep one point a minute (every whole minute, compacted into deltas) for this span.
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    pub keep_minutes: Duration,
    /// Then one point an hour for this span.
    #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
    pub keep_hours: Duration,
    /// Then one point a day for this span; anything older is deleted.
    #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
    pub keep_days: Duration,
    /// How long condemned objects stay before a later prune deletes them. It must be longer than
    /// any restore or verify takes: one that started before the condemnation may still read them.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub grace: Duration,
    /// Print what would be kept, condemned and deleted, and change nothing. A dry run does
    /// not compact: the segments that the minutes tier's new deltas would replace are
    /// not counted as condemned.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub progress: ProgressArgs,
}

/// How long-running commands show progress on stderr: a bar with bytes, rate and ETA on a
/// terminal, a plain line every --progress-every otherwise, and one closing line per phase with
/// its exact total.
#[derive(Debug, Clone, Args)]
pub struct ProgressArgs {
    /// When stderr is not a terminal (a log), print a progress line this often.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    pub progress_every: std::time::Duration,
}

#[derive(Debug, Clone, Args)]
pub struct WebhookArgs {
    /// Address to serve HTTPS on (POST /mutate, GET /healthz, GET /readyz).
    #[arg(long, default_value = "0.0.0.0:8443")]
    pub listen: String,
    /// PEM certificate chain; re-read when the file changes, so rotated certificates need no restart.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: PathBuf,
    /// PEM private key matching --tls-cert; re-read together with it.
    #[arg(long, value_name = "FILE")]
    pub tls_key: PathBuf,
    /// JSON file with the injection settings (sidecar image, default store, resources...);
    /// built-in defaults when absent. See docs/KUBERNETES.md.
    #[arg(long, value_name = "FILE", env = "REWIND_WEBHOOK_CONFIG")]
    pub config: Option<PathBuf>,
}
