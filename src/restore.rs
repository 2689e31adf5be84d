//! Restore: rebuilds a volume at a time from the store alone. It owns the
//! replay engine that applies a base and then records onto a target
//! directory, and the rules that keep a restore honest: every object is
//! verified before use; names are checked and every operation is made
//! relative to directory handles this module opened itself with
//! O_NOFOLLOW, so nothing is ever written outside the target; a marker
//! (`.rewind/restore-incomplete`) stays until the restore has finished, so
//! a partial result never looks complete. It must not read the journal or
//! any local state of `rewind run`.
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

use bytes::Bytes;
use rustix::fs::{self as rfs, AtFlags, Mode, OFlags};

use crate::base::{chunk_key, decode_chunk, load_manifest, safe_name, BaseError, Manifest};
use crate::clock::{fmt_ns, Nanos};
use crate::delta::{self, DeltaError};
use crate::layout::{HIDDEN, INCOMPLETE_MARKER};
use crate::record::{Ino, Kind, Op, Record, RENAME_EXCHANGE_FLAG};
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

#[derive(Debug)]
struct Node {
    kind: Kind,
    /// Directories: where it is; None while in staging.
    place: Option<(Ino, CString)>,
    /// Non-directories: the names that link to it.
    links: HashSet<(Ino, CString)>,
    mtime: Option<Nanos>,
    size: u64,
}

/// The target tree being built, with its model of entries.
pub struct Tree {
    root: Ino,
    root_fd: OwnedFd,
    objs: OwnedFd,
    dirs: OwnedFd,
    nodes: HashMap<Ino, Node>,
    entries: HashMap<(Ino, CString), Ino>,
    dir_fds: HashMap<Ino, OwnedFd>,
    files: HashMap<Ino, OwnedFd>,
    staging: PathBuf,
    dead: u64,
    /// Records timed before this ran while the base was walked: one may
    /// name a file that died before the walk could see it (written, then
    /// replaced or unlinked and closed). Such records only remove entries.
    fuzzy_until: Nanos,
    /// Device nodes that could not be made, with their device number: a
    /// placeholder file stands in for each until `finish` removes it.
    unmade: HashMap<Ino, u64>,
}

/// Open descriptors the restore keeps for files and directories.
const FILE_CACHE: usize = 256;
const DIR_CACHE: usize = 1024;

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

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
        Ok(Tree {
            root: 0,
            root_fd,
            objs,
            dirs,
            nodes: HashMap::new(),
            entries: HashMap::new(),
            dir_fds: HashMap::new(),
            files: HashMap::new(),
            staging,
            dead: 0,
            fuzzy_until: i64::MIN,
            unmade: HashMap::new(),
        })
    }

    fn dir_fd(&mut self, ino: Ino) -> Result<&OwnedFd> {
        if ino == self.root {
            return Ok(&self.root_fd);
        }
        if !self.dir_fds.contains_key(&ino) {
            let node = self
                .nodes
                .get(&ino)
                .ok_or_else(|| RestoreError::Inconsistent {
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
                    let pfd = self.dir_fd(parent)?;
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

    /// Creates a fresh object; an existing object with the same identity is
    /// an earlier, dead inode (or a fuzzy-base copy) and is discarded.
    fn create_object(
        &mut self,
        ino: Ino,
        kind: Kind,
        mode: u32,
        uid: u32,
        gid: u32,
        rdev: u64,
        target: &[u8],
    ) -> Result<()> {
        if self.nodes.contains_key(&ino) {
            self.discard(ino)?;
        }
        let name = ino_name(ino);
        let m = Mode::from_bits_truncate(0o600);
        match kind {
            Kind::File => {
                let fd = rfs::openat(
                    &self.objs,
                    &name,
                    OFlags::RDWR
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    m,
                )
                .map_err(|e| io(format!("create file {ino}"), e))?;
                if self.files.len() >= FILE_CACHE {
                    self.files.clear();
                }
                self.files.insert(ino, fd);
            }
            Kind::Dir => rfs::mkdirat(&self.dirs, &name, Mode::from_bits_truncate(0o700))
                .map_err(|e| io(format!("mkdir {ino}"), e))?,
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
        self.nodes.insert(
            ino,
            Node {
                kind,
                place: None,
                links: HashSet::new(),
                mtime: None,
                size: 0,
            },
        );
        self.set_attr(ino, mode, uid, gid)?;
        Ok(())
    }

    fn discard(&mut self, ino: Ino) -> Result<()> {
        let Some(node) = self.nodes.remove(&ino) else {
            return Ok(());
        };
        self.unmade.remove(&ino);
        self.files.remove(&ino);
        self.dir_fds.remove(&ino);
        match node.kind {
            Kind::Dir => {
                // Its entries leave the tree with it: child directories go to
                // staging (unplaced), links of files are forgotten.
                let children: Vec<(CString, Ino)> = self
                    .entries
                    .iter()
                    .filter(|((p, _), _)| *p == ino)
                    .map(|((_, n), c)| (n.clone(), *c))
                    .collect();
                if !children.is_empty() {
                    let fd = match &node.place {
                        Some((p, n)) => {
                            let pfd = rustix::io::fcntl_dupfd_cloexec(self.dir_fd(*p)?, 0)
                                .map_err(|e| io("dup", e))?;
                            rfs::openat(&pfd, n, DIR_FLAGS, Mode::empty())
                        }
                        None => rfs::openat(&self.dirs, &ino_name(ino), DIR_FLAGS, Mode::empty()),
                    }
                    .map_err(|e| io("open discarded directory", e))?;
                    for (n, c) in children {
                        self.entries.remove(&(ino, n.clone()));
                        if let Some(child) = self.nodes.get_mut(&c) {
                            if child.kind == Kind::Dir {
                                child.place = None;
                                rfs::renameat(&fd, &n, &self.dirs, &ino_name(c))
                                    .map_err(|e| io("unplace directory", e))?;
                            } else {
                                child.links.remove(&(ino, n));
                            }
                        }
                    }
                }
                let dead = CString::new(format!("dead-{}", self.dead)).unwrap();
                self.dead += 1;
                match &node.place {
                    Some((p, n)) => {
                        self.entries.remove(&(*p, n.clone()));
                        let pfd = rustix::io::fcntl_dupfd_cloexec(self.dir_fd(*p)?, 0)
                            .map_err(|e| io("dup", e))?;
                        rfs::renameat(&pfd, n, &self.dirs, &dead)
                            .map_err(|e| io("discard directory", e))?;
                    }
                    None => rfs::renameat(&self.dirs, &ino_name(ino), &self.dirs, &dead)
                        .map_err(|e| io("discard directory", e))?,
                }
            }
            _ => {
                for (p, n) in &node.links {
                    self.entries.remove(&(*p, n.clone()));
                    let pfd = self.dir_fd(*p)?;
                    rfs::unlinkat(pfd, n, AtFlags::empty())
                        .map_err(|e| io(format!("discard link {:?} of {ino} in {p}", n), e))?;
                }
                rfs::unlinkat(&self.objs, &ino_name(ino), AtFlags::empty())
                    .map_err(|e| io("discard object", e))?;
            }
        }
        Ok(())
    }

    /// Removes the entry (parent, name), whatever it names.
    fn remove_entry(&mut self, parent: Ino, name: &CString) -> Result<()> {
        let Some(ino) = self.entries.remove(&(parent, name.clone())) else {
            return Ok(());
        };
        let kind = self.nodes.get(&ino).map(|n| n.kind);
        let pfd =
            rustix::io::fcntl_dupfd_cloexec(self.dir_fd(parent)?, 0).map_err(|e| io("dup", e))?;
        if kind == Some(Kind::Dir) {
            // Move it aside rather than delete: a fuzzy base may still hold
            // children that later records move out of it.
            rfs::renameat(&pfd, name, &self.dirs, &ino_name(ino))
                .map_err(|e| io("move directory aside", e))?;
            self.nodes.get_mut(&ino).unwrap().place = None;
        } else {
            rfs::unlinkat(&pfd, name, AtFlags::empty()).map_err(|e| io("unlink", e))?;
            if let Some(n) = self.nodes.get_mut(&ino) {
                n.links.remove(&(parent, name.clone()));
            }
        }
        Ok(())
    }

    /// Makes (parent, name) name `ino`, replacing what was there.
    fn ensure_entry(&mut self, parent: Ino, name: &CString, ino: Ino, seq: u64) -> Result<()> {
        if self.entries.get(&(parent, name.clone())) == Some(&ino) {
            return Ok(());
        }
        let kind =
            self.nodes
                .get(&ino)
                .map(|n| n.kind)
                .ok_or_else(|| RestoreError::Inconsistent {
                    seq,
                    why: format!(
                        "names file {ino}, which neither the base nor an earlier record created"
                    ),
                })?;
        self.remove_entry(parent, name)?;
        let pfd =
            rustix::io::fcntl_dupfd_cloexec(self.dir_fd(parent)?, 0).map_err(|e| io("dup", e))?;
        if kind == Kind::Dir {
            let place = self.nodes[&ino].place.clone();
            match place {
                Some((p, n)) => {
                    let from = rustix::io::fcntl_dupfd_cloexec(self.dir_fd(p)?, 0)
                        .map_err(|e| io("dup", e))?;
                    rfs::renameat(&from, &n, &pfd, name).map_err(|e| io("move directory", e))?;
                    self.entries.remove(&(p, n));
                }
                None => rfs::renameat(&self.dirs, &ino_name(ino), &pfd, name)
                    .map_err(|e| io("place directory", e))?,
            }
            self.nodes.get_mut(&ino).unwrap().place = Some((parent, name.clone()));
        } else {
            rfs::linkat(&self.objs, &ino_name(ino), &pfd, name, AtFlags::empty())
                .map_err(|e| io("link", e))?;
            self.nodes
                .get_mut(&ino)
                .unwrap()
                .links
                .insert((parent, name.clone()));
        }
        self.entries.insert((parent, name.clone()), ino);
        Ok(())
    }

    fn set_attr(&mut self, ino: Ino, mode: u32, uid: u32, gid: u32) -> Result<()> {
        let kind = self.nodes[&ino].kind;
        let mode = Mode::from_bits_truncate(mode & 0o7777);
        match kind {
            Kind::Dir => {
                let fd = rustix::io::fcntl_dupfd_cloexec(self.dir_fd(ino)?, 0)
                    .map_err(|e| io("dup", e))?;
                rfs::fchown(
                    &fd,
                    Some(rfs::Uid::from_raw(uid)),
                    Some(rfs::Gid::from_raw(gid)),
                )
                .map_err(|e| io("chown", e))?;
                rfs::fchmod(&fd, mode).map_err(|e| io("chmod", e))?;
            }
            Kind::Symlink => {
                rfs::chownat(
                    &self.objs,
                    &ino_name(ino),
                    Some(rfs::Uid::from_raw(uid)),
                    Some(rfs::Gid::from_raw(gid)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(|e| io("lchown", e))?;
            }
            _ => {
                // chown first: it may clear set-id bits that chmod then sets.
                rfs::chownat(
                    &self.objs,
                    &ino_name(ino),
                    Some(rfs::Uid::from_raw(uid)),
                    Some(rfs::Gid::from_raw(gid)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(|e| io("chown", e))?;
                rfs::chmodat(&self.objs, &ino_name(ino), mode, AtFlags::empty())
                    .map_err(|e| io("chmod", e))?;
            }
        }
        Ok(())
    }

    fn xattr_target(&mut self, ino: Ino) -> Result<Option<CString>> {
        // Xattrs go through /proc/self/fd paths of our own handles, so they
        // can never resolve outside the target.
        let kind = self.nodes.get(&ino).map(|n| n.kind);
        let fd = match kind {
            Some(Kind::Dir) => self.dir_fd(ino)?.as_raw_fd(),
            Some(Kind::File) => self.file_fd(ino)?.as_raw_fd(),
            _ => return Ok(None),
        };
        Ok(Some(CString::new(format!("/proc/self/fd/{fd}")).unwrap()))
    }

    fn set_xattr(&mut self, ino: Ino, name: &[u8], value: &[u8]) -> Result<()> {
        let Some(p) = self.xattr_target(ino)? else {
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

    fn write_at(&mut self, ino: Ino, offset: u64, data: &[u8]) -> Result<()> {
        let fd = self.file_fd(ino)?;
        let mut done = 0;
        while done < data.len() {
            done += rustix::io::pwrite(fd, &data[done..], offset + done as u64)
                .map_err(|e| io("write", e))?;
        }
        Ok(())
    }

    fn set_size(&mut self, ino: Ino, size: u64) -> Result<()> {
        if self.nodes[&ino].size != size || size == 0 {
            let fd = self.file_fd(ino)?;
            rfs::ftruncate(fd, size).map_err(|e| io("truncate", e))?;
            self.nodes.get_mut(&ino).unwrap().size = size;
        }
        Ok(())
    }

    fn node(&self, ino: Ino, seq: u64) -> Result<&Node> {
        self.nodes
            .get(&ino)
            .ok_or_else(|| RestoreError::Inconsistent {
                seq,
                why: format!("names file {ino}, which the base and earlier records never created"),
            })
    }

    /// Materialises a base manifest. `fetch` returns a verified chunk.
    pub fn apply_base(
        &mut self,
        m: &Manifest,
        fetch: &mut dyn FnMut(&[u8; 32]) -> Result<Vec<u8>>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<()> {
        self.root = m.root;
        self.nodes.insert(
            m.root,
            Node {
                kind: Kind::Dir,
                place: None,
                links: HashSet::new(),
                mtime: None,
                size: 0,
            },
        );
        let total = m.objects.len();
        for (i, o) in m.objects.iter().enumerate() {
            if o.ino == m.root {
                self.set_attr(o.ino, o.mode, o.uid, o.gid)?;
            } else {
                self.create_object(o.ino, o.kind, o.mode, o.uid, o.gid, o.rdev, &o.target)?;
            }
            for (k, v) in &o.xattrs {
                self.set_xattr(o.ino, k, v)?;
            }
            if o.kind == Kind::File {
                for e in &o.extents {
                    let data = fetch(&e.hash)?;
                    if data.len() != e.len as usize {
                        return Err(RestoreError::Chunk {
                            key: chunk_key(&e.hash),
                            why: "length differs from the manifest".into(),
                        });
                    }
                    self.write_at(o.ino, e.offset, &data)?;
                }
                self.set_size(o.ino, o.size)?;
                self.nodes.get_mut(&o.ino).unwrap().mtime = Some(o.mtime);
            }
            if i % 1000 == 999 {
                progress(i + 1, total);
            }
        }
        progress(total, total);
        // Place directories top-down so every parent exists first.
        let mut pending: Vec<&crate::base::Link> = m.links.iter().collect();
        loop {
            let before = pending.len();
            let mut rest = Vec::new();
            for l in pending {
                let name = cname(&l.name, "base manifest")?;
                if l.parent == self.root && l.name.as_ref() == HIDDEN.as_bytes() {
                    return Err(RestoreError::HostileName {
                        name: HIDDEN.into(),
                        what: "base manifest (reserved name)".into(),
                    });
                }
                let parent_placed = l.parent == self.root
                    || self.nodes.get(&l.parent).is_some_and(|n| n.place.is_some());
                if parent_placed {
                    self.ensure_entry(l.parent, &name, l.ino, 0)?;
                } else {
                    rest.push(l);
                }
            }
            if rest.is_empty() || rest.len() == before {
                // Links under directories that are not (yet) placed stay
                // pending; later records place their parents.
                for l in rest {
                    let name = cname(&l.name, "base manifest")?;
                    self.ensure_entry(l.parent, &name, l.ino, 0)?;
                }
                break;
            }
            pending = rest;
        }
        Ok(())
    }

    /// Declares the time until which records raced the base walk.
    pub fn set_fuzzy_until(&mut self, ns: Nanos) {
        self.fuzzy_until = ns;
    }

    /// The file a record names, if the record raced the base walk and names
    /// a file the walk never saw because it no longer existed at the end.
    fn died_during_walk(&self, rec: &Record) -> Option<Ino> {
        if rec.time > self.fuzzy_until {
            return None;
        }
        let ino = match &rec.op {
            Op::Write { ino, .. }
            | Op::SetAttr { ino, .. }
            | Op::Fallocate { ino, .. }
            | Op::SetXattr { ino, .. }
            | Op::RemoveXattr { ino, .. } => *ino,
            Op::Link { ino, .. } | Op::Rename { ino, .. } | Op::Unlink { ino, .. } => *ino,
            Op::Create { .. } | Op::ClockStep { .. } => return None,
        };
        // A data record for an identity the base holds as something other
        // than a file: the number was reused during the walk (the later
        // Create record replaces it).
        let wants_file = matches!(rec.op, Op::Write { .. } | Op::Fallocate { .. });
        match self.nodes.get(&ino) {
            None => Some(ino),
            Some(n) if wants_file && n.kind != Kind::File => Some(ino),
            Some(_) => None,
        }
    }

    /// Applies one record.
    pub fn apply(&mut self, rec: &Record) -> Result<()> {
        let seq = rec.seq;
        if self.died_during_walk(rec).is_some() {
            // Only the record's effect on other entries matters: a rename
            // of the dead file still replaced whatever stood at its target.
            if let Op::Rename {
                from_parent,
                from_name,
                to_parent,
                to_name,
                replaced,
                flags,
                ..
            } = &rec.op
            {
                let from = cname(from_name, "segment")?;
                let to = cname(to_name, "segment")?;
                if flags & RENAME_EXCHANGE_FLAG != 0 && self.nodes.contains_key(replaced) {
                    self.remove_entry(*to_parent, &to)?;
                    self.ensure_entry(*from_parent, &from, *replaced, seq)?;
                } else {
                    self.remove_entry(*to_parent, &to)?;
                }
            }
            return Ok(());
        }
        let reserved = |parent: Ino, name: &Bytes, root: Ino| {
            parent == root && name.as_ref() == HIDDEN.as_bytes()
        };
        match &rec.op {
            Op::Create {
                parent,
                name,
                ino,
                kind,
                mode,
                uid,
                gid,
                mtime,
                rdev,
                target,
            } => {
                let n = cname(name, "segment")?;
                if reserved(*parent, name, self.root) {
                    return Err(RestoreError::HostileName {
                        name: HIDDEN.into(),
                        what: "segment (reserved name)".into(),
                    });
                }
                self.node(*parent, seq)?;
                self.create_object(*ino, *kind, *mode, *uid, *gid, *rdev, target)?;
                if *kind == Kind::File {
                    self.nodes.get_mut(ino).unwrap().mtime = Some(*mtime);
                }
                self.ensure_entry(*parent, &n, *ino, seq)?;
            }
            Op::Link { ino, parent, name } => {
                let n = cname(name, "segment")?;
                if reserved(*parent, name, self.root) {
                    return Err(RestoreError::HostileName {
                        name: HIDDEN.into(),
                        what: "segment (reserved name)".into(),
                    });
                }
                self.ensure_entry(*parent, &n, *ino, seq)?;
            }
            Op::Unlink { parent, name, ino } => {
                let n = cname(name, "segment")?;
                if self.entries.get(&(*parent, n.clone())) == Some(ino) {
                    self.remove_entry(*parent, &n)?;
                }
            }
            Op::Rename {
                from_parent,
                from_name,
                to_parent,
                to_name,
                ino,
                replaced,
                flags,
            } => {
                let from = cname(from_name, "segment")?;
                let to = cname(to_name, "segment")?;
                if reserved(*to_parent, to_name, self.root)
                    || reserved(*from_parent, from_name, self.root)
                {
                    return Err(RestoreError::HostileName {
                        name: HIDDEN.into(),
                        what: "segment (reserved name)".into(),
                    });
                }
                if ino == replaced && flags & RENAME_EXCHANGE_FLAG == 0 {
                    // rename(2) between two links of one file does nothing.
                    return Ok(());
                }
                if flags & RENAME_EXCHANGE_FLAG != 0 {
                    let a = self.entries.get(&(*from_parent, from.clone())).copied();
                    let b = self.entries.get(&(*to_parent, to.clone())).copied();
                    if a == Some(*ino) && b == Some(*replaced) {
                        let f = rustix::io::fcntl_dupfd_cloexec(self.dir_fd(*from_parent)?, 0)
                            .map_err(|e| io("dup", e))?;
                        let t = rustix::io::fcntl_dupfd_cloexec(self.dir_fd(*to_parent)?, 0)
                            .map_err(|e| io("dup", e))?;
                        rfs::renameat_with(&f, &from, &t, &to, rfs::RenameFlags::EXCHANGE)
                            .map_err(|e| io("exchange", e))?;
                        self.entries.insert((*from_parent, from.clone()), *replaced);
                        self.entries.insert((*to_parent, to.clone()), *ino);
                        self.relink(*ino, (*from_parent, from.clone()), (*to_parent, to.clone()));
                        self.relink(
                            *replaced,
                            (*to_parent, to.clone()),
                            (*from_parent, from.clone()),
                        );
                    } else {
                        self.remove_entry(*from_parent, &from)?;
                        self.ensure_entry(*to_parent, &to, *ino, seq)?;
                        self.ensure_entry(*from_parent, &from, *replaced, seq)?;
                    }
                } else if self.entries.get(&(*from_parent, from.clone())) == Some(ino) {
                    if self.entries.contains_key(&(*to_parent, to.clone())) {
                        self.remove_entry(*to_parent, &to)?;
                    }
                    let f = rustix::io::fcntl_dupfd_cloexec(self.dir_fd(*from_parent)?, 0)
                        .map_err(|e| io("dup", e))?;
                    let t = rustix::io::fcntl_dupfd_cloexec(self.dir_fd(*to_parent)?, 0)
                        .map_err(|e| io("dup", e))?;
                    rfs::renameat(&f, &from, &t, &to).map_err(|e| io("rename", e))?;
                    self.entries.remove(&(*from_parent, from.clone()));
                    self.entries.insert((*to_parent, to.clone()), *ino);
                    self.relink(*ino, (*from_parent, from), (*to_parent, to));
                } else {
                    self.ensure_entry(*to_parent, &to, *ino, seq)?;
                }
            }
            Op::Write {
                ino,
                offset,
                size,
                mtime,
                data,
            } => {
                self.node(*ino, seq)?;
                self.write_at(*ino, *offset, data)?;
                let n = self.nodes.get_mut(ino).unwrap();
                n.size = n.size.max(offset + data.len() as u64);
                self.set_size(*ino, *size)?;
                self.nodes.get_mut(ino).unwrap().mtime = Some(*mtime);
            }
            Op::SetAttr {
                ino,
                mode,
                uid,
                gid,
                size,
                mtime,
            } => {
                let kind = self.node(*ino, seq)?.kind;
                self.set_attr(*ino, *mode, *uid, *gid)?;
                if kind == Kind::File {
                    self.set_size(*ino, *size)?;
                    self.nodes.get_mut(ino).unwrap().mtime = Some(*mtime);
                }
            }
            Op::Fallocate {
                ino,
                mode,
                offset,
                len,
                size,
                mtime,
            } => {
                self.node(*ino, seq)?;
                let fd = self.file_fd(*ino)?;
                let flags = rfs::FallocateFlags::from_bits_retain(*mode);
                rfs::fallocate(fd, flags, *offset, *len).map_err(|e| io("fallocate", e))?;
                let n = self.nodes.get_mut(ino).unwrap();
                if !flags.contains(rfs::FallocateFlags::KEEP_SIZE) {
                    n.size = n.size.max(offset + len);
                }
                self.set_size(*ino, *size)?;
                self.nodes.get_mut(ino).unwrap().mtime = Some(*mtime);
            }
            Op::SetXattr { ino, name, value } => {
                self.node(*ino, seq)?;
                self.set_xattr(*ino, name, value)?;
            }
            Op::RemoveXattr { ino, name } => {
                self.node(*ino, seq)?;
                if let Some(p) = self.xattr_target(*ino)? {
                    if let Ok(n) = CString::new(name.as_ref()) {
                        let _ = rfs::removexattr(p.as_c_str(), n.as_c_str());
                    }
                }
            }
            Op::ClockStep { .. } => {}
        }
        Ok(())
    }

    fn relink(&mut self, ino: Ino, from: (Ino, CString), to: (Ino, CString)) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            if n.kind == Kind::Dir {
                n.place = Some(to);
            } else {
                n.links.remove(&from);
                n.links.insert(to);
            }
        }
    }

    /// The path of entry `name` in directory `parent`, relative to the
    /// target, if that directory is placed in the tree.
    fn entry_path(&self, parent: Ino, name: &CString) -> Option<String> {
        let mut parts = vec![String::from_utf8_lossy(name.as_bytes()).into_owned()];
        let mut at = parent;
        while at != self.root {
            let (p, n) = self.nodes.get(&at)?.place.clone()?;
            parts.push(String::from_utf8_lossy(n.as_bytes()).into_owned());
            at = p;
            if parts.len() > 4096 {
                return None;
            }
        }
        parts.reverse();
        Some(parts.join("/"))
    }

    /// Removes the placeholders of device nodes that could not be made and
    /// returns one line per name they had in the tree.
    fn drop_unmade(&mut self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut unmade: Vec<(Ino, u64)> = self.unmade.drain().collect();
        unmade.sort();
        for (ino, rdev) in unmade {
            let Some(node) = self.nodes.get(&ino) else {
                continue;
            };
            let what = if node.kind == Kind::BlockDev {
                "block"
            } else {
                "character"
            };
            let mut links: Vec<(Ino, CString)> = node.links.iter().cloned().collect();
            links.sort();
            for (p, n) in links {
                if let Some(path) = self.entry_path(p, &n) {
                    out.push(format!(
                        "{path}: {what} device {}:{} not restored (making device nodes needs CAP_MKNOD)",
                        rustix::fs::major(rdev),
                        rustix::fs::minor(rdev)
                    ));
                }
                self.remove_entry(p, &n)?;
            }
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
            .nodes
            .iter()
            .filter_map(|(i, n)| n.mtime.map(|m| (*i, m)))
            .collect();
        self.files.clear();
        for (ino, m) in mtimes {
            let ts = rfs::Timestamps {
                last_access: rfs::Timespec {
                    tv_sec: m.div_euclid(1_000_000_000),
                    tv_nsec: m.rem_euclid(1_000_000_000) as _,
                },
                last_modification: rfs::Timespec {
                    tv_sec: m.div_euclid(1_000_000_000),
                    tv_nsec: m.rem_euclid(1_000_000_000) as _,
                },
            };
            rfs::utimensat(&self.objs, &ino_name(ino), &ts, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| io("set mtime", e))?;
        }
        rfs::syncfs(&self.root_fd).map_err(|e| io("sync target", e))?;
        std::fs::remove_dir_all(&self.staging).map_err(|e| io("remove staging", e))?;
        let hidden = self.staging.parent().unwrap().to_path_buf();
        std::fs::remove_file(hidden.join(INCOMPLETE_MARKER)).map_err(|e| io("remove marker", e))?;
        let _ = std::fs::remove_dir(&hidden);
        rfs::syncfs(&self.root_fd).map_err(|e| io("sync target", e))?;
        Ok(skipped)
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

/// Restores the volume in `store` at `plan` into `target`.
pub fn restore(
    store: &dyn Store,
    plan: &Plan,
    target: &Path,
    force: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<Restored> {
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
    let mut tree = Tree::prepare(target, force)?;
    tree.set_fuzzy_until(manifest.completed_ns);
    let naming = store.chunk_naming()?;
    let mut fetch = |hash: &[u8; 32]| -> Result<Vec<u8>> {
        let key = chunk_key(hash);
        let data = store.get(&key)?;
        decode_chunk(&data, hash, &naming).map_err(|e| RestoreError::Chunk {
            key,
            why: e.to_string(),
        })
    };
    let mut last_pct = 0;
    tree.apply_base(&manifest, &mut fetch, &mut |done, total| {
        let pct = if total == 0 { 100 } else { done * 100 / total };
        if pct >= last_pct + 10 || done == total {
            last_pct = pct;
            progress(&format!("base: {done}/{total} objects ({pct}%)"));
        }
    })?;
    let mut records = 0u64;
    let mut last_record_ns = None;
    let mut last_seq = 0;
    let n = plan.pieces.len();
    let apply = |tree: &mut Tree, r: &Record| -> Result<()> {
        tree.apply(r).map_err(|e| RestoreError::AtRecord {
            seq: r.seq,
            op: r.op.kind_name(),
            source: Box::new(e),
        })
    };
    for (i, piece) in plan.pieces.iter().enumerate() {
        let key = piece.key();
        let data = store.get(&key)?;
        match piece {
            Piece::Segment(s) => {
                let (meta, recs) =
                    segment::decode(&data).map_err(|source| RestoreError::Segment {
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
                // Segments may overlap (a journal prefix shipped again after
                // a machine crash): each sequence number applies once.
                for r in recs.iter() {
                    if r.seq <= plan.base.start_seq.max(last_seq) || r.time > plan.at_ns {
                        continue;
                    }
                    last_seq = r.seq;
                    apply(&mut tree, r)?;
                    records += 1;
                    last_record_ns = Some(r.time);
                }
            }
            Piece::Delta(d) => {
                let delta = delta::decode(&data).map_err(|source| RestoreError::Delta {
                    key: key.clone(),
                    source,
                })?;
                if delta.meta != *d {
                    return Err(RestoreError::Delta {
                        key,
                        source: DeltaError::Inconsistent(
                            "header does not match the object key".into(),
                        ),
                    });
                }
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
                    apply(&mut tree, r)?;
                }
                records += delta.records.len() as u64;
                last_seq = d.to_seq;
                last_record_ns = Some(d.last_ns);
            }
        }
        if n >= 10 && (i + 1) % (n / 10) == 0 {
            progress(&format!("replay: {}/{} objects", i + 1, n));
        }
    }
    let files = tree.nodes.len();
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

/// Convenience for callers holding a timeline already.
pub fn plan(store: &dyn Store, at: crate::clock::At, lineage: Option<&str>) -> Result<Plan> {
    let t = Timeline::load(store)?;
    Ok(t.plan(at, lineage)?)
}
