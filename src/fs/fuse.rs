//! The fuser adapter: the only module that imports fuser. It translates
//! kernel requests into `Passthrough` calls and results into replies (inode
//! numbers, attributes, errno), mounts the session (mount(2) itself as
//! root, without opening the mountpoint, which may be a dead mount; through
//! fusermount3 otherwise) with the options the
//! contract fixes (allow_other, default_permissions, 1 MiB writes, one
//! cloned /dev/fuse fd per worker thread; nodev only where the source is
//! nodev), asks for unmasked create modes (FUSE_DONT_MASK), and nothing
//! else: no logic that
//! the core could hold. What needs fuser's types stays here: the open flags
//! for each `OpenMode`, fsync replies handed to the journal's group commit
//! as callbacks (`Journal::sync_then`: a worker never waits for a sync
//! another runs), and attribute invalidations after the daemon itself
//! changed a mode. `ViewFs` is the second, read-only adapter: it serves
//! the mount view of one instant (`crate::view`) and answers every change
//! with EROFS.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BsdFileFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, SessionACL, TimeOrNow, WriteFlags,
};
use rustix::fs::Stat;

use std::collections::HashMap;

use fuser::BackingId;
use parking_lot::Mutex;

use super::{Caller, OpenMode, Passthrough, Requester};
use crate::record::{Ino, Kind};
use crate::view::{Attr as ViewAttr, Listing, ReadOnlyTree};

/// Every change goes through this mount, so the kernel may cache entries
/// and attributes; a second is short enough for tools that look at the
/// source directly while debugging. (A minute made the crash suite find
/// acknowledged files missing through a mount restarted after kill -9;
/// until that is understood, the timeout stays short.)
const TTL: Duration = Duration::from_secs(1);

/// How long the kernel may remember that a name does not exist. Only a
/// change made outside the mount can make such an entry wrong, and such a
/// change is outside the contract anyway (it is not journaled); creates,
/// links and renames through the mount replace the cached entry, and
/// `O_EXCL` opens always ask. Without it, every stat of a missing name
/// (fio before each create, SQLite's hot-journal checks) is a round trip.
const NEGATIVE_TTL: Duration = Duration::from_secs(10);

/// A negative entry: node id 0, the rest is ignored by the kernel.
const NO_ENTRY: FileAttr = FileAttr {
    ino: INodeNo(0),
    size: 0,
    blocks: 0,
    atime: UNIX_EPOCH,
    mtime: UNIX_EPOCH,
    ctime: UNIX_EPOCH,
    crtime: UNIX_EPOCH,
    kind: FileType::RegularFile,
    perm: 0,
    nlink: 0,
    uid: 0,
    gid: 0,
    rdev: 0,
    blksize: 0,
    flags: 0,
};

pub struct FuseFs {
    core: Arc<Passthrough>,
    root: Ino,
    /// One backing id per inode while it has passthrough handles (the
    /// kernel wants the same id for every open of an inode), with the
    /// number of handles using it.
    backing: Mutex<HashMap<Ino, (BackingId, u32)>>,
    /// Passthrough handles and their inode, to release the backing id.
    passthrough_fh: Mutex<HashMap<u64, Ino>>,
    /// Whether the kernel lets a FOPEN_DIRECT_IO file be mmap()ed shared
    /// (FUSE_DIRECT_IO_ALLOW_MMAP, Linux 6.6). Without it, `OpenMode::Direct`
    /// handles are served cached: SQLite's -shm and LMDB need shared maps.
    direct_io: bool,
    /// The way to tell the kernel that cached attributes went stale; set
    /// once the session exists (`mount`).
    notifier: Arc<OnceLock<fuser::Notifier>>,
    /// Told when the session ends (`destroy`), for `Served::wait_ended`.
    ended: Option<crossbeam_channel::Sender<()>>,
}

thread_local! {
    /// Each worker's read buffer, kept between requests (see `Passthrough::read`):
    /// at most max_read (1 MiB) per worker thread.
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn err(e: rustix::io::Errno) -> Errno {
    Errno::from_i32(e.raw_os_error())
}

impl FuseFs {
    pub fn new(core: Arc<Passthrough>) -> FuseFs {
        let root = core.root_ino();
        FuseFs {
            core,
            root,
            backing: Mutex::new(HashMap::new()),
            passthrough_fh: Mutex::new(HashMap::new()),
            direct_io: false,
            notifier: Arc::new(OnceLock::new()),
            ended: None,
        }
    }

    /// The open flags for a handle the daemon serves. Every write is applied
    /// and journaled before it is answered, so a close has nothing to flush:
    /// FOPEN_NOFLUSH saves the round trip on every close().
    fn open_flags(&self, mode: OpenMode) -> FopenFlags {
        match mode {
            OpenMode::Direct if self.direct_io => {
                // Parallel writes to one file are serialized by the
                // inode's lock in the core, in the order they arrive.
                FopenFlags::FOPEN_DIRECT_IO
                    | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
                    | FopenFlags::FOPEN_NOFLUSH
            }
            _ => FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH,
        }
    }

    /// FUSE's root is inode 1; the source root has its own number. Swap the
    /// two (an involution, so the same function maps both ways).
    fn map(&self, ino: u64) -> u64 {
        if ino == 1 {
            self.root
        } else if ino == self.root {
            1
        } else {
            ino
        }
    }

    fn src(&self, ino: INodeNo) -> Ino {
        self.map(ino.0)
    }

    fn attr(&self, st: &Stat) -> FileAttr {
        let t = |s: i64, ns: i64| {
            if s >= 0 {
                UNIX_EPOCH + Duration::new(s as u64, ns as u32)
            } else {
                UNIX_EPOCH - Duration::new((-s) as u64, 0)
            }
        };
        let kind = file_type(Kind::from_mode(st.st_mode));
        FileAttr {
            ino: INodeNo(self.map(st.st_ino)),
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: t(st.st_atime, st.st_atime_nsec as i64),
            mtime: t(st.st_mtime, st.st_mtime_nsec as i64),
            ctime: t(st.st_ctime, st.st_ctime_nsec as i64),
            crtime: UNIX_EPOCH,
            kind,
            perm: (st.st_mode & 0o7777) as u16,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
            flags: 0,
        }
    }

    fn entry(&self, reply: ReplyEntry, r: Result<Stat, rustix::io::Errno>) {
        match r {
            Ok(st) => reply.entry(&TTL, &self.attr(&st), Generation(0)),
            Err(e) => reply.error(err(e)),
        }
    }
}

/// The FUSE file type of a kind (None: the source showed a type Linux
/// does not define; answered as a regular file, as readdir does).
fn file_type(kind: Option<Kind>) -> FileType {
    match kind {
        Some(Kind::Dir) => FileType::Directory,
        Some(Kind::Symlink) => FileType::Symlink,
        Some(Kind::Fifo) => FileType::NamedPipe,
        Some(Kind::Socket) => FileType::Socket,
        Some(Kind::CharDev) => FileType::CharDevice,
        Some(Kind::BlockDev) => FileType::BlockDevice,
        Some(Kind::File) | None => FileType::RegularFile,
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

/// The process behind a request, for decisions that depend on its groups
/// and capabilities (`Passthrough::setattr`, `Passthrough::write`).
fn requester(req: &Request) -> Requester {
    Requester {
        pid: req.pid(),
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn time_arg(t: Option<TimeOrNow>) -> Option<Option<(i64, i64)>> {
    t.map(|t| match t {
        TimeOrNow::Now => None,
        TimeOrNow::SpecificTime(st) => Some(match st.duration_since(UNIX_EPOCH) {
            Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i64),
            Err(e) => (-(e.duration().as_secs() as i64), 0),
        }),
    })
}

fn empty(reply: ReplyEmpty, r: Result<(), rustix::io::Errno>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(err(e)),
    }
}

impl Filesystem for FuseFs {
    /// The session ended: the kernel let go of the mount.
    fn destroy(&mut self) {
        if let Some(tx) = self.ended.take() {
            let _ = tx.send(());
        }
    }

    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_PARALLEL_DIROPS);
        // Creates arrive with the caller's mode unmasked and its umask
        // beside it, so the core can let the source filesystem decide
        // between the umask and a default ACL (`Passthrough::create`).
        // Without it the kernel masks first, which ignores default ACLs.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_DONT_MASK);
        self.direct_io = config
            .add_capabilities(fuser::InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP)
            .is_ok();
        if !self.direct_io && !self.core.cached_writes() {
            tracing::warn!("the kernel cannot mmap direct-io files (Linux 6.6 or later can): files opened for writing are served through the page cache, at one more round trip per write");
        }
        if self.core.read_passthrough() {
            // Passthrough needs the kernel's consent and a stacking depth
            // of at least one (the source is a plain filesystem).
            if config
                .add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH)
                .is_err()
                || config.set_max_stack_depth(1).is_err()
            {
                return Err(std::io::Error::other("the kernel does not offer FUSE passthrough (Linux 6.9 or later); run without --read-passthrough"));
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.core.lookup(self.src(parent), name) {
            // Node id 0 is the kernel's "no such entry, and remember that".
            Err(rustix::io::Errno::NOENT) => reply.entry(&NEGATIVE_TTL, &NO_ENTRY, Generation(0)),
            r => self.entry(reply, r),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.core.forget(self.src(ino), nlookup)
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.core.getattr(self.src(ino)) {
            Ok(st) => reply.attr(&TTL, &self.attr(&st)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.core.setattr(
            self.src(ino),
            mode,
            uid,
            gid,
            size,
            time_arg(atime),
            time_arg(mtime),
            fh.map(|f| f.0),
            requester(req),
        ) {
            Ok(st) => reply.attr(&TTL, &self.attr(&st)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.core.readlink(self.src(ino)) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(err(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        // FUSE carries the kernel's 32-bit device encoding, whose value is
        // the st_rdev the source will report for it.
        self.entry(
            reply,
            self.core.mknod(
                self.src(parent),
                name,
                mode,
                umask,
                u64::from(rdev),
                caller(req),
            ),
        )
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.entry(
            reply,
            self.core
                .mkdir(self.src(parent), name, mode, umask, caller(req)),
        )
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.core.unlink(self.src(parent), name, false))
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.core.unlink(self.src(parent), name, true))
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.entry(
            reply,
            self.core
                .symlink(self.src(parent), link_name, target.as_os_str(), caller(req)),
        )
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        empty(
            reply,
            self.core.rename(
                self.src(parent),
                name,
                self.src(newparent),
                newname,
                flags.bits(),
            ),
        )
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.entry(
            reply,
            self.core.link(self.src(ino), self.src(newparent), newname),
        )
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let src = self.src(ino);
        match self.core.open(src, flags.0) {
            Ok((fh, mode @ (OpenMode::Cached | OpenMode::Direct))) => {
                reply.opened(FileHandle(fh), self.open_flags(mode))
            }
            Ok((fh, OpenMode::Passthrough)) => {
                let mut backing = self.backing.lock();
                if !backing.contains_key(&src) {
                    let id = self.core.backing_fd(fh).and_then(|fd| {
                        reply.open_backing(fd).map_err(|e| {
                            rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO)
                        })
                    });
                    match id {
                        Ok(id) => {
                            backing.insert(src, (id, 0));
                        }
                        Err(e) => {
                            drop(backing);
                            self.core.release(fh);
                            return reply.error(err(e));
                        }
                    }
                }
                let entry = backing.get_mut(&src).expect("inserted above");
                entry.1 += 1;
                self.passthrough_fh.lock().insert(fh, src);
                // The kernel refuses passthrough opens with cache flags
                // such as FOPEN_KEEP_CACHE (EINVAL, seen as EIO).
                reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &entry.0);
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lo: Option<LockOwner>,
        reply: ReplyData,
    ) {
        READ_BUF.with_borrow_mut(
            |buf| match self.core.read(fh.0, offset, buf, size as usize) {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(err(e)),
            },
        )
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        wf: WriteFlags,
        _flags: OpenFlags,
        _lo: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let kill_privs = wf
            .contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID)
            .then(|| requester(req));
        match self.core.write(fh.0, offset, data, kill_privs) {
            Ok((n, mode_changed)) => {
                if mode_changed {
                    // The kernel keeps the file's old mode for the attribute
                    // timeout otherwise: `stat` right after the write would
                    // still show the set-user-ID bit. A negative offset
                    // drops the attributes only, not cached pages.
                    if let Some(notifier) = self.notifier.get() {
                        let _ = notifier.inval_inode(ino, -1, 0);
                    }
                }
                reply.written(n as u32)
            }
            Err(e) => reply.error(err(e)),
        }
    }

    /// Every write is applied and journaled before it is answered, so a
    /// close has nothing to flush; opens say FOPEN_NOFLUSH, which saves the
    /// round trip on every close(). Flushes of older handles land here.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lo: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Not in the `if let` itself: its guard would live through the
        // block and take the two locks in the opposite order to `open`.
        let passthrough = self.passthrough_fh.lock().remove(&fh.0);
        if let Some(src) = passthrough {
            let mut backing = self.backing.lock();
            if let Some(entry) = backing.get_mut(&src) {
                entry.1 -= 1;
                if entry.1 == 0 {
                    // Dropping the id closes it in the kernel.
                    backing.remove(&src);
                }
            }
        }
        self.core.release(fh.0);
        reply.ok()
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.core.fsync_then(fh.0, move |r| empty(reply, r));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.core.opendir(self.src(ino)) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = self
            .core
            .readdir(fh.0, offset, &mut |ino, off, kind, name| {
                reply.add(INodeNo(self.map(ino)), off, file_type(kind), name)
            });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.core.release(fh.0);
        reply.ok()
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.core.fsyncdir(fh.0))
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.core.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(err(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.core.setxattr(self.src(ino), name, value, flags))
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.core.getxattr(self.src(ino), name, size as usize) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(err(e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.core.listxattr(self.src(ino), size as usize) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(err(e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.core.removexattr(self.src(ino), name))
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel has checked already.
        reply.ok()
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self
            .core
            .create(self.src(parent), name, mode, umask, flags, caller(req))
        {
            Ok((st, fh, mode)) => reply.created(
                &TTL,
                &self.attr(&st),
                Generation(0),
                FileHandle(fh),
                self.open_flags(mode),
            ),
            Err(e) => reply.error(err(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.core.fallocate(fh.0, offset, length, mode))
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // Terminal probes (TCGETS on every buffered open) land here; a
        // regular file answers ENOTTY, as the native filesystem does.
        reply.error(Errno::ENOTTY)
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.core.lseek(fh.0, offset, whence) {
            Ok(o) => reply.offset(o as i64),
            Err(e) => reply.error(err(e)),
        }
    }
}

/// The FUSE session serving the mount in the background.
///
/// The session is never dropped: its threads and its `/dev/fuse` descriptor
/// end with the process. When fusermount3 made the mount (the daemon is not
/// root), fuser unmounts by the mountpoint's *path* on drop, and after the
/// lazy detach at shutdown that path leads to whatever lies beneath, the
/// read-only guard (`crate::guard`), which must stay.
pub struct Served {
    _session: std::mem::ManuallyDrop<fuser::BackgroundSession>,
    ended: crossbeam_channel::Receiver<()>,
}

impl Served {
    /// Waits until the kernel has ended the session (the detached mount's
    /// last open file closed) or the deadline passes; true if it ended.
    pub fn wait_ended(&self, deadline: std::time::Instant) -> bool {
        // A sender dropped without a word (the session thread unwound) is
        // an end too.
        !matches!(
            self.ended.recv_deadline(deadline),
            Err(crossbeam_channel::RecvTimeoutError::Timeout)
        )
    }
}

/// Mounts `/dev/fuse` at `mountpoint` with mount(2), as fuser would but
/// without opening or stating the mountpoint first: the start mounts over a
/// dead mount an earlier run left there (`crate::guard`), whose root
/// answers every open and stat with ENOTCONN, while mount(2) only walks to
/// it. The root's mode given here is replaced by the daemon's answer to the
/// kernel's first getattr, before any permission check. None when mount(2)
/// is not permitted (the daemon is not root): fusermount3 then mounts.
fn mount_directly(mountpoint: &Path, dev: bool) -> std::io::Result<Option<std::os::fd::OwnedFd>> {
    use rustix::fs::{Mode, OFlags};
    use rustix::mount::MountFlags;
    use std::os::fd::AsRawFd;
    let fd = rustix::fs::open("/dev/fuse", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())?;
    let data = std::ffi::CString::new(format!(
        "fd={},rootmode=40000,user_id={},group_id={},default_permissions,allow_other",
        fd.as_raw_fd(),
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw(),
    ))
    .expect("no NUL in mount options");
    let mut flags = MountFlags::NOSUID;
    if !dev {
        flags |= MountFlags::NODEV;
    }
    match rustix::mount::mount("rewind", mountpoint, "fuse", flags, data.as_c_str()) {
        Ok(()) => Ok(Some(fd)),
        Err(rustix::io::Errno::PERM) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Mounts `fs` at `mountpoint` with the contract's options and serves it on
/// `threads` worker threads in the background.
pub fn mount(mut fs: FuseFs, mountpoint: &Path, threads: usize) -> std::io::Result<Served> {
    let (tx, ended) = crossbeam_channel::bounded(1);
    fs.ended = Some(tx);
    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::FSName("rewind".into()),
        MountOption::Subtype("rewind".into()),
        MountOption::DefaultPermissions,
    ];
    // fuser mounts nodev unless told otherwise; the mount follows the
    // source's own mount instead, so a device node made through it (or
    // restored into the source) opens where it would natively. The daemon
    // creates nothing the source could not hold already.
    let dev = fs
        .core
        .statfs()
        .is_ok_and(|s| !s.f_flag.contains(rustix::fs::StatVfsMountFlags::NODEV));
    if dev {
        cfg.mount_options.push(MountOption::Dev);
    }
    cfg.acl = SessionACL::All;
    cfg.n_threads = Some(threads.max(1));
    cfg.clone_fd = true;
    let notifier = fs.notifier.clone();
    let session = match mount_directly(mountpoint, dev)? {
        // The kernel sends its INIT once mounted; the session reads it.
        Some(fd) => fuser::Session::from_fd(fs, fd, SessionACL::All, cfg)?.spawn()?,
        None => fuser::spawn_mount(fs, mountpoint, &cfg)?,
    };
    let _ = notifier.set(session.notifier());
    Ok(Served {
        _session: std::mem::ManuallyDrop::new(session),
        ended,
    })
}

/// How long the kernel may cache what the view answers: the view never
/// changes while it is mounted.
const VIEW_TTL: Duration = Duration::from_secs(3600);

/// The read-only adapter: serves a `ReadOnlyTree` (the mount view of one
/// instant) and refuses every change with EROFS. The mount is read-only
/// too, so the kernel refuses most changes before they get here.
pub struct ViewFs {
    tree: Arc<dyn ReadOnlyTree>,
    root: Ino,
    /// Open directories' listings, so that readdir offsets stay stable.
    dirs: Mutex<HashMap<u64, Arc<Listing>>>,
    next_fh: std::sync::atomic::AtomicU64,
    /// Told when the session ends (`destroy`), for `ViewSession::ended`.
    ended: Option<crossbeam_channel::Sender<()>>,
}

impl ViewFs {
    pub fn new(tree: Arc<dyn ReadOnlyTree>) -> ViewFs {
        let root = tree.root();
        ViewFs {
            tree,
            root,
            dirs: Mutex::new(HashMap::new()),
            next_fh: std::sync::atomic::AtomicU64::new(1),
            ended: None,
        }
    }

    /// The root swap of `FuseFs::map`.
    fn map(&self, ino: u64) -> u64 {
        if ino == 1 {
            self.root
        } else if ino == self.root {
            1
        } else {
            ino
        }
    }

    fn attr(&self, a: &ViewAttr) -> FileAttr {
        let mtime = if a.mtime >= 0 {
            UNIX_EPOCH + Duration::from_nanos(a.mtime as u64)
        } else {
            UNIX_EPOCH - Duration::from_nanos(a.mtime.unsigned_abs())
        };
        FileAttr {
            ino: INodeNo(self.map(a.ino)),
            size: a.size,
            blocks: a.size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: UNIX_EPOCH,
            kind: file_type(Some(a.kind)),
            perm: a.perm as u16,
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            rdev: a.rdev as u32,
            blksize: 4096,
            flags: 0,
        }
    }

    fn xattr(reply: ReplyXattr, size: u32, r: Result<Vec<u8>, rustix::io::Errno>) {
        match r {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(err(e)),
        }
    }
}

impl Filesystem for ViewFs {
    /// The session ended: the view was unmounted.
    fn destroy(&mut self) {
        if let Some(tx) = self.ended.take() {
            let _ = tx.send(());
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        use std::os::unix::ffi::OsStrExt;
        match self.tree.lookup(self.map(parent.0), name.as_bytes()) {
            Ok(a) => reply.entry(&VIEW_TTL, &self.attr(&a), Generation(0)),
            Err(rustix::io::Errno::NOENT) => reply.entry(&VIEW_TTL, &NO_ENTRY, Generation(0)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.tree.getattr(self.map(ino.0)) {
            Ok(a) => reply.attr(&VIEW_TTL, &self.attr(&a)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.tree.readlink(self.map(ino.0)) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(err(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
            return reply.error(Errno::EROFS);
        }
        match self.tree.getattr(self.map(ino.0)) {
            // The contents never change: the page cache may keep them.
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(err(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lo: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.tree.read(self.map(ino.0), offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(err(e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.tree.readdir(self.map(ino.0)) {
            Ok(list) => {
                let fh = self
                    .next_fh
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.dirs.lock().insert(fh, Arc::new(list));
                reply.opened(FileHandle(fh), FopenFlags::empty())
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(list) = self.dirs.lock().get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        // Offsets 1 and 2 are "." and ".."; entry i is offset i + 3.
        let dots = [
            (ino.0, FileType::Directory, "."),
            (ino.0, FileType::Directory, ".."),
        ];
        for (i, (n, kind, name)) in dots.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*n), (i + 1) as u64, *kind, name) {
                return reply.ok();
            }
        }
        use std::os::unix::ffi::OsStrExt;
        for (i, (name, child, kind)) in list
            .iter()
            .enumerate()
            .skip((offset as usize).saturating_sub(2))
        {
            let full = reply.add(
                INodeNo(self.map(*child)),
                (i + 3) as u64,
                file_type(Some(*kind)),
                OsStr::from_bytes(name),
            );
            if full {
                break;
            }
        }
        reply.ok()
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs.lock().remove(&fh.0);
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (bytes, files) = self.tree.totals();
        reply.statfs(bytes.div_ceil(4096), 0, 0, files, 0, 4096, 255, 4096)
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        use std::os::unix::ffi::OsStrExt;
        let r = self.tree.getxattr(self.map(ino.0), name.as_bytes());
        ViewFs::xattr(reply, size, r.map(|v| v.to_vec()))
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        ViewFs::xattr(reply, size, self.tree.listxattr(self.map(ino.0)))
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel has checked already.
        reply.ok()
    }

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS)
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS)
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS)
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS)
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS)
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS)
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS)
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS)
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _wf: WriteFlags,
        _flags: OpenFlags,
        _lo: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS)
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS)
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS)
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS)
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS)
    }
}

/// A mounted view. Dropping it unmounts the view.
pub struct ViewSession {
    _session: fuser::BackgroundSession,
    ended: crossbeam_channel::Receiver<()>,
}

impl ViewSession {
    /// Told once the kernel has ended the session (someone unmounted it).
    pub fn ended(&self) -> &crossbeam_channel::Receiver<()> {
        &self.ended
    }
}

/// Mounts the read-only view `fs` at `mountpoint` (read-only, allow_other,
/// default_permissions, device nodes openable as in a restore) and serves
/// it on `threads` worker threads until the returned session is dropped.
pub fn mount_view(
    mut fs: ViewFs,
    mountpoint: &Path,
    threads: usize,
) -> std::io::Result<ViewSession> {
    let (tx, ended) = crossbeam_channel::bounded(1);
    fs.ended = Some(tx);
    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::FSName("rewind-view".into()),
        MountOption::Subtype("rewind".into()),
        MountOption::DefaultPermissions,
        MountOption::RO,
        MountOption::Dev,
    ];
    cfg.acl = SessionACL::All;
    cfg.n_threads = Some(threads.max(1));
    Ok(ViewSession {
        _session: fuser::spawn_mount(fs, mountpoint, &cfg)?,
        ended,
    })
}
