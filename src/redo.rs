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
//! when their precondition holds on the source (the entry is absent, or
//! names the file the record names), so one that already happened is a
//! no-op. A file whose creation was lost is created again; its journal
//! identity then maps to its new inode number for the records that follow.
//!
//! It owns that identity map and the walk that seeds it. It must not touch
//! the store, the mount or the journal's files (it reads records only), and
//! every path it opens is resolved beneath the source without following
//! symlinks.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use crate::journal::{Journal, JournalError, JournalReader};
use crate::layout::HIDDEN;
use crate::record::{Ino, Kind, Op, Record, RENAME_EXCHANGE_FLAG};

#[derive(Debug, thiserror::Error)]
pub enum RedoError {
    #[error("redo onto the source failed: cannot {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("redo cannot read the journal: {0}")]
    Journal(#[from] JournalError),
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
    /// Namespace records whose precondition did not hold (already applied,
    /// or about entries that no longer exist).
    pub skipped: u64,
    /// Files and directories created again.
    pub recreated: u64,
}

/// One name of a source inode: its parent's inode and the entry name.
struct Place {
    parent: Ino,
    name: Vec<u8>,
}

struct Redo {
    root: OwnedFd,
    root_ino: Ino,
    /// Current source inode -> one of its names.
    places: HashMap<Ino, Place>,
    /// Journal identity -> current source inode, for files created again.
    remap: HashMap<Ino, Ino>,
    stats: RedoStats,
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
    let mut r = Redo {
        root,
        root_ino,
        places: HashMap::new(),
        remap: HashMap::new(),
        stats: RedoStats::default(),
    };
    r.walk(root_ino, PathBuf::new())?;
    let files = journal.files();
    let Some(first) = files.first().map(|f| f.first_seq) else {
        return Ok(r.stats);
    };
    let mut reader = JournalReader::new(first);
    while let Some((_, records)) = reader.read(&files, 8 << 20)? {
        if records.is_empty() {
            break;
        }
        for rec in &records {
            r.apply(rec)?;
        }
    }
    rfs::syncfs(&r.root).map_err(|e| io("sync the source after redo", e))?;
    Ok(r.stats)
}

impl Redo {
    /// Records one name of every inode under `dir` (the first one seen).
    fn walk(&mut self, dir_ino: Ino, rel: PathBuf) -> Result<()> {
        let fd = self.open_dir_path(&rel)?;
        let mut entries = Vec::new();
        for e in rfs::Dir::read_from(&fd).map_err(|e| io(format!("list {}", rel.display()), e))? {
            let e = e.map_err(|e| io(format!("list {}", rel.display()), e))?;
            let name = e.file_name().to_bytes().to_vec();
            if name == b"."
                || name == b".."
                || (dir_ino == self.root_ino && name == HIDDEN.as_bytes())
            {
                continue;
            }
            entries.push((name, e.ino(), e.file_type() == rfs::FileType::Directory));
        }
        for (name, ino, is_dir) in entries {
            if self.places.contains_key(&ino) {
                continue;
            }
            self.places.insert(
                ino,
                Place {
                    parent: dir_ino,
                    name: name.clone(),
                },
            );
            if is_dir {
                self.walk(ino, rel.join(OsStr::from_bytes(&name)))?;
            }
        }
        Ok(())
    }

    fn open_dir_path(&self, rel: &Path) -> Result<OwnedFd> {
        let p = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        rfs::openat2(
            &self.root,
            p,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
        )
        .map_err(|e| io(format!("open directory {}", p.display()), e))
    }

    fn cur(&self, ino: Ino) -> Ino {
        self.remap.get(&ino).copied().unwrap_or(ino)
    }

    /// The source path of a current inode, relative to the root.
    fn path(&self, ino: Ino) -> Option<PathBuf> {
        let mut parts = Vec::new();
        let mut at = ino;
        while at != self.root_ino {
            let p = self.places.get(&at)?;
            parts.push(p.name.clone());
            at = p.parent;
            if parts.len() > 4096 {
                return None;
            }
        }
        let mut out = PathBuf::new();
        for n in parts.iter().rev() {
            out.push(OsStr::from_bytes(n));
        }
        Some(out)
    }

    /// A directory handle for the journal identity `parent`, if it exists.
    fn dir(&self, parent: Ino) -> Option<OwnedFd> {
        let p = self.path(self.cur(parent))?;
        self.open_dir_path(&p).ok()
    }

    /// Opens the inode a journal identity names, if it can be found.
    fn open(&self, ino: Ino, flags: OFlags) -> Option<OwnedFd> {
        let p = self.path(self.cur(ino))?;
        let p = if p.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            p
        };
        rfs::openat2(
            &self.root,
            &p,
            flags | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
        )
        .ok()
    }

    fn entry(dir: &OwnedFd, name: &[u8]) -> Option<rfs::Stat> {
        rfs::statat(dir, OsStr::from_bytes(name), AtFlags::SYMLINK_NOFOLLOW).ok()
    }

    fn apply(&mut self, rec: &Record) -> Result<()> {
        self.stats.records += 1;
        match &rec.op {
            Op::Write {
                ino,
                offset,
                size,
                mtime,
                data,
            } => {
                if let Some(f) = self.open(*ino, OFlags::WRONLY) {
                    let what = || format!("redo a write of {} bytes to file {ino}", data.len());
                    let mut done = 0;
                    while done < data.len() {
                        done += rustix::io::pwrite(&f, &data[done..], offset + done as u64)
                            .map_err(|e| io(what(), e))?;
                    }
                    rfs::ftruncate(&f, *size).map_err(|e| io(what(), e))?;
                    set_mtime(&f, *mtime);
                }
            }
            Op::SetAttr {
                ino,
                mode,
                uid,
                gid,
                size,
                mtime,
            } => {
                let Some(f) = self.open(*ino, OFlags::PATH) else {
                    return Ok(());
                };
                let st = rfs::fstat(&f).map_err(|e| io(format!("stat {ino}"), e))?;
                let _ = rfs::chownat(
                    &f,
                    c"",
                    Some(rfs::Uid::from_raw(*uid)),
                    Some(rfs::Gid::from_raw(*gid)),
                    AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
                );
                if Kind::from_mode(st.st_mode) == Some(Kind::File) {
                    if let Some(w) = self.open(*ino, OFlags::WRONLY) {
                        let _ = rfs::fchmod(&w, Mode::from_bits_truncate(*mode));
                        rfs::ftruncate(&w, *size)
                            .map_err(|e| io(format!("redo the size of file {ino}"), e))?;
                        set_mtime(&w, *mtime);
                    }
                } else if Kind::from_mode(st.st_mode) == Some(Kind::Dir) {
                    if let Some(d) = self.open(*ino, OFlags::RDONLY | OFlags::DIRECTORY) {
                        let _ = rfs::fchmod(&d, Mode::from_bits_truncate(*mode));
                    }
                } else if Kind::from_mode(st.st_mode).is_some_and(Kind::is_special) {
                    // Fifos, sockets and device nodes are not opened (that
                    // would block, or touch a device): chmod goes through
                    // the O_PATH handle's magic link, which names the inode
                    // itself.
                    let p = CString::new(format!(
                        "/proc/self/fd/{}",
                        std::os::fd::AsRawFd::as_raw_fd(&f)
                    ))
                    .unwrap();
                    let _ = rfs::chmodat(
                        rfs::CWD,
                        p.as_c_str(),
                        Mode::from_bits_truncate(*mode),
                        AtFlags::empty(),
                    );
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
                if let Some(f) = self.open(*ino, OFlags::WRONLY) {
                    let _ = rfs::fallocate(
                        &f,
                        rfs::FallocateFlags::from_bits_retain(*mode),
                        *offset,
                        *len,
                    );
                    rfs::ftruncate(&f, *size)
                        .map_err(|e| io(format!("redo the size of file {ino}"), e))?;
                    set_mtime(&f, *mtime);
                }
            }
            Op::SetXattr { ino, name, value } => {
                if let Some(f) = self.open(*ino, OFlags::RDONLY) {
                    let _ = rfs::fsetxattr(
                        &f,
                        OsStr::from_bytes(name),
                        value,
                        rfs::XattrFlags::empty(),
                    );
                }
            }
            Op::RemoveXattr { ino, name } => {
                if let Some(f) = self.open(*ino, OFlags::RDONLY) {
                    let _ = rfs::fremovexattr(&f, OsStr::from_bytes(name));
                }
            }
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
                let Some(dir) = self.dir(*parent) else {
                    self.stats.skipped += 1;
                    return Ok(());
                };
                let want = self.cur(*ino);
                match Self::entry(&dir, name) {
                    Some(st) if st.st_ino == want => {}
                    Some(st) if Kind::from_mode(st.st_mode) == Some(Kind::Dir) => {
                        // A directory in the way is not ours to remove.
                        tracing::warn!(parent, name = %String::from_utf8_lossy(name), "redo: a directory occupies the name of a created file; left as is");
                        self.stats.skipped += 1;
                    }
                    other => {
                        if other.is_some() {
                            rfs::unlinkat(&dir, OsStr::from_bytes(name), AtFlags::empty())
                                .map_err(|e| io("remove an entry a redone create replaces", e))?;
                        }
                        let new = match make(&dir, name, *kind, *mode, *uid, *gid, *rdev, target) {
                            Ok(new) => new,
                            // The journal's device node was made by a
                            // process with CAP_MKNOD, which this one lacks:
                            // the new base records the source as it is.
                            Err(RedoError::Io { source, .. })
                                if matches!(kind, Kind::CharDev | Kind::BlockDev)
                                    && source.raw_os_error() == Some(libc::EPERM) =>
                            {
                                tracing::warn!(parent, name = %String::from_utf8_lossy(name), "redo: cannot make a device node without CAP_MKNOD; left out");
                                self.stats.skipped += 1;
                                return Ok(());
                            }
                            Err(e) => return Err(e),
                        };
                        if *kind == Kind::File {
                            if let Ok(f) = rfs::openat(
                                &dir,
                                OsStr::from_bytes(name),
                                OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                                Mode::empty(),
                            ) {
                                set_mtime(&f, *mtime);
                            }
                        }
                        self.remap.insert(*ino, new);
                        self.places.insert(
                            new,
                            Place {
                                parent: self.cur(*parent),
                                name: name.to_vec(),
                            },
                        );
                        self.stats.recreated += 1;
                    }
                }
            }
            Op::Link { ino, parent, name } => {
                let (Some(dir), Some(src)) = (self.dir(*parent), self.path(self.cur(*ino))) else {
                    self.stats.skipped += 1;
                    return Ok(());
                };
                if Self::entry(&dir, name).is_none() {
                    rfs::linkat(
                        &self.root,
                        &src,
                        &dir,
                        OsStr::from_bytes(name),
                        AtFlags::empty(),
                    )
                    .map_err(|e| io("redo a hard link", e))?;
                } else {
                    self.stats.skipped += 1;
                }
            }
            Op::Unlink { parent, name, ino } => {
                let Some(dir) = self.dir(*parent) else {
                    self.stats.skipped += 1;
                    return Ok(());
                };
                match Self::entry(&dir, name) {
                    Some(st) if st.st_ino == self.cur(*ino) => {
                        let is_dir = Kind::from_mode(st.st_mode) == Some(Kind::Dir);
                        match rfs::unlinkat(
                            &dir,
                            OsStr::from_bytes(name),
                            if is_dir {
                                AtFlags::REMOVEDIR
                            } else {
                                AtFlags::empty()
                            },
                        ) {
                            Ok(()) => {}
                            // Entries the journal does not know of (written
                            // back, never acknowledged) keep it.
                            Err(Errno::NOTEMPTY) => self.stats.skipped += 1,
                            Err(e) => return Err(io("redo an unlink", e)),
                        }
                    }
                    _ => self.stats.skipped += 1,
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
                let (Some(from), Some(to)) = (self.dir(*from_parent), self.dir(*to_parent)) else {
                    self.stats.skipped += 1;
                    return Ok(());
                };
                let here = Self::entry(&from, from_name).map(|s| s.st_ino);
                if here != Some(self.cur(*ino)) {
                    self.stats.skipped += 1;
                    return Ok(());
                }
                let exchange = flags & RENAME_EXCHANGE_FLAG != 0;
                let rflags = if exchange {
                    rfs::RenameFlags::EXCHANGE
                } else {
                    rfs::RenameFlags::empty()
                };
                match rfs::renameat_with(
                    &from,
                    OsStr::from_bytes(from_name),
                    &to,
                    OsStr::from_bytes(to_name),
                    rflags,
                ) {
                    Ok(()) => {
                        let (fp, tp) = (self.cur(*from_parent), self.cur(*to_parent));
                        self.places.insert(
                            self.cur(*ino),
                            Place {
                                parent: tp,
                                name: to_name.to_vec(),
                            },
                        );
                        if exchange && *replaced != 0 {
                            self.places.insert(
                                self.cur(*replaced),
                                Place {
                                    parent: fp,
                                    name: from_name.to_vec(),
                                },
                            );
                        }
                    }
                    // The source holds what the journal never saw (an
                    // exchange partner gone, a non-empty directory in the
                    // way): leave it, the new base records what is there.
                    Err(Errno::NOENT) | Err(Errno::NOTEMPTY) | Err(Errno::ISDIR)
                    | Err(Errno::NOTDIR) => self.stats.skipped += 1,
                    Err(e) => return Err(io("redo a rename", e)),
                }
            }
            Op::ClockStep { .. } => {}
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
        last_modification: rfs::Timespec {
            tv_sec: mtime.div_euclid(1_000_000_000),
            tv_nsec: mtime.rem_euclid(1_000_000_000) as _,
        },
    };
    let _ = rfs::futimens(f, &ts);
}

/// Creates an entry as a Create record describes it and returns its inode.
#[allow(clippy::too_many_arguments)]
fn make(
    dir: &OwnedFd,
    name: &[u8],
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    rdev: u64,
    target: &[u8],
) -> Result<Ino> {
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
    Ok(rfs::statat(dir, n, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| io(what(), e))?
        .st_ino)
}
