//! Base snapshots: what the volume already holds, as content-addressed
//! chunks plus a manifest of objects (by file identity) and links (parent,
//! name, identity). It owns the chunk and manifest formats and the walk
//! that takes a base while the application keeps writing. The walk is
//! fuzzy: records with seq > `start_seq` are absolute effects on file
//! identities and replay over it converges, so a base is usable only for
//! times after `completed_ns`. Entries that a rename or link moves during
//! the walk are reported by the filesystem (`BaseWatch`) and captured at
//! the end, so nothing is missed. A periodic walk is incremental: a regular
//! file that no record changed since the previous base's start_seq, and
//! whose size and mtime still match, keeps the previous base's object
//! (`reuse_decision`) and is not read. It must not touch FUSE or journal
//! files.
//!
//! Chunk format (version 1): `magic "RWCHK001" | version:u16 | raw_len:u32 |
//! lz4 blocks (codec) | blake3 trailer`; key `chunk/<hash of raw, hex>`,
//! where the hash is blake3, keyed in an encrypted volume
//! (`crypt::ChunkNaming`).
//!
//! Manifest format (version 2): `magic "RWBASE01" | version:u16 | lineage:u64
//! | start_seq:u64 | started_ns:i64 | completed_ns:i64 | kind:u8 | root:u64 |
//! raw_len:u64 | lz4 blocks of body | blake3 trailer`, where
//! `body := n_objects:u64 object* n_links:u64 (parent:u64 name:bytes ino:u64)*`
//! and `object := ino:u64 kind:u8 mode:u32 uid:u32 gid:u32 size:u64 mtime:i64
//! rdev:u64 target:bytes n_xattrs:u32 (name:bytes value:bytes)* n_extents:u32
//! (offset:u64 len:u32 hash:32)*`.
//! Key: `base/<completed_ns:020>-<lineage:016x>-<start_seq:020>-<kind>.rwb`.
//! An object's kind is a record `Kind` (record.rs). Manifest version 2 has
//! the layout of version 1 and adds the kinds socket, character device and
//! block device (5-7), whose `rdev` is the device number; version 1
//! manifests (which never hold them) are decoded forever.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, OsStr};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;

use bytes::{BufMut, Bytes};
use parking_lot::Mutex;
use rustix::fs::{self as rfs, Mode, OFlags};

use crate::clock::{mtime_of, Nanos};
use crate::codec::{put_bytes, put_lz4_blocks, read_lz4_blocks, seal, unseal, DecodeError, Reader};
use crate::crypt::ChunkNaming;
use crate::layout::HIDDEN;
use crate::record::{Ino, Kind, Seq};
use crate::store::{Store, StoreError};

pub const CHUNK_MAGIC: &[u8; 8] = b"RWCHK001";
pub const MANIFEST_MAGIC: &[u8; 8] = b"RWBASE01";
/// The chunk format's version.
pub const VERSION: u16 = 1;
/// The manifest version this build writes: 2 since objects may be sockets
/// and device nodes.
pub const MANIFEST_VERSION: u16 = 2;
/// The oldest manifest version this build reads.
pub const MANIFEST_MIN_VERSION: u16 = 1;
/// Files are cut into chunks at fixed 1 MiB offsets: databases rewrite
/// pages in place, so fixed offsets dedupe unchanged regions best.
pub const CHUNK_SIZE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{what} is damaged: {source}")]
    Damaged {
        what: String,
        #[source]
        source: DecodeError,
    },
    #[error("{0}")]
    Inconsistent(String),
    #[error("base walk failed on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseKind {
    /// The first base of a lineage.
    Initial,
    /// Taken after an unclean stop: times between its start and completion
    /// are a gap, since the source may hold a change no record describes.
    Repair,
    /// Taken on a schedule to bound replay time.
    Periodic,
}

impl BaseKind {
    fn tag(self) -> &'static str {
        match self {
            BaseKind::Initial => "initial",
            BaseKind::Repair => "repair",
            BaseKind::Periodic => "periodic",
        }
    }
    fn from_tag(s: &str) -> Option<Self> {
        Some(match s {
            "initial" => BaseKind::Initial,
            "repair" => BaseKind::Repair,
            "periodic" => BaseKind::Periodic,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseMeta {
    pub lineage: u64,
    pub start_seq: Seq,
    pub completed_ns: Nanos,
    pub kind: BaseKind,
}

impl BaseMeta {
    pub fn key(&self) -> String {
        format!(
            "base/{:020}-{:016x}-{:020}-{}.rwb",
            self.completed_ns.max(0),
            self.lineage,
            self.start_seq,
            self.kind.tag()
        )
    }
    pub fn from_key(key: &str) -> Option<BaseMeta> {
        let name = key.strip_prefix("base/")?.strip_suffix(".rwb")?;
        let p: Vec<&str> = name.split('-').collect();
        if p.len() != 4 {
            return None;
        }
        Some(BaseMeta {
            completed_ns: p[0].parse().ok()?,
            lineage: u64::from_str_radix(p[1], 16).ok()?,
            start_seq: p[2].parse().ok()?,
            kind: BaseKind::from_tag(p[3])?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u32,
    pub hash: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    pub ino: Ino,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: Nanos,
    pub rdev: u64,
    pub target: Bytes,
    pub xattrs: Vec<(Bytes, Bytes)>,
    pub extents: Vec<Extent>,
}

impl Object {
    /// An empty directory owned by root, mode 0755, mtime 0: the root of
    /// the manifests that tests and benches build by hand.
    pub fn dir(ino: Ino) -> Object {
        Object {
            ino,
            kind: Kind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: 0,
            rdev: 0,
            target: Bytes::new(),
            xattrs: vec![],
            extents: vec![],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub parent: Ino,
    pub name: Bytes,
    pub ino: Ino,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub lineage: u64,
    pub start_seq: Seq,
    pub started_ns: Nanos,
    pub completed_ns: Nanos,
    pub kind: BaseKind,
    pub root: Ino,
    pub objects: Vec<Object>,
    pub links: Vec<Link>,
}

impl Manifest {
    pub fn meta(&self) -> BaseMeta {
        BaseMeta {
            lineage: self.lineage,
            start_seq: self.start_seq,
            completed_ns: self.completed_ns,
            kind: self.kind,
        }
    }
}

pub fn chunk_key(hash: &[u8; 32]) -> String {
    let mut s = String::with_capacity(70);
    s.push_str("chunk/");
    for b in hash {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

pub fn encode_chunk(raw: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(raw.len() / 2 + 64);
    out.extend_from_slice(CHUNK_MAGIC);
    out.put_u16_le(VERSION);
    out.put_u32_le(raw.len() as u32);
    put_lz4_blocks(&mut out, raw);
    seal(&mut out);
    Bytes::from(out)
}

/// Decodes a chunk and checks that its content hashes to `hash` (its key)
/// as the volume names chunks (`naming`, from `Store::chunk_naming`).
pub fn decode_chunk(
    data: &[u8],
    hash: &[u8; 32],
    naming: &ChunkNaming,
) -> Result<Vec<u8>, DecodeError> {
    let body = unseal(data)?;
    let mut r = Reader::new(body);
    if r.take(8)? != CHUNK_MAGIC {
        return Err(r.err("not a Rewind chunk (bad magic)"));
    }
    let v = r.u16()?;
    if v != VERSION {
        return Err(r.err(format!("chunk format version {v} is not supported")));
    }
    let raw_len = r.u32()? as usize;
    if raw_len as u64 > CHUNK_SIZE {
        return Err(r.err("chunk larger than the chunk size"));
    }
    let raw = read_lz4_blocks(&mut r, raw_len)?;
    if &naming.hash(&raw) != hash {
        return Err(DecodeError {
            at: 0,
            what: "content does not match the chunk's hash".into(),
        });
    }
    Ok(raw)
}

pub fn encode_manifest(m: &Manifest) -> Bytes {
    let mut body = Vec::new();
    body.put_u64_le(m.objects.len() as u64);
    for o in &m.objects {
        put_object(&mut body, o);
    }
    body.put_u64_le(m.links.len() as u64);
    for l in &m.links {
        body.put_u64_le(l.parent);
        put_bytes(&mut body, &l.name);
        body.put_u64_le(l.ino);
    }
    let mut out = Vec::with_capacity(body.len() / 2 + 128);
    out.extend_from_slice(MANIFEST_MAGIC);
    out.put_u16_le(MANIFEST_VERSION);
    out.put_u64_le(m.lineage);
    out.put_u64_le(m.start_seq);
    out.put_i64_le(m.started_ns);
    out.put_i64_le(m.completed_ns);
    out.put_u8(match m.kind {
        BaseKind::Initial => 1,
        BaseKind::Repair => 2,
        BaseKind::Periodic => 3,
    });
    out.put_u64_le(m.root);
    out.put_u64_le(body.len() as u64);
    put_lz4_blocks(&mut out, &body);
    seal(&mut out);
    Bytes::from(out)
}

/// Appends one `object` of the manifest body (layout in the module docs).
/// The local catalog (`crate::catalog`) stores objects in this layout too.
pub(crate) fn put_object(body: &mut Vec<u8>, o: &Object) {
    body.put_u64_le(o.ino);
    body.put_u8(o.kind as u8);
    body.put_u32_le(o.mode);
    body.put_u32_le(o.uid);
    body.put_u32_le(o.gid);
    body.put_u64_le(o.size);
    body.put_i64_le(o.mtime);
    body.put_u64_le(o.rdev);
    put_bytes(body, &o.target);
    body.put_u32_le(o.xattrs.len() as u32);
    for (k, v) in &o.xattrs {
        put_bytes(body, k);
        put_bytes(body, v);
    }
    body.put_u32_le(o.extents.len() as u32);
    for e in &o.extents {
        body.put_u64_le(e.offset);
        body.put_u32_le(e.len);
        body.extend_from_slice(&e.hash);
    }
}

/// Reads one `object` written by [`put_object`]; `v` is the manifest
/// version whose file kinds are allowed.
pub(crate) fn read_object(r: &mut Reader<'_>, v: u16) -> Result<Object, DecodeError> {
    let ino = r.u64()?;
    let k = r.u8()?;
    let kind = Kind::from_u8(k)
        .filter(|k| k.in_version(v))
        .ok_or_else(|| r.err(format!("unknown file kind {k} for manifest version {v}")))?;
    let mode = r.u32()?;
    let uid = r.u32()?;
    let gid = r.u32()?;
    let size = r.u64()?;
    let mtime = r.i64()?;
    let rdev = r.u64()?;
    let target = r.owned()?;
    let nx = r.u32()?;
    let mut xattrs = Vec::new();
    for _ in 0..nx {
        xattrs.push((r.owned()?, r.owned()?));
    }
    let ne = r.u32()?;
    let mut extents = Vec::new();
    for _ in 0..ne {
        extents.push(Extent {
            offset: r.u64()?,
            len: r.u32()?,
            hash: r.hash()?,
        });
    }
    Ok(Object {
        ino,
        kind,
        mode,
        uid,
        gid,
        size,
        mtime,
        rdev,
        target,
        xattrs,
        extents,
    })
}

pub fn decode_manifest(data: &[u8]) -> Result<Manifest, DecodeError> {
    let body = unseal(data)?;
    let mut r = Reader::new(body);
    if r.take(8)? != MANIFEST_MAGIC {
        return Err(r.err("not a Rewind base manifest (bad magic)"));
    }
    let v = r.u16()?;
    if !(MANIFEST_MIN_VERSION..=MANIFEST_VERSION).contains(&v) {
        return Err(r.err(format!(
            "manifest format version {v} is not supported (this build reads {MANIFEST_MIN_VERSION} to {MANIFEST_VERSION})"
        )));
    }
    let lineage = r.u64()?;
    let start_seq = r.u64()?;
    let started_ns = r.i64()?;
    let completed_ns = r.i64()?;
    let kind = match r.u8()? {
        1 => BaseKind::Initial,
        2 => BaseKind::Repair,
        3 => BaseKind::Periodic,
        k => return Err(r.err(format!("unknown base kind {k}"))),
    };
    let root = r.u64()?;
    let raw_len = r.u64()? as usize;
    let raw = read_lz4_blocks(&mut r, raw_len)?;
    let mut r = Reader::new(&raw);
    let n = r.u64()?;
    let mut objects = Vec::new();
    for _ in 0..n {
        objects.push(read_object(&mut r, v)?);
    }
    let nl = r.u64()?;
    let mut links = Vec::new();
    for _ in 0..nl {
        links.push(Link {
            parent: r.u64()?,
            name: r.owned()?,
            ino: r.u64()?,
        });
    }
    r.end()?;
    Ok(Manifest {
        lineage,
        start_seq,
        started_ns,
        completed_ns,
        kind,
        root,
        objects,
        links,
    })
}

/// Entries the filesystem moved (rename, link) while a base walk runs: the
/// walk may have passed their new place already, so it captures them at the
/// end from these handles.
#[derive(Default)]
pub struct BaseWatch {
    active: std::sync::atomic::AtomicBool,
    moved: Mutex<Vec<OwnedFd>>,
}

impl BaseWatch {
    pub fn is_active(&self) -> bool {
        self.active.load(std::sync::atomic::Ordering::Acquire)
    }
    /// Called by the filesystem, under its namespace lock, with an O_PATH
    /// handle of the entry it just moved or linked.
    pub fn moved(&self, fd: OwnedFd) {
        if self.is_active() {
            self.moved.lock().push(fd);
        }
    }
}

impl crate::fs::MoveWatch for BaseWatch {
    fn is_active(&self) -> bool {
        BaseWatch::is_active(self)
    }
    fn moved(&self, fd: OwnedFd) {
        BaseWatch::moved(self, fd)
    }
}

/// Progress of a walk, for logs and metrics.
#[derive(Debug, Default, Clone)]
pub struct BaseStats {
    /// Regular files read from the source.
    pub files: u64,
    /// Regular files whose previous object was reused without reading.
    pub files_reused: u64,
    /// Bytes read from the source.
    pub bytes: u64,
    pub chunks_uploaded: u64,
    pub chunks_reused: u64,
    /// `exists` requests made for chunks not yet confirmed.
    pub chunks_checked: u64,
    /// Chunks counted as stored because the store still holds the previous
    /// base's manifest (`trust_chunks_of`), with one request.
    pub chunks_trusted: u64,
}

struct Walker<'a> {
    store: &'a dyn Store,
    previous: Option<&'a Previous>,
    touched: &'a dyn Fn(Ino) -> bool,
    seen: HashSet<Ino>,
    known_chunks: &'a StoredChunks,
    naming: ChunkNaming,
    objects: Vec<Object>,
    links: Vec<Link>,
    stats: BaseStats,
    buf: Vec<u8>,
}

fn io_err(path: &str, e: impl Into<std::io::Error>) -> BaseError {
    BaseError::Io {
        path: path.to_string(),
        source: e.into(),
    }
}

fn xattrs_of(fd: &OwnedFd, path_for_symlink: Option<&CStr>) -> Vec<(Bytes, Bytes)> {
    // Symlinks cannot be opened for reading; their (rare) xattrs are read
    // through the path without following.
    let mut names = vec![0u8; 4096];
    let n = match path_for_symlink {
        Some(p) => rfs::llistxattr(p, &mut names),
        None => rfs::flistxattr(fd, &mut names),
    };
    let Ok(n) = n else { return Vec::new() };
    let mut out = Vec::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let Ok(cname) = CString::new(name) else {
            continue;
        };
        let mut val = vec![0u8; 65536];
        let r = match path_for_symlink {
            Some(p) => rfs::lgetxattr(p, cname.as_c_str(), &mut val),
            None => rfs::fgetxattr(fd, cname.as_c_str(), &mut val),
        };
        if let Ok(len) = r {
            out.push((
                Bytes::copy_from_slice(name),
                Bytes::copy_from_slice(&val[..len]),
            ));
        }
    }
    out.sort();
    out
}

impl<'a> Walker<'a> {
    fn capture_file(
        &mut self,
        fd: &OwnedFd,
        st: &rfs::Stat,
        what: &str,
    ) -> Result<Vec<Extent>, BaseError> {
        let mut extents = Vec::new();
        let size = st.st_size as u64;
        let mut pos = 0u64;
        while pos < size {
            // Sparse files stay sparse: only data regions are chunked.
            let data = match rfs::seek(fd, rfs::SeekFrom::Data(pos)) {
                Ok(d) => d,
                Err(rustix::io::Errno::NXIO) => break,
                Err(e) => return Err(io_err(what, e)),
            };
            let hole = rfs::seek(fd, rfs::SeekFrom::Hole(data)).map_err(|e| io_err(what, e))?;
            let mut off = data - data % CHUNK_SIZE;
            off = off.max(data);
            while off < hole {
                let end = ((off / CHUNK_SIZE + 1) * CHUNK_SIZE).min(hole);
                let len = (end - off) as usize;
                self.buf.resize(len, 0);
                let n = read_full_at(fd, &mut self.buf[..len], off).map_err(|e| io_err(what, e))?;
                if n == 0 {
                    break;
                }
                let raw = &self.buf[..n];
                let hash = self.naming.hash(raw);
                self.stats.bytes += n as u64;
                if !self.known_chunks.contains(&hash) {
                    self.stats.chunks_checked += 1;
                }
                if ensure_chunk(self.store, self.known_chunks, &hash, raw)? {
                    self.stats.chunks_uploaded += 1;
                } else {
                    self.stats.chunks_reused += 1;
                }
                extents.push(Extent {
                    offset: off,
                    len: n as u32,
                    hash,
                });
                off += n as u64;
            }
            pos = hole;
        }
        Ok(extents)
    }

    /// Captures the object `name` in directory `dir` and, for a directory,
    /// everything below it.
    fn visit(&mut self, dir: &OwnedFd, name: &CStr, path: &str) -> Result<Option<Ino>, BaseError> {
        let st = match rfs::statat(dir, name, rfs::AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            // Gone since readdir: its unlink is a record replayed on top.
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(io_err(path, e)),
        };
        let ino = st.st_ino;
        let Some(kind) = Kind::from_mode(st.st_mode) else {
            tracing::warn!(
                path,
                mode = st.st_mode,
                "skipping an entry of unknown file type"
            );
            return Ok(None);
        };
        if !self.seen.insert(ino) {
            return Ok(Some(ino));
        }
        let mut obj = Object {
            ino,
            kind,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            size: st.st_size as u64,
            mtime: mtime_of(&st),
            rdev: st.st_rdev,
            target: Bytes::new(),
            xattrs: Vec::new(),
            extents: Vec::new(),
        };
        match kind {
            Kind::File if self.reuse_previous(&mut obj) => {}
            Kind::File => {
                let fd = match rfs::openat(
                    dir,
                    name,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOATIME,
                    Mode::empty(),
                )
                .or_else(|_| {
                    rfs::openat(
                        dir,
                        name,
                        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                }) {
                    Ok(fd) => fd,
                    Err(rustix::io::Errno::NOENT) => return Ok(None),
                    Err(e) => return Err(io_err(path, e)),
                };
                let st = rfs::fstat(&fd).map_err(|e| io_err(path, e))?;
                obj.size = st.st_size as u64;
                obj.mtime = mtime_of(&st);
                obj.xattrs = xattrs_of(&fd, None);
                obj.extents = self.capture_file(&fd, &st, path)?;
                self.stats.files += 1;
            }
            Kind::Symlink => {
                obj.target = Bytes::from(
                    rfs::readlinkat(dir, name, Vec::new())
                        .map_err(|e| io_err(path, e))?
                        .into_bytes(),
                );
            }
            // Special files hold no data: their mode, owner, device
            // number (`rdev`, from the stat above) and xattrs are all.
            Kind::Fifo | Kind::Socket | Kind::CharDev | Kind::BlockDev => {
                let fd = rfs::openat(
                    dir,
                    name,
                    OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| io_err(path, e))?;
                let p = CString::new(format!(
                    "/proc/self/fd/{}",
                    std::os::fd::AsRawFd::as_raw_fd(&fd)
                ))
                .unwrap();
                obj.xattrs = xattrs_of(&fd, Some(&p));
            }
            Kind::Dir => {
                let fd = match rfs::openat(
                    dir,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                ) {
                    Ok(fd) => fd,
                    Err(rustix::io::Errno::NOENT) => return Ok(None),
                    Err(e) => return Err(io_err(path, e)),
                };
                obj.xattrs = xattrs_of(&fd, None);
                self.objects.push(obj);
                self.walk_dir(&fd, ino, path, false)?;
                return Ok(Some(ino));
            }
        }
        self.objects.push(obj);
        Ok(Some(ino))
    }

    fn walk_dir(
        &mut self,
        fd: &OwnedFd,
        ino: Ino,
        path: &str,
        is_root: bool,
    ) -> Result<(), BaseError> {
        let mut names = Vec::new();
        let dup = rfs::openat(
            fd,
            c".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_err(path, e))?;
        let mut dir = rfs::Dir::read_from(&dup).map_err(|e| io_err(path, e))?;
        while let Some(ent) = dir.next() {
            let ent = ent.map_err(|e| io_err(path, e))?;
            let n = ent.file_name();
            if n == c"." || n == c".." || (is_root && n.to_bytes() == HIDDEN.as_bytes()) {
                continue;
            }
            names.push(n.to_owned());
        }
        for n in names {
            let child_path = format!("{path}/{}", String::from_utf8_lossy(n.to_bytes()));
            if let Some(child) = self.visit(fd, &n, &child_path)? {
                self.links.push(Link {
                    parent: ino,
                    name: Bytes::copy_from_slice(n.to_bytes()),
                    ino: child,
                });
            }
        }
        Ok(())
    }
}

/// Makes sure the chunk `hash` (content `raw`) is in the store before a
/// manifest may name it, and returns whether it was uploaded. The chunk is
/// recorded in `stored` only once the store said so in this run: a put
/// that failed leaves it unrecorded, so the next walk checks it again
/// instead of trusting a put that never landed. Two walkers may both put
/// the same chunk while neither has recorded it yet; that costs one
/// request, nothing else, since chunks are immutable and named by their
/// content. A put that failed after its bytes reached the store is found
/// by the next `exists` (or put again, with the same bytes).
fn ensure_chunk(
    store: &dyn Store,
    stored: &StoredChunks,
    hash: &[u8; 32],
    raw: &[u8],
) -> Result<bool, StoreError> {
    if stored.contains(hash) {
        return Ok(false);
    }
    let key = chunk_key(hash);
    let uploaded = if store.exists(&key)? {
        false
    } else {
        store.put(&key, encode_chunk(raw))?;
        true
    };
    stored.confirm(*hash);
    Ok(uploaded)
}

fn read_full_at(fd: &OwnedFd, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match rustix::io::pread(fd, &mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(done)
}

/// Inputs of one base walk.
pub struct BaseRequest<'a> {
    pub source: &'a OwnedFd,
    pub store: &'a dyn Store,
    pub lineage: u64,
    pub start_seq: Seq,
    pub started_ns: Nanos,
    pub kind: BaseKind,
    pub watch: &'a BaseWatch,
    /// Handles of every inode the filesystem knows and the walk has not
    /// seen: anything the application touched during the walk, wherever it
    /// is now (moved, or open but unlinked).
    pub unseen: &'a dyn Fn(&HashSet<Ino>) -> Vec<OwnedFd>,
    /// Chunks this run has confirmed stored; the walk adds each chunk it
    /// puts or finds in the store, and nothing else.
    pub known_chunks: &'a StoredChunks,
    /// The previous base of this lineage, for an incremental walk; `None`
    /// reads every file.
    pub previous: Option<&'a Previous>,
    /// Whether an object may have changed since the previous base's
    /// start_seq, asked when the walk reaches it (see `fs::touched`).
    pub touched: &'a dyn Fn(Ino) -> bool,
}

/// Walks the source and uploads its chunks. The manifest is returned, not
/// stored: the caller stamps `completed_ns` from the record clock after the
/// walk (so every record before it is covered) and stores it, once
/// [`unconfirmed_chunks`] finds every chunk it names confirmed stored.
/// The caller activates `req.watch` before taking `start_seq` (so no move
/// after the start goes unwatched) and deactivates it once the completion
/// time is stamped.
pub fn walk(req: &BaseRequest<'_>) -> Result<(Manifest, BaseStats), BaseError> {
    walk_inner(req)
}

impl BaseWatch {
    pub fn activate(&self) {
        self.moved.lock().clear();
        self.active
            .store(true, std::sync::atomic::Ordering::Release);
    }
    pub fn deactivate(&self) {
        self.active
            .store(false, std::sync::atomic::Ordering::Release);
        self.moved.lock().clear();
    }
}

fn walk_inner(req: &BaseRequest<'_>) -> Result<(Manifest, BaseStats), BaseError> {
    let root_st = rfs::fstat(req.source).map_err(|e| io_err("source", e))?;
    let mut w = Walker {
        store: req.store,
        previous: req.previous,
        touched: req.touched,
        seen: HashSet::new(),
        known_chunks: req.known_chunks,
        naming: req.store.chunk_naming()?,
        objects: Vec::new(),
        links: Vec::new(),
        stats: BaseStats::default(),
        buf: Vec::new(),
    };
    let root = root_st.st_ino;
    w.seen.insert(root);
    w.objects.push(Object {
        ino: root,
        kind: Kind::Dir,
        mode: root_st.st_mode & 0o7777,
        uid: root_st.st_uid,
        gid: root_st.st_gid,
        size: 0,
        mtime: 0,
        rdev: 0,
        target: Bytes::new(),
        xattrs: xattrs_of(req.source, None),
        extents: Vec::new(),
    });
    w.walk_dir(req.source, root, "", true)?;
    // Capture what moved behind the walk. Handles are O_PATH: reopen each
    // through /proc so the normal capture code applies.
    loop {
        let mut moved: Vec<OwnedFd> = std::mem::take(&mut *req.watch.moved.lock());
        moved.extend((req.unseen)(&w.seen));
        if moved.is_empty() {
            break;
        }
        let proc = rfs::open(
            "/proc/self/fd",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_err("/proc/self/fd", e))?;
        for fd in moved {
            let st = match rfs::fstat(&fd) {
                Ok(st) => st,
                Err(_) => continue,
            };
            // Unlinked files are captured too: records may still write to
            // them through a descriptor the application holds.
            if w.seen.contains(&st.st_ino) {
                continue;
            }
            let name = CString::new(std::os::fd::AsRawFd::as_raw_fd(&fd).to_string()).unwrap();
            // The magic link resolves to the moved inode itself.
            let _ = w.visit_proc(&proc, &name, &fd)?;
        }
    }
    Ok((
        Manifest {
            lineage: req.lineage,
            start_seq: req.start_seq,
            started_ns: req.started_ns,
            completed_ns: 0,
            kind: req.kind,
            root,
            objects: w.objects,
            links: w.links,
        },
        w.stats,
    ))
}

impl Walker<'_> {
    fn visit_proc(
        &mut self,
        proc: &OwnedFd,
        name: &CStr,
        fd: &OwnedFd,
    ) -> Result<Option<Ino>, BaseError> {
        let st = rfs::fstat(fd).map_err(|e| io_err("moved entry", e))?;
        if Kind::from_mode(st.st_mode) == Some(Kind::Dir) {
            // Reopen the directory itself (following the magic link) and
            // walk it; its own link comes from the rename record.
            let d = rfs::openat(
                proc,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| io_err("moved dir", e))?;
            self.seen.insert(st.st_ino);
            self.objects.push(Object {
                ino: st.st_ino,
                kind: Kind::Dir,
                mode: st.st_mode & 0o7777,
                uid: st.st_uid,
                gid: st.st_gid,
                size: 0,
                mtime: 0,
                rdev: 0,
                target: Bytes::new(),
                xattrs: xattrs_of(&d, None),
                extents: Vec::new(),
            });
            self.walk_dir(&d, st.st_ino, "(moved dir)", false)?;
            return Ok(Some(st.st_ino));
        }
        let Some(kind) = Kind::from_mode(st.st_mode) else {
            return Ok(None);
        };
        let mut obj = Object {
            ino: st.st_ino,
            kind,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            size: st.st_size as u64,
            mtime: mtime_of(&st),
            rdev: st.st_rdev,
            target: Bytes::new(),
            xattrs: Vec::new(),
            extents: Vec::new(),
        };
        match kind {
            Kind::File => {
                // The magic link names the inode itself, so following it is
                // safe here.
                let f = rfs::openat(proc, name, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
                    .map_err(|e| io_err("moved file", e))?;
                self.stats.files += 1;
                obj.extents = self.capture_file(&f, &st, "(moved file)")?;
                obj.xattrs = xattrs_of(&f, None);
            }
            Kind::Symlink => {
                obj.target = Bytes::from(
                    rfs::readlinkat(fd, c"", Vec::new())
                        .map_err(|e| io_err("moved symlink", e))?
                        .into_bytes(),
                );
            }
            // Special files: the stat holds everything (xattrs of moved
            // special files are not captured, as before for fifos).
            _ => {}
        }
        self.seen.insert(st.st_ino);
        self.objects.push(obj);
        Ok(Some(st.st_ino))
    }
}

/// Stores the manifest; the base is usable from `completed_ns` on.
pub fn store_manifest(store: &dyn Store, m: &Manifest) -> Result<(), StoreError> {
    store.put(&m.meta().key(), encode_manifest(m))
}

pub fn load_manifest(store: &dyn Store, meta: &BaseMeta) -> Result<Manifest, BaseError> {
    let key = meta.key();
    let data = store.get(&key)?;
    let m = decode_manifest(&data).map_err(|source| BaseError::Damaged {
        what: format!("base manifest {key}"),
        source,
    })?;
    if m.meta() != *meta {
        return Err(BaseError::Inconsistent(format!(
            "base manifest {key} does not match its key"
        )));
    }
    Ok(m)
}

/// Converts a name from a record or manifest into a path component,
/// refusing anything that could leave the directory it is applied in.
pub fn safe_name(name: &[u8]) -> Option<&OsStr> {
    if name.is_empty()
        || name.len() > 255
        || name == b"."
        || name == b".."
        || name.contains(&b'/')
        || name.contains(&0)
    {
        return None;
    }
    Some(OsStr::from_bytes(name))
}

/// The previous base's objects by identity: what an incremental walk may
/// reuse. Kept in memory by the daemon between bases.
pub struct Previous {
    pub meta: BaseMeta,
    objects: HashMap<Ino, Object>,
}

impl Previous {
    pub fn new(m: Manifest) -> Previous {
        let meta = m.meta();
        Previous::from_objects(meta, m.objects)
    }
    /// The base `meta` names, from its objects (the local catalog keeps
    /// them between runs).
    pub(crate) fn from_objects(meta: BaseMeta, objects: Vec<Object>) -> Previous {
        let objects = objects.into_iter().map(|o| (o.ino, o)).collect();
        Previous { meta, objects }
    }
    pub fn get(&self, ino: Ino) -> Option<&Object> {
        self.objects.get(&ino)
    }
    /// Every object, in no particular order.
    pub(crate) fn objects(&self) -> impl Iterator<Item = &Object> {
        self.objects.values()
    }
    pub(crate) fn len(&self) -> usize {
        self.objects.len()
    }
}

/// Confirms, for the base about to be walked, every chunk that `prev`'s
/// manifest names, if the store still holds that manifest; returns how
/// many chunks that confirmed (0 when it does not hold it). One `exists`
/// replaces one per chunk.
///
/// Why this is safe (docs/SEMANTICS.md, "What the catalog may trust"): a
/// prune deletes a chunk only if no manifest in its listing of `base/`
/// names it, and never while an in-flight marker without its manifest
/// exists; a manifest is stored only after every chunk it names was
/// confirmed, itself under an in-flight marker. So while a manifest is in
/// the store, so is every chunk it names. The caller must call this after
/// [`crate::prune::announce_base`] returned: from then on no prune deletes
/// a chunk until this base's manifest, which names the chunks it reuses,
/// is stored. A manifest key is written once and never again once it is
/// deleted, so finding it now means it was never away.
pub(crate) fn trust_chunks_of(
    store: &dyn Store,
    known: &StoredChunks,
    prev: &Previous,
) -> Result<usize, StoreError> {
    if !store.exists(&prev.meta.key())? {
        return Ok(0);
    }
    let mut n = 0;
    for e in prev.objects().flat_map(|o| o.extents.iter()) {
        if !known.contains(&e.hash) {
            known.confirm(e.hash);
            n += 1;
        }
    }
    Ok(n)
}

/// Why a file is read rather than taken from the previous base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadWhy {
    /// The previous base has no such identity.
    New,
    /// A record changed it since the previous base's start_seq.
    Touched,
    /// The previous base knew this identity as another kind of file.
    KindChanged,
    /// Size or mtime differ from the previous object although no record
    /// changed it: changed behind the mount's back.
    Differs,
}

/// Whether a regular file is captured by reusing the previous base's
/// object (extents, chunk hashes, xattrs) or by reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Capture {
    Reuse,
    Read(ReadWhy),
}

/// The reuse rule, kept pure so it can be tested by table. `touched` is
/// whether a record changed the object since the previous base's
/// start_seq; `size` and `mtime` are what the source shows now. A reused
/// object equals the file's state at the previous start_seq, which no
/// record has changed since, so replay from the new base converges.
pub(crate) fn reuse_decision(
    previous: Option<&Object>,
    touched: bool,
    kind: Kind,
    size: u64,
    mtime: Nanos,
) -> Capture {
    let Some(p) = previous else {
        return Capture::Read(ReadWhy::New);
    };
    if touched {
        Capture::Read(ReadWhy::Touched)
    } else if p.kind != kind || kind != Kind::File {
        Capture::Read(ReadWhy::KindChanged)
    } else if p.size != size || p.mtime != mtime {
        Capture::Read(ReadWhy::Differs)
    } else {
        Capture::Reuse
    }
}

impl Walker<'_> {
    /// Takes a regular file's extents and xattrs from the previous base
    /// when `reuse_decision` allows, without opening the file; `obj`
    /// already holds what stat showed (mode and owner are taken from it,
    /// which is free and exact). Returns whether it reused.
    fn reuse_previous(&mut self, obj: &mut Object) -> bool {
        let Some(prev) = self.previous else {
            return false;
        };
        let old = prev.get(obj.ino);
        let touched = (self.touched)(obj.ino);
        if reuse_decision(old, touched, obj.kind, obj.size, obj.mtime) != Capture::Reuse {
            return false;
        }
        let old = old.expect("reuse implies a previous object");
        obj.extents = old.extents.clone();
        obj.xattrs = old.xattrs.clone();
        self.stats.files_reused += 1;
        true
    }
}

#[cfg(test)]
mod reuse_tests {
    use super::*;

    fn file(size: u64, mtime: Nanos) -> Object {
        Object {
            ino: 7,
            kind: Kind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size,
            mtime,
            rdev: 0,
            target: Bytes::new(),
            xattrs: Vec::new(),
            extents: Vec::new(),
        }
    }

    #[test]
    fn reuse_only_untouched_files_that_still_look_the_same() {
        let prev = file(100, 5);
        let mut fifo = file(0, 5);
        fifo.kind = Kind::Fifo;
        use Capture::*;
        use ReadWhy::*;
        #[rustfmt::skip]
        let table: &[(&str, Option<&Object>, bool, Kind, u64, Nanos, Capture)] = &[
            ("unchanged",                      Some(&prev), false, Kind::File, 100, 5, Reuse),
            ("not in the previous base",       None,        false, Kind::File, 100, 5, Read(New)),
            ("a record changed it",            Some(&prev), true,  Kind::File, 100, 5, Read(Touched)),
            ("touched and looks different",    Some(&prev), true,  Kind::File, 1,   6, Read(Touched)),
            ("size differs, behind the mount", Some(&prev), false, Kind::File, 101, 5, Read(Differs)),
            ("mtime differs, behind the mount",Some(&prev), false, Kind::File, 100, 6, Read(Differs)),
            ("number reused by another kind",  Some(&fifo), false, Kind::File, 0,   5, Read(KindChanged)),
            ("not a regular file now",         Some(&prev), false, Kind::Fifo, 100, 5, Read(KindChanged)),
        ];
        for (what, p, touched, kind, size, mtime, want) in table {
            assert_eq!(
                reuse_decision(*p, *touched, *kind, *size, *mtime),
                *want,
                "{what}"
            );
        }
    }
}

/// The chunks confirmed to be in the store for the base being walked: a
/// put of it succeeded, or `exists` found it, during this base, or a
/// manifest that names it was found in the store after the base's
/// in-flight marker ([`trust_chunks_of`]). It is never persisted nor
/// seeded from a listing of chunks, so a chunk an earlier base knew is
/// checked again, not assumed; and nothing is recorded before the store
/// has answered, so a failed put leaves no trace here. A base's manifest
/// may be stored only when every chunk it names is in this set (see
/// [`unconfirmed_chunks`]).
#[derive(Debug, Default)]
pub struct StoredChunks {
    set: Mutex<HashSet<[u8; 32]>>,
}

impl StoredChunks {
    pub fn contains(&self, hash: &[u8; 32]) -> bool {
        self.set.lock().contains(hash)
    }

    /// Forgets every confirmation: once prune may delete, a chunk confirmed
    /// for an earlier base may be gone, so each base checks again what it
    /// names (the in-flight marker protects only what this walk checks), or
    /// trusts a manifest the store still holds ([`trust_chunks_of`]).
    pub fn forget_all(&self) {
        self.set.lock().clear();
    }

    /// Records that the store holds `hash`; call only after the store said so.
    pub fn confirm(&self, hash: [u8; 32]) {
        self.set.lock().insert(hash);
    }

    /// The chunks `m` names that this run has not confirmed stored.
    pub fn unconfirmed(&self, m: &Manifest) -> Vec<[u8; 32]> {
        unconfirmed_chunks(m, &self.set.lock())
    }
}

/// The chunk hashes a manifest names that are not in `stored`, each once,
/// in the manifest's order. Empty means the manifest may be stored: a
/// manifest is the last object of a base to be written, and the restore
/// window opens on it, so it must never name a chunk the store may lack.
pub(crate) fn unconfirmed_chunks(m: &Manifest, stored: &HashSet<[u8; 32]>) -> Vec<[u8; 32]> {
    let mut seen = HashSet::new();
    m.objects
        .iter()
        .flat_map(|o| o.extents.iter())
        .map(|e| e.hash)
        .filter(|h| !stored.contains(h) && seen.insert(*h))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn file(ino: Ino, hashes: &[u8]) -> Object {
        Object {
            ino,
            kind: Kind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: hashes.len() as u64 * CHUNK_SIZE,
            mtime: 0,
            rdev: 0,
            target: Bytes::new(),
            xattrs: Vec::new(),
            extents: hashes
                .iter()
                .enumerate()
                .map(|(i, &h)| Extent {
                    offset: i as u64 * CHUNK_SIZE,
                    len: CHUNK_SIZE as u32,
                    hash: [h; 32],
                })
                .collect(),
        }
    }

    fn manifest(files: &[&[u8]]) -> Manifest {
        let mut objects = vec![Object {
            kind: Kind::Dir,
            ..file(1, &[])
        }];
        objects.extend(files.iter().enumerate().map(|(i, h)| file(i as Ino + 2, h)));
        Manifest {
            lineage: 1,
            start_seq: 0,
            started_ns: 0,
            completed_ns: 1,
            kind: BaseKind::Initial,
            root: 1,
            objects,
            links: Vec::new(),
        }
    }

    #[test]
    fn a_manifest_waits_for_every_chunk_it_names() {
        // (chunks of each file, chunks confirmed stored, expected unconfirmed)
        let cases: &[(&[&[u8]], &[u8], &[u8])] = &[
            // Nothing but directories: nothing to wait for.
            (&[], &[], &[]),
            // Empty and sparse-only files name no chunk.
            (&[&[]], &[], &[]),
            (&[&[1, 2], &[3]], &[1, 2, 3], &[]),
            // Confirmed chunks that no file names do not matter.
            (&[&[1]], &[1, 9], &[]),
            // The chunk whose put failed, between two that landed.
            (&[&[1, 2, 3]], &[1, 3], &[2]),
            // Nothing confirmed yet: all, each once, in manifest order.
            (&[&[3, 1], &[1, 2], &[3]], &[], &[3, 1, 2]),
            // A chunk shared by two files is reported once.
            (&[&[4, 5], &[5, 4]], &[4], &[5]),
        ];
        for (files, stored, want) in cases {
            let m = manifest(files);
            let stored: HashSet<[u8; 32]> = stored.iter().map(|&h| [h; 32]).collect();
            let want: Vec<[u8; 32]> = want.iter().map(|&h| [h; 32]).collect();
            assert_eq!(
                unconfirmed_chunks(&m, &stored),
                want,
                "files {files:?}, stored {stored:?}"
            );
        }
    }

    /// A walk whose chunk put fails, retried, stores every chunk before the
    /// manifest could name it: the bug of issue 12 marked the failed chunk
    /// known and the retry skipped it. Also a put that landed but whose
    /// answer was lost.
    #[test]
    fn a_retried_walk_stores_the_chunk_whose_put_failed() {
        use crate::store::faulty::{Fault, FaultyStore, Op};
        use crate::store::file::FileStore;

        for fault in [Fault::Unreachable, Fault::LandThenFail] {
            let dir = tempfile::tempdir().unwrap();
            let src = dir.path().join("src");
            std::fs::create_dir(&src).unwrap();
            for i in 0..4u8 {
                std::fs::write(src.join(format!("f{i}")), vec![i; 1000 + i as usize]).unwrap();
            }
            let inner: Arc<dyn Store> =
                Arc::new(FileStore::open(dir.path().join("store")).unwrap());
            let store = FaultyStore::new(inner.clone());
            let fd = rfs::open(&src, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
            let watch = BaseWatch::default();
            let known = StoredChunks::default();
            let req = BaseRequest {
                source: &fd,
                store: &store,
                lineage: 1,
                start_seq: 0,
                started_ns: 0,
                kind: BaseKind::Initial,
                watch: &watch,
                unseen: &|_| Vec::new(),
                known_chunks: &known,
                previous: None,
                touched: &|_| false,
            };
            store.fail_next(Op::Put, fault, 1);
            assert!(walk(&req).is_err(), "{fault:?}: the first walk must fail");
            let (m, _) = walk(&req).expect("the retried walk");
            assert!(known.unconfirmed(&m).is_empty(), "{fault:?}");
            let hashes: Vec<_> = m.objects.iter().flat_map(|o| &o.extents).collect();
            assert_eq!(hashes.len(), 4);
            for e in hashes {
                let data = inner
                    .get(&chunk_key(&e.hash))
                    .expect("every named chunk is stored");
                decode_chunk(&data, &e.hash, &ChunkNaming::Plain).unwrap();
            }
        }
    }

    #[test]
    fn only_confirmed_chunks_are_recorded() {
        let s = StoredChunks::default();
        let m = manifest(&[&[7, 8]]);
        assert_eq!(s.unconfirmed(&m), vec![[7; 32], [8; 32]]);
        s.confirm([7; 32]);
        assert_eq!(s.unconfirmed(&m), vec![[8; 32]]);
        assert!(s.contains(&[7; 32]) && !s.contains(&[8; 32]));
    }
}
