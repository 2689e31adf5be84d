//! Restore: rebuilds a volume at a time from the store alone. It owns the
//! target directory as a replay target (`Disk`: how the replay core's
//! effects land on disk; how a record changes the tree is `replay.rs`'s),
//! the fetching of what a plan names, and the rules that keep a restore
//! honest: every object is verified before use; names are checked and
//! every operation is made relative to directory handles this module
//! opened itself with O_NOFOLLOW, so nothing is ever written outside the
//! target; a marker
//! (`.rewind/restore-incomplete`) stays until the restore has finished, so
//! a partial result never looks complete. A restore of some paths finds
//! the identities under them with a replay into memory first, fetches only
//! their data, and removes every other name before it finishes. It must
//! not read the journal or any local state of `rewind run`.
//!
//! # State
//! Files live as staging objects `.rewind/restore-tmp/o/<ino>` hard-linked
//! into the tree, so hard links, renames and writes to unlinked open files
//! replay by identity. Directories live in place (or in
//! `.rewind/restore-tmp/d/<ino>` while unlinked or not yet placed).
//!
//! # Device nodes the restoring user may not make
//! Making a character or block device needs CAP_MKNOD, which a restore
//! into a container often lacks. Such a node is stood in for by an empty
//! placeholder file, so that every later record (links, renames, modes)
//! replays as for any other identity; at the end each placeholder's names
//! are removed and reported (`Restored::skipped`), and the restore still
//! completes: a missing device node must not cost the user the data.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags};

use crate::base::{chunk_key, decode_chunk, load_manifest, safe_name, BaseError, Manifest};
use crate::clock::{fmt_ns, Nanos};
use crate::delta::{self, DeltaError};
use crate::fetch::{Pool, DEFAULT_JOBS};
use crate::layout::{HIDDEN, INCOMPLETE_MARKER};
use crate::progress::{Meter, Unit};
use crate::record::{Ino, Kind, Record};
use crate::replay::memory::Memory;
use crate::replay::{
    clean_path, within, Attrs, Effects, Name, Namespace, Policy, Replay, ReplayError,
};
use crate::segment::{self, SegmentError};
use crate::store::{Store, StoreError};
use crate::timeline::{Piece, Plan, Timeline, TimelineError};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Timeline(#[from] TimelineError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Base(#[from] BaseError),
    #[error("segment {key}: {source}")]
    Segment {
        key: String,
        #[source]
        source: SegmentError,
    },
    #[error("delta {key}: {source}")]
    Delta {
        key: String,
        #[source]
        source: DeltaError,
    },
    #[error("chunk {key} is damaged: {why}")]
    Chunk { key: String, why: String },
    #[error("target {0} is not empty; restore into an empty directory or pass --force to replace its contents")]
    NotEmpty(PathBuf),
    #[error(
        "refusing hostile or invalid name {name:?} in {what}: names must be one path component"
    )]
    HostileName { name: String, what: String },
    #[error("the timeline is inconsistent at record {seq}: {why}")]
    Inconsistent { seq: u64, why: String },
    #[error("--path {path:?} did not exist at {at}; give a path relative to the volume root (see `rewind diff` for what changed when)")]
    NoSuchPath { path: String, at: String },

    #[error("record {seq} ({op}): {source}")]
    AtRecord {
        seq: u64,
        op: &'static str,
        #[source]
        source: Box<RestoreError>,
    },
    #[error("restore I/O error ({what}): {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl RestoreError {
    /// `e`, said of record `r` (its sequence number and kind lead the message).
    pub(crate) fn at_record(r: &Record, e: impl Into<RestoreError>) -> RestoreError {
        RestoreError::AtRecord {
            seq: r.seq,
            op: r.op.kind_name(),
            source: Box::new(e.into()),
        }
    }
}

type Result<T> = std::result::Result<T, RestoreError>;

fn io(what: impl Into<String>, e: impl Into<std::io::Error>) -> RestoreError {
    RestoreError::Io {
        what: what.into(),
        source: e.into(),
    }
}

fn cname(name: &[u8], what: &str) -> Result<CString> {
    match safe_name(name) {
        Some(_) => Ok(CString::new(name).unwrap()),
        None => Err(RestoreError::HostileName {
            name: String::from_utf8_lossy(name).into_owned(),
            what: what.into(),
        }),
    }
}

fn ino_name(ino: Ino) -> CString {
    CString::new(ino.to_string()).unwrap()
}

/// A base file whose chunks are being written by a pool's jobs: its own
/// handle (the tree's may be closed meanwhile), its size, and how many of
/// its chunks are still to write (the last job sets the size).
struct Content {
    fd: OwnedFd,
    size: u64,
    left: AtomicUsize,
}

fn pwrite_all(fd: &OwnedFd, offset: u64, data: &[u8]) -> Result<()> {
    let mut done = 0;
    while done < data.len() {
        done += rustix::io::pwrite(fd, &data[done..], offset + done as u64)
            .map_err(|e| io("write", e))?;
    }
    Ok(())
}

impl From<ReplayError> for RestoreError {
    fn from(e: ReplayError) -> RestoreError {
        match e {
            ReplayError::HostileName { name, what } => RestoreError::HostileName { name, what },
            ReplayError::Inconsistent { seq, why } => RestoreError::Inconsistent { seq, why },
        }
    }
}

/// The target directory as a replay target: where each identity lives
/// (see `# State`), and the handles that reach it.
pub(crate) struct Disk {
    root_fd: OwnedFd,
    objs: OwnedFd,
    dirs: OwnedFd,
    dir_fds: HashMap<Ino, OwnedFd>,
    files: HashMap<Ino, OwnedFd>,
    staging: PathBuf,
    dead: u64,
    /// Device nodes that could not be made, with their device number: a
    /// placeholder file stands in for each until `finish` removes it.
    unmade: HashMap<Ino, u64>,
}

/// The target tree being built: the replay model driving the directory.
pub struct Tree {
    replay: Replay<Disk>,
}

/// Open descriptors the restore keeps for files and directories.
const FILE_CACHE: usize = 256;
const DIR_CACHE: usize = 1024;

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

fn dup(fd: &OwnedFd) -> Result<OwnedFd> {
    rustix::io::fcntl_dupfd_cloexec(fd, 0).map_err(|e| io("dup", e))
}

impl Disk {
    fn dir_fd(&mut self, ns: &Namespace, ino: Ino) -> Result<&OwnedFd> {
        if ino == ns.root() {
            return Ok(&self.root_fd);
        }
        if !self.dir_fds.contains_key(&ino) {
            let node = ns.node(ino).ok_or_else(|| RestoreError::Inconsistent {
                seq: 0,
                why: format!("directory {ino} is unknown"),
            })?;
            if node.kind != Kind::Dir {
                return Err(RestoreError::Inconsistent {
                    seq: 0,
                    why: format!("{ino} is not a directory"),
                });
            }
            let fd = match node.place.clone() {
                Some((parent, name)) => {
                    let name = cname(&name, "model")?;
                    let pfd = self.dir_fd(ns, parent)?;
                    rfs::openat(pfd, &name, DIR_FLAGS, Mode::empty())
                }
                None => rfs::openat(&self.dirs, &ino_name(ino), DIR_FLAGS, Mode::empty()),
            }
            .map_err(|e| io(format!("open directory {ino}"), e))?;
            // Handles follow the directory through renames, so the cache
            // never goes stale; it is only bounded, since every entry can
            // be reopened through its parent chain or from staging.
            if self.dir_fds.len() >= DIR_CACHE {
                self.dir_fds.clear();
            }
            self.dir_fds.insert(ino, fd);
        }
        Ok(&self.dir_fds[&ino])
    }

    /// An owned handle on directory `ino`, for calls that take two.
    fn dir_dup(&mut self, ns: &Namespace, ino: Ino) -> Result<OwnedFd> {
        dup(self.dir_fd(ns, ino)?)
    }

    fn file_fd(&mut self, ino: Ino) -> Result<&OwnedFd> {
        if !self.files.contains_key(&ino) {
            if self.files.len() >= FILE_CACHE {
                self.files.clear();
            }
            let fd = rfs::openat(
                &self.objs,
                &ino_name(ino),
                OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| io(format!("open file object {ino}"), e))?;
            self.files.insert(ino, fd);
        }
        Ok(&self.files[&ino])
    }

    fn xattr_target(&mut self, ns: &Namespace, ino: Ino) -> Result<Option<CString>> {
        // Xattrs go through /proc/self/fd paths of our own handles, so they
        // can never resolve outside the target.
        let fd = match ns.node(ino).map(|n| n.kind) {
            Some(Kind::Dir) => self.dir_fd(ns, ino)?.as_raw_fd(),
            Some(Kind::File) => self.file_fd(ino)?.as_raw_fd(),
            _ => return Ok(None),
        };
        Ok(Some(CString::new(format!("/proc/self/fd/{fd}")).unwrap()))
    }
}

impl Effects for Disk {
    type Error = RestoreError;

    fn make(
        &mut self,
        ns: &Namespace,
        ino: Ino,
        kind: Kind,
        attrs: Attrs,
        rdev: u64,
        target: &[u8],
    ) -> Result<()> {
        let name = ino_name(ino);
        let m = Mode::from_bits_truncate(attrs.mode & 0o7777);
        match kind {
            Kind::File => drop(
                rfs::openat(
                    &self.objs,
                    &name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    m,
                )
                .map_err(|e| io(format!("create {ino}"), e))?,
            ),
            Kind::Dir => {
                rfs::mkdirat(&self.dirs, &name, m).map_err(|e| io(format!("mkdir {ino}"), e))?
            }
            Kind::Symlink => rfs::symlinkat(
                CString::new(target)
                    .map_err(|_| RestoreError::HostileName {
                        name: String::from_utf8_lossy(target).into(),
                        what: "symlink target".into(),
                    })?
                    .as_c_str(),
                &self.objs,
                &name,
            )
            .map_err(|e| io(format!("symlink {ino}"), e))?,
            Kind::Fifo => rfs::mknodat(&self.objs, &name, rfs::FileType::Fifo, m, 0)
                .map_err(|e| io(format!("mkfifo {ino}"), e))?,
            // A socket's node is made the way bind() makes it; no process
            // listens on it after a restore, exactly as after a reboot.
            Kind::Socket => rfs::mknodat(&self.objs, &name, rfs::FileType::Socket, m, 0)
                .map_err(|e| io(format!("mknod socket {ino}"), e))?,
            Kind::CharDev | Kind::BlockDev => {
                let ft = if kind == Kind::CharDev {
                    rfs::FileType::CharacterDevice
                } else {
                    rfs::FileType::BlockDevice
                };
                match rfs::mknodat(&self.objs, &name, ft, m, rdev) {
                    Ok(()) => {}
                    // No CAP_MKNOD (a container, a user namespace): a
                    // placeholder keeps the identity's names in step, and
                    // `finish` removes and reports them.
                    Err(rustix::io::Errno::PERM) => {
                        drop(
                            rfs::openat(
                                &self.objs,
                                &name,
                                OFlags::WRONLY
                                    | OFlags::CREATE
                                    | OFlags::EXCL
                                    | OFlags::NOFOLLOW
                                    | OFlags::CLOEXEC,
                                m,
                            )
                            .map_err(|e| io(format!("create placeholder {ino}"), e))?,
                        );
                        self.unmade.insert(ino, rdev);
                    }
                    Err(e) => return Err(io(format!("mknod device {ino}"), e)),
                }
            }
        }
        self.set_attrs(ns, ino, attrs)
    }

    fn link(&mut self, ns: &Namespace, parent: Ino, name: &[u8], ino: Ino) -> Result<()> {
        let name = cname(name, "segment")?;
        let pfd = self.dir_dup(ns, parent)?;
        let node = ns.node(ino).ok_or_else(|| RestoreError::Inconsistent {
            seq: 0,
            why: format!("{ino} is unknown"),
        })?;
        if node.kind == Kind::Dir {
            match node.place.clone() {
                Some((p, n)) => {
                    let from = self.dir_dup(ns, p)?;
                    rfs::renameat(&from, &cname(&n, "model")?, &pfd, &name)
                        .map_err(|e| io("move directory", e))?
                }
                None => rfs::renameat(&self.dirs, &ino_name(ino), &pfd, &name)
                    .map_err(|e| io("place directory", e))?,
            }
        } else {
            rfs::linkat(&self.objs, &ino_name(ino), &pfd, &name, AtFlags::empty())
                .map_err(|e| io("link", e))?;
        }
        Ok(())
    }

    fn unlink(&mut self, ns: &Namespace, parent: Ino, name: &[u8], ino: Ino) -> Result<()> {
        let name = cname(name, "segment")?;
        let pfd = self.dir_dup(ns, parent)?;
        if ns.node(ino).map(|n| n.kind) == Some(Kind::Dir) {
            // Move it aside rather than delete: a fuzzy base may still hold
            // children that later records move out of it.
            rfs::renameat(&pfd, &name, &self.dirs, &ino_name(ino))
                .map_err(|e| io("move directory aside", e))?;
        } else {
            rfs::unlinkat(&pfd, &name, AtFlags::empty())
                .map_err(|e| io(format!("unlink {name:?} of {ino} in {parent}"), e))?;
        }
        Ok(())
    }

    fn rename(
        &mut self,
        ns: &Namespace,
        (fp, from): (Ino, &[u8]),
        (tp, to): (Ino, &[u8]),
        _: Ino,
        over: Option<Ino>,
    ) -> Result<()> {
        // What stands at the target is taken away first, as `unlink` does:
        // a directory there may not be empty on disk yet.
        if let Some(o) = over {
            self.unlink(ns, tp, to, o)?;
        }
        let (from, to) = (cname(from, "segment")?, cname(to, "segment")?);
        let f = self.dir_dup(ns, fp)?;
        let t = self.dir_dup(ns, tp)?;
        rfs::renameat(&f, &from, &t, &to).map_err(|e| io("rename", e))
    }

    fn exchange(
        &mut self,
        ns: &Namespace,
        (ap, a): (Ino, &[u8]),
        (bp, b): (Ino, &[u8]),
    ) -> Result<()> {
        let (a, b) = (cname(a, "segment")?, cname(b, "segment")?);
        let f = self.dir_dup(ns, ap)?;
        let t = self.dir_dup(ns, bp)?;
        rfs::renameat_with(&f, &a, &t, &b, rfs::RenameFlags::EXCHANGE)
            .map_err(|e| io("exchange", e))
    }

    fn renumber(&mut self, ns: &Namespace, old: Ino, new: Ino) -> Result<()> {
        self.files.remove(&old);
        if let Some(fd) = self.dir_fds.remove(&old) {
            self.dir_fds.insert(new, fd);
        }
        if let Some(rdev) = self.unmade.remove(&old) {
            self.unmade.insert(new, rdev);
        }
        // The staging object carries the identity in its name; a directory
        // in the tree has no staging name.
        match ns.node(new) {
            Some(n) if n.kind == Kind::Dir && n.place.is_some() => Ok(()),
            Some(n) => {
                let d = if n.kind == Kind::Dir {
                    &self.dirs
                } else {
                    &self.objs
                };
                rfs::renameat(d, &ino_name(old), d, &ino_name(new))
                    .map_err(|e| io("renumber staging object", e))
            }
            None => Ok(()),
        }
    }

    fn discard(&mut self, ns: &Namespace, ino: Ino) -> Result<()> {
        self.unmade.remove(&ino);
        self.files.remove(&ino);
        self.dir_fds.remove(&ino);
        if ns.node(ino).map(|n| n.kind) == Some(Kind::Dir) {
            // Dead directories stay in staging until `finish` removes it
            // whole: whatever a fuzzy base left in one goes with it.
            let dead = CString::new(format!("dead-{}", self.dead)).unwrap();
            self.dead += 1;
            rfs::renameat(&self.dirs, &ino_name(ino), &self.dirs, &dead)
                .map_err(|e| io("discard directory", e))
        } else {
            rfs::unlinkat(&self.objs, &ino_name(ino), AtFlags::empty())
                .map_err(|e| io("discard object", e))
        }
    }

    fn write(&mut self, _: &Namespace, ino: Ino, offset: u64, data: &[u8]) -> Result<()> {
        pwrite_all(self.file_fd(ino)?, offset, data)
    }

    fn set_size(&mut self, _: &Namespace, ino: Ino, size: u64) -> Result<()> {
        let fd = self.file_fd(ino)?;
        rfs::ftruncate(fd, size).map_err(|e| io("truncate", e))
    }

    fn fallocate(
        &mut self,
        _: &Namespace,
        ino: Ino,
        mode: u32,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        let fd = self.file_fd(ino)?;
        let flags = rfs::FallocateFlags::from_bits_retain(mode);
        rfs::fallocate(fd, flags, offset, len).map_err(|e| io("fallocate", e))
    }

    fn set_attrs(&mut self, ns: &Namespace, ino: Ino, attrs: Attrs) -> Result<()> {
        let kind = ns.node(ino).map(|n| n.kind);
        let mode = Mode::from_bits_truncate(attrs.mode & 0o7777);
        let (uid, gid) = (
            Some(rfs::Uid::from_raw(attrs.uid)),
            Some(rfs::Gid::from_raw(attrs.gid)),
        );
        match kind {
            Some(Kind::Dir) => {
                let fd = self.dir_dup(ns, ino)?;
                rfs::fchown(&fd, uid, gid).map_err(|e| io("chown", e))?;
                rfs::fchmod(&fd, mode).map_err(|e| io("chmod", e))?;
            }
            Some(Kind::Symlink) => {
                rfs::chownat(
                    &self.objs,
                    &ino_name(ino),
                    uid,
                    gid,
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(|e| io("lchown", e))?;
            }
            _ => {
                // chown first: it may clear set-id bits that chmod then sets.
                rfs::chownat(
                    &self.objs,
                    &ino_name(ino),
                    uid,
                    gid,
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(|e| io("chown", e))?;
                rfs::chmodat(&self.objs, &ino_name(ino), mode, AtFlags::empty())
                    .map_err(|e| io("chmod", e))?;
            }
        }
        Ok(())
    }

    fn set_mtime(&mut self, _: &Namespace, _: Ino, _: Nanos) -> Result<()> {
        // Every write moves a file's mtime: `finish` sets the model's last
        // one once, after all data is in.
        Ok(())
    }

    fn set_xattr(&mut self, ns: &Namespace, ino: Ino, name: &[u8], value: &[u8]) -> Result<()> {
        let Some(p) = self.xattr_target(ns, ino)? else {
            return Ok(());
        };
        let n = CString::new(name).map_err(|_| RestoreError::HostileName {
            name: String::from_utf8_lossy(name).into(),
            what: "xattr".into(),
        })?;
        if let Err(e) = rfs::setxattr(p.as_c_str(), n.as_c_str(), value, rfs::XattrFlags::empty()) {
            // Only user xattrs are part of the contract; others (security.*,
            // trusted.*) depend on the target system and are best effort.
            if name.starts_with(b"user.") {
                return Err(io(format!("setxattr {}", String::from_utf8_lossy(name)), e));
            }
        }
        Ok(())
    }

    fn remove_xattr(&mut self, ns: &Namespace, ino: Ino, name: &[u8]) -> Result<()> {
        if let Some(p) = self.xattr_target(ns, ino)? {
            if let Ok(n) = CString::new(name) {
                let _ = rfs::removexattr(p.as_c_str(), n.as_c_str());
            }
        }
        Ok(())
    }
}

impl Tree {
    /// Prepares `target` (created if absent): refuses a non-empty one unless
    /// `force`, then writes the incomplete marker and staging directories.
    pub fn prepare(target: &Path, force: bool) -> Result<Tree> {
        std::fs::create_dir_all(target)
            .map_err(|e| io(format!("create {}", target.display()), e))?;
        // A fresh ext4 volume holds an empty lost+found: that is empty.
        let is_trivial = |e: &std::fs::DirEntry| {
            e.file_name() == "lost+found"
                && std::fs::read_dir(e.path())
                    .map(|mut d| d.next().is_none())
                    .unwrap_or(false)
        };
        let mut entries = std::fs::read_dir(target)
            .map_err(|e| io(format!("read {}", target.display()), e))?
            .filter_map(|e| e.ok())
            .filter(|e| !is_trivial(e));
        if entries.next().is_some() {
            if !force {
                return Err(RestoreError::NotEmpty(target.to_path_buf()));
            }
            for e in std::fs::read_dir(target)
                .map_err(|e| io("read target", e))?
                .flatten()
                .filter(|e| !is_trivial(e))
            {
                let p = e.path();
                let r = if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
                r.map_err(|e| io(format!("clear {}", p.display()), e))?;
            }
        }
        let root_fd =
            rfs::open(target, DIR_FLAGS, Mode::empty()).map_err(|e| io("open target", e))?;
        let hidden = target.join(HIDDEN);
        std::fs::create_dir_all(&hidden).map_err(|e| io("create .rewind", e))?;
        std::fs::write(
            hidden.join(INCOMPLETE_MARKER),
            b"a restore is in progress or failed; this directory is not a complete restore\n",
        )
        .map_err(|e| io("write marker", e))?;
        let staging = hidden.join("restore-tmp");
        std::fs::create_dir_all(staging.join("o")).map_err(|e| io("create staging", e))?;
        std::fs::create_dir_all(staging.join("d")).map_err(|e| io("create staging", e))?;
        let objs = rfs::open(staging.join("o"), DIR_FLAGS, Mode::empty())
            .map_err(|e| io("open staging", e))?;
        let dirs = rfs::open(staging.join("d"), DIR_FLAGS, Mode::empty())
            .map_err(|e| io("open staging", e))?;
        let disk = Disk {
            root_fd,
            objs,
            dirs,
            dir_fds: HashMap::new(),
            files: HashMap::new(),
            staging,
            dead: 0,
            unmade: HashMap::new(),
        };
        Ok(Tree {
            replay: Replay::new(disk, Policy::Exact),
        })
    }

    /// Materialises a base manifest. `fetch` returns a verified chunk; it
    /// is called on `jobs` threads at once, each of which writes the chunks
    /// it got into their files (distinct offsets, through their own
    /// handles), while this thread makes the objects, their attributes and
    /// their names in manifest order. Every chunk is written before this
    /// returns, so records replayed after it see the whole base; the first
    /// error stops the fetches and is returned.
    pub fn apply_base(
        &mut self,
        m: &Manifest,
        fetch: &(dyn Fn(&[u8; 32]) -> Result<Vec<u8>> + Sync),
        jobs: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<()> {
        std::thread::scope(|scope| {
            let pool = Pool::start(scope, jobs);
            let made = self.make_base_objects(m, fetch, &pool, progress);
            // The pool's error comes first: a failed fetch is the cause, a
            // later error here only its consequence (submitting stopped).
            let fetched = pool.finish();
            fetched.and(made)
        })?;
        self.replay.base_links(&m.links)
    }

    fn make_base_objects<'scope>(
        &mut self,
        m: &Manifest,
        fetch: &'scope (dyn Fn(&[u8; 32]) -> Result<Vec<u8>> + Sync),
        pool: &Pool<'scope, RestoreError>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<()> {
        self.replay.set_root(m.root);
        let total = m.objects.len();
        for (i, o) in m.objects.iter().enumerate() {
            self.replay.base_object(o)?;
            if o.kind == Kind::File {
                // A restore of some paths fetches only their files' data.
                let wanted = self.replay.wants_data(o.ino);
                if wanted && !o.extents.is_empty() && !self.submit_extents(o, fetch, pool)? {
                    return Ok(());
                }
                // The size is set now, while the chunks (all within it) are
                // still being written; the last chunk's job sets it again in
                // case one reached past it.
                self.replay.base_file_done(o)?;
            }
            if i % 1000 == 999 {
                progress(i + 1, total);
            }
        }
        progress(total, total);
        Ok(())
    }

    /// Queues the chunks of file `o` on `pool`: each job fetches one, checks
    /// its length and writes it; the job that writes the file's last chunk
    /// sets its size. False once the pool has stopped on an error.
    fn submit_extents<'scope>(
        &mut self,
        o: &crate::base::Object,
        fetch: &'scope (dyn Fn(&[u8; 32]) -> Result<Vec<u8>> + Sync),
        pool: &Pool<'scope, RestoreError>,
    ) -> Result<bool> {
        let fd = dup(self.replay.target.file_fd(o.ino)?)?;
        let file = Arc::new(Content {
            fd,
            size: o.size,
            left: AtomicUsize::new(o.extents.len()),
        });
        for e in &o.extents {
            let (file, e) = (Arc::clone(&file), e.clone());
            let ok = pool.submit(move || {
                let data = fetch(&e.hash)?;
                if data.len() != e.len as usize {
                    return Err(RestoreError::Chunk {
                        key: chunk_key(&e.hash),
                        why: "length differs from the manifest".into(),
                    });
                }
                pwrite_all(&file.fd, e.offset, &data)?;
                if file.left.fetch_sub(1, Ordering::AcqRel) == 1 {
                    rfs::ftruncate(&file.fd, file.size).map_err(|e| io("truncate", e))?;
                }
                Ok(())
            });
            if !ok {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Declares the time until which records raced the base walk.
    pub fn set_fuzzy_until(&mut self, ns: Nanos) {
        self.replay.set_fuzzy_until(ns);
    }

    /// Applies one record.
    pub fn apply(&mut self, rec: &Record) -> Result<()> {
        self.replay.apply(rec).map(drop)
    }

    /// Removes the placeholders of device nodes that could not be made and
    /// returns one line per name they had in the tree.
    fn drop_unmade(&mut self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut unmade: Vec<(Ino, u64)> = self.replay.target.unmade.drain().collect();
        unmade.sort();
        for (ino, rdev) in unmade {
            let Some(node) = self.replay.ns.node(ino) else {
                continue;
            };
            let what = if node.kind == Kind::BlockDev {
                "block"
            } else {
                "character"
            };
            let mut links: Vec<(Ino, Name)> = node.links.iter().cloned().collect();
            links.sort();
            for (p, n) in links {
                if let Some(path) = self.replay.ns.entry_path(p, &n) {
                    out.push(format!(
                        "{path}: {what} device {}:{} not restored (making device nodes needs CAP_MKNOD)",
                        rustix::fs::major(rdev),
                        rustix::fs::minor(rdev)
                    ));
                }
            }
            self.replay.unlink_all(ino)?;
        }
        out.sort();
        Ok(out)
    }

    /// Sets file mtimes (last, since every write moves them), removes the
    /// staging area and the marker, and syncs the target. Returns the
    /// device nodes that could not be made (see the module doc).
    pub fn finish(mut self) -> Result<Vec<String>> {
        let skipped = self.drop_unmade()?;
        let mtimes: Vec<(Ino, Nanos)> = self
            .replay
            .ns
            .nodes()
            .filter_map(|(i, n)| n.mtime.map(|m| (i, m)))
            .collect();
        let disk = &mut self.replay.target;
        disk.files.clear();
        for (ino, m) in mtimes {
            let t = crate::clock::timespec(m);
            let ts = rfs::Timestamps {
                last_access: t,
                last_modification: t,
            };
            rfs::utimensat(&disk.objs, &ino_name(ino), &ts, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| io("set mtime", e))?;
        }
        rfs::syncfs(&disk.root_fd).map_err(|e| io("sync target", e))?;
        std::fs::remove_dir_all(&disk.staging).map_err(|e| io("remove staging", e))?;
        let hidden = disk.staging.parent().unwrap().to_path_buf();
        std::fs::remove_file(hidden.join(INCOMPLETE_MARKER)).map_err(|e| io("remove marker", e))?;
        let _ = std::fs::remove_dir(&hidden);
        rfs::syncfs(&disk.root_fd).map_err(|e| io("sync target", e))?;
        Ok(skipped)
    }

    /// Gives file data only to `inos` (a restore of some paths).
    fn limit_data(&mut self, inos: HashSet<Ino>) {
        self.replay.limit_data(inos);
    }

    /// Removes every name that is not one of `paths`, under one, or a
    /// directory above one.
    fn keep_only(&mut self, paths: &[String]) -> Result<()> {
        let mut stack = vec![(self.replay.ns.root(), String::new())];
        while let Some((dir, prefix)) = stack.pop() {
            for (name, ino) in self.replay.ns.children(dir) {
                let path = format!("{prefix}{}", String::from_utf8_lossy(&name));
                if paths.iter().any(|p| within(&path, p)) {
                    continue;
                }
                if paths.iter().any(|p| within(p, &path)) {
                    stack.push((ino, format!("{path}/")));
                    continue;
                }
                self.replay.remove_entry(dir, &name)?;
            }
        }
        Ok(())
    }

    /// How many identities the tree holds.
    fn len(&self) -> usize {
        self.replay.ns.len()
    }
}

/// Summary of a finished restore, for the CLI.
#[derive(Debug)]
pub struct Restored {
    pub at_ns: Nanos,
    pub lineage: u64,
    pub base_completed_ns: Nanos,
    pub records: u64,
    pub last_record_ns: Option<Nanos>,
    pub segments: usize,
    pub deltas: usize,
    pub files: usize,
    /// Paths that are in the volume at the instant but not in the target,
    /// each with the reason: device nodes the restoring user may not make.
    pub skipped: Vec<String>,
}

/// How a restore fetches and reports.
pub struct Options<'a> {
    /// Store reads (and base chunk writes) in flight at once.
    pub jobs: usize,
    /// Counts the base's bytes and the records' objects as they are done.
    pub meter: &'a Meter,
    /// Restore only these paths (relative to the volume root): their
    /// sub-trees with their metadata, the hard links among them and the
    /// directories above them. All of the volume when empty.
    pub paths: &'a [String],
}

/// Restores the volume in `store` at `plan` into `target`, with the
/// default number of parallel fetches and no meter.
pub fn restore(
    store: &dyn Store,
    plan: &Plan,
    target: &Path,
    force: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<Restored> {
    let meter = Meter::silent();
    let opts = Options {
        jobs: DEFAULT_JOBS,
        meter: &meter,
        paths: &[],
    };
    restore_with(store, plan, target, force, &opts, progress)
}

/// Restores the volume in `store` at `plan` into `target`. Chunks of the
/// base are fetched, verified and written on `opts.jobs` threads; segments
/// and deltas are fetched and verified ahead on up to two threads (from the
/// start, while the base is written) and applied in order on this one.
pub fn restore_with(
    store: &dyn Store,
    plan: &Plan,
    target: &Path,
    force: bool,
    opts: &Options,
    progress: &mut dyn FnMut(&str),
) -> Result<Restored> {
    let paths: Vec<String> = opts.paths.iter().map(|p| clean_path(p)).collect();
    let wanted = if paths.is_empty() {
        None
    } else {
        progress(&format!(
            "finding {} path(s) at {}",
            paths.len(),
            fmt_ns(plan.at_ns)
        ));
        Some(identities_under(store, plan, &paths)?)
    };
    let manifest = load_manifest(store, &plan.base)?;
    progress(&format!(
        "restoring lineage {:016x} at {} from the base completed at {} ({} objects), {} segments and {} deltas",
        plan.lineage,
        fmt_ns(plan.at_ns),
        fmt_ns(manifest.completed_ns),
        manifest.objects.len(),
        plan.pieces.iter().filter(|p| matches!(p, Piece::Segment(_))).count(),
        plan.pieces.iter().filter(|p| matches!(p, Piece::Delta(_))).count()
    ));
    // A restore of some paths fetches only their chunks, so its total
    // counts only their bytes: the bar reaches its end and the ETA holds.
    let base_bytes: u64 = manifest
        .objects
        .iter()
        .filter(|o| wanted.as_ref().is_none_or(|w| w.contains(&o.ino)))
        .flat_map(|o| &o.extents)
        .map(|e| u64::from(e.len))
        .sum();
    let mut tree = Tree::prepare(target, force)?;
    tree.set_fuzzy_until(manifest.completed_ns);
    if let Some(w) = wanted {
        tree.limit_data(w);
    }
    let meter = opts.meter;
    let naming = store.chunk_naming()?;
    let fetch = |hash: &[u8; 32]| -> Result<Vec<u8>> {
        let key = chunk_key(hash);
        let data = store.get(&key)?;
        let raw = decode_chunk(&data, hash, &naming).map_err(|e| RestoreError::Chunk {
            key,
            why: e.to_string(),
        })?;
        meter.add(raw.len() as u64);
        Ok(raw)
    };
    let (records, last_record_ns) = std::thread::scope(|scope| -> Result<(u64, Option<Nanos>)> {
        // Two threads ahead keep the replay fed; each holds at most two
        // segments (up to 16 MiB of records each), so with the one being
        // applied at most five are in memory, whatever --jobs says.
        let pieces = fetch_ahead(scope, store, plan, opts.jobs.min(2));
        meter.begin("base", Unit::Bytes, base_bytes);
        // The meter shows progress from here on: bytes of the base, then
        // segments and deltas applied.
        tree.apply_base(&manifest, &fetch, opts.jobs, &mut |_, _| {})?;
        meter.begin("records", Unit::Objects, plan.pieces.len() as u64);
        apply_pieces(
            plan,
            pieces,
            &mut |r| tree.apply(r).map_err(|e| RestoreError::at_record(r, e)),
            &mut |_| meter.add(1),
        )
    })?;
    meter.end();
    if !paths.is_empty() {
        tree.keep_only(&paths)?;
    }
    let files = tree.len();
    let skipped = tree.finish()?;
    Ok(Restored {
        at_ns: plan.at_ns,
        lineage: plan.lineage,
        base_completed_ns: manifest.completed_ns,
        records,
        last_record_ns,
        segments: plan
            .pieces
            .iter()
            .filter(|p| matches!(p, Piece::Segment(_)))
            .count(),
        deltas: plan
            .pieces
            .iter()
            .filter(|p| matches!(p, Piece::Delta(_)))
            .count(),
        files,
        skipped,
    })
}

/// A segment or delta fetched, verified and checked against its key, with
/// its size in the store.
enum Loaded {
    Segment(Vec<Record>, usize),
    Delta(delta::Delta, usize),
}

/// What `apply_pieces` tells its caller before it applies a piece's
/// records: the bytes the piece takes in the store and the bytes of file
/// data all its records write (applied or not), whose ratio is the piece's
/// compression ratio.
pub(crate) struct PieceStats {
    pub(crate) stored: u64,
    pub(crate) written: u64,
}

fn data_written(records: &[Record]) -> u64 {
    records
        .iter()
        .map(|r| match &r.op {
            crate::record::Op::Write { data, .. } => data.len() as u64,
            _ => 0,
        })
        .sum()
}

/// Gets piece `piece` and verifies it: its checksum (by decoding) and that
/// its header is the one its key names.
fn load_piece(store: &dyn Store, piece: &Piece) -> Result<Loaded> {
    let key = piece.key();
    let data = store.get(&key)?;
    match piece {
        Piece::Segment(s) => {
            let (meta, recs) = segment::decode(&data).map_err(|source| RestoreError::Segment {
                key: key.clone(),
                source,
            })?;
            if meta != *s {
                return Err(RestoreError::Segment {
                    key,
                    source: SegmentError::Inconsistent(
                        "header does not match the object key".into(),
                    ),
                });
            }
            Ok(Loaded::Segment(recs, data.len()))
        }
        Piece::Delta(d) => {
            let delta = delta::decode(&data).map_err(|source| RestoreError::Delta {
                key: key.clone(),
                source,
            })?;
            if delta.meta != *d {
                return Err(RestoreError::Delta {
                    key,
                    source: DeltaError::Inconsistent("header does not match the object key".into()),
                });
            }
            Ok(Loaded::Delta(delta, data.len()))
        }
    }
}

/// The plan's segments and deltas, fetched and verified on `threads`
/// threads of `scope` and yielded in the plan's order.
fn fetch_ahead<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    store: &'env dyn Store,
    plan: &'env Plan,
    threads: usize,
) -> impl Iterator<Item = Result<Loaded>> + 'scope {
    crate::fetch::ahead(scope, threads, plan.pieces.len(), move |i| {
        load_piece(store, &plan.pieces[i])
    })
}

/// Hands `apply` every record of `pieces` (the plan's segments and deltas,
/// in order) after the plan's base up to its instant, each sequence number
/// once, and calls `each` with a piece's sizes before its records. Returns
/// how many records it handed on and the time of the last.
fn apply_pieces(
    plan: &Plan,
    mut pieces: impl Iterator<Item = Result<Loaded>>,
    apply: &mut dyn FnMut(&Record) -> Result<()>,
    each: &mut dyn FnMut(&PieceStats),
) -> Result<(u64, Option<Nanos>)> {
    let mut records = 0u64;
    let mut last_record_ns = None;
    let mut last_seq = 0;
    for piece in &plan.pieces {
        let key = piece.key();
        let loaded = pieces.next().ok_or_else(|| RestoreError::Inconsistent {
            seq: last_seq,
            why: format!("{key} was never fetched"),
        })??;
        match (piece, loaded) {
            (Piece::Segment(_), Loaded::Segment(recs, stored)) => {
                each(&PieceStats {
                    stored: stored as u64,
                    written: data_written(&recs),
                });
                // Segments may overlap (a journal prefix shipped again after
                // a machine crash): each sequence number applies once.
                for r in recs.iter() {
                    if r.seq <= plan.base.start_seq.max(last_seq) || r.time > plan.at_ns {
                        continue;
                    }
                    last_seq = r.seq;
                    apply(r)?;
                    records += 1;
                    last_record_ns = Some(r.time);
                }
            }
            (Piece::Delta(d), Loaded::Delta(delta, stored)) => {
                each(&PieceStats {
                    stored: stored as u64,
                    written: data_written(&delta.records),
                });
                // A delta applies whole, to the state after its from_seq
                // exactly (the timeline chains them so).
                if d.from_seq != plan.base.start_seq.max(last_seq) || d.last_ns > plan.at_ns {
                    return Err(RestoreError::Inconsistent {
                        seq: d.from_seq,
                        why: format!(
                            "delta {key} does not follow record {} or ends after the restore time",
                            plan.base.start_seq.max(last_seq)
                        ),
                    });
                }
                for r in &delta.records {
                    apply(r)?;
                }
                records += delta.records.len() as u64;
                last_seq = d.to_seq;
                last_record_ns = Some(d.last_ns);
            }
            _ => unreachable!("load_piece returns the kind of the piece it was given"),
        }
    }
    Ok((records, last_record_ns))
}

/// Fetches the segments and deltas `plan` names (two ahead) and hands
/// `apply` every record after the plan's base up to its instant, in order,
/// each sequence number once, counting the pieces into `meter` (a
/// "records" phase). Returns how many records it handed on and the time of
/// the last. The mount view (`crate::view`) replays through it.
pub(crate) fn replay_records(
    store: &dyn Store,
    plan: &Plan,
    meter: &Meter,
    apply: &mut dyn FnMut(&Record) -> Result<()>,
) -> Result<(u64, Option<Nanos>)> {
    meter.begin("records", Unit::Objects, plan.pieces.len() as u64);
    let done = std::thread::scope(|scope| {
        let pieces = fetch_ahead(scope, store, plan, 2);
        apply_pieces(plan, pieces, apply, &mut |_| meter.add(1))
    })?;
    meter.end();
    Ok(done)
}

/// The identities at or under `paths` in the volume at `plan`, found by a
/// replay without data; a path that does not exist is an error naming it.
fn identities_under(store: &dyn Store, plan: &Plan, paths: &[String]) -> Result<HashSet<Ino>> {
    let at = memory_at(store, plan, &mut |_, _| {})?;
    let listing = at.target.listing(&at.ns);
    if let Some(p) = paths
        .iter()
        .find(|p| !p.is_empty() && !listing.contains_key(*p))
    {
        return Err(RestoreError::NoSuchPath {
            path: p.clone(),
            at: fmt_ns(plan.at_ns),
        });
    }
    Ok(listing
        .iter()
        .filter(|(q, _)| paths.iter().any(|p| within(q, p)))
        .map(|(_, e)| e.ino)
        .collect())
}

/// The volume at `plan` as an in-memory tree (no file contents), built
/// from the base's manifest and the plan's records. `seen` hears of every
/// record applied, with the stored bytes per byte of file data in the
/// piece it came from (the inverse of that piece's compression ratio).
pub(crate) fn memory_at(
    store: &dyn Store,
    plan: &Plan,
    seen: &mut dyn FnMut(&Record, f64),
) -> Result<Replay<Memory>> {
    let manifest = load_manifest(store, &plan.base)?;
    let mut tree = Replay::new(Memory::default(), Policy::Exact);
    tree.set_fuzzy_until(manifest.completed_ns);
    tree.set_root(manifest.root);
    for o in &manifest.objects {
        tree.base_object(o)?;
        if o.kind == Kind::File {
            tree.base_file_done(o)?;
        }
    }
    tree.base_links(&manifest.links)?;
    let ratio = std::cell::Cell::new(1.0);
    std::thread::scope(|scope| {
        let pieces = fetch_ahead(scope, store, plan, 2);
        apply_pieces(
            plan,
            pieces,
            &mut |r| {
                tree.apply(r).map_err(|e| RestoreError::at_record(r, e))?;
                seen(r, ratio.get());
                Ok(())
            },
            &mut |p| ratio.set(p.stored as f64 / p.written.max(1) as f64),
        )
    })?;
    Ok(tree)
}

/// Convenience for callers holding a timeline already.
pub fn plan(store: &dyn Store, at: crate::clock::At, lineage: Option<&str>) -> Result<Plan> {
    let t = Timeline::load(store)?;
    Ok(t.plan(at, lineage)?)
}
