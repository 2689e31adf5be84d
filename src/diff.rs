//! Diff: what changed in a volume between two instants, file by file
//! (created, deleted, renamed, modified, mode, owner, xattrs), and a
//! summary per second of the writes between them, so that a burst of full
//! rewrites with incompressible data stands out. It owns the comparison of
//! two in-memory trees and the accounting of the records between them
//! (both pure, `compare` and `Activity`); it builds the trees through
//! `restore::memory_at`, under restore's lineage and window rules. It must
//! not write anything, to the store or elsewhere.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use crate::clock::{fmt_ns, At, Nanos, NS_PER_SEC};
use crate::record::{Ino, Kind, Op, Record, Seq};
use crate::replay::memory::{Entry, Memory};
use crate::replay::{clean_path, within, Replay};
use crate::restore::{memory_at, RestoreError};
use crate::store::Store;
use crate::timeline::{lineage_id, Timeline, TimelineError};

#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    #[error(transparent)]
    Timeline(#[from] TimelineError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error("--to ({to}) is before --from ({from}); give the earlier instant as --from")]
    Backwards { from: String, to: String },
    #[error("--from is in lineage {from} and --to in lineage {to}: a diff compares two instants of one lineage (pass --lineage, see `rewind ls`)")]
    Lineages { from: String, to: String },
    #[error("--path {0:?} exists at neither instant; give a path relative to the volume root that exists at --from or --to")]
    NoSuchPath(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Created,
    Deleted,
    Renamed,
    Modified,
    Mode,
    Owner,
    Xattrs,
}

impl ChangeKind {
    pub fn name(self) -> &'static str {
        match self {
            ChangeKind::Created => "created",
            ChangeKind::Deleted => "deleted",
            ChangeKind::Renamed => "renamed",
            ChangeKind::Modified => "modified",
            ChangeKind::Mode => "mode",
            ChangeKind::Owner => "owner",
            ChangeKind::Xattrs => "xattrs",
        }
    }
}

/// One change of one file (one identity: its hard links are one file).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    pub change: ChangeKind,
    /// file, dir, symlink, fifo, socket, chardev, blockdev.
    pub kind: &'static str,
    /// Where the file is at --to (at --from for a deleted one).
    pub path: String,
    /// Every name it has there (more than one for hard links).
    pub paths: Vec<String>,
    /// Renamed: every name it had at --from.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<String>,
    /// Modified: bytes the records between the instants wrote to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_written: Option<u64>,
    /// What the changed attribute was and became (size, mode, owner, the
    /// xattr names), for people.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
}

/// The writes of one second between the instants.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Second {
    /// Unix seconds.
    pub second: i64,
    pub time: String,
    pub bytes_written: u64,
    /// Files whose every byte was written in this second.
    pub files_rewritten: u64,
    /// Bytes written per byte stored, from the segments that hold the
    /// writes (near 1 for incompressible data such as encrypted files).
    pub compression_ratio: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub lineage: String,
    pub from_ns: Nanos,
    pub from: String,
    pub to_ns: Nanos,
    pub to: String,
    /// Records between the instants that the summary counts.
    pub records: u64,
    pub changes: Vec<Change>,
    pub seconds: Vec<Second>,
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::File => "file",
        Kind::Dir => "dir",
        Kind::Symlink => "symlink",
        Kind::Fifo => "fifo",
        Kind::Socket => "socket",
        Kind::CharDev => "chardev",
        Kind::BlockDev => "blockdev",
    }
}

/// What the records between the two instants did, per file and per second.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    pub(crate) records: u64,
    files: HashMap<Ino, FileActivity>,
    seconds: BTreeMap<i64, SecondActivity>,
}

#[derive(Debug, Default)]
struct FileActivity {
    written: u64,
    /// Data changed other than by writes (fallocate), or a size was set.
    touched: bool,
    /// A Create record made this identity anew: whatever had it before is
    /// another file.
    created: bool,
}

#[derive(Debug, Default)]
struct SecondActivity {
    written: u64,
    stored: f64,
    /// Per file: the byte ranges written, and the size after the last write.
    ranges: HashMap<Ino, (Vec<(u64, u64)>, u64)>,
}

/// Whether `ranges` cover every byte of a file of `size` bytes (a file of
/// no bytes is not rewritten).
pub(crate) fn covers(ranges: &[(u64, u64)], size: u64) -> bool {
    if size == 0 {
        return false;
    }
    let mut sorted = ranges.to_vec();
    sorted.sort();
    let mut reach = 0;
    for (start, end) in sorted {
        if start > reach {
            return false;
        }
        reach = reach.max(end);
    }
    reach >= size
}

impl Activity {
    /// Counts one record; `stored_per_byte` is what a byte of file data
    /// cost in the piece it came from.
    pub(crate) fn see(&mut self, r: &Record, stored_per_byte: f64) {
        self.records += 1;
        let second = r.time.div_euclid(NS_PER_SEC);
        match &r.op {
            Op::Write {
                ino,
                offset,
                size,
                data,
                ..
            } => {
                let n = data.len() as u64;
                self.files.entry(*ino).or_default().written += n;
                let s = self.seconds.entry(second).or_default();
                s.written += n;
                s.stored += n as f64 * stored_per_byte;
                let (ranges, last) = s.ranges.entry(*ino).or_default();
                ranges.push((*offset, offset + n));
                *last = *size;
            }
            Op::Fallocate { ino, .. } | Op::SetAttr { ino, .. } => {
                self.files.entry(*ino).or_default().touched = true;
            }
            Op::Create { ino, .. } => {
                self.files.entry(*ino).or_default().created = true;
                // A file made anew starts empty: earlier ranges of its
                // number in this second were another file's.
                if let Some(s) = self.seconds.get_mut(&second) {
                    s.ranges.remove(ino);
                }
            }
            _ => {}
        }
    }

    pub(crate) fn seconds(&self) -> Vec<Second> {
        self.seconds
            .iter()
            .map(|(sec, s)| Second {
                second: *sec,
                time: fmt_ns(sec * NS_PER_SEC),
                bytes_written: s.written,
                files_rewritten: s
                    .ranges
                    .values()
                    .filter(|(r, size)| covers(r, *size))
                    .count() as u64,
                compression_ratio: (s.stored > 0.0).then(|| s.written as f64 / s.stored),
            })
            .collect()
    }
}

/// The files of a tree by identity: every path, and the entry of the first.
fn by_identity(listing: &BTreeMap<String, Entry>) -> BTreeMap<Ino, (Vec<String>, &Entry)> {
    let mut out: BTreeMap<Ino, (Vec<String>, &Entry)> = BTreeMap::new();
    for (p, e) in listing {
        out.entry(e.ino)
            .or_insert_with(|| (Vec::new(), e))
            .0
            .push(p.clone());
    }
    out
}

/// The names (parent identity, name) of a file's paths: a file whose own
/// names did not change is not renamed, even when a directory above it was.
fn names(paths: &[String], listing: &BTreeMap<String, Entry>) -> BTreeSet<(Ino, String)> {
    paths
        .iter()
        .map(|p| {
            let name = p.rsplit('/').next().unwrap_or(p).to_string();
            (listing[p].parent, name)
        })
        .collect()
}

fn mode(e: &Entry) -> String {
    format!("{:04o}", e.attrs.mode)
}

fn owner(e: &Entry) -> String {
    format!("{}:{}", e.attrs.uid, e.attrs.gid)
}

fn xattr_names(e: &Entry) -> String {
    let names: Vec<String> = e
        .xattrs
        .keys()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    names.join(",")
}

/// The changes from tree `before` to tree `after`, given what the records
/// between them did; sorted by path, then kind of change.
pub(crate) fn compare(
    before: &BTreeMap<String, Entry>,
    after: &BTreeMap<String, Entry>,
    act: &Activity,
) -> Vec<Change> {
    let (old, new) = (by_identity(before), by_identity(after));
    let mut out = Vec::new();
    let change = |change, e: &Entry, paths: &Vec<String>| Change {
        change,
        kind: kind_name(e.kind),
        path: paths[0].clone(),
        paths: paths.clone(),
        from: Vec::new(),
        bytes_written: None,
        before: None,
        after: None,
    };
    let inos: BTreeSet<Ino> = old.keys().chain(new.keys()).copied().collect();
    for ino in inos {
        let a = act.files.get(&ino);
        match (old.get(&ino), new.get(&ino)) {
            (Some((p1, e1)), Some((p2, e2)))
                if e1.kind == e2.kind && !a.is_some_and(|a| a.created) =>
            {
                if names(p1, before) != names(p2, after) {
                    out.push(Change {
                        from: p1.clone(),
                        ..change(ChangeKind::Renamed, e2, p2)
                    });
                }
                let data = match e2.kind {
                    Kind::File => {
                        a.is_some_and(|a| a.written > 0 || a.touched)
                            || e1.size != e2.size
                            || e1.mtime != e2.mtime
                    }
                    Kind::Symlink => e1.target != e2.target,
                    _ => false,
                };
                if data {
                    out.push(Change {
                        bytes_written: Some(a.map_or(0, |a| a.written)),
                        before: Some(e1.size.to_string()),
                        after: Some(e2.size.to_string()),
                        ..change(ChangeKind::Modified, e2, p2)
                    });
                }
                let attrs = [
                    (ChangeKind::Mode, mode(e1), mode(e2)),
                    (ChangeKind::Owner, owner(e1), owner(e2)),
                    (ChangeKind::Xattrs, xattr_names(e1), xattr_names(e2)),
                ];
                for (kind, b, c) in attrs {
                    let differs = match kind {
                        ChangeKind::Xattrs => e1.xattrs != e2.xattrs,
                        _ => b != c,
                    };
                    if differs {
                        out.push(Change {
                            before: Some(b),
                            after: Some(c),
                            ..change(kind, e2, p2)
                        });
                    }
                }
            }
            (was, is) => {
                if let Some((p1, e1)) = was {
                    out.push(change(ChangeKind::Deleted, e1, p1));
                }
                if let Some((p2, e2)) = is {
                    out.push(Change {
                        after: (e2.kind == Kind::File).then(|| e2.size.to_string()),
                        ..change(ChangeKind::Created, e2, p2)
                    });
                }
            }
        }
    }
    out.sort_by(|a, b| (&a.path, a.change).cmp(&(&b.path, b.change)));
    out
}

/// What changed in the volume between `from` and `to`.
pub fn diff(
    store: &dyn Store,
    timeline: &Timeline,
    from: At,
    to: At,
    lineage: Option<&str>,
    path: Option<&str>,
) -> Result<Report, DiffError> {
    let backwards = |a: Nanos, b: Nanos| DiffError::Backwards {
        from: fmt_ns(a),
        to: fmt_ns(b),
    };
    if let (At::Instant(a), At::Instant(b)) = (from, to) {
        if b < a {
            return Err(backwards(a, b));
        }
    }
    let p1 = timeline.plan(from, lineage)?;
    let p2 = timeline.plan(to, lineage)?;
    if p2.at_ns < p1.at_ns {
        return Err(backwards(p1.at_ns, p2.at_ns));
    }
    if p1.lineage != p2.lineage {
        return Err(DiffError::Lineages {
            from: lineage_id(p1.lineage),
            to: lineage_id(p2.lineage),
        });
    }
    let mut seq1: Seq = p1.base.start_seq;
    let t1 = memory_at(store, &p1, &mut |r, _| seq1 = seq1.max(r.seq))?;
    let mut act = Activity::default();
    let t2 = memory_at(store, &p2, &mut |r, cost| {
        if r.seq > seq1 {
            act.see(r, cost);
        }
    })?;
    let (before, after) = (listing(&t1), listing(&t2));
    let mut changes = compare(&before, &after, &act);
    if let Some(p) = path {
        let p = clean_path(p);
        let exists = |l: &BTreeMap<String, Entry>| p.is_empty() || l.contains_key(&p);
        if !exists(&before) && !exists(&after) {
            return Err(DiffError::NoSuchPath(p));
        }
        changes.retain(|c| c.paths.iter().chain(&c.from).any(|q| within(q, &p)));
    }
    Ok(Report {
        lineage: lineage_id(p1.lineage),
        from_ns: p1.at_ns,
        from: fmt_ns(p1.at_ns),
        to_ns: p2.at_ns,
        to: fmt_ns(p2.at_ns),
        records: act.records,
        changes,
        seconds: act.seconds(),
    })
}

fn listing(t: &Replay<Memory>) -> BTreeMap<String, Entry> {
    t.target.listing(&t.ns)
}

#[cfg(test)]
mod tests;
