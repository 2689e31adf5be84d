//! Which file identities the mount changed since the last base started:
//! the "touched since epoch" set that lets a periodic base re-read only
//! the files that changed and reuse the previous base's object for the
//! rest. It owns the set and the rule of which records change an object;
//! it must not decide reuse (that is `base::reuse_decision`).
//!
//! The ordering that makes reuse safe: the core marks an identity after
//! the operation is applied to the source and before its record is
//! appended, and the base thread takes the set before it reads its
//! `start_seq`. So for every record with seq <= start_seq, the mark is
//! either in the set the base took, or made after the take and visible
//! when the walk reaches the file (the walk starts after start_seq is
//! read), and the walk asks both. A mark made before the previous take by
//! an operation whose record came after that base's start_seq belongs to
//! a change that was already applied when that base's walk began, so its
//! capture holds it.

use std::collections::HashSet;

use parking_lot::Mutex;

use crate::record::{Ino, Op};

/// Shards keep writers to different files off each other's lock; writers
/// to one file already serialise on that inode's lock.
const SHARDS: usize = 16;

/// The set of identities changed since the last `take`.
#[derive(Default)]
pub(crate) struct Touched {
    shards: [Mutex<HashSet<Ino>>; SHARDS],
}

impl Touched {
    fn shard(&self, ino: Ino) -> &Mutex<HashSet<Ino>> {
        &self.shards[(ino % SHARDS as u64) as usize]
    }

    /// Notes that `ino`'s object (data, size, mode, owner, mtime or
    /// xattrs) changed. Call after applying, before appending the record.
    pub(crate) fn mark(&self, ino: Ino) {
        self.shard(ino).lock().insert(ino);
    }

    /// Marks every object the records of one operation change.
    pub(crate) fn mark_ops(&self, ops: &[Op]) {
        for op in ops {
            if let Some(ino) = changed_object(op) {
                self.mark(ino);
            }
        }
    }

    /// Whether `ino` was marked since the last `take`.
    pub(crate) fn contains(&self, ino: Ino) -> bool {
        self.shard(ino).lock().contains(&ino)
    }

    /// Empties the set and returns what it held. Shards are taken one at
    /// a time: each identity lives in one shard, so the ordering argument
    /// in the module doc holds per identity.
    pub(crate) fn take(&self) -> HashSet<Ino> {
        let mut out = HashSet::new();
        for s in &self.shards {
            out.extend(std::mem::take(&mut *s.lock()));
        }
        out
    }
}

/// The object whose captured state (kind, mode, owner, size, mtime,
/// xattrs, contents) a record changes, if any. Names alone (link, unlink,
/// rename) change no object: the walk lists every name again. A Create
/// counts, because a new file may reuse the number of a file the previous
/// base captured. Every other record changes an object when it sets data
/// or attributes (`Op::data_ino`, whose exhaustive match makes a new
/// record kind decide).
pub(crate) fn changed_object(op: &Op) -> Option<Ino> {
    match op {
        Op::Create { ino, .. } => Some(*ino),
        _ => op.data_ino(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn take_empties_and_returns_every_shard() {
        let t = Touched::default();
        for ino in [1, 17, 33, 2, 1000] {
            t.mark(ino);
        }
        assert!(t.contains(17) && !t.contains(18));
        let got = t.take();
        assert_eq!(got, HashSet::from([1, 17, 33, 2, 1000]));
        assert!(t.take().is_empty());
        assert!(!t.contains(17));
    }

    #[test]
    fn which_records_change_an_object() {
        let t = Touched::default();
        t.mark_ops(&[
            Op::Write {
                ino: 5,
                offset: 0,
                size: 1,
                mtime: 0,
                data: Bytes::from_static(b"x"),
            },
            Op::Rename {
                from_parent: 1,
                from_name: Bytes::from_static(b"a"),
                to_parent: 1,
                to_name: Bytes::from_static(b"b"),
                ino: 6,
                replaced: 7,
                flags: 0,
            },
            Op::RemoveXattr {
                ino: 8,
                name: Bytes::from_static(b"user.x"),
            },
        ]);
        assert_eq!(t.take(), HashSet::from([5, 8]));
    }
}
