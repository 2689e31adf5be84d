//! The view's replay target: the in-memory tree (`replay::memory::Memory`)
//! for names and metadata, plus each regular file's contents as extents:
//! ranges of base chunks (by chunk hash and offset in the chunk) and ranges
//! of bytes that records wrote; a range no extent covers reads as zeros.
//! It must not do I/O: chunks are named here and fetched by the view.
//!
//! # Memory
//! Per file: one map entry per extent (about 80 bytes; a base file has one
//! per 1 MiB chunk). Per byte written by a record and still visible at the
//! instant: that byte, copied out of its segment so the decoded segment
//! can be freed; bytes that a later record overwrote or truncated away
//! are dropped as the replay goes.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;

use crate::clock::Nanos;
// The fallocate(2) modes that change what a file reads as.
use crate::record::falloc::{COLLAPSE_RANGE, INSERT_RANGE, PUNCH_HOLE, ZERO_RANGE};
use crate::record::{Ino, Kind};
use crate::replay::memory::Memory;
use crate::replay::{Attrs, Effects, Namespace, ReplayError};

/// Where the bytes of one extent come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    /// Bytes of a base chunk, starting at `offset` in the chunk.
    Chunk { hash: [u8; 32], offset: u64 },
    /// Bytes a record wrote, exactly the extent's length.
    Data(Bytes),
}

/// A range of a file: `len` bytes from `source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Extent {
    pub(crate) len: u64,
    pub(crate) source: Source,
}

impl Extent {
    /// The part of this extent from `skip` bytes in, `len` long.
    fn slice(&self, skip: u64, len: u64) -> Extent {
        let source = match &self.source {
            Source::Chunk { hash, offset } => Source::Chunk {
                hash: *hash,
                offset: offset + skip,
            },
            Source::Data(b) => Source::Data(b.slice(skip as usize..(skip + len) as usize)),
        };
        Extent { len, source }
    }
}

/// A file's extents by their offset in the file; they never overlap.
pub(crate) type Extents = BTreeMap<u64, Extent>;

/// Removes every byte in `[start, end)` from `map` (they read as zeros),
/// splitting the extents that straddle either end.
pub(crate) fn clear(map: &mut Extents, start: u64, end: u64) {
    if start >= end {
        return;
    }
    let mut touched: Vec<u64> = map.range(start..end).map(|(o, _)| *o).collect();
    if let Some((o, e)) = map.range(..start).next_back() {
        if o + e.len > start {
            touched.push(*o);
        }
    }
    for o in touched {
        let e = map.remove(&o).expect("listed above");
        if o < start {
            map.insert(o, e.slice(0, start - o));
        }
        if o + e.len > end {
            map.insert(end, e.slice(end - o, o + e.len - end));
        }
    }
}

/// Splits the extent that straddles `at`, if one does.
fn split_at(map: &mut Extents, at: u64) {
    if let Some((o, e)) = map.range(..at).next_back() {
        let (o, e) = (*o, e.clone());
        if o + e.len > at {
            map.insert(o, e.slice(0, at - o));
            map.insert(at, e.slice(at - o, o + e.len - at));
        }
    }
}

/// FALLOC_FL_COLLAPSE_RANGE: the bytes `[offset, offset + len)` go, and
/// everything after them moves down by `len`.
pub(crate) fn collapse(map: &mut Extents, offset: u64, len: u64) {
    let end = offset.saturating_add(len);
    clear(map, offset, end);
    let after: Vec<u64> = map.range(end..).map(|(o, _)| *o).collect();
    for o in after {
        let e = map.remove(&o).expect("listed above");
        map.insert(o - len, e);
    }
}

/// FALLOC_FL_INSERT_RANGE: everything from `offset` on moves up by `len`,
/// leaving a hole.
pub(crate) fn insert_hole(map: &mut Extents, offset: u64, len: u64) {
    split_at(map, offset);
    let after: Vec<u64> = map.range(offset..).map(|(o, _)| *o).rev().collect();
    for o in after {
        let e = map.remove(&o).expect("listed above");
        map.insert(o + len, e);
    }
}

/// Puts `extent` at `offset`, replacing what was there.
pub(crate) fn put(map: &mut Extents, offset: u64, extent: Extent) {
    if extent.len == 0 {
        return;
    }
    clear(map, offset, offset + extent.len);
    map.insert(offset, extent);
}

/// The view's replay target (see the module doc).
#[derive(Debug, Default)]
pub(crate) struct Contents {
    pub(crate) meta: Memory,
    pub(crate) files: HashMap<Ino, Extents>,
}

impl Contents {
    /// A base file's chunk at `offset`.
    pub(crate) fn base_chunk(&mut self, ino: Ino, offset: u64, len: u64, hash: [u8; 32]) {
        let source = Source::Chunk { hash, offset: 0 };
        put(
            self.files.entry(ino).or_default(),
            offset,
            Extent { len, source },
        );
    }
}

impl Effects for Contents {
    type Error = ReplayError;

    fn make(
        &mut self,
        ns: &Namespace,
        ino: Ino,
        kind: Kind,
        attrs: Attrs,
        rdev: u64,
        target: &[u8],
    ) -> Result<(), ReplayError> {
        self.files.remove(&ino);
        self.meta.make(ns, ino, kind, attrs, rdev, target)
    }

    fn link(&mut self, ns: &Namespace, p: Ino, n: &[u8], ino: Ino) -> Result<(), ReplayError> {
        self.meta.link(ns, p, n, ino)
    }

    fn unlink(&mut self, ns: &Namespace, p: Ino, n: &[u8], ino: Ino) -> Result<(), ReplayError> {
        self.meta.unlink(ns, p, n, ino)
    }

    fn rename(
        &mut self,
        ns: &Namespace,
        from: (Ino, &[u8]),
        to: (Ino, &[u8]),
        ino: Ino,
        over: Option<Ino>,
    ) -> Result<(), ReplayError> {
        self.meta.rename(ns, from, to, ino, over)
    }

    fn exchange(
        &mut self,
        ns: &Namespace,
        a: (Ino, &[u8]),
        b: (Ino, &[u8]),
    ) -> Result<(), ReplayError> {
        self.meta.exchange(ns, a, b)
    }

    fn renumber(&mut self, ns: &Namespace, old: Ino, new: Ino) -> Result<(), ReplayError> {
        if let Some(x) = self.files.remove(&old) {
            self.files.insert(new, x);
        }
        self.meta.renumber(ns, old, new)
    }

    fn discard(&mut self, ns: &Namespace, ino: Ino) -> Result<(), ReplayError> {
        self.files.remove(&ino);
        self.meta.discard(ns, ino)
    }

    fn write(
        &mut self,
        ns: &Namespace,
        ino: Ino,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ReplayError> {
        // A copy: the record's bytes share the decoded segment's buffer,
        // which must not stay alive for a few bytes of it.
        let source = Source::Data(Bytes::copy_from_slice(data));
        let len = data.len() as u64;
        put(
            self.files.entry(ino).or_default(),
            offset,
            Extent { len, source },
        );
        self.meta.write(ns, ino, offset, data)
    }

    fn set_size(&mut self, ns: &Namespace, ino: Ino, size: u64) -> Result<(), ReplayError> {
        if let Some(map) = self.files.get_mut(&ino) {
            clear(map, size, u64::MAX);
        }
        self.meta.set_size(ns, ino, size)
    }

    fn fallocate(
        &mut self,
        ns: &Namespace,
        ino: Ino,
        mode: u32,
        offset: u64,
        len: u64,
    ) -> Result<(), ReplayError> {
        if let Some(map) = self.files.get_mut(&ino) {
            if mode & COLLAPSE_RANGE != 0 {
                collapse(map, offset, len);
            } else if mode & INSERT_RANGE != 0 {
                insert_hole(map, offset, len);
            }
        }
        if mode & (PUNCH_HOLE | ZERO_RANGE) != 0 {
            if let Some(map) = self.files.get_mut(&ino) {
                clear(map, offset, offset.saturating_add(len));
            }
        }
        self.meta.fallocate(ns, ino, mode, offset, len)
    }

    fn set_attrs(&mut self, ns: &Namespace, ino: Ino, attrs: Attrs) -> Result<(), ReplayError> {
        self.meta.set_attrs(ns, ino, attrs)
    }

    fn set_mtime(&mut self, ns: &Namespace, ino: Ino, mtime: Nanos) -> Result<(), ReplayError> {
        self.meta.set_mtime(ns, ino, mtime)
    }

    fn set_xattr(
        &mut self,
        ns: &Namespace,
        ino: Ino,
        name: &[u8],
        value: &[u8],
    ) -> Result<(), ReplayError> {
        self.meta.set_xattr(ns, ino, name, value)
    }

    fn remove_xattr(&mut self, ns: &Namespace, ino: Ino, name: &[u8]) -> Result<(), ReplayError> {
        self.meta.remove_xattr(ns, ino, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(map: &Extents) -> Vec<(u64, u64, Vec<u8>)> {
        map.iter()
            .map(|(o, e)| match &e.source {
                Source::Data(b) => (*o, e.len, b.to_vec()),
                Source::Chunk { offset, .. } => (*o, e.len, vec![*offset as u8]),
            })
            .collect()
    }

    fn d(s: &[u8]) -> Extent {
        Extent {
            len: s.len() as u64,
            source: Source::Data(Bytes::copy_from_slice(s)),
        }
    }

    #[test]
    fn extents_overwrite_split_and_clear() {
        type Step = fn(&mut Extents);
        let cases: Vec<(&str, Vec<Step>, Vec<(u64, u64, Vec<u8>)>)> = vec![
            (
                "one write",
                vec![|m| put(m, 0, d(b"abcd"))],
                vec![(0, 4, b"abcd".to_vec())],
            ),
            (
                "overwrite the middle",
                vec![|m| put(m, 0, d(b"abcdef")), |m| put(m, 2, d(b"XY"))],
                vec![
                    (0, 2, b"ab".to_vec()),
                    (2, 2, b"XY".to_vec()),
                    (4, 2, b"ef".to_vec()),
                ],
            ),
            (
                "overwrite across two",
                vec![|m| put(m, 0, d(b"abc")), |m| put(m, 3, d(b"def")), |m| {
                    put(m, 2, d(b"XY"))
                }],
                vec![
                    (0, 2, b"ab".to_vec()),
                    (2, 2, b"XY".to_vec()),
                    (4, 2, b"ef".to_vec()),
                ],
            ),
            (
                "truncate inside",
                vec![|m| put(m, 0, d(b"abcdef")), |m| clear(m, 3, u64::MAX)],
                vec![(0, 3, b"abc".to_vec())],
            ),
            (
                "punch a hole",
                vec![|m| put(m, 0, d(b"abcdef")), |m| clear(m, 1, 5)],
                vec![(0, 1, b"a".to_vec()), (5, 1, b"f".to_vec())],
            ),
            (
                "collapse a range",
                vec![|m| put(m, 0, d(b"abcdef")), |m| collapse(m, 1, 2)],
                vec![(0, 1, b"a".to_vec()), (1, 3, b"def".to_vec())],
            ),
            (
                "insert a range",
                vec![|m| put(m, 0, d(b"abcd")), |m| insert_hole(m, 2, 5)],
                vec![(0, 2, b"ab".to_vec()), (7, 2, b"cd".to_vec())],
            ),
            (
                "sparse write",
                vec![|m| put(m, 10, d(b"z"))],
                vec![(10, 1, b"z".to_vec())],
            ),
            (
                "chunk offsets move with a split",
                vec![
                    |m| {
                        put(
                            m,
                            0,
                            Extent {
                                len: 100,
                                source: Source::Chunk {
                                    hash: [0; 32],
                                    offset: 0,
                                },
                            },
                        )
                    },
                    |m| clear(m, 0, 7),
                ],
                vec![(7, 93, vec![7])],
            ),
        ];
        for (what, steps, want) in cases {
            let mut m = Extents::new();
            for s in steps {
                s(&mut m);
            }
            assert_eq!(data(&m), want, "{what}");
        }
    }
}
