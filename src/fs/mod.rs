//! The passthrough filesystem core: every operation the mount serves,
//! applied to the source directory and journaled before it returns. It
//! owns the inode table (source inode number -> O_PATH handle), open file
//! handles, the locking that makes sequence order equal application order
//! (one namespace lock for operations that change names, one lock per inode
//! for data and attributes, each held across apply + journal append), the
//! ownership rules for new files, and the hidden journal directory at the
//! root. It speaks plain types and `Errno`; it must not import fuser (that
//! is `fuse.rs`) and must not reply before the record is appended.
//!
//! Apply, then record: an operation is applied to the source first, so the
//! record carries its resolved effect (the offset an O_APPEND write landed
//! at, the resulting size, mode, owner and mtime read back with fstat), and
//! only operations that succeeded are journaled. A crash between the two
//! leaves the source ahead of the journal by at most the requests in
//! flight, none of them acknowledged; the next start takes a repair base
//! (see `run::decide`), which the timeline marks as a gap until it completes.
//!
//! New entries get the mode the source filesystem gives them for the
//! caller's mode and umask, as if the caller had made them natively (see
//! `with_umask`): the adapter asks the kernel for the unmasked mode
//! (FUSE_DONT_MASK), so a parent's default POSIX ACL decides instead of the
//! umask where it would natively.

pub mod fuse;
mod killpriv;
mod touched;

pub(crate) use touched::{changed_object, Touched};

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, Stat};
use rustix::io::Errno;

use crate::clock::mtime_of;
use crate::journal::Journal;
use crate::layout::HIDDEN;
use crate::record::{Ino, Kind, Op, RENAME_EXCHANGE_FLAG};

pub use killpriv::Requester;

pub type FsResult<T> = Result<T, Errno>;

struct Inode {
    /// An O_PATH handle while fewer than `Passthrough::keep_cap` inodes
    /// hold one; past that, the inode is reopened from its file handle for
    /// each operation, so the daemon never runs out of descriptors however
    /// many inodes the kernel keeps.
    kept: Option<OwnedFd>,
    handle: Option<Box<RawHandle>>,
    kind: Kind,
    nlookup: AtomicU64,
    /// Held across apply + append for data and attribute changes.
    data: Mutex<()>,
    /// Open handles by io mode, for kernel read passthrough.
    io: Mutex<IoMode>,
    io_changed: parking_lot::Condvar,
}

/// How an inode is open. The kernel puts a FUSE inode in one io mode at a
/// time: cached (served by the daemon) or passthrough (served from the
/// backing file). An open in the other mode fails with EIO while the first
/// mode's handles exist, and passthrough writes would skip the journal, so
/// only read-only opens go passthrough, and only while no writable handle
/// exists; a writable open while passthrough readers exist is refused.
#[derive(Default)]
struct IoMode {
    writers: u32,
    passthrough: u32,
}

/// How the kernel should serve a handle: what `open` decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Reads and writes come to the daemon through the mount's page cache.
    Cached,
    /// A writable handle that bypasses the mount's page cache: every read
    /// and write comes to the daemon as the application issued it. This is
    /// the default for writable opens because a cached write costs a second
    /// round trip: the kernel asks for `security.capability` before every
    /// buffered write on FUSE (it never caches that the attribute is
    /// absent). Reads are then served from the source's page cache, so data
    /// is cached once instead of twice.
    Direct,
    /// A read-only handle whose reads the kernel serves from the source
    /// file (`Passthrough::backing_fd` gives the descriptor to register).
    Passthrough,
}

/// A `struct file_handle` with room for the largest handle.
#[repr(C)]
struct RawHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; 128],
}

fn handle_of(fd: &OwnedFd) -> FsResult<Box<RawHandle>> {
    let mut h = Box::new(RawHandle {
        handle_bytes: 128,
        handle_type: 0,
        f_handle: [0; 128],
    });
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `h` is a properly aligned file_handle whose handle_bytes says
    // how much room f_handle has; the path is an empty C string used with
    // AT_EMPTY_PATH on a descriptor we own.
    let r = unsafe {
        libc::name_to_handle_at(
            fd.as_raw_fd(),
            c"".as_ptr(),
            (&mut *h as *mut RawHandle).cast::<libc::file_handle>(),
            &mut mount_id,
            libc::AT_EMPTY_PATH,
        )
    };
    if r != 0 {
        return Err(Errno::from_raw_os_error(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        ));
    }
    Ok(h)
}

/// A descriptor for an inode: its kept one, or one reopened for this use.
pub(crate) enum InodeFd<'a> {
    Kept(&'a OwnedFd),
    Opened(OwnedFd),
}

impl std::ops::Deref for InodeFd<'_> {
    type Target = OwnedFd;
    fn deref(&self) -> &OwnedFd {
        match self {
            InodeFd::Kept(f) => f,
            InodeFd::Opened(f) => f,
        }
    }
}

/// An open file or directory.
pub struct Handle {
    ino: Ino,
    fd: OwnedFd,
    append: bool,
    writable: bool,
    mode: OpenMode,
    dir: Mutex<DirState>,
}

#[derive(Default)]
struct DirState {
    buf: Vec<u8>,
}

pub struct Passthrough {
    root_fd: OwnedFd,
    root_ino: Ino,
    inodes: RwLock<HashMap<Ino, Arc<Inode>>>,
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    namespace: Mutex<()>,
    gate: RwLock<()>,
    /// Set by `stop_mutations` under the gate: the daemon is finishing, and
    /// nothing more may be acknowledged.
    stopped: AtomicBool,
    journal: Arc<Journal>,
    watch: Arc<dyn MoveWatch>,
    /// Objects changed since the last base started (see `touched.rs`).
    touched: Touched,
    kept: AtomicU64,
    keep_cap: u64,
    read_passthrough: bool,
    cached_writes: bool,
}

fn proc_path(fd: &impl AsRawFd) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap()
}

thread_local! {
    /// Whether this thread has its own umask: None until the first create
    /// on the thread tried to unshare it (`with_umask`).
    static OWN_UMASK: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Runs `create` (one mkdirat, mknodat or openat(O_CREAT) on the source)
/// with the calling thread's umask set to the FUSE caller's `umask`, and
/// puts the thread's umask back after.
///
/// Why the source filesystem applies the umask, and not the daemon: where
/// the parent directory has a default POSIX ACL, Linux ignores the umask
/// and derives the mode from the ACL instead; anywhere else it masks. Only
/// the source filesystem knows which holds, so the daemon passes the
/// caller's unmasked mode (FUSE_DONT_MASK) and lets the syscall run under
/// the caller's umask. The daemon's own umask (022 as started) used to be
/// applied on top, so umask 002 and mode 0664 gave 0644.
///
/// Why per thread: the umask is per process unless a thread unshares its
/// filesystem attributes (CLONE_FS, which no privilege guards), and the
/// daemon's other threads keep creating the journal, state.json and store
/// files with the process umask. Each FUSE worker unshares once, on its
/// first create; the daemon never changes its working directory or root,
/// the other attributes CLONE_FS carries. Should unshare fail (a seccomp
/// policy), the umask is applied here by masking the mode, without default
/// ACL semantics, under the process umask: the behaviour before this fix,
/// with one warning in the log.
fn with_umask<T>(mode: u32, umask: u32, create: impl FnOnce(Mode) -> T) -> T {
    let own = OWN_UMASK.with(|c| match c.get() {
        Some(own) => own,
        None => {
            // SAFETY: unshare(CLONE_FS) only gives this thread a private
            // copy of its umask, working directory and root; it touches no
            // memory.
            let own = unsafe { libc::unshare(libc::CLONE_FS) } == 0;
            if !own {
                tracing::warn!(
                    "cannot give a FUSE worker its own umask (unshare(CLONE_FS): {}): new files get the daemon's umask on top of the caller's",
                    std::io::Error::last_os_error()
                );
            }
            c.set(Some(own));
            own
        }
    });
    if !own {
        return create(Mode::from_bits_truncate(mode & 0o7777 & !umask));
    }
    let saved = rustix::process::umask(Mode::from_bits_truncate(umask & 0o777));
    let r = create(Mode::from_bits_truncate(mode & 0o7777));
    rustix::process::umask(saved);
    r
}

/// What a new file or directory should be owned by: the caller, with the
/// parent's group under a setgid directory (as the kernel does).
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// Told about entries that a rename or link moves, so that a snapshot walk
/// running at the same time can capture what it may have passed already.
/// The core knows nothing of bases: whoever walks implements this.
pub trait MoveWatch: Send + Sync {
    /// Whether a walk wants moved entries now (checked before a handle is
    /// opened for it, so an idle volume pays nothing).
    fn is_active(&self) -> bool;
    /// Called under the namespace lock with an O_PATH handle of the entry
    /// just moved or linked.
    fn moved(&self, fd: OwnedFd);
}

impl Passthrough {
    pub fn new(
        root_fd: OwnedFd,
        journal: Arc<Journal>,
        watch: Arc<dyn MoveWatch>,
    ) -> std::io::Result<Passthrough> {
        let st = rfs::fstat(&root_fd)?;
        let path_fd = rfs::openat(
            &root_fd,
            c".",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let mut inodes = HashMap::new();
        inodes.insert(
            st.st_ino,
            Arc::new(Inode {
                kept: Some(path_fd),
                handle: None,
                kind: Kind::Dir,
                nlookup: AtomicU64::new(1 << 40),
                data: Mutex::new(()),
                io: Mutex::new(IoMode::default()),
                io_changed: parking_lot::Condvar::new(),
            }),
        );
        // Half the descriptor limit for kept inode handles; the rest serves
        // open files, the journal and the store.
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(1024);
        let keep_cap = (limit / 2).max(64);
        Ok(Passthrough {
            root_fd,
            root_ino: st.st_ino,
            inodes: RwLock::new(inodes),
            handles: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            namespace: Mutex::new(()),
            gate: RwLock::new(()),
            stopped: AtomicBool::new(false),
            journal,
            watch,
            touched: Touched::default(),
            kept: AtomicU64::new(1),
            keep_cap,
            read_passthrough: false,
            cached_writes: false,
        })
    }

    /// Lets read-only opens use kernel passthrough (see `IoMode`); the
    /// adapter must have negotiated it with the kernel.
    pub fn set_read_passthrough(&mut self, on: bool) {
        self.read_passthrough = on;
    }

    pub fn read_passthrough(&self) -> bool {
        self.read_passthrough
    }

    /// Serves writable opens through the mount's page cache (`OpenMode::Cached`)
    /// instead of `OpenMode::Direct`.
    pub fn set_cached_writes(&mut self, on: bool) {
        self.cached_writes = on;
    }

    pub fn cached_writes(&self) -> bool {
        self.cached_writes
    }

    fn writable_mode(&self) -> OpenMode {
        if self.cached_writes {
            OpenMode::Cached
        } else {
            OpenMode::Direct
        }
    }

    pub fn root_ino(&self) -> Ino {
        self.root_ino
    }

    fn inode(&self, ino: Ino) -> FsResult<Arc<Inode>> {
        self.inodes.read().get(&ino).cloned().ok_or(Errno::STALE)
    }

    fn fd<'a>(&self, inode: &'a Inode) -> FsResult<InodeFd<'a>> {
        if let Some(f) = &inode.kept {
            return Ok(InodeFd::Kept(f));
        }
        let h = inode.handle.as_ref().ok_or(Errno::STALE)?;
        let mut copy = RawHandle {
            handle_bytes: h.handle_bytes,
            handle_type: h.handle_type,
            f_handle: h.f_handle,
        };
        // SAFETY: `copy` is a valid file_handle filled by name_to_handle_at;
        // the result is a new descriptor we take ownership of.
        let fd = unsafe {
            libc::open_by_handle_at(
                self.root_fd.as_raw_fd(),
                (&mut copy as *mut RawHandle).cast::<libc::file_handle>(),
                libc::O_PATH | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            )
        };
        if fd < 0 {
            return Err(Errno::from_raw_os_error(
                std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::ESTALE),
            ));
        }
        // SAFETY: open_by_handle_at returned a fresh descriptor.
        Ok(InodeFd::Opened(unsafe {
            <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
        }))
    }

    fn handle(&self, fh: u64) -> FsResult<Arc<Handle>> {
        self.handles.read().get(&fh).cloned().ok_or(Errno::BADF)
    }

    fn is_hidden(&self, parent: Ino, name: &OsStr) -> bool {
        parent == self.root_ino && name.as_bytes() == HIDDEN.as_bytes()
    }

    /// Appends the records of an applied operation. A journal that cannot
    /// take records fails for good (`Journal::has_failed`), and the mount
    /// then fails every later change loudly (EIO) rather than acknowledge
    /// what is not journaled.
    fn record(&self, ops: &[Op]) -> FsResult<()> {
        // Applied, not yet appended: the order periodic bases rely on.
        self.touched.mark_ops(ops);
        self.journaled(|| self.journal.append(ops))
    }

    fn journaled<T>(
        &self,
        append: impl FnOnce() -> Result<T, crate::journal::JournalError>,
    ) -> FsResult<()> {
        // The journal logged why when it failed.
        append().map(drop).map_err(|_| Errno::IO)
    }

    /// Starts a mutating operation: refuses it once the journal failed (an
    /// append or a flush), so nothing reaches the source after, and holds
    /// the gate that `barrier` uses to wait for operations in flight
    /// (applied to the source but not yet journaled).
    fn begin(&self) -> FsResult<parking_lot::RwLockReadGuard<'_, ()>> {
        if self.journal.has_failed() {
            return Err(Errno::IO);
        }
        let g = self.gate.read();
        if self.stopped.load(Ordering::Acquire) {
            return Err(Errno::IO);
        }
        Ok(g)
    }

    /// Refuses every mutating operation from now on (EIO), after those in
    /// flight have been journaled. A stopping daemon calls it before its
    /// last upload round, so that no write is acknowledged that the round
    /// would not store: files kept open past the shutdown deadline get an
    /// error instead of a write that only the next start would ship.
    pub fn stop_mutations(&self) {
        let _g = self.gate.write();
        self.stopped.store(true, Ordering::Release);
    }

    /// Waits until every mutating operation in flight has been journaled,
    /// then runs `f` while new ones wait. A base uses it to stamp its
    /// completion time after everything the walk may have seen.
    pub fn barrier<T>(&self, f: impl FnOnce() -> T) -> T {
        let _g = self.gate.write();
        f()
    }

    /// Finds or adds the inode for `name` in `parent` and counts a lookup.
    fn remember(&self, parent_fd: &OwnedFd, name: &OsStr) -> FsResult<Stat> {
        let pfd = parent_fd;
        let fd = rfs::openat(
            pfd,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let st = rfs::fstat(&fd)?;
        let kind = Kind::from_mode(st.st_mode).ok_or(Errno::NOTSUP)?;
        let mut map = self.inodes.write();
        match map.get(&st.st_ino) {
            Some(i) => {
                i.nlookup.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                let (kept, handle) = if self.kept.load(Ordering::Relaxed) < self.keep_cap {
                    self.kept.fetch_add(1, Ordering::Relaxed);
                    (Some(fd), None)
                } else {
                    (None, Some(handle_of(&fd)?))
                };
                map.insert(
                    st.st_ino,
                    Arc::new(Inode {
                        kept,
                        handle,
                        kind,
                        nlookup: AtomicU64::new(1),
                        data: Mutex::new(()),
                        io: Mutex::new(IoMode::default()),
                        io_changed: parking_lot::Condvar::new(),
                    }),
                );
            }
        }
        Ok(st)
    }

    pub fn lookup(&self, parent: Ino, name: &OsStr) -> FsResult<Stat> {
        if self.is_hidden(parent, name) {
            return Err(Errno::NOENT);
        }
        let p = self.inode(parent)?;
        let pfd = self.fd(&p)?;
        self.remember(&pfd, name)
    }

    pub fn forget(&self, ino: Ino, n: u64) {
        let mut map = self.inodes.write();
        if let Some(i) = map.get(&ino) {
            if i.nlookup
                .fetch_sub(n.min(i.nlookup.load(Ordering::Relaxed)), Ordering::Relaxed)
                <= n
                && ino != self.root_ino
            {
                if let Some(i) = map.remove(&ino) {
                    if i.kept.is_some() {
                        self.kept.fetch_sub(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    pub fn getattr(&self, ino: Ino) -> FsResult<Stat> {
        let i = self.inode(ino)?;
        Ok(rfs::fstat(&*self.fd(&i)?)?)
    }

    fn attr_record(&self, ino: Ino, st: &Stat) -> Op {
        Op::SetAttr {
            ino,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            size: st.st_size as u64,
            mtime: mtime_of(st),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn setattr(
        &self,
        ino: Ino,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<Option<(i64, i64)>>,
        mtime: Option<Option<(i64, i64)>>,
        fh: Option<u64>,
        who: Requester,
    ) -> FsResult<Stat> {
        let _op = self.begin()?;
        let inode = self.inode(ino)?;
        let _g = inode.data.lock();
        let ifd = self.fd(&inode)?;
        // Every setattr but a change of times alone can be one the kernel
        // made to remove privileges (a truncate, a chown, chown(-1, -1)
        // arriving with nothing to set, or the mode it computed for a
        // set-user-ID file); a chmod by a caller outside the group carries
        // no S_ISGID (the kernel strips it), so treating it alike is exact.
        // Directories keep their set-id bits through all of these natively,
        // and symlinks have none; every other kind of node can lose S_ISGID
        // (a chown of a fifo or a device node clears it as a file's).
        let times_only = mode.is_none()
            && uid.is_none()
            && gid.is_none()
            && size.is_none()
            && (atime.is_some() || mtime.is_some());
        let kill_check = !times_only && !matches!(inode.kind, Kind::Dir | Kind::Symlink);
        // The group before a chown is the one the kernel tests membership of.
        let before = if kill_check {
            Some(rfs::fstat(&*ifd)?)
        } else {
            None
        };
        let res = (|| -> FsResult<()> {
            if uid.is_some() || gid.is_some() {
                rfs::chownat(
                    &*ifd,
                    c"",
                    uid.map(rfs::Uid::from_raw),
                    gid.map(rfs::Gid::from_raw),
                    AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
                )?;
            }
            if let Some(m) = mode {
                if inode.kind == Kind::Symlink {
                    return Err(Errno::OPNOTSUPP);
                }
                rfs::chmodat(
                    rfs::CWD,
                    proc_path(&*ifd).as_c_str(),
                    Mode::from_bits_truncate(m & 0o7777),
                    AtFlags::empty(),
                )?;
            }
            if let Some(sz) = size {
                match fh.and_then(|f| self.handle(f).ok()).filter(|h| h.writable) {
                    Some(h) => rfs::ftruncate(&h.fd, sz)?,
                    None => {
                        let f = rfs::open(
                            proc_path(&*ifd).as_c_str(),
                            OFlags::WRONLY | OFlags::CLOEXEC,
                            Mode::empty(),
                        )?;
                        rfs::ftruncate(&f, sz)?
                    }
                }
            }
            if atime.is_some() || mtime.is_some() {
                let conv = |t: Option<Option<(i64, i64)>>| match t {
                    None => rfs::Timespec {
                        tv_sec: 0,
                        tv_nsec: rfs::UTIME_OMIT,
                    },
                    Some(None) => rfs::Timespec {
                        tv_sec: 0,
                        tv_nsec: rfs::UTIME_NOW,
                    },
                    Some(Some((s, n))) => rfs::Timespec {
                        tv_sec: s,
                        tv_nsec: n as _,
                    },
                };
                let ts = rfs::Timestamps {
                    last_access: conv(atime),
                    last_modification: conv(mtime),
                };
                // Through /proc/self/fd the kernel follows the magic link to
                // the inode the O_PATH handle holds and stops there: for a
                // symlink that is the link itself, never its target, which
                // is what utimensat(AT_SYMLINK_NOFOLLOW) and `touch -h` ask
                // (the kernel sends both as this setattr). The record below
                // is replayed without following the link either: restore
                // and redo lchown a symlink and apply a SetAttr's mtime to
                // regular files only (symlink times are not restored).
                rfs::utimensat(rfs::CWD, proc_path(&*ifd).as_c_str(), &ts, AtFlags::empty())?;
            }
            if let Some(before) = &before {
                self.drop_sgid_after_setattr(&ifd, before, who)?;
            }
            Ok(())
        })();
        // Record the absolute state even after a partial failure: whatever
        // did change on the source must be in the timeline.
        let st = rfs::fstat(&*ifd)?;
        self.record(&[self.attr_record(ino, &st)])?;
        res.map(|_| st)
    }

    /// The kernel's FUSE client clears S_ISGID itself (by sending a mode)
    /// when a truncate or chown of a group-executable file removes
    /// privileges; the daemon's own chown, made as root, clears no more.
    /// What is left is the case that depends on the caller's groups: a file
    /// without group execute, changed by a caller outside its group
    /// (`before.st_gid`, the group before a chown) without CAP_FSETID,
    /// which loses the bit natively (`killpriv`).
    fn drop_sgid_after_setattr(
        &self,
        ifd: &OwnedFd,
        before: &Stat,
        who: Requester,
    ) -> FsResult<()> {
        let st = rfs::fstat(ifd)?;
        if st.st_mode & (libc::S_ISGID | libc::S_IXGRP) != libc::S_ISGID
            || !who.kills_sgid(st.st_mode, before.st_gid, None)
        {
            return Ok(());
        }
        rfs::chmodat(
            rfs::CWD,
            proc_path(ifd).as_c_str(),
            Mode::from_bits_truncate(st.st_mode & 0o7777 & !libc::S_ISGID),
            AtFlags::empty(),
        )?;
        Ok(())
    }

    pub fn readlink(&self, ino: Ino) -> FsResult<Vec<u8>> {
        let i = self.inode(ino)?;
        Ok(rfs::readlinkat(&*self.fd(&i)?, c"", Vec::new())?.into_bytes())
    }

    fn new_owner(&self, parent: &Inode, caller: Caller) -> FsResult<(u32, u32)> {
        let pst = rfs::fstat(&*self.fd(parent)?)?;
        let gid = if pst.st_mode & libc::S_ISGID != 0 {
            pst.st_gid
        } else {
            caller.gid
        };
        Ok((caller.uid, gid))
    }

    /// Gives a just-created entry its owner, keeping the mode the source
    /// filesystem gave it, then returns its stat and the Create record.
    fn finish_create(
        &self,
        parent: Ino,
        pinode: &Inode,
        name: &OsStr,
        caller: Caller,
        target: &[u8],
    ) -> FsResult<(Stat, Op)> {
        let pfd = self.fd(pinode)?;
        let mut st = self.remember(&*pfd, name)?;
        let kind = Kind::from_mode(st.st_mode).ok_or(Errno::NOTSUP)?;
        // The kernel made the entry the daemon's, with the parent's group
        // under a setgid parent. When that is already the caller's owner
        // and group (a root application, the common sidecar case), the
        // chown and its checks are skipped: two syscalls per create.
        if st.st_uid != caller.uid || st.st_gid != caller.gid {
            // The mode as created: the caller's mode under its umask, or
            // under the parent's default ACL (which chmod would rewrite).
            let created = st.st_mode & 0o7777;
            let (uid, gid) = self.new_owner(pinode, caller)?;
            rfs::chownat(
                &*pfd,
                name,
                Some(rfs::Uid::from_raw(uid)),
                Some(rfs::Gid::from_raw(gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )?;
            // chown clears the set-id bits of anything but a directory;
            // put back the ones it was created with (the kernel already
            // dropped set-group-ID where the caller may not have it). Only
            // then: a chmod would also rewrite a default ACL's mask entry.
            let setid = libc::S_ISUID | libc::S_ISGID;
            if kind != Kind::Symlink && kind != Kind::Dir && created & setid != 0 {
                rfs::chmodat(
                    &*pfd,
                    name,
                    Mode::from_bits_truncate(created),
                    AtFlags::empty(),
                )?;
            }
            st = rfs::statat(&*pfd, name, AtFlags::SYMLINK_NOFOLLOW)?;
        }
        let op = Op::Create {
            parent,
            name: Bytes::copy_from_slice(name.as_bytes()),
            ino: st.st_ino,
            kind,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            mtime: mtime_of(&st),
            rdev: st.st_rdev,
            target: Bytes::copy_from_slice(target),
        };
        Ok((st, op))
    }

    /// Makes a fifo, a socket's node, a device node or an empty file;
    /// `rdev` is the device number (the kernel's encoding, as in st_rdev).
    #[allow(clippy::too_many_arguments)]
    pub fn mknod(
        &self,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u64,
        caller: Caller,
    ) -> FsResult<Stat> {
        let _op = self.begin()?;
        if self.is_hidden(parent, name) {
            return Err(Errno::PERM);
        }
        // The kernel checked CAP_MKNOD for device nodes (as natively)
        // before sending the request; the source filesystem checks again
        // that the daemon may make them.
        let (ft, rdev) = match mode & libc::S_IFMT {
            libc::S_IFIFO => (rfs::FileType::Fifo, 0),
            libc::S_IFREG | 0 => (rfs::FileType::RegularFile, 0),
            // bind() of a Unix domain socket makes its node this way.
            libc::S_IFSOCK => (rfs::FileType::Socket, 0),
            libc::S_IFCHR => (rfs::FileType::CharacterDevice, rdev),
            libc::S_IFBLK => (rfs::FileType::BlockDevice, rdev),
            _ => return Err(Errno::INVAL),
        };
        let p = self.inode(parent)?;
        let pfd = self.fd(&p)?;
        let _ns = self.namespace.lock();
        with_umask(mode, umask, |m| rfs::mknodat(&*pfd, name, ft, m, rdev))?;
        let (st, op) = self.finish_create(parent, &p, name, caller, b"")?;
        self.record(&[op])?;
        Ok(st)
    }

    pub fn mkdir(
        &self,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        umask: u32,
        caller: Caller,
    ) -> FsResult<Stat> {
        let _op = self.begin()?;
        if self.is_hidden(parent, name) {
            return Err(Errno::PERM);
        }
        let p = self.inode(parent)?;
        let pfd = self.fd(&p)?;
        let _ns = self.namespace.lock();
        with_umask(mode, umask, |m| rfs::mkdirat(&*pfd, name, m))?;
        let (st, op) = self.finish_create(parent, &p, name, caller, b"")?;
        self.record(&[op])?;
        Ok(st)
    }

    pub fn symlink(
        &self,
        parent: Ino,
        name: &OsStr,
        target: &OsStr,
        caller: Caller,
    ) -> FsResult<Stat> {
        let _op = self.begin()?;
        if self.is_hidden(parent, name) {
            return Err(Errno::PERM);
        }
        let p = self.inode(parent)?;
        let pfd = self.fd(&p)?;
        let _ns = self.namespace.lock();
        rfs::symlinkat(target, &*pfd, name)?;
        let (st, op) = self.finish_create(parent, &p, name, caller, target.as_bytes())?;
        self.record(&[op])?;
        Ok(st)
    }

    fn entry_ino(&self, parent_fd: &OwnedFd, name: &OsStr) -> FsResult<Option<Ino>> {
        match rfs::statat(parent_fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st.st_ino)),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn unlink(&self, parent: Ino, name: &OsStr, dir: bool) -> FsResult<()> {
        let _op = self.begin()?;
        if self.is_hidden(parent, name) {
            return Err(Errno::NOENT);
        }
        let p = self.inode(parent)?;
        let pfd = self.fd(&p)?;
        let _ns = self.namespace.lock();
        let ino = self.entry_ino(&*pfd, name)?.ok_or(Errno::NOENT)?;
        rfs::unlinkat(
            &*pfd,
            name,
            if dir {
                AtFlags::REMOVEDIR
            } else {
                AtFlags::empty()
            },
        )?;
        self.record(&[Op::Unlink {
            parent,
            name: Bytes::copy_from_slice(name.as_bytes()),
            ino,
        }])
    }

    pub fn rename(
        &self,
        parent: Ino,
        name: &OsStr,
        newparent: Ino,
        newname: &OsStr,
        flags: u32,
    ) -> FsResult<()> {
        let _op = self.begin()?;
        if self.is_hidden(parent, name) {
            return Err(Errno::NOENT);
        }
        if self.is_hidden(newparent, newname) {
            return Err(Errno::PERM);
        }
        let rflags = rfs::RenameFlags::from_bits(flags).ok_or(Errno::INVAL)?;
        if rflags.contains(rfs::RenameFlags::WHITEOUT) {
            return Err(Errno::INVAL);
        }
        let p = self.inode(parent)?;
        let pfd = self.fd(&p)?;
        let np = self.inode(newparent)?;
        let npfd = self.fd(&np)?;
        let _ns = self.namespace.lock();
        let ino = self.entry_ino(&*pfd, name)?.ok_or(Errno::NOENT)?;
        let replaced = self.entry_ino(&*npfd, newname)?;
        rfs::renameat_with(&*pfd, name, &*npfd, newname, rflags)?;
        if self.watch.is_active() {
            // The walk may have passed the new place already.
            for (fd, n) in [(&npfd, newname), (&pfd, name)] {
                if let Ok(h) = rfs::openat(
                    &**fd,
                    n,
                    OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                ) {
                    self.watch.moved(h);
                }
            }
        }
        let exchange = rflags.contains(rfs::RenameFlags::EXCHANGE);
        self.record(&[Op::Rename {
            from_parent: parent,
            from_name: Bytes::copy_from_slice(name.as_bytes()),
            to_parent: newparent,
            to_name: Bytes::copy_from_slice(newname.as_bytes()),
            ino,
            replaced: replaced.unwrap_or(0),
            flags: if exchange { RENAME_EXCHANGE_FLAG } else { 0 },
        }])
    }

    pub fn link(&self, ino: Ino, newparent: Ino, newname: &OsStr) -> FsResult<Stat> {
        let _op = self.begin()?;
        if self.is_hidden(newparent, newname) {
            return Err(Errno::PERM);
        }
        let inode = self.inode(ino)?;
        let np = self.inode(newparent)?;
        let npfd = self.fd(&np)?;
        let _ns = self.namespace.lock();
        rfs::linkat(
            &*self.fd(&inode)?,
            c"",
            &*npfd,
            newname,
            AtFlags::EMPTY_PATH,
        )?;
        if self.watch.is_active() {
            if let Ok(h) = rfs::openat(
                &*npfd,
                newname,
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                self.watch.moved(h);
            }
        }
        let st = self.remember(&*npfd, newname)?;
        self.record(&[Op::Link {
            ino,
            parent: newparent,
            name: Bytes::copy_from_slice(newname.as_bytes()),
        }])?;
        Ok(st)
    }

    fn new_handle(&self, ino: Ino, fd: OwnedFd, flags: i32, mode: OpenMode) -> u64 {
        let acc = flags & libc::O_ACCMODE;
        let h = Handle {
            ino,
            fd,
            append: flags & libc::O_APPEND != 0,
            writable: acc == libc::O_WRONLY || acc == libc::O_RDWR,
            mode,
            dir: Mutex::new(DirState::default()),
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.write().insert(fh, Arc::new(h));
        fh
    }

    /// Flags for reopening a source file: appends are positioned by us
    /// (under the inode lock, so the record knows where they landed), and
    /// creation and truncation are separate, journaled steps.
    fn reopen_flags(flags: i32) -> OFlags {
        let keep = flags
            & !(libc::O_CREAT
                | libc::O_EXCL
                | libc::O_TRUNC
                | libc::O_APPEND
                | libc::O_NOCTTY
                | libc::O_NOFOLLOW);
        OFlags::from_bits_retain(keep as u32) | OFlags::CLOEXEC
    }

    /// Takes an io mode for a new handle of `inode` (see `IoMode`).
    fn enter_mode(
        &self,
        ino: Ino,
        inode: &Inode,
        writable: bool,
        passthrough_ok: bool,
    ) -> FsResult<OpenMode> {
        let mut io = inode.io.lock();
        if writable {
            // The kernel sends RELEASE after close() has returned, so a
            // reader that just closed may still be counted: give those
            // releases a moment before refusing.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
            while io.passthrough > 0 && !inode.io_changed.wait_until(&mut io, deadline).timed_out()
            {
            }
            if io.passthrough > 0 {
                tracing::warn!(ino, readers = io.passthrough, "refusing a writable open (ETXTBSY): the file is open read-only with kernel passthrough; run without --read-passthrough to allow this");
                return Err(Errno::TXTBSY);
            }
            io.writers += 1;
            Ok(self.writable_mode())
        } else if passthrough_ok && inode.kind == Kind::File && io.writers == 0 {
            io.passthrough += 1;
            Ok(OpenMode::Passthrough)
        } else {
            Ok(OpenMode::Cached)
        }
    }

    fn leave_mode(&self, h: &Handle) {
        if let Ok(inode) = self.inode(h.ino) {
            let mut io = inode.io.lock();
            if h.writable {
                io.writers = io.writers.saturating_sub(1);
            }
            if h.mode == OpenMode::Passthrough {
                io.passthrough = io.passthrough.saturating_sub(1);
                inode.io_changed.notify_all();
            }
        }
    }

    pub fn open(&self, ino: Ino, flags: i32) -> FsResult<(u64, OpenMode)> {
        self.open_as(ino, flags, self.read_passthrough)
    }

    fn open_as(&self, ino: Ino, flags: i32, passthrough_ok: bool) -> FsResult<(u64, OpenMode)> {
        let inode = self.inode(ino)?;
        let fd = rfs::open(
            proc_path(&*self.fd(&inode)?).as_c_str(),
            Self::reopen_flags(flags),
            Mode::empty(),
        )?;
        if flags & libc::O_TRUNC != 0 && flags & libc::O_ACCMODE != libc::O_RDONLY {
            let _op = self.begin()?;
            let _g = inode.data.lock();
            rfs::ftruncate(&fd, 0)?;
            let st = rfs::fstat(&fd)?;
            self.record(&[self.attr_record(ino, &st)])?;
        }
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let mode = self.enter_mode(ino, &inode, writable, passthrough_ok)?;
        Ok((self.new_handle(ino, fd, flags, mode), mode))
    }

    /// The source descriptor the kernel reads a passthrough handle from.
    pub fn backing_fd(&self, fh: u64) -> FsResult<impl AsFd> {
        let h = self.handle(fh)?;
        Ok(rustix::io::fcntl_dupfd_cloexec(&h.fd, 0)?)
    }

    pub fn create(
        &self,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        caller: Caller,
    ) -> FsResult<(Stat, u64, OpenMode)> {
        let op = self.begin()?;
        if self.is_hidden(parent, name) {
            return Err(Errno::PERM);
        }
        let p = self.inode(parent)?;
        let pfd = self.fd(&p)?;
        let ns = self.namespace.lock();
        let oflags = Self::reopen_flags(flags) | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW;
        match with_umask(mode, umask, |m| rfs::openat(&*pfd, name, oflags, m)) {
            Ok(fd) => {
                let (st, op) = self.finish_create(parent, &p, name, caller, b"")?;
                self.record(&[op])?;
                let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
                let mode = if writable {
                    self.inode(st.st_ino)?.io.lock().writers += 1;
                    self.writable_mode()
                } else {
                    // A new file is never passthrough: nobody else has it open.
                    OpenMode::Cached
                };
                Ok((st, self.new_handle(st.st_ino, fd, flags, mode), mode))
            }
            Err(Errno::EXIST) if flags & libc::O_EXCL == 0 => {
                // Lost a race with another creator: open what is there.
                drop(ns);
                drop(op);
                let st = self.lookup(parent, name)?;
                // A CREATE reply carries no backing file: served cached.
                let (fh, mode) = self.open_as(st.st_ino, flags, false)?;
                Ok((rfs::fstat(&self.handle(fh)?.fd)?, fh, mode))
            }
            Err(e) => Err(e),
        }
    }

    /// Reads up to `size` bytes at `offset` into the start of `buf` and
    /// returns how many were read. `buf` only grows, and bytes past the
    /// count are left as they were: the caller keeps one buffer per thread,
    /// so a read neither allocates nor zero-fills.
    pub fn read(&self, fh: u64, offset: u64, buf: &mut Vec<u8>, size: usize) -> FsResult<usize> {
        let h = self.handle(fh)?;
        // The application's fadvise never reaches us, and the source is read
        // without advice of our own, as a native reader that gives none:
        // the kernel's readahead heuristics decide. Inferring "random" from
        // the offsets and advising FADV_RANDOM was measured and dropped:
        // cold 4 KiB random reads of a 1 GiB file ran at 0.69-0.78 of
        // native with it and 1.05-1.08 without (docs/PERFORMANCE.md).
        if buf.len() < size {
            buf.resize(size, 0);
        }
        let mut done = 0;
        while done < size {
            match rustix::io::pread(&h.fd, &mut buf[done..size], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    /// `kill_privs` names the writer when the kernel says it lacks
    /// CAP_FSETID (FUSE_WRITE_KILL_SUIDGID, sent with writes that bypass
    /// the mount's page cache). The daemon writes as root, which keeps
    /// set-user-ID and set-group-ID bits, so it clears them itself first,
    /// as the kernel does natively: without it, a user could write into a
    /// set-user-ID file and keep the bit. Returns the bytes written and
    /// whether the mode changed (the adapter then drops the kernel's cached
    /// mode).
    pub fn write(
        &self,
        fh: u64,
        offset: u64,
        data: &[u8],
        kill_privs: Option<Requester>,
    ) -> FsResult<(usize, bool)> {
        let _op = self.begin()?;
        let h = self.handle(fh)?;
        let inode = self.inode(h.ino)?;
        let _g = inode.data.lock();
        let mode_changed = match kill_privs {
            Some(who) => self.kill_privs(&h, who)?,
            None => false,
        };
        let off = if h.append {
            rfs::fstat(&h.fd)?.st_size as u64
        } else {
            offset
        };
        let mut done = 0;
        while done < data.len() {
            match rustix::io::pwrite(&h.fd, &data[done..], off + done as u64) {
                Ok(n) => done += n,
                Err(Errno::INTR) => continue,
                Err(e) if done == 0 => return Err(e),
                // A short write (e.g. ENOSPC midway) is reported as such, and
                // only the bytes that landed are recorded.
                Err(_) => break,
            }
        }
        let st = rfs::fstat(&h.fd)?;
        self.touched.mark(h.ino);
        self.journaled(|| {
            self.journal
                .append_write(h.ino, off, st.st_size as u64, mtime_of(&st), &data[..done])
        })?;
        Ok((done, mode_changed))
    }

    /// Clears set-user-ID, and set-group-ID when the file is group-executable
    /// or the writer is outside the file's group (`killpriv`: without group
    /// execute the bit stays for the group's members), and journals the new
    /// mode before the write that caused it. Returns whether anything was
    /// cleared.
    fn kill_privs(&self, h: &Handle, who: Requester) -> FsResult<bool> {
        let st = rfs::fstat(&h.fd)?;
        let mode = st.st_mode & 0o7777;
        let (suid, sgid) = (libc::S_ISUID, libc::S_ISGID);
        // The write flag is the kernel's word that the writer lacks CAP_FSETID.
        let sgid_kill = if who.kills_sgid(st.st_mode, st.st_gid, Some(false)) {
            sgid
        } else {
            0
        };
        let kill = (mode & suid) | sgid_kill;
        if kill == 0 {
            return Ok(false);
        }
        rfs::fchmod(&h.fd, Mode::from_bits_truncate(mode & !kill))?;
        let st = rfs::fstat(&h.fd)?;
        self.record(&[self.attr_record(h.ino, &st)])?;
        Ok(true)
    }

    pub fn fallocate(&self, fh: u64, offset: u64, len: u64, mode: i32) -> FsResult<()> {
        let _op = self.begin()?;
        let h = self.handle(fh)?;
        let inode = self.inode(h.ino)?;
        let _g = inode.data.lock();
        rfs::fallocate(
            &h.fd,
            rfs::FallocateFlags::from_bits_retain(mode as u32),
            offset,
            len,
        )?;
        let st = rfs::fstat(&h.fd)?;
        self.record(&[Op::Fallocate {
            ino: h.ino,
            mode: mode as u32,
            offset,
            len,
            size: st.st_size as u64,
            mtime: mtime_of(&st),
        }])
    }

    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> FsResult<u64> {
        let h = self.handle(fh)?;
        let pos = match whence {
            libc::SEEK_DATA => rfs::SeekFrom::Data(offset as u64),
            libc::SEEK_HOLE => rfs::SeekFrom::Hole(offset as u64),
            libc::SEEK_SET => rfs::SeekFrom::Start(offset as u64),
            libc::SEEK_END => rfs::SeekFrom::End(offset),
            _ => return Err(Errno::INVAL),
        };
        Ok(rfs::seek(&h.fd, pos)?)
    }

    /// fsync/fdatasync: calls `done` once every change acknowledged so far
    /// is durable in the journal (EBADF at once unless `fh` is an open
    /// handle). The source file is not synced here: journal space is
    /// released only after the source's filesystem was synced past it
    /// (`ship.rs`), and after a machine crash `redo.rs` re-applies the
    /// journal to the source, so what fsync acknowledged is in the journal
    /// until it is durable in the source. A caller that arrives while a sync
    /// runs does not wait for it: the syncing thread calls `done`
    /// (`Journal::sync_then`, group commit).
    pub fn fsync_then(&self, fh: u64, done: impl FnOnce(FsResult<()>) + Send + 'static) {
        if let Err(e) = self.handle(fh) {
            return done(Err(e));
        }
        self.journal.sync_then(Box::new(move |r| {
            done(r.map_err(|e| {
                tracing::error!("journal sync failed: {e}");
                Errno::IO
            }))
        }))
    }

    pub fn release(&self, fh: u64) {
        if let Some(h) = self.handles.write().remove(&fh) {
            self.leave_mode(&h);
        }
    }

    pub fn opendir(&self, ino: Ino) -> FsResult<u64> {
        let inode = self.inode(ino)?;
        let fd = rfs::openat(
            &*self.fd(&inode)?,
            c".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(self.new_handle(ino, fd, libc::O_RDONLY, OpenMode::Cached))
    }

    /// Lists a directory from a source cookie: offsets are the source
    /// filesystem's own `d_off` values, so they stay stable across calls.
    /// `emit(ino, next_offset, kind, name)` returns true when full.
    pub fn readdir(
        &self,
        fh: u64,
        offset: u64,
        emit: &mut dyn FnMut(Ino, u64, Option<Kind>, &OsStr) -> bool,
    ) -> FsResult<()> {
        let h = self.handle(fh)?;
        let mut st = h.dir.lock();
        rfs::seek(&h.fd, rfs::SeekFrom::Start(offset))?;
        if st.buf.len() < 32768 {
            st.buf.resize(32768, 0);
        }
        loop {
            // SAFETY: the buffer is valid for writes of its length and the
            // fd is an open directory owned by the handle, locked by `st`.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_getdents64,
                    h.fd.as_raw_fd(),
                    st.buf.as_mut_ptr(),
                    st.buf.len(),
                )
            };
            if n < 0 {
                return Err(Errno::from_raw_os_error(
                    std::io::Error::last_os_error()
                        .raw_os_error()
                        .unwrap_or(libc::EIO),
                ));
            }
            if n == 0 {
                return Ok(());
            }
            let mut pos = 0usize;
            while pos < n as usize {
                let b = &st.buf[pos..];
                let d_ino = u64::from_ne_bytes(b[0..8].try_into().unwrap());
                let d_off = u64::from_ne_bytes(b[8..16].try_into().unwrap());
                let reclen = u16::from_ne_bytes(b[16..18].try_into().unwrap()) as usize;
                let dtype = b[18];
                let name_bytes = &b[19..reclen];
                let name_len = name_bytes
                    .iter()
                    .position(|&c| c == 0)
                    .unwrap_or(name_bytes.len());
                let name = OsStr::from_bytes(&name_bytes[..name_len]);
                pos += reclen;
                if h.ino == self.root_ino && name.as_bytes() == HIDDEN.as_bytes() {
                    continue;
                }
                let kind = match dtype {
                    libc::DT_DIR => Some(Kind::Dir),
                    libc::DT_REG => Some(Kind::File),
                    libc::DT_LNK => Some(Kind::Symlink),
                    libc::DT_FIFO => Some(Kind::Fifo),
                    libc::DT_SOCK => Some(Kind::Socket),
                    libc::DT_CHR => Some(Kind::CharDev),
                    libc::DT_BLK => Some(Kind::BlockDev),
                    _ => None,
                };
                if emit(d_ino, d_off, kind, name) {
                    return Ok(());
                }
            }
        }
    }

    pub fn fsyncdir(&self, fh: u64) -> FsResult<()> {
        let h = self.handle(fh)?;
        self.journal.sync().map_err(|_| Errno::IO)?;
        Ok(rfs::fsync(&h.fd)?)
    }

    pub fn statfs(&self) -> FsResult<rfs::StatVfs> {
        Ok(rfs::fstatvfs(&self.root_fd)?)
    }

    /// A /proc path for xattr calls, with the descriptor it names (which
    /// must outlive the call).
    fn xattr_path<'a>(&self, inode: &'a Inode) -> FsResult<(InodeFd<'a>, CString)> {
        if inode.kind == Kind::Symlink {
            // Linux allows user xattrs only on files and directories.
            return Err(Errno::PERM);
        }
        let fd = self.fd(inode)?;
        let p = proc_path(&*fd);
        Ok((fd, p))
    }

    pub fn setxattr(&self, ino: Ino, name: &OsStr, value: &[u8], flags: i32) -> FsResult<()> {
        let _op = self.begin()?;
        let inode = self.inode(ino)?;
        let (_fd, p) = self.xattr_path(&inode)?;
        let _g = inode.data.lock();
        rfs::setxattr(
            p.as_c_str(),
            name,
            value,
            rfs::XattrFlags::from_bits_retain(flags as u32),
        )?;
        self.record(&[Op::SetXattr {
            ino,
            name: Bytes::copy_from_slice(name.as_bytes()),
            value: Bytes::copy_from_slice(value),
        }])
    }

    pub fn getxattr(&self, ino: Ino, name: &OsStr, size: usize) -> FsResult<Vec<u8>> {
        let inode = self.inode(ino)?;
        let (_fd, p) = match self.xattr_path(&inode) {
            Ok(p) => p,
            Err(_) => return Err(Errno::NODATA),
        };
        let mut buf = vec![0u8; if size == 0 { 65536 } else { size }];
        let n = rfs::getxattr(p.as_c_str(), name, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    pub fn listxattr(&self, ino: Ino, size: usize) -> FsResult<Vec<u8>> {
        let inode = self.inode(ino)?;
        let (_fd, p) = match self.xattr_path(&inode) {
            Ok(p) => p,
            Err(_) => return Ok(Vec::new()),
        };
        let mut buf = vec![0u8; if size == 0 { 65536 } else { size }];
        let n = rfs::listxattr(p.as_c_str(), &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    pub fn removexattr(&self, ino: Ino, name: &OsStr) -> FsResult<()> {
        let _op = self.begin()?;
        let inode = self.inode(ino)?;
        let (_fd, p) = self.xattr_path(&inode)?;
        let _g = inode.data.lock();
        rfs::removexattr(p.as_c_str(), name)?;
        self.record(&[Op::RemoveXattr {
            ino,
            name: Bytes::copy_from_slice(name.as_bytes()),
        }])
    }

    /// The number of open handles, for the shutdown log.
    pub fn open_handles(&self) -> usize {
        self.handles.read().len()
    }

    /// O_PATH handles of every known inode not in `seen` (for a base walk).
    pub fn unseen_handles(&self, seen: &std::collections::HashSet<Ino>) -> Vec<OwnedFd> {
        let inodes: Vec<Arc<Inode>> = self
            .inodes
            .read()
            .iter()
            .filter(|(i, _)| !seen.contains(i))
            .map(|(_, v)| v.clone())
            .collect();
        let mut out = Vec::new();
        for i in inodes {
            let Ok(fd) = self.fd(&i) else { continue };
            let owned = match fd {
                InodeFd::Kept(f) => match rustix::io::fcntl_dupfd_cloexec(f, 0) {
                    Ok(d) => d,
                    Err(_) => continue,
                },
                InodeFd::Opened(f) => f,
            };
            out.push(owned);
        }
        out
    }

    /// Objects changed since the last base started; the base thread takes
    /// the set before it reads its start_seq.
    pub(crate) fn touched(&self) -> &Touched {
        &self.touched
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(dir: &std::path::Path, name: &str) -> u32 {
        rfs::lstat(dir.join(name)).unwrap().st_mode & 0o7777
    }

    /// A create under `with_umask` gets the caller's umask applied by the
    /// filesystem (not the process umask on top), on a thread of its own,
    /// and leaves the umask of the process's other threads alone.
    #[test]
    fn creates_run_under_the_callers_umask_on_their_own_thread() {
        let dir = tempfile::tempdir().unwrap();
        let d = rfs::open(
            dir.path(),
            OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
        )
        .unwrap();
        let process_umask = rustix::process::umask(Mode::from_bits_truncate(0o022));
        std::thread::scope(|s| {
            s.spawn(|| {
                for (umask, mode, name) in
                    [(0, 0o620, "a"), (0o002, 0o664, "b"), (0o077, 0o777, "c")]
                {
                    let fd = with_umask(mode, umask, |m| {
                        rfs::openat(&d, name, OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY, m)
                    });
                    drop(fd.unwrap());
                }
                with_umask(0o2775, 0o002, |m| rfs::mkdirat(&d, "d", m)).unwrap();
                with_umask(libc::S_IFSOCK | 0o777, 0, |m| {
                    rfs::mknodat(&d, "s", rfs::FileType::Socket, m, 0)
                })
                .unwrap();
            });
        });
        // This thread's (the process's) umask was not changed.
        assert_eq!(
            rustix::process::umask(process_umask),
            Mode::from_bits_truncate(0o022)
        );
        assert_eq!(mode_of(dir.path(), "a"), 0o620);
        assert_eq!(mode_of(dir.path(), "b"), 0o664);
        assert_eq!(mode_of(dir.path(), "c"), 0o700);
        // mkdir drops set-group-ID where the parent is not setgid.
        assert_eq!(mode_of(dir.path(), "d"), 0o775);
        assert_eq!(mode_of(dir.path(), "s"), 0o777);
    }
}
