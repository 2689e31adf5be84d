//! Compaction against the real replay engine: random record streams are
//! replayed raw and compacted (cut into pieces at random boundaries) into
//! two directories, which must then be equal byte for byte.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::base::{BaseKind, Extent, Link, Manifest, Object};
use crate::restore::Tree;

const ROOT: Ino = 1;
const BASE_FILE: Ino = 2;
const BASE_DIR: Ino = 3;
const NAMES: [&str; 3] = ["a", "b", "c"];

#[derive(Debug, Clone)]
enum Action {
    Create {
        dir: usize,
        name: usize,
        reuse: bool,
        is_dir: bool,
    },
    Write {
        file: usize,
        off: u64,
        len: usize,
        byte: u8,
    },
    SetAttr {
        file: usize,
        size: u64,
        mode: usize,
        owner: bool,
    },
    DirAttr {
        dir: usize,
        mode: usize,
    },
    Fallocate {
        file: usize,
        off: u64,
        len: u64,
        kind: u8,
    },
    Link {
        file: usize,
        dir: usize,
        name: usize,
    },
    Unlink {
        entry: usize,
    },
    Rename {
        entry: usize,
        dir: usize,
        name: usize,
    },
    Xattr {
        file: usize,
        name: usize,
        value: Option<u8>,
    },
}

fn arb_action() -> impl Strategy<Value = Action> {
    let pick = 0usize..16;
    prop_oneof![
        1 => (pick.clone(), 0usize..3, any::<bool>(), prop::bool::weighted(0.15)).prop_map(
            |(dir, name, reuse, is_dir)| Action::Create { dir, name, reuse, is_dir }
        ),
        4 => (pick.clone(), 0u64..9000, 0usize..3000, any::<u8>())
            .prop_map(|(file, off, len, byte)| Action::Write { file, off, len, byte }),
        1 => (pick.clone(), 0u64..9000, 0usize..4, any::<bool>())
            .prop_map(|(file, size, mode, owner)| Action::SetAttr { file, size, mode, owner }),
        1 => (pick.clone(), 0usize..4).prop_map(|(dir, mode)| Action::DirAttr { dir, mode }),
        1 => (pick.clone(), 0u64..9000, 1u64..4000, 0u8..5)
            .prop_map(|(file, off, len, kind)| Action::Fallocate { file, off, len, kind }),
        1 => (pick.clone(), pick.clone(), 0usize..3)
            .prop_map(|(file, dir, name)| Action::Link { file, dir, name }),
        1 => pick.clone().prop_map(|entry| Action::Unlink { entry }),
        1 => (pick.clone(), pick.clone(), 0usize..3)
            .prop_map(|(entry, dir, name)| Action::Rename { entry, dir, name }),
        1 => (pick, 0usize..3, proptest::option::of(any::<u8>()))
            .prop_map(|(file, name, value)| Action::Xattr { file, name, value }),
    ]
}

/// The source as the records describe it, to make only valid records.
struct Model {
    next_ino: Ino,
    dirs: Vec<Ino>,
    /// Every file identity that exists (linked or open but unlinked).
    files: BTreeMap<Ino, u64>,
    entries: BTreeMap<(Ino, Bytes), Ino>,
    seq: Seq,
    time: Nanos,
    out: Vec<Record>,
}

const MODES: [u32; 4] = [0o644, 0o600, 0o755, 0o4755];

impl Model {
    fn push(&mut self, op: Op) {
        self.seq += 1;
        self.time += 1000;
        self.out.push(Record {
            seq: self.seq,
            time: self.time,
            op,
        });
    }

    fn pick<T: Copy>(v: &[T], i: usize) -> Option<T> {
        (!v.is_empty()).then(|| v[i % v.len()])
    }

    fn links(&self, ino: Ino) -> usize {
        self.entries.values().filter(|&&i| i == ino).count()
    }

    fn apply(&mut self, a: Action) {
        let files: Vec<Ino> = self.files.keys().copied().collect();
        let now = self.time;
        match a {
            Action::Create {
                dir,
                name,
                reuse,
                is_dir,
            } => {
                let parent = Self::pick(&self.dirs, dir).unwrap();
                let name = Bytes::from(NAMES[name]);
                if self.entries.contains_key(&(parent, name.clone())) {
                    return;
                }
                // The source reuses the number of a file that is gone.
                let dead: Vec<Ino> = files
                    .iter()
                    .copied()
                    .filter(|&f| self.links(f) == 0)
                    .collect();
                let ino = match (reuse && !is_dir, Self::pick(&dead, dir)) {
                    (true, Some(i)) => i,
                    _ => {
                        self.next_ino += 1;
                        self.next_ino
                    }
                };
                let kind = if is_dir { Kind::Dir } else { Kind::File };
                self.push(Op::Create {
                    parent,
                    name: name.clone(),
                    ino,
                    kind,
                    mode: if is_dir { 0o755 } else { 0o644 },
                    uid: 0,
                    gid: 0,
                    mtime: now,
                    rdev: 0,
                    target: Bytes::new(),
                });
                self.entries.insert((parent, name), ino);
                if is_dir {
                    self.dirs.push(ino);
                } else {
                    self.files.insert(ino, 0);
                }
            }
            Action::Write {
                file,
                off,
                len,
                byte,
            } => {
                let Some(ino) = Self::pick(&files, file) else {
                    return;
                };
                let size = self.files[&ino].max(off + len as u64);
                self.files.insert(ino, size);
                let data: Vec<u8> = (0..len).map(|i| byte.wrapping_add(i as u8)).collect();
                self.push(Op::Write {
                    ino,
                    offset: off,
                    size,
                    mtime: now,
                    data: Bytes::from(data),
                });
            }
            Action::SetAttr {
                file,
                size,
                mode,
                owner,
            } => {
                let Some(ino) = Self::pick(&files, file) else {
                    return;
                };
                self.files.insert(ino, size);
                let id = if owner { 1000 } else { 0 };
                self.push(Op::SetAttr {
                    ino,
                    mode: MODES[mode],
                    uid: id,
                    gid: id,
                    size,
                    mtime: now,
                });
            }
            Action::DirAttr { dir, mode } => {
                let ino = Self::pick(&self.dirs, dir).unwrap();
                self.push(Op::SetAttr {
                    ino,
                    mode: MODES[mode],
                    uid: 0,
                    gid: 0,
                    size: 0,
                    mtime: now,
                });
            }
            Action::Fallocate {
                file,
                off,
                len,
                kind,
            } => {
                let Some(ino) = Self::pick(&files, file) else {
                    return;
                };
                let cur = self.files[&ino];
                // punch hole, zero range (keeping the size or not), plain
                // and keep-size allocation.
                let mode = [3u32, 0x10, 0x11, 0, 1][kind as usize];
                let size = if mode & 1 == 0 {
                    cur.max(off + len)
                } else {
                    cur
                };
                self.files.insert(ino, size);
                self.push(Op::Fallocate {
                    ino,
                    mode,
                    offset: off,
                    len,
                    size,
                    mtime: now,
                });
            }
            Action::Link { file, dir, name } => {
                let linked: Vec<Ino> = files
                    .iter()
                    .copied()
                    .filter(|&f| self.links(f) > 0)
                    .collect();
                let Some(ino) = Self::pick(&linked, file) else {
                    return;
                };
                let parent = Self::pick(&self.dirs, dir).unwrap();
                let name = Bytes::from(NAMES[name]);
                if self.entries.contains_key(&(parent, name.clone())) {
                    return;
                }
                self.entries.insert((parent, name.clone()), ino);
                self.push(Op::Link { ino, parent, name });
            }
            Action::Unlink { entry } => {
                let of_files: Vec<(Ino, Bytes)> = self
                    .entries
                    .iter()
                    .filter(|(_, i)| self.files.contains_key(i))
                    .map(|(k, _)| k.clone())
                    .collect();
                if of_files.is_empty() {
                    return;
                }
                let (parent, name) = of_files[entry % of_files.len()].clone();
                let ino = self.entries.remove(&(parent, name.clone())).unwrap();
                self.push(Op::Unlink { parent, name, ino });
            }
            Action::Rename { entry, dir, name } => {
                let of_files: Vec<(Ino, Bytes)> = self
                    .entries
                    .iter()
                    .filter(|(_, i)| self.files.contains_key(i))
                    .map(|(k, _)| k.clone())
                    .collect();
                if of_files.is_empty() {
                    return;
                }
                let (fp, fname) = of_files[entry % of_files.len()].clone();
                let tp = Self::pick(&self.dirs, dir).unwrap();
                let tname = Bytes::from(NAMES[name]);
                if (fp, &fname) == (tp, &tname) {
                    return;
                }
                let ino = self.entries[&(fp, fname.clone())];
                let replaced = match self.entries.get(&(tp, tname.clone())) {
                    Some(r) if !self.files.contains_key(r) => return,
                    Some(r) => *r,
                    None => 0,
                };
                if replaced != ino {
                    self.entries.remove(&(fp, fname.clone()));
                    self.entries.insert((tp, tname.clone()), ino);
                }
                self.push(Op::Rename {
                    from_parent: fp,
                    from_name: fname,
                    to_parent: tp,
                    to_name: tname,
                    ino,
                    replaced,
                    flags: 0,
                });
            }
            Action::Xattr { file, name, value } => {
                let Some(ino) = Self::pick(&files, file) else {
                    return;
                };
                let name = Bytes::from(format!("user.{}", NAMES[name]));
                self.push(match value {
                    Some(v) => Op::SetXattr {
                        ino,
                        name,
                        value: Bytes::from(vec![v; 3]),
                    },
                    None => Op::RemoveXattr { ino, name },
                });
            }
        }
    }
}

fn base_content() -> Vec<u8> {
    (0..5000u32).map(|i| (i % 251) as u8).collect()
}

fn manifest() -> Manifest {
    let content = base_content();
    let dir = |ino| Object::dir(ino);
    Manifest {
        lineage: 1,
        start_seq: 0,
        started_ns: 0,
        completed_ns: 0,
        kind: BaseKind::Initial,
        root: ROOT,
        objects: vec![
            dir(ROOT),
            Object {
                ino: BASE_FILE,
                kind: Kind::File,
                mode: 0o644,
                size: content.len() as u64,
                mtime: 7,
                extents: vec![Extent {
                    offset: 0,
                    len: content.len() as u32,
                    hash: *blake3::hash(&content).as_bytes(),
                }],
                ..dir(BASE_FILE)
            },
            dir(BASE_DIR),
        ],
        links: vec![
            Link {
                parent: ROOT,
                name: Bytes::from("base"),
                ino: BASE_FILE,
            },
            Link {
                parent: ROOT,
                name: Bytes::from("d"),
                ino: BASE_DIR,
            },
        ],
    }
}

fn model() -> Model {
    let m = manifest();
    Model {
        next_ino: 10,
        dirs: vec![ROOT, BASE_DIR],
        files: BTreeMap::from([(BASE_FILE, base_content().len() as u64)]),
        entries: m
            .links
            .iter()
            .map(|l| ((l.parent, l.name.clone()), l.ino))
            .collect(),
        seq: 0,
        time: 1_000_000,
        out: Vec::new(),
    }
}

fn replay(dir: &Path, records: &[Record]) {
    let mut tree = Tree::prepare(dir, false).unwrap();
    let content = base_content();
    tree.apply_base(&manifest(), &|_| Ok(content.clone()), 1, &mut |_, _| {})
        .unwrap();
    for r in records {
        tree.apply(r)
            .unwrap_or_else(|e| panic!("record {r:?}: {e}"));
    }
    tree.finish().unwrap();
}

/// Everything the product contract compares, per path, and the hard-link
/// groups (paths that share an inode).
fn snapshot(dir: &Path) -> (BTreeMap<String, String>, Vec<Vec<String>>) {
    let mut out = BTreeMap::new();
    let mut groups: HashMap<u64, Vec<String>> = HashMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(dir).unwrap().display().to_string();
            let md = std::fs::symlink_metadata(&p).unwrap();
            let mut names = vec![0u8; 4096];
            let n = rustix::fs::llistxattr(&p, &mut names).unwrap();
            let mut xattrs = Vec::new();
            for name in names[..n]
                .split(|&b| b == 0)
                .filter(|n| n.starts_with(b"user."))
            {
                let mut v = vec![0u8; 256];
                let c = std::ffi::CString::new(name).unwrap();
                let len = rustix::fs::lgetxattr(&p, c.as_c_str(), &mut v).unwrap();
                xattrs.push((
                    String::from_utf8_lossy(name).into_owned(),
                    v[..len].to_vec(),
                ));
            }
            xattrs.sort();
            let mut desc = format!(
                "mode {:o} uid {} gid {} xattrs {xattrs:?}",
                md.mode(),
                md.uid(),
                md.gid()
            );
            if md.is_dir() {
                stack.push(p.clone());
            } else {
                let data = std::fs::read(&p).unwrap();
                desc += &format!(
                    " size {} mtime {}.{} content {}",
                    md.size(),
                    md.mtime(),
                    md.mtime_nsec(),
                    blake3::hash(&data)
                );
                groups.entry(md.ino()).or_default().push(rel.clone());
            }
            out.insert(rel, desc);
        }
    }
    let mut g: Vec<Vec<String>> = groups
        .into_values()
        .map(|mut v| {
            v.sort();
            v
        })
        .collect();
    g.sort();
    (out, g)
}

fn compacted(records: &[Record], cuts: &[usize]) -> Vec<Record> {
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (records.len() + 1)).collect();
    bounds.push(0);
    bounds.push(records.len());
    bounds.sort();
    bounds.dedup();
    bounds
        .windows(2)
        .flat_map(|w| compact(&records[w[0]..w[1]]))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Raw and compacted replays agree at the end of the stream and at a
    /// boundary in its middle.
    #[test]
    fn compacted_replay_equals_raw_replay(
        actions in proptest::collection::vec(arb_action(), 1..80),
        cuts in proptest::collection::vec(any::<usize>(), 0..4),
        mid in any::<usize>(),
    ) {
        let mut m = model();
        for a in actions {
            m.apply(a);
        }
        let records = m.out;
        let mid = mid % (records.len() + 1);
        for upto in [records.len(), mid] {
            let tmp = tempfile::tempdir().unwrap();
            let (raw, comp) = (tmp.path().join("raw"), tmp.path().join("compacted"));
            let prefix = &records[..upto];
            let small = compacted(prefix, &cuts);
            replay(&raw, prefix);
            replay(&comp, &small);
            let (a, b) = (snapshot(&raw), snapshot(&comp));
            prop_assert_eq!(a, b, "after {} of {} records; compacted to {}", upto, records.len(), small.len());
        }
    }
}

fn write(seq: Seq, ino: Ino, offset: u64, data: &[u8], size: u64) -> Record {
    Record {
        seq,
        time: seq as i64 * 10,
        op: Op::Write {
            ino,
            offset,
            size,
            mtime: seq as i64,
            data: Bytes::copy_from_slice(data),
        },
    }
}

#[test]
fn overwrites_of_one_page_collapse_to_one_write() {
    let recs: Vec<Record> = (1..=1000)
        .map(|i| write(i, 5, 4096, &[i as u8; 4096], 8192))
        .collect();
    let out = compact(&recs);
    let data: usize = out.iter().map(|r| r.op.payload_len()).sum();
    assert_eq!(data, 4096, "{out:?}");
    // A truncation to the first size, the page; nothing else.
    assert_eq!(out.len(), 2);
    match &out[1].op {
        Op::Write {
            offset,
            data,
            mtime,
            ..
        } => {
            assert_eq!((*offset, data[0], *mtime), (4096, 1000u16 as u8, 1000));
        }
        op => panic!("{op:?}"),
    }
    assert_eq!(out[1].seq, 1000);
}

#[test]
fn namespace_records_keep_their_order_and_an_epoch_flushes_before_reuse() {
    let create = |seq, ino, name: &'static str| Record {
        seq,
        time: seq as i64,
        op: Op::Create {
            parent: 1,
            name: Bytes::from(name),
            ino,
            kind: Kind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            rdev: 0,
            target: Bytes::new(),
        },
    };
    let unlink = |seq, ino, name: &'static str| Record {
        seq,
        time: seq as i64,
        op: Op::Unlink {
            parent: 1,
            name: Bytes::from(name),
            ino,
        },
    };
    let recs = vec![
        create(1, 9, "x"),
        write(2, 9, 0, b"old", 3),
        unlink(3, 9, "x"),
        write(4, 9, 0, b"OLD", 3),
        create(5, 9, "y"),
        write(6, 9, 0, b"new", 3),
    ];
    let out = compact(&recs);
    let kinds: Vec<(&str, Seq)> = out.iter().map(|r| (r.op.kind_name(), r.seq)).collect();
    assert_eq!(
        kinds,
        vec![
            ("create", 1),
            ("unlink", 3),
            ("write", 4),
            ("write", 4),
            ("create", 5),
            ("write", 6),
            ("write", 6),
        ]
    );
}

#[test]
fn cut_points_table() {
    const MIN: i64 = 60_000_000_000;
    let cuts = Cuts {
        after_seqs: [10].into(),
        at_times: [5 * MIN + 7].into(),
        minutes: Some((2 * MIN, 4 * MIN)),
        bases: vec![(20, 7 * MIN)],
    };
    // (a, b, cut between them?)
    let table = [
        ((10, MIN), (11, MIN + 1), true),  // after a kept base's start
        ((11, MIN), (12, MIN + 1), false), // nothing between
        ((12, 2 * MIN - 1), (13, 2 * MIN), false), // a minute, but b is at it
        ((12, 2 * MIN), (13, 2 * MIN + 1), true), // a at the minute: cut after a
        ((12, 2 * MIN - 1), (13, 2 * MIN + 1), true),
        ((12, 4 * MIN - 1), (13, 4 * MIN + 1), false), // outside the minutes range
        ((12, MIN - 1), (13, MIN + 1), false),         // before it
        ((12, MIN - 1), (13, 2 * MIN + 1), true),      // idle across the range's start
        ((12, MIN - 1), (13, 5 * MIN), true),          // idle across the whole range
        ((12, 5 * MIN + 7), (13, 5 * MIN + 8), true),  // at a base's completion
        ((12, 5 * MIN + 6), (13, 5 * MIN + 7), false),
    ];
    for (a, b, want) in table {
        assert_eq!(cuts.between(a, b), want, "{a:?} {b:?}");
    }
    assert!(cuts.is_raw((21, 7 * MIN)));
    assert!(!cuts.is_raw((20, 7 * MIN)));
    assert!(!cuts.is_raw((21, 7 * MIN + 1)));
    // The cutter: a raw run is its own piece, and pieces chain.
    let cuts = Cuts {
        after_seqs: [3].into(),
        at_times: [50].into(),
        minutes: None,
        bases: vec![(3, 50)],
    };
    let mut c = Cutter::new(&cuts, 7, 0, usize::MAX);
    let mut pieces = Vec::new();
    for s in 1..=8 {
        pieces.extend(c.push(write(s, 1, 0, b"x", 1)));
    }
    pieces.extend(c.finish(None));
    let got: Vec<(Seq, Seq, bool)> = pieces
        .iter()
        .map(|p| (p.meta.from_seq, p.meta.to_seq, p.raw))
        .collect();
    assert_eq!(got, vec![(0, 3, false), (3, 5, true), (5, 8, false)]);
    // A size bound cuts too.
    let none = Cuts::default();
    let mut c = Cutter::new(&none, 7, 0, 100);
    let n = (1..=4)
        .filter_map(|s| c.push(write(s, 1, 0, &[0; 80], 80)))
        .count();
    assert_eq!(n, 3);
}
