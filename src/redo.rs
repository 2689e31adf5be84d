//! Redo: after a machine crash, re-applies the journal's records to the
//! source, so that everything `fsync` acknowledged is in the source before
//! the new lineage's base is taken. This is what lets an application's
//! fsync wait for the journal alone: the source file is synced lazily
//! (`syncfs` before journal space is released, see `ship.rs`), and the
//! journal always holds every record the source may have lost.
//!
//! After a power loss the source is some mix of states: whatever the page
//! cache had written back. Every record is an absolute effect (bytes at an
//! offset, a resulting size, mode, owner and mtime), so data records are
//! re-applied as they are and converge on the journal's final state.
//! Namespace records (create, link, unlink, rename) are re-applied only
//! when their premise holds on the source (the entry is absent, or names
//! the file the record names), so one that already happened is a no-op.
//! Those decisions are the replay core's (`replay.rs`, `Policy::Converge`);
//! a file whose creation was lost is created again under its journal
//! identity, which the model maps to its path for the records that follow.
//!
//! It owns the walk that seeds the model with the source's names and the
//! effects on the source (`Source`). It must not decide how a record
//! changes a tree, touch the store, the mount or the journal's files (it
//! reads records only), and every path it opens is resolved beneath the
//! source without following symlinks.

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use crate::clock::Nanos;
use crate::journal::{Journal, JournalError, JournalReader};
use crate::layout::HIDDEN;
use crate::record::{Ino, Kind};
use crate::replay::{Attrs, Effects, Namespace, Outcome, Policy, Replay, ReplayError};

#[derive(Debug, thiserror::Error)]
pub enum RedoError {
    #[error("redo onto the source failed: cannot {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("redo cannot read the journal: {0}")]
    Journal(#[from] JournalError),
    #[error("redo refuses a journal record: {0}")]
    Replay(#[from] ReplayError),
}

fn io(what: impl Into<String>, e: impl Into<std::io::Error>) -> RedoError {
    RedoError::Io {
        what: what.into(),
        source: e.into(),
    }
}

type Result<T> = std::result::Result<T, RedoError>;

/// What a redo did, for the log.
#[derive(Debug, Default, Clone, Copy)]
pub struct RedoStats {
    pub records: u64,
    /// Records whose premise did not hold (already applied, or about
    /// entries that no longer exist).
    pub skipped: u64,
    /// Files and directories created again.
    pub recreated: u64,
}

/// An object a redone create makes once it has its name.
struct Pending {
    kind: Kind,
    attrs: Attrs,
    rdev: u64,
    target: Vec<u8>,
}

/// The source directory as a replay target. The model names objects by
/// journal identity and knows every name on the source (seeded by a walk),
/// so each effect reaches its object by a path beneath the source.
struct Source {
    root: OwnedFd,
    pending: HashMap<Ino, Pending>,
    /// Device nodes this process may not make: left out of the source.
    unmade: HashSet<Ino>,
}

/// Re-applies every record in `journal` to the directory `source`, then
/// syncs the source's filesystem.
pub fn redo(source: &Path, journal: &Journal) -> Result<RedoStats> {
    let root = rfs::open(
        source,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io(format!("open {}", source.display()), e))?;
    let root_ino = rfs::fstat(&root)
        .map_err(|e| io("stat the source", e))?
        .st_ino;
    let mut replay = Replay::new(
        Source {
            root,
            pending: HashMap::new(),
            unmade: HashSet::new(),
        },
        Policy::Converge,
    );
    replay.set_root(root_ino);
    walk(&mut replay, root_ino, PathBuf::new())?;
    let mut stats = RedoStats::default();
    let files = journal.files();
    if let Some(first) = files.first().map(|f| f.first_seq) {
        let mut reader = JournalReader::new(first);
        while let Some((_, records)) = reader.read(&files, 8 << 20)? {
            if records.is_empty() {
                break;
            }
            for rec in &records {
                stats.records += 1;
                match replay.apply(rec)? {
                    Outcome::Applied => {}
                    Outcome::Skipped => stats.skipped += 1,
                    Outcome::Created => stats.recreated += 1,
                }
            }
        }
    }
    rfs::syncfs(&replay.target.root).map_err(|e| io("sync the source after redo", e))?;
    Ok(stats)
}

/// Seeds the model with every name under `dir`.
fn walk(replay: &mut Replay<Source>, dir_ino: Ino, rel: PathBuf) -> Result<()> {
    let fd = open_dir_path(&replay.target.root, &rel)?;
    let mut entries = Vec::new();
    for e in rfs::Dir::read_from(&fd).map_err(|e| io(format!("list {}", rel.display()), e))? {
        let e = e.map_err(|e| io(format!("list {}", rel.display()), e))?;
        let name = e.file_name().to_bytes().to_vec();
        if name == b"."
            || name == b".."
            || (rel.as_os_str().is_empty() && name == HIDDEN.as_bytes())
        {
            continue;
        }
        entries.push(name);
    }
    for name in entries {
        let st =
            rfs::statat(&fd, OsStr::from_bytes(&name), AtFlags::SYMLINK_NOFOLLOW).map_err(|e| {
                io(
                    format!("stat {}", rel.join(OsStr::from_bytes(&name)).display()),
                    e,
                )
            })?;
        let Some(kind) = Kind::from_mode(st.st_mode) else {
            continue;
        };
        let known = replay.ns.node(st.st_ino).is_some();
        replay.seed(
            dir_ino,
            Bytes::from(name.clone()),
            st.st_ino,
            kind,
            st.st_size as u64,
        );
        if kind == Kind::Dir && !known {
            walk(replay, st.st_ino, rel.join(OsStr::from_bytes(&name)))?;
        }
    }
    Ok(())
}

fn open_dir_path(root: &OwnedFd, rel: &Path) -> Result<OwnedFd> {
    let p = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    rfs::openat2(
        root,
        p,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
    )
    .map_err(|e| io(format!("open directory {}", p.display()), e))
}

/// The source path of an identity, relative to the root ("." for it).
fn rel_path(ns: &Namespace, ino: Ino) -> Option<PathBuf> {
    let parts = ns.path(ino)?;
    let mut out = PathBuf::from(".");
    for n in &parts {
        out.push(OsStr::from_bytes(n));
    }
    Some(out)
}

impl Source {
    /// A directory handle for identity `dir`, if it is in the tree.
    fn dir(&self, ns: &Namespace, dir: Ino) -> Option<OwnedFd> {
        open_dir_path(&self.root, &rel_path(ns, dir)?).ok()
    }

    /// Opens the object an identity names, if it can be found.
    fn open(&self, ns: &Namespace, ino: Ino, flags: OFlags) -> Option<OwnedFd> {
        if self.unmade.contains(&ino) {
            return None;
        }
        rfs::openat2(
            &self.root,
            rel_path(ns, ino)?,
            flags | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
        )
        .ok()
    }
}

/// What redo tolerates from a namespace call: the source holds what the
/// journal never saw (an exchange partner gone, a non-empty directory in
/// the way); it is left, and the new base records what is there.
fn tolerated(r: std::result::Result<(), Errno>, what: &str) -> Result<()> {
    match r {
        Ok(()) => Ok(()),
        Err(Errno::NOENT | Errno::NOTEMPTY | Errno::ISDIR | Errno::NOTDIR | Errno::EXIST) => {
            tracing::warn!("redo: could not {what}; the source keeps what it holds");
            Ok(())
        }
        Err(e) => Err(io(format!("redo {what}"), e)),
    }
}

impl Effects for Source {
    type Error = RedoError;

    fn make(
        &mut self,
        _: &Namespace,
        ino: Ino,
        kind: Kind,
        attrs: Attrs,
        rdev: u64,
        target: &[u8],
    ) -> Result<()> {
        // Nothing is made on the source without a name: `link` makes it.
        self.pending.insert(
            ino,
            Pending {
                kind,
                attrs,
                rdev,
                target: target.to_vec(),
            },
        );
        Ok(())
    }

    fn link(&mut self, ns: &Namespace, parent: Ino, name: &[u8], ino: Ino) -> Result<()> {
        let Some(dir) = self.dir(ns, parent) else {
            return Ok(());
        };
        if let Some(p) = self.pending.remove(&ino) {
            return match make(&dir, name, p.kind, p.attrs, p.rdev, &p.target) {
                Ok(()) => Ok(()),
                // The journal's device node was made by a process with
                // CAP_MKNOD, which this one lacks: the new base records
                // the source as it is.
                Err(RedoError::Io { source, .. })
                    if matches!(p.kind, Kind::CharDev | Kind::BlockDev)
                        && source.raw_os_error() == Some(libc::EPERM) =>
                {
                    tracing::warn!(parent, name = %String::from_utf8_lossy(name), "redo: cannot make a device node without CAP_MKNOD; left out");
                    self.unmade.insert(ino);
                    Ok(())
                }
                Err(e) => Err(e),
            };
        }
        if self.unmade.contains(&ino) {
            return Ok(());
        }
        let Some(src) = rel_path(ns, ino) else {
            return Ok(());
        };
        tolerated(
            rfs::linkat(
                &self.root,
                &src,
                &dir,
                OsStr::from_bytes(name),
                AtFlags::empty(),
            ),
            "make a hard link",
        )
    }

    fn unlink(&mut self, ns: &Namespace, parent: Ino, name: &[u8], ino: Ino) -> Result<()> {
        let Some(dir) = self.dir(ns, parent) else {
            return Ok(());
        };
        if self.unmade.contains(&ino) {
            return Ok(());
        }
        let flags = if ns.node(ino).map(|n| n.kind) == Some(Kind::Dir) {
            AtFlags::REMOVEDIR
        } else {
            AtFlags::empty()
        };
        tolerated(
            rfs::unlinkat(&dir, OsStr::from_bytes(name), flags),
            "remove an entry",
        )
    }

    fn rename(
        &mut self,
        ns: &Namespace,
        (fp, from): (Ino, &[u8]),
        (tp, to): (Ino, &[u8]),
        _: Ino,
        _: Option<Ino>,
    ) -> Result<()> {
        let (Some(f), Some(t)) = (self.dir(ns, fp), self.dir(ns, tp)) else {
            return Ok(());
        };
        // One rename(2), which replaces what stood at the target atomically,
        // so a crash during redo leaves either name as it was.
        tolerated(
            rfs::renameat(&f, OsStr::from_bytes(from), &t, OsStr::from_bytes(to)),
            "rename",
        )
    }

    fn exchange(
        &mut self,
        ns: &Namespace,
        (ap, a): (Ino, &[u8]),
        (bp, b): (Ino, &[u8]),
    ) -> Result<()> {
        let (Some(f), Some(t)) = (self.dir(ns, ap), self.dir(ns, bp)) else {
            return Ok(());
        };
        tolerated(
            rfs::renameat_with(
                &f,
                OsStr::from_bytes(a),
                &t,
                OsStr::from_bytes(b),
                rfs::RenameFlags::EXCHANGE,
            ),
            "exchange",
        )
    }

    fn renumber(&mut self, _: &Namespace, old: Ino, new: Ino) -> Result<()> {
        // The source reaches objects by path, so only what this target
        // keeps by identity moves.
        if self.unmade.remove(&old) {
            self.unmade.insert(new);
        }
        Ok(())
    }

    fn discard(&mut self, _: &Namespace, ino: Ino) -> Result<()> {
        // Under `Converge` a create gives the object that held its identity
        // another one rather than ending it; an identity that ends here has
        // no names, and its inode is the filesystem's business.
        self.pending.remove(&ino);
        self.unmade.remove(&ino);
        Ok(())
    }

    fn write(&mut self, ns: &Namespace, ino: Ino, offset: u64, data: &[u8]) -> Result<()> {
        let Some(f) = self.open(ns, ino, OFlags::WRONLY) else {
            return Ok(());
        };
        let what = || format!("redo a write of {} bytes to file {ino}", data.len());
        let mut done = 0;
        while done < data.len() {
            done += rustix::io::pwrite(&f, &data[done..], offset + done as u64)
                .map_err(|e| io(what(), e))?;
        }
        Ok(())
    }

    fn set_size(&mut self, ns: &Namespace, ino: Ino, size: u64) -> Result<()> {
        if let Some(f) = self.open(ns, ino, OFlags::WRONLY) {
            rfs::ftruncate(&f, size).map_err(|e| io(format!("redo the size of file {ino}"), e))?;
        }
        Ok(())
    }

    fn fallocate(
        &mut self,
        ns: &Namespace,
        ino: Ino,
        mode: u32,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        if let Some(f) = self.open(ns, ino, OFlags::WRONLY) {
            let _ = rfs::fallocate(&f, rfs::FallocateFlags::from_bits_retain(mode), offset, len);
        }
        Ok(())
    }

    fn set_attrs(&mut self, ns: &Namespace, ino: Ino, attrs: Attrs) -> Result<()> {
        let Some(f) = self.open(ns, ino, OFlags::PATH) else {
            return Ok(());
        };
        let mode = Mode::from_bits_truncate(attrs.mode);
        let _ = rfs::chownat(
            &f,
            c"",
            Some(rfs::Uid::from_raw(attrs.uid)),
            Some(rfs::Gid::from_raw(attrs.gid)),
            AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
        );
        match ns.node(ino).map(|n| n.kind) {
            Some(Kind::File) => {
                if let Some(w) = self.open(ns, ino, OFlags::WRONLY) {
                    let _ = rfs::fchmod(&w, mode);
                }
            }
            Some(Kind::Dir) => {
                if let Some(d) = self.open(ns, ino, OFlags::RDONLY | OFlags::DIRECTORY) {
                    let _ = rfs::fchmod(&d, mode);
                }
            }
            Some(k) if k.is_special() => {
                // Fifos, sockets and device nodes are not opened (that
                // would block, or touch a device): chmod goes through the
                // O_PATH handle's magic link, which names the inode itself.
                let p = CString::new(format!(
                    "/proc/self/fd/{}",
                    std::os::fd::AsRawFd::as_raw_fd(&f)
                ))
                .unwrap();
                let _ = rfs::chmodat(rfs::CWD, p.as_c_str(), mode, AtFlags::empty());
            }
            _ => {}
        }
        Ok(())
    }

    fn set_mtime(&mut self, ns: &Namespace, ino: Ino, mtime: Nanos) -> Result<()> {
        if let Some(f) = self.open(ns, ino, OFlags::WRONLY) {
            set_mtime(&f, mtime);
        }
        Ok(())
    }

    fn set_xattr(&mut self, ns: &Namespace, ino: Ino, name: &[u8], value: &[u8]) -> Result<()> {
        if ns
            .node(ino)
            .is_some_and(|n| matches!(n.kind, Kind::File | Kind::Dir))
        {
            if let Some(f) = self.open(ns, ino, OFlags::RDONLY) {
                let _ =
                    rfs::fsetxattr(&f, OsStr::from_bytes(name), value, rfs::XattrFlags::empty());
            }
        }
        Ok(())
    }

    fn remove_xattr(&mut self, ns: &Namespace, ino: Ino, name: &[u8]) -> Result<()> {
        if ns
            .node(ino)
            .is_some_and(|n| matches!(n.kind, Kind::File | Kind::Dir))
        {
            if let Some(f) = self.open(ns, ino, OFlags::RDONLY) {
                let _ = rfs::fremovexattr(&f, OsStr::from_bytes(name));
            }
        }
        Ok(())
    }
}

fn set_mtime(f: &impl AsFd, mtime: i64) {
    let ts = rfs::Timestamps {
        last_access: rfs::Timespec {
            tv_sec: 0,
            tv_nsec: rfs::UTIME_OMIT,
        },
        last_modification: crate::clock::timespec(mtime),
    };
    let _ = rfs::futimens(f, &ts);
}

/// Creates an entry as a Create record describes it.
fn make(
    dir: &OwnedFd,
    name: &[u8],
    kind: Kind,
    attrs: Attrs,
    rdev: u64,
    target: &[u8],
) -> Result<()> {
    let Attrs { mode, uid, gid } = attrs;
    let n = OsStr::from_bytes(name);
    let m = Mode::from_bits_truncate(mode & 0o7777);
    let what = || format!("recreate {:?}", String::from_utf8_lossy(name));
    match kind {
        Kind::File => drop(
            rfs::openat(
                dir,
                n,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                m,
            )
            .map_err(|e| io(what(), e))?,
        ),
        Kind::Dir => rfs::mkdirat(dir, n, m).map_err(|e| io(what(), e))?,
        Kind::Symlink => {
            let t = CString::new(target).map_err(|_| {
                io(
                    what(),
                    std::io::Error::from(std::io::ErrorKind::InvalidData),
                )
            })?;
            rfs::symlinkat(t.as_c_str(), dir, n).map_err(|e| io(what(), e))?
        }
        Kind::Fifo | Kind::Socket | Kind::CharDev | Kind::BlockDev => {
            let ft = match kind {
                Kind::Fifo => rfs::FileType::Fifo,
                Kind::Socket => rfs::FileType::Socket,
                Kind::CharDev => rfs::FileType::CharacterDevice,
                _ => rfs::FileType::BlockDevice,
            };
            let dev = if matches!(kind, Kind::CharDev | Kind::BlockDev) {
                rdev
            } else {
                0
            };
            rfs::mknodat(dir, n, ft, m, dev).map_err(|e| io(what(), e))?
        }
    }
    let _ = rfs::chownat(
        dir,
        n,
        Some(rfs::Uid::from_raw(uid)),
        Some(rfs::Gid::from_raw(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    );
    if kind != Kind::Symlink {
        // chown clears set-id bits; the record's mode is the final one.
        let _ = rfs::chmodat(dir, n, m, AtFlags::empty());
    }
    Ok(())
}
