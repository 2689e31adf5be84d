//! The mount view: a read-only tree of a volume exactly as it was at one
//! instant, served from the store without a restore. It owns building
//! that tree (the base's manifest and the records up to the instant,
//! replayed through the one replay core into `tree::Contents`), freezing
//! it into per-inode entries, and reading file contents on demand: base
//! chunks are fetched when a read needs them, verified, and kept in a
//! bounded cache (`cache.rs`), with readahead for sequential reads. It
//! must not import fuser (`fs::fuse::ViewFs` adapts it through the
//! `ReadOnlyTree` trait) nor change anything: every mutation is the
//! adapter's EROFS.

mod cache;
pub(crate) mod tree;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use rustix::io::Errno;

use crate::base::load_manifest;
use crate::clock::Nanos;
use crate::progress::{Meter, Unit};
use crate::record::{Ino, Kind, Record};
use crate::replay::{Policy, Replay};
use crate::restore::{replay_records, RestoreError};
use crate::store::Store;
use crate::timeline::Plan;

pub use crate::fs::fuse::ViewSession;
use cache::ChunkCache;
use tree::{Contents, Extents, Source};

/// What a `stat` of an entry of the view shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    /// Permission and set-id bits.
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: Nanos,
    pub nlink: u32,
    pub rdev: u64,
}

/// A directory's entries: name, inode, kind, sorted by name.
pub type Listing = Vec<(Bytes, Ino, Kind)>;

/// The calls a read-only filesystem answers; errors are errnos for the
/// kernel. Inode numbers are the volume's own, the root's included.
pub trait ReadOnlyTree: Send + Sync {
    fn root(&self) -> Ino;
    fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr, Errno>;
    fn getattr(&self, ino: Ino) -> Result<Attr, Errno>;
    fn readlink(&self, ino: Ino) -> Result<Bytes, Errno>;
    /// The entries of a directory, sorted by name, with their inode and kind.
    fn readdir(&self, ino: Ino) -> Result<Listing, Errno>;
    /// Up to `size` bytes of file `ino` from `offset`; short only at the
    /// end of the file. A fetch that fails is EIO, never other bytes.
    fn read(&self, ino: Ino, offset: u64, size: u32) -> Result<Vec<u8>, Errno>;
    fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Bytes, Errno>;
    /// Xattr names, each followed by a NUL, as listxattr(2) returns them.
    fn listxattr(&self, ino: Ino) -> Result<Vec<u8>, Errno>;
    /// Total bytes and inodes of the tree, for statfs.
    fn totals(&self) -> (u64, u64);
}

/// One inode of the frozen tree.
#[derive(Debug)]
struct Entry {
    attr: Attr,
    target: Bytes,
    xattrs: BTreeMap<Bytes, Bytes>,
    /// Directories: their entries, sorted by name.
    children: Listing,
    /// Regular files: their contents.
    extents: Extents,
}

/// A volume at one instant, ready to serve.
pub struct View {
    root: Ino,
    entries: HashMap<Ino, Entry>,
    bytes: u64,
    cache: ChunkCache,
    /// Per file, where its last read ended: a read that starts there is
    /// sequential and triggers readahead.
    last_end: Mutex<HashMap<Ino, u64>>,
}

/// What opening a view found, for the CLI.
#[derive(Debug)]
pub struct Opened {
    pub base_completed_ns: Nanos,
    pub records: u64,
    pub last_record_ns: Option<Nanos>,
    pub files: usize,
}

impl View {
    /// Builds the tree of `plan` from the store: the base's manifest and
    /// the segments and deltas it names (no chunk is fetched), with the
    /// same checks and errors as a restore. `meter` counts the base's
    /// objects, then the segments and deltas, as they are replayed.
    pub fn open(
        store: Arc<dyn Store>,
        plan: &Plan,
        cache_bytes: u64,
        meter: &Meter,
        progress: &mut dyn FnMut(&str),
    ) -> Result<(View, Opened), RestoreError> {
        let manifest = load_manifest(store.as_ref(), &plan.base)?;
        progress(&format!(
            "building the tree from the base ({} objects) and {} segments and deltas",
            manifest.objects.len(),
            plan.pieces.len()
        ));
        let mut replay = Replay::new(Contents::default(), Policy::Exact);
        replay.set_fuzzy_until(manifest.completed_ns);
        replay.set_root(manifest.root);
        meter.begin("base", Unit::Objects, manifest.objects.len() as u64);
        for o in &manifest.objects {
            meter.add(1);
            replay.base_object(o)?;
            if o.kind == Kind::File {
                for e in &o.extents {
                    replay
                        .target
                        .base_chunk(o.ino, e.offset, u64::from(e.len), e.hash);
                }
                replay.base_file_done(o)?;
            }
        }
        replay.base_links(&manifest.links)?;
        let (records, last_record_ns) =
            replay_records(store.as_ref(), plan, meter, &mut |r: &Record| {
                replay
                    .apply(r)
                    .map(drop)
                    .map_err(|e| RestoreError::at_record(r, e))
            })?;
        let naming = store.chunk_naming()?;
        let view = freeze(
            replay,
            plan.at_ns,
            ChunkCache::new(store, naming, cache_bytes),
        );
        let opened = Opened {
            base_completed_ns: manifest.completed_ns,
            records,
            last_record_ns,
            files: view.entries.len(),
        };
        Ok((view, opened))
    }

    fn entry(&self, ino: Ino) -> Result<&Entry, Errno> {
        self.entries.get(&ino).ok_or(Errno::NOENT)
    }

    /// Fetches what `extents` hold in `[offset, end)` into `out`.
    fn fill(&self, extents: &Extents, offset: u64, end: u64, out: &mut [u8]) -> Result<(), Errno> {
        let first = extents
            .range(..=offset)
            .next_back()
            .map(|(o, _)| *o)
            .unwrap_or(offset);
        for (o, e) in extents.range(first..end) {
            let (from, to) = ((*o).max(offset), (o + e.len).min(end));
            if from >= to {
                continue;
            }
            let dst = &mut out[(from - offset) as usize..(to - offset) as usize];
            let skip = (from - o) as usize;
            match &e.source {
                Source::Data(b) => dst.copy_from_slice(&b[skip..skip + dst.len()]),
                Source::Chunk { hash, offset: at } => {
                    let chunk = self.cache.get(hash)?;
                    let start = *at as usize + skip;
                    let Some(src) = chunk.get(start..start + dst.len()) else {
                        tracing::error!(
                            chunk = %crate::base::chunk_key(hash),
                            "chunk is shorter than the manifest says; answering EIO"
                        );
                        return Err(Errno::IO);
                    };
                    dst.copy_from_slice(src);
                }
            }
        }
        Ok(())
    }

    /// The chunks of `extents` that a read of `[from, to)` would fetch.
    fn chunks_in(extents: &Extents, from: u64, to: u64) -> Vec<[u8; 32]> {
        let first = extents
            .range(..=from)
            .next_back()
            .map(|(o, _)| *o)
            .unwrap_or(from);
        let mut out: Vec<[u8; 32]> = Vec::new();
        for (o, e) in extents.range(first..to) {
            if o + e.len <= from {
                continue;
            }
            if let Source::Chunk { hash, .. } = &e.source {
                if out.last() != Some(hash) {
                    out.push(*hash);
                }
            }
        }
        out
    }
}

/// Mounts `view` read-only at `mountpoint`, served on `threads` FUSE
/// worker threads until the session is dropped.
pub fn mount(
    view: View,
    mountpoint: &std::path::Path,
    threads: usize,
) -> std::io::Result<ViewSession> {
    let fs = crate::fs::fuse::ViewFs::new(Arc::new(view));
    crate::fs::fuse::mount_view(fs, mountpoint, threads)
}

/// How far ahead of a sequential read the view fetches (two chunks).
const READAHEAD: u64 = 2 << 20;

/// Turns the replayed model into the served tree: only what is reachable
/// from the root, as a restore leaves it. One pass over the model indexes
/// every directory's entries (asking the model per directory would scan
/// all entries once per directory).
fn freeze(replay: Replay<Contents>, at_ns: Nanos, cache: ChunkCache) -> View {
    let Replay { ns, mut target, .. } = replay;
    let root = ns.root();
    let mut index: HashMap<Ino, Listing> = HashMap::new();
    for (ino, node) in ns.nodes() {
        let Some(o) = target.meta.objects.get(&ino) else {
            continue;
        };
        if node.kind == Kind::Dir {
            if let Some((p, n)) = &node.place {
                index.entry(*p).or_default().push((n.clone(), ino, o.kind));
            }
        } else {
            for (p, n) in &node.links {
                index.entry(*p).or_default().push((n.clone(), ino, o.kind));
            }
        }
    }
    // The walk from the root: which directories are in the tree, and how
    // many of each file's names are (names under a directory that has no
    // name are gone with it, as after a restore).
    let mut dirs = Vec::new();
    let mut nlinks: HashMap<Ino, u32> = HashMap::new();
    let mut stack = vec![root];
    while let Some(dir) = stack.pop() {
        let mut listed = index.remove(&dir).unwrap_or_default();
        listed.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, ino, kind) in &listed {
            if *kind == Kind::Dir {
                stack.push(*ino);
            } else {
                *nlinks.entry(*ino).or_default() += 1;
            }
        }
        dirs.push((dir, listed));
    }
    let mut entries = HashMap::with_capacity(dirs.len() + nlinks.len());
    let mut bytes = 0;
    for (ino, nlink) in nlinks {
        let (Some(n), Some(o)) = (ns.node(ino), target.meta.objects.get(&ino)) else {
            continue;
        };
        let size = if o.kind == Kind::File {
            n.size
        } else {
            o.target.len() as u64
        };
        if o.kind == Kind::File {
            bytes += size;
        }
        let attr = Attr {
            ino,
            kind: o.kind,
            // A symlink's mode is always 0777 on Linux.
            perm: if o.kind == Kind::Symlink {
                0o777
            } else {
                o.attrs.mode & 0o7777
            },
            uid: o.attrs.uid,
            gid: o.attrs.gid,
            size,
            mtime: n.mtime.unwrap_or(at_ns),
            nlink,
            rdev: o.rdev,
        };
        let entry = Entry {
            attr,
            target: o.target.clone(),
            xattrs: o.xattrs.clone(),
            children: Vec::new(),
            extents: target.files.remove(&ino).unwrap_or_default(),
        };
        entries.insert(ino, entry);
    }
    for (dir, listed) in dirs {
        let o = target.meta.objects.get(&dir);
        let attr = Attr {
            ino: dir,
            kind: Kind::Dir,
            perm: o.map(|o| o.attrs.mode & 0o7777).unwrap_or(0o755),
            uid: o.map(|o| o.attrs.uid).unwrap_or(0),
            gid: o.map(|o| o.attrs.gid).unwrap_or(0),
            size: 0,
            mtime: at_ns,
            nlink: 2 + listed.iter().filter(|c| c.2 == Kind::Dir).count() as u32,
            rdev: 0,
        };
        let entry = Entry {
            attr,
            target: Bytes::new(),
            xattrs: o.map(|o| o.xattrs.clone()).unwrap_or_default(),
            children: listed,
            extents: Extents::new(),
        };
        entries.insert(dir, entry);
    }
    View {
        root,
        entries,
        bytes,
        cache,
        last_end: Mutex::new(HashMap::new()),
    }
}

impl ReadOnlyTree for View {
    fn root(&self) -> Ino {
        self.root
    }

    fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr, Errno> {
        let dir = self.entry(parent)?;
        if dir.attr.kind != Kind::Dir {
            return Err(Errno::NOTDIR);
        }
        let i = dir
            .children
            .binary_search_by(|(n, _, _)| n.as_ref().cmp(name))
            .map_err(|_| Errno::NOENT)?;
        self.getattr(dir.children[i].1)
    }

    fn getattr(&self, ino: Ino) -> Result<Attr, Errno> {
        Ok(self.entry(ino)?.attr)
    }

    fn readlink(&self, ino: Ino) -> Result<Bytes, Errno> {
        let e = self.entry(ino)?;
        if e.attr.kind != Kind::Symlink {
            return Err(Errno::INVAL);
        }
        Ok(e.target.clone())
    }

    fn readdir(&self, ino: Ino) -> Result<Listing, Errno> {
        let e = self.entry(ino)?;
        if e.attr.kind != Kind::Dir {
            return Err(Errno::NOTDIR);
        }
        Ok(e.children.clone())
    }

    fn read(&self, ino: Ino, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let e = self.entry(ino)?;
        if e.attr.kind != Kind::File {
            return Err(Errno::INVAL);
        }
        let end = offset.saturating_add(u64::from(size)).min(e.attr.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let sequential = {
            let mut last = self.last_end.lock();
            let seq = last.get(&ino) == Some(&offset);
            last.insert(ino, end);
            seq
        };
        if sequential {
            let ahead = end.saturating_add(READAHEAD).min(e.attr.size);
            self.cache.prefetch(View::chunks_in(&e.extents, end, ahead));
        }
        let mut out = vec![0u8; (end - offset) as usize];
        self.fill(&e.extents, offset, end, &mut out)?;
        Ok(out)
    }

    fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Bytes, Errno> {
        self.entry(ino)?
            .xattrs
            .get(name)
            .cloned()
            .ok_or(Errno::NODATA)
    }

    fn listxattr(&self, ino: Ino) -> Result<Vec<u8>, Errno> {
        let mut out = Vec::new();
        for k in self.entry(ino)?.xattrs.keys() {
            out.extend_from_slice(k);
            out.push(0);
        }
        Ok(out)
    }

    fn totals(&self) -> (u64, u64) {
        (self.bytes, self.entries.len() as u64)
    }
}
