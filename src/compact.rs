//! Compaction: turns a run of records into fewer records whose replay
//! (restore.rs, `Tree::apply`) gives exactly the same state, and cuts a
//! record stream into the pieces that `rewind prune` stores as deltas
//! (delta.rs). Pure functions over records: it must not do I/O, and it
//! must never produce a stream whose replay differs from the original's.
//!
//! What it collapses (docs/SEMANTICS.md, "Retention"), per file identity
//! between two Creates of that identity (an inode number the source reused
//! starts a new *epoch*, and whatever is pending for the old one is emitted
//! before the Create):
//! - Writes, size changes (SetAttr, a Write's resulting size) and hole
//!   punches or zeroed ranges (fallocate PUNCH_HOLE|KEEP_SIZE and
//!   ZERO_RANGE) of a regular file: later bytes win; the smallest size the
//!   file was cut to is emitted first as a truncation, so bytes the
//!   original stream cut off (and zeros it re-extended with) come out the
//!   same; then the surviving bytes in offset order; then the final size.
//! - Mode, owner and mtime: the last value.
//! - `user.` xattrs: the last value or removal of each name.
//!
//! What it keeps as it is, in order: Create, Link, Unlink, Rename and
//! ClockStep records (every namespace operation); fallocate of any other
//! mode (allocation, collapse, insert: the file's pending state is emitted
//! first); xattrs outside `user.` (the kernel may drop
//! `security.capability` on a write, so their order against writes
//! matters). SetAttr records of an identity not known to be a regular file
//! in the run keep their smallest-size and their last record.
//!
//! Emitted data records stand at the end of the run or just before the
//! next Create of the same identity. Replay resolves records by identity,
//! through staging objects, so data does not depend on names; an identity
//! exists in replay from its Create until the next Create of it, which is
//! why the emitted records find it. Emitted records carry the sequence
//! number and time of the last original record they stand for.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;

use crate::clock::{Nanos, MINUTE_NS};
use crate::delta::DeltaMeta;
// The fallocate(2) mode bits the compaction understands.
use crate::record::falloc::{
    KEEP_SIZE as FALLOC_KEEP_SIZE, PUNCH_HOLE as FALLOC_PUNCH_HOLE, ZERO_RANGE as FALLOC_ZERO_RANGE,
};
use crate::record::{Ino, Kind, Op, Record, Seq};

/// Adjacent surviving bytes are emitted as one Write up to this length.
const MAX_WRITE: usize = 1 << 20;

#[derive(Debug, Clone)]
enum Content {
    Data(Bytes),
    Zero,
}

impl Content {
    /// The part of a range starting at `start` that begins at `from` and
    /// ends at `to`.
    fn slice(&self, start: u64, from: u64, to: u64) -> Content {
        match self {
            Content::Data(b) => {
                Content::Data(b.slice((from - start) as usize..(to - start) as usize))
            }
            Content::Zero => Content::Zero,
        }
    }
}

/// What is pending for one identity in the current run.
#[derive(Debug, Default)]
struct Pending {
    is_file: bool,
    /// The smallest size the file was cut to (or first set to).
    cut: Option<u64>,
    /// The size as the run knows it (None until a size-setting record).
    cur: Option<u64>,
    /// Bytes written or zeroed since, by start offset: (end, content).
    ext: BTreeMap<u64, (u64, Content)>,
    attr: Option<(u32, u32, u32)>,
    mtime: Option<Nanos>,
    xattrs: BTreeMap<Bytes, Option<Bytes>>,
    /// For an identity not known to be a file: SetAttr records kept whole.
    setattr_min: Option<Op>,
    setattr_last: Option<Op>,
    last: (Seq, Nanos),
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.cut.is_none()
            && self.attr.is_none()
            && self.xattrs.is_empty()
            && self.setattr_last.is_none()
    }

    fn set(&mut self, start: u64, end: u64, c: Content) {
        if start >= end {
            return;
        }
        let overlapping: Vec<u64> = self
            .ext
            .range(..end)
            .rev()
            .take_while(|(_, (e, _))| *e > start)
            .map(|(s, _)| *s)
            .collect();
        for s in overlapping {
            let (e, old) = self.ext.remove(&s).unwrap();
            if s < start {
                self.ext.insert(s, (start, old.slice(s, s, start)));
            }
            if e > end {
                self.ext.insert(end, (e, old.slice(s, end, e)));
            }
        }
        self.ext.insert(start, (end, c));
    }

    /// The file's size becomes `z`: a cut when it shrinks or when the size
    /// before is unknown (cutting at or above the real size loses nothing).
    fn size_to(&mut self, z: u64) {
        if self.cur.is_none_or(|c| z < c) {
            self.cut = Some(self.cut.map_or(z, |c| c.min(z)));
            let beyond: Vec<u64> = self.ext.range(z..).map(|(s, _)| *s).collect();
            for s in beyond {
                self.ext.remove(&s);
            }
            if let Some((&s, &(e, _))) = self.ext.range(..z).next_back() {
                if e > z {
                    let (_, c) = self.ext.remove(&s).unwrap();
                    self.ext.insert(s, (z, c.slice(s, s, z)));
                }
            }
        }
        self.cur = Some(z);
    }

    /// Appends the records that reproduce this pending state.
    fn emit(self, ino: Ino, out: &mut Vec<Record>) {
        let (seq, time) = self.last;
        let mut push = |op: Op| out.push(Record { seq, time, op });
        if let (Some(min), Some(last)) = (&self.setattr_min, &self.setattr_last) {
            if min != last {
                push(min.clone());
            }
        }
        if let (Some(cut), Some(mtime)) = (self.cut, self.mtime) {
            let write = |offset: u64, size: u64, data: Bytes| Op::Write {
                ino,
                offset,
                size,
                mtime,
                data,
            };
            push(write(0, cut, Bytes::new()));
            let mut size = cut;
            let mut run: Option<(u64, Vec<u8>)> = None;
            let flush_run =
                |run: &mut Option<(u64, Vec<u8>)>, size: &mut u64, push: &mut dyn FnMut(Op)| {
                    if let Some((off, data)) = run.take() {
                        *size = (*size).max(off + data.len() as u64);
                        push(write(off, *size, Bytes::from(data)));
                    }
                };
            for (start, (end, c)) in self.ext {
                match c {
                    Content::Data(b) => {
                        let joins = run.as_ref().is_some_and(|(off, d)| {
                            off + d.len() as u64 == start && d.len() + b.len() <= MAX_WRITE
                        });
                        if !joins {
                            flush_run(&mut run, &mut size, &mut push);
                            run = Some((start, Vec::with_capacity(b.len())));
                        }
                        run.as_mut().unwrap().1.extend_from_slice(&b);
                    }
                    Content::Zero => {
                        flush_run(&mut run, &mut size, &mut push);
                        push(Op::Fallocate {
                            ino,
                            mode: FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE,
                            offset: start,
                            len: end - start,
                            size,
                            mtime,
                        });
                    }
                }
            }
            flush_run(&mut run, &mut size, &mut push);
            let fin = self.cur.expect("a cut implies a known size");
            if fin != size {
                push(write(0, fin, Bytes::new()));
            }
            if let Some((mode, uid, gid)) = self.attr {
                push(Op::SetAttr {
                    ino,
                    mode,
                    uid,
                    gid,
                    size: fin,
                    mtime,
                });
            }
        }
        if let Some(last) = self.setattr_last {
            push(last);
        }
        for (name, v) in self.xattrs {
            push(match v {
                Some(value) => Op::SetXattr { ino, name, value },
                None => Op::RemoveXattr { ino, name },
            });
        }
    }
}

/// Compacts a run of records (see the module docs). The result, replayed
/// onto the state before `records[0]`, gives the state after the last.
pub(crate) fn compact(records: &[Record]) -> Vec<Record> {
    // Which epochs of which identities are regular files: a Create of a
    // file, or any write or fallocate in the epoch, says so.
    let mut epoch: HashMap<Ino, u32> = HashMap::new();
    let mut files: BTreeSet<(Ino, u32)> = BTreeSet::new();
    for r in records {
        match &r.op {
            Op::Create { ino, kind, .. } => {
                let e = epoch.entry(*ino).or_default();
                *e += 1;
                if *kind == Kind::File {
                    files.insert((*ino, *e));
                }
            }
            Op::Write { ino, .. } | Op::Fallocate { ino, .. } => {
                files.insert((*ino, epoch.get(ino).copied().unwrap_or(0)));
            }
            _ => {}
        }
    }
    epoch.clear();
    let mut out = Vec::with_capacity(records.len() / 4 + 4);
    let mut pending: BTreeMap<Ino, Pending> = BTreeMap::new();
    let flush = |pending: &mut BTreeMap<Ino, Pending>, ino: Ino, out: &mut Vec<Record>| {
        if let Some(p) = pending.remove(&ino) {
            if !p.is_empty() {
                p.emit(ino, out);
            }
        }
    };
    for r in records {
        let Some(ino) = r.op.data_ino() else {
            if let Op::Create { ino, .. } = &r.op {
                flush(&mut pending, *ino, &mut out);
                *epoch.entry(*ino).or_default() += 1;
            }
            out.push(r.clone());
            continue;
        };
        let is_file = files.contains(&(ino, epoch.get(&ino).copied().unwrap_or(0)));
        let barrier = match &r.op {
            Op::Fallocate { mode, .. } => ![
                FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE,
                FALLOC_ZERO_RANGE,
                FALLOC_ZERO_RANGE | FALLOC_KEEP_SIZE,
            ]
            .contains(mode),
            Op::SetXattr { name, .. } | Op::RemoveXattr { name, .. } => !name.starts_with(b"user."),
            _ => false,
        };
        if barrier {
            flush(&mut pending, ino, &mut out);
            out.push(r.clone());
            continue;
        }
        let p = pending.entry(ino).or_insert_with(|| Pending {
            is_file,
            ..Default::default()
        });
        p.last = (r.seq, r.time);
        match &r.op {
            Op::Write {
                offset,
                size,
                mtime,
                data,
                ..
            } => {
                let end = offset + data.len() as u64;
                p.set(*offset, end, Content::Data(data.clone()));
                p.cur = p.cur.map(|c| c.max(end));
                p.size_to(*size);
                p.mtime = Some(*mtime);
            }
            Op::Fallocate {
                mode,
                offset,
                len,
                size,
                mtime,
                ..
            } => {
                let end = offset.saturating_add(*len);
                p.set(*offset, end, Content::Zero);
                if mode & FALLOC_KEEP_SIZE == 0 {
                    p.cur = p.cur.map(|c| c.max(end));
                }
                p.size_to(*size);
                p.mtime = Some(*mtime);
            }
            Op::SetAttr {
                mode,
                uid,
                gid,
                size,
                mtime,
                ..
            } if p.is_file => {
                p.attr = Some((*mode, *uid, *gid));
                p.size_to(*size);
                p.mtime = Some(*mtime);
            }
            Op::SetAttr { size, .. } => {
                let smaller = match &p.setattr_min {
                    Some(Op::SetAttr { size: m, .. }) => size < m,
                    _ => true,
                };
                if smaller {
                    p.setattr_min = Some(r.op.clone());
                }
                p.setattr_last = Some(r.op.clone());
            }
            Op::SetXattr { name, value, .. } => {
                p.xattrs.insert(name.clone(), Some(value.clone()));
            }
            Op::RemoveXattr { name, .. } => {
                p.xattrs.insert(name.clone(), None);
            }
            _ => unreachable!("data_ino named a data record"),
        }
    }
    let inos: Vec<Ino> = pending.keys().copied().collect();
    for ino in inos {
        flush(&mut pending, ino, &mut out);
    }
    out
}

/// Where a prune cuts the records it compacts into deltas: every kept
/// point must fall on a delta boundary, and the records a kept base's walk
/// raced stay uncompacted (restore treats them specially).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Cuts {
    /// Cut after each of these records (kept bases start here).
    pub after_seqs: BTreeSet<Seq>,
    /// Cut after the last record at or before each of these instants.
    pub at_times: BTreeSet<Nanos>,
    /// Cut after the last record at or before each whole UTC minute in
    /// this range [from, to).
    pub minutes: Option<(Nanos, Nanos)>,
    /// Kept bases as (start_seq, completed_ns): their raced records (after
    /// the start, at or before the completion) are stored raw.
    pub bases: Vec<(Seq, Nanos)>,
}

impl Cuts {
    /// Whether a delta boundary lies between consecutive records a and b.
    pub fn between(&self, a: (Seq, Nanos), b: (Seq, Nanos)) -> bool {
        if self.after_seqs.contains(&a.0) {
            return true;
        }
        if self.at_times.range(a.1..b.1).next().is_some() {
            return true;
        }
        if let Some((from, to)) = self.minutes {
            // The first whole minute of the range at or after a's time: a
            // stretch of idle time across the range's start still holds
            // the range's first minutes.
            let ceil = |t: Nanos| {
                t.div_euclid(MINUTE_NS) * MINUTE_NS
                    + MINUTE_NS * Nanos::from(t.rem_euclid(MINUTE_NS) != 0)
            };
            let m = ceil(a.1).max(ceil(from));
            if m < b.1 && m < to {
                return true;
            }
        }
        false
    }

    /// Whether a record is one a kept base's walk raced.
    pub fn is_raw(&self, r: (Seq, Nanos)) -> bool {
        self.bases.iter().any(|&(s, c)| r.0 > s && r.1 <= c)
    }
}

/// Cuts a stream of consecutive records into the pieces a prune stores,
/// without holding more than one piece: `push` returns the piece that a
/// record closes. A piece also ends once it holds `max_bytes` of encoded
/// payload, which bounds the memory a compaction needs (an extra boundary
/// is harmless: any sequence number is a valid place to cut).
pub(crate) struct Cutter<'a> {
    cuts: &'a Cuts,
    max_bytes: usize,
    lineage: u64,
    from_seq: Seq,
    records: Vec<Record>,
    bytes: usize,
}

/// One stored delta: its key's metadata and body.
pub(crate) struct Piece {
    pub meta: DeltaMeta,
    pub raw: bool,
    pub records: Vec<Record>,
}

impl Piece {
    /// The records the delta stores: compacted unless raw.
    pub fn stored(&self) -> Vec<Record> {
        if self.raw {
            self.records.clone()
        } else {
            compact(&self.records)
        }
    }
}

impl<'a> Cutter<'a> {
    /// Starts after record `from_seq` of `lineage`.
    pub fn new(cuts: &'a Cuts, lineage: u64, from_seq: Seq, max_bytes: usize) -> Self {
        Cutter {
            cuts,
            max_bytes,
            lineage,
            from_seq,
            records: Vec::new(),
            bytes: 0,
        }
    }

    /// Takes the next record (seq must follow the previous one).
    pub fn push(&mut self, r: Record) -> Option<Piece> {
        let closed = match self.records.last() {
            Some(prev) => {
                let (a, b) = ((prev.seq, prev.time), (r.seq, r.time));
                (self.cuts.between(a, b)
                    || self.cuts.is_raw(a) != self.cuts.is_raw(b)
                    || self.bytes >= self.max_bytes)
                    .then(|| self.take(Some(r.time)))
                    .flatten()
            }
            None => None,
        };
        self.bytes += r.op.payload_len() + 64;
        self.records.push(r);
        closed
    }

    /// The last piece, if records are pending; `next_ns` is the time of
    /// the record after it, if the caller read one.
    pub fn finish(mut self, next_ns: Option<Nanos>) -> Option<Piece> {
        self.take(next_ns)
    }

    fn take(&mut self, next_ns: Option<Nanos>) -> Option<Piece> {
        let first = self.records.first()?;
        let last = self.records.last().unwrap();
        let meta = DeltaMeta {
            lineage: self.lineage,
            from_seq: self.from_seq,
            to_seq: last.seq,
            first_ns: first.time,
            last_ns: last.time,
            next_ns: next_ns.unwrap_or(last.time + 1).max(last.time + 1),
        };
        let raw = self.cuts.is_raw((first.seq, first.time));
        self.from_seq = last.seq;
        self.bytes = 0;
        Some(Piece {
            meta,
            raw,
            records: std::mem::take(&mut self.records),
        })
    }
}

#[cfg(test)]
mod tests;
