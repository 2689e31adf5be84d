//! Diff's decisions: which changes two trees and the records between them
//! make, and what a second of writes counts.

use bytes::Bytes;

use super::*;
use crate::replay::{clean_path, within, Policy, Replay};

const ROOT: Ino = 1;

fn op_create(parent: Ino, name: &str, ino: Ino, kind: Kind) -> Op {
    Op::Create {
        parent,
        name: Bytes::copy_from_slice(name.as_bytes()),
        ino,
        kind,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: 1,
        rdev: 0,
        target: Bytes::new(),
    }
}

fn op_write(ino: Ino, offset: u64, n: usize, size: u64) -> Op {
    Op::Write {
        ino,
        offset,
        size,
        mtime: 2,
        data: Bytes::from(vec![b'x'; n]),
    }
}

fn op_rename(from: (Ino, &str), to: (Ino, &str), ino: Ino) -> Op {
    Op::Rename {
        from_parent: from.0,
        from_name: Bytes::copy_from_slice(from.1.as_bytes()),
        to_parent: to.0,
        to_name: Bytes::copy_from_slice(to.1.as_bytes()),
        ino,
        replaced: 0,
        flags: 0,
    }
}

fn op_attr(ino: Ino, mode: u32, uid: u32, size: u64) -> Op {
    Op::SetAttr {
        ino,
        mode,
        uid,
        gid: 0,
        size,
        mtime: 1,
    }
}

/// A tree made by `setup`, and the changes that `ops` (one second each,
/// from second 10) make to it.
fn changes(setup: Vec<Op>, ops: Vec<Op>) -> (Vec<String>, Activity) {
    let mut t = Replay::new(Memory::default(), Policy::Exact);
    t.set_root(ROOT);
    t.base_object(&crate::base::Object::dir(ROOT)).unwrap();
    let mut seq = 0;
    for op in setup {
        seq += 1;
        t.apply(&Record { seq, time: 1, op }).unwrap();
    }
    let before = t.target.listing(&t.ns);
    let mut act = Activity::default();
    for (i, op) in ops.into_iter().enumerate() {
        seq += 1;
        let r = Record {
            seq,
            time: (10 + i as i64) * 1_000_000_000,
            op,
        };
        t.apply(&r).unwrap();
        act.see(&r, 0.5);
    }
    let after = t.target.listing(&t.ns);
    let out = compare(&before, &after, &act)
        .into_iter()
        .map(|c| {
            let mut s = format!("{} {} {}", c.change.name(), c.kind, c.paths.join(","));
            if !c.from.is_empty() {
                s += &format!(" from {}", c.from.join(","));
            }
            if let Some(n) = c.bytes_written {
                s += &format!(" wrote {n}");
            }
            if let (Some(b), Some(a)) = (&c.before, &c.after) {
                s += &format!(" {b}->{a}");
            }
            s
        })
        .collect();
    (out, act)
}

#[test]
fn each_kind_of_change_is_reported_once_per_file() {
    let base = || {
        vec![
            op_create(ROOT, "d", 2, Kind::Dir),
            op_create(2, "f", 3, Kind::File),
            op_write(3, 0, 4, 4),
            op_create(ROOT, "g", 4, Kind::File),
        ]
    };
    let cases: Vec<(&str, Vec<Op>, Vec<&str>)> = vec![
        ("nothing", vec![], vec![]),
        (
            "a new file",
            vec![op_create(ROOT, "n", 9, Kind::File), op_write(9, 0, 3, 3)],
            vec!["created file n"],
        ),
        (
            "a deleted file",
            vec![Op::Unlink {
                parent: ROOT,
                name: Bytes::from_static(b"g"),
                ino: 4,
            }],
            vec!["deleted file g"],
        ),
        (
            "a renamed directory: its entries keep their names",
            vec![op_rename((ROOT, "d"), (ROOT, "e"), 2)],
            vec!["renamed dir e from d"],
        ),
        (
            "a file moved and written",
            vec![op_rename((2, "f"), (ROOT, "h"), 3), op_write(3, 4, 2, 6)],
            vec!["renamed file h from d/f", "modified file h wrote 2 4->6"],
        ),
        (
            "a rewrite of the same bytes is a modification",
            vec![op_write(4, 0, 0, 0), op_write(3, 0, 4, 4)],
            vec![
                "modified file d/f wrote 4 4->4",
                "modified file g wrote 0 0->0",
            ],
        ),
        (
            "mode, owner and a truncation",
            vec![op_attr(3, 0o600, 7, 1)],
            vec![
                "modified file d/f wrote 0 4->1",
                "mode file d/f 0644->0600",
                "owner file d/f 0:0->7:0",
            ],
        ),
        (
            "an identity made anew is another file",
            vec![
                Op::Unlink {
                    parent: ROOT,
                    name: Bytes::from_static(b"g"),
                    ino: 4,
                },
                op_create(ROOT, "g2", 4, Kind::File),
            ],
            vec!["deleted file g", "created file g2"],
        ),
        (
            "a new hard link",
            vec![Op::Link {
                ino: 4,
                parent: 2,
                name: Bytes::from_static(b"l"),
            }],
            vec!["renamed file d/l,g from g"],
        ),
    ];
    for (what, ops, want) in cases {
        let (got, _) = changes(base(), ops);
        assert_eq!(got, want, "{what}");
    }
}

#[test]
fn a_second_counts_bytes_full_rewrites_and_compression() {
    let setup = vec![
        op_create(ROOT, "a", 2, Kind::File),
        op_write(2, 0, 8, 8),
        op_create(ROOT, "b", 3, Kind::File),
        op_write(3, 0, 8, 8),
    ];
    // Every op lands in its own second: ops on one second are built by
    // hand below.
    let (_, act) = changes(
        setup.clone(),
        vec![op_write(2, 0, 8, 8), op_write(3, 0, 4, 8)],
    );
    let s = act.seconds();
    assert_eq!(s.len(), 2);
    assert_eq!(
        (s[0].second, s[0].bytes_written, s[0].files_rewritten),
        (10, 8, 1)
    );
    assert_eq!(
        (s[1].second, s[1].bytes_written, s[1].files_rewritten),
        (11, 4, 0)
    );
    assert_eq!(s[0].compression_ratio, Some(2.0));

    let mut act = Activity::default();
    for (i, op) in [
        op_write(2, 0, 4, 4),
        op_write(2, 4, 4, 8),
        op_attr(3, 0o644, 0, 0),
    ]
    .into_iter()
    .enumerate()
    {
        let r = Record {
            seq: i as u64,
            time: 5_000_000_000 + i as i64,
            op,
        };
        act.see(&r, 1.0);
    }
    let s = act.seconds();
    assert_eq!((s[0].bytes_written, s[0].files_rewritten), (8, 1));
    assert_eq!(s[0].compression_ratio, Some(1.0));
}

#[test]
fn ranges_cover_a_file_only_when_no_byte_is_missed() {
    let cases: Vec<(Vec<(u64, u64)>, u64, bool)> = vec![
        (vec![(0, 10)], 10, true),
        (vec![(0, 4), (4, 10)], 10, true),
        (vec![(4, 10), (0, 5)], 10, true),
        (vec![(0, 4), (5, 10)], 10, false),
        (vec![(1, 10)], 10, false),
        (vec![(0, 9)], 10, false),
        (vec![], 0, false),
        (vec![(0, 20)], 10, true),
    ];
    for (ranges, size, want) in cases {
        assert_eq!(covers(&ranges, size), want, "{ranges:?} of {size}");
    }
}

#[test]
fn a_path_filter_keeps_the_path_and_what_is_under_it() {
    let cases = [
        ("a", "", true),
        ("a", "a", true),
        ("a/b", "a", true),
        ("ab", "a", false),
        ("b/a", "a", false),
        ("a", "a/b", false),
    ];
    for (path, under, want) in cases {
        assert_eq!(within(path, under), want, "{path} within {under}");
    }
    assert_eq!(clean_path("/a//b/./c/"), "a/b/c");
    assert_eq!(clean_path("."), "");
}
