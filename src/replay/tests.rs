//! The replay core's decisions, as tables of record runs and the tree they
//! leave in memory.

use bytes::Bytes;

use super::memory::Memory;
use super::*;

const ROOT: Ino = 1;

fn rec(seq: u64, time: Nanos, op: Op) -> Record {
    Record { seq, time, op }
}

fn create(parent: Ino, name: &str, ino: Ino, kind: Kind) -> Op {
    Op::Create {
        parent,
        name: Bytes::copy_from_slice(name.as_bytes()),
        ino,
        kind,
        mode: if kind == Kind::Dir { 0o755 } else { 0o644 },
        uid: 0,
        gid: 0,
        mtime: 7,
        rdev: 0,
        target: Bytes::new(),
    }
}

fn link(ino: Ino, parent: Ino, name: &str) -> Op {
    Op::Link {
        ino,
        parent,
        name: Bytes::copy_from_slice(name.as_bytes()),
    }
}

fn unlink(parent: Ino, name: &str, ino: Ino) -> Op {
    Op::Unlink {
        parent,
        name: Bytes::copy_from_slice(name.as_bytes()),
        ino,
    }
}

fn rename(from: (Ino, &str), to: (Ino, &str), ino: Ino, replaced: Ino, flags: u8) -> Op {
    Op::Rename {
        from_parent: from.0,
        from_name: Bytes::copy_from_slice(from.1.as_bytes()),
        to_parent: to.0,
        to_name: Bytes::copy_from_slice(to.1.as_bytes()),
        ino,
        replaced,
        flags,
    }
}

fn write(ino: Ino, offset: u64, data: &str, size: u64) -> Op {
    Op::Write {
        ino,
        offset,
        size,
        mtime: 9,
        data: Bytes::copy_from_slice(data.as_bytes()),
    }
}

fn chmod(ino: Ino, mode: u32) -> Op {
    Op::SetAttr {
        ino,
        mode,
        uid: 5,
        gid: 6,
        size: 0,
        mtime: 11,
    }
}

/// The tree as lines `path ino kind mode size written`, sorted by path.
fn render(r: &Replay<Memory>) -> Vec<String> {
    r.target
        .listing(&r.ns)
        .into_iter()
        .map(|(p, e)| {
            format!(
                "{p} {} {:?} {:o} {} {}",
                if e.ino > u64::MAX / 2 { 0 } else { e.ino },
                e.kind,
                e.attrs.mode,
                e.size,
                e.written
            )
        })
        .collect()
}

fn exact() -> Replay<Memory> {
    let mut r = Replay::new(Memory::default(), Policy::Exact);
    r.set_root(ROOT);
    r.base_object(&crate::base::Object::dir(ROOT)).unwrap();
    r
}

/// A redo's replay over a source that holds `names` (path, ino, kind).
fn converge(names: &[(Ino, &str, Ino, Kind)]) -> Replay<Memory> {
    let mut r = Replay::new(Memory::default(), Policy::Converge);
    r.set_root(ROOT);
    for &(parent, name, ino, kind) in names {
        if !r.target.objects.contains_key(&ino) {
            let attrs = Attrs {
                mode: 0o600,
                uid: 0,
                gid: 0,
            };
            r.target.make(&r.ns, ino, kind, attrs, 0, b"").unwrap();
        }
        r.seed(
            parent,
            Bytes::copy_from_slice(name.as_bytes()),
            ino,
            kind,
            0,
        );
    }
    r
}

/// Applies `ops` in order and checks the outcomes and the tree.
fn check(mut r: Replay<Memory>, ops: Vec<Op>, outcomes: &[Outcome], want: &[&str]) {
    let mut got = Vec::new();
    for (i, op) in ops.into_iter().enumerate() {
        got.push(r.apply(&rec(i as u64 + 1, 1000, op)).unwrap());
    }
    assert_eq!(got, outcomes, "outcomes");
    assert_eq!(render(&r), want, "tree");
}

use Kind::{Dir, File};
use Outcome::{Applied as A, Created as C, Skipped as S};

#[test]
fn exact_namespace_decisions() {
    let cases: Vec<(&str, Vec<Op>, Vec<Outcome>, Vec<&str>)> = vec![
        (
            "a rename between two links of one file does nothing",
            vec![
                create(ROOT, "a", 2, File),
                link(2, ROOT, "b"),
                rename((ROOT, "a"), (ROOT, "b"), 2, 2, 0),
            ],
            vec![C, A, A],
            vec!["a 2 File 644 0 0", "b 2 File 644 0 0"],
        ),
        (
            "an exchange whose sides match swaps them",
            vec![
                create(ROOT, "a", 2, File),
                create(ROOT, "b", 3, Dir),
                rename((ROOT, "a"), (ROOT, "b"), 2, 3, 1),
            ],
            vec![C, C, A],
            vec!["a 3 Dir 755 0 0", "b 2 File 644 0 0"],
        ),
        (
            "an exchange whose sides do not match names each file where the record says",
            vec![
                create(ROOT, "a", 2, File),
                create(ROOT, "c", 3, File),
                rename((ROOT, "a"), (ROOT, "b"), 2, 3, 1),
            ],
            vec![C, C, A],
            vec!["a 3 File 644 0 0", "b 2 File 644 0 0", "c 3 File 644 0 0"],
        ),
        (
            "a rename over a file takes its name",
            vec![
                create(ROOT, "a", 2, File),
                create(ROOT, "b", 3, File),
                rename((ROOT, "a"), (ROOT, "b"), 2, 3, 0),
            ],
            vec![C, C, A],
            vec!["b 2 File 644 0 0"],
        ),
        (
            "a rename whose source was never seen names the file at its target",
            vec![
                create(ROOT, "a", 2, File),
                rename((ROOT, "x"), (ROOT, "b"), 2, 0, 0),
            ],
            vec![C, A],
            vec!["a 2 File 644 0 0", "b 2 File 644 0 0"],
        ),
        (
            "a create for a live identity ends the earlier object",
            vec![
                create(ROOT, "a", 2, File),
                link(2, ROOT, "b"),
                create(ROOT, "c", 2, Dir),
            ],
            vec![C, A, C],
            vec!["c 2 Dir 755 0 0"],
        ),
        (
            "an unlink whose name holds another file does nothing",
            vec![create(ROOT, "a", 2, File), unlink(ROOT, "a", 3)],
            vec![C, S],
            vec!["a 2 File 644 0 0"],
        ),
        (
            "a directory moves with its entries",
            vec![
                create(ROOT, "d", 2, Dir),
                create(2, "f", 3, File),
                rename((ROOT, "d"), (ROOT, "e"), 2, 0, 0),
            ],
            vec![C, C, A],
            vec!["e 2 Dir 755 0 0", "e/f 3 File 644 0 0"],
        ),
        (
            "a write grows the file, sets the recorded size and counts its bytes",
            vec![
                create(ROOT, "a", 2, File),
                write(2, 4, "abcd", 8),
                write(2, 0, "xy", 3),
            ],
            vec![C, A, A],
            vec!["a 2 File 644 3 6"],
        ),
        (
            "attributes change mode and owner; a file takes the recorded size",
            vec![
                create(ROOT, "a", 2, File),
                write(2, 0, "abc", 3),
                chmod(2, 0o4700),
            ],
            vec![C, A, A],
            vec!["a 2 File 4700 0 3"],
        ),
        (
            "an identity discarded with its directory takes its entries out of the tree",
            vec![
                create(ROOT, "d", 2, Dir),
                create(2, "f", 3, File),
                create(ROOT, "g", 2, File),
            ],
            vec![C, C, C],
            vec!["g 2 File 644 0 0"],
        ),
    ];
    for (what, ops, outcomes, want) in cases {
        eprintln!("case: {what}");
        check(exact(), ops, &outcomes, &want);
    }
}

#[test]
fn exact_refuses_what_the_timeline_cannot_hold() {
    let cases: Vec<(&str, Op, &str)> = vec![
        (
            "a write to an identity nothing created",
            write(9, 0, "x", 1),
            "never created",
        ),
        (
            "a create in an unknown directory",
            create(9, "a", 2, File),
            "never created",
        ),
        (
            "a link of an unknown identity",
            link(9, ROOT, "a"),
            "neither the base",
        ),
        (
            "a name with a slash",
            create(ROOT, "a/b", 2, File),
            "hostile",
        ),
        (
            "the reserved name at the root",
            create(ROOT, HIDDEN, 2, File),
            "reserved",
        ),
        (
            "a rename onto the reserved name",
            rename((ROOT, "a"), (ROOT, HIDDEN), 2, 0, 0),
            "reserved",
        ),
    ];
    for (what, op, needle) in cases {
        let err = exact()
            .apply(&rec(1, 1000, op))
            .expect_err(what)
            .to_string();
        assert!(err.contains(needle), "{what}: {err}");
    }
}

#[test]
fn records_that_raced_the_base_walk_only_remove_entries() {
    let base = || {
        let mut r = exact();
        r.set_fuzzy_until(500);
        let mut f = crate::base::Object::dir(3);
        f.kind = File;
        f.mode = 0o600;
        r.base_object(&f).unwrap();
        r.base_links(&[crate::base::Link {
            parent: ROOT,
            name: Bytes::from_static(b"b"),
            ino: 3,
        }])
        .unwrap();
        r
    };
    let cases: Vec<(&str, Record, Vec<&str>)> = vec![
        (
            "a rename of a file the walk never saw still replaced its target",
            rec(1, 100, rename((ROOT, "x"), (ROOT, "b"), 9, 3, 0)),
            vec![],
        ),
        (
            "an exchange with a file the walk never saw moves the other file",
            rec(1, 100, rename((ROOT, "x"), (ROOT, "b"), 9, 3, 1)),
            vec!["x 3 File 600 0 0"],
        ),
        (
            "a write to a file the walk never saw is dropped",
            rec(1, 100, write(9, 0, "x", 1)),
            vec!["b 3 File 600 0 0"],
        ),
        (
            "a write to a number the walk saw as a directory is dropped",
            rec(1, 100, write(ROOT, 0, "x", 1)),
            vec!["b 3 File 600 0 0"],
        ),
    ];
    for (what, r, want) in cases {
        let mut t = base();
        assert_eq!(t.apply(&r).unwrap(), Outcome::Skipped, "{what}");
        assert_eq!(render(&t), want, "{what}");
    }
    // After the walk, the same write is an inconsistent timeline.
    let late = base().apply(&rec(1, 501, write(9, 0, "x", 1)));
    assert!(late.is_err());
}

#[test]
fn converge_applies_a_namespace_record_only_when_its_premise_holds() {
    let src = [(ROOT, "a", 2, File), (ROOT, "d", 4, Dir), (4, "f", 5, File)];
    let cases: Vec<(&str, Vec<Op>, Vec<Outcome>, Vec<&str>)> = vec![
        (
            "a create that already happened is a no-op",
            vec![create(ROOT, "a", 2, File)],
            vec![S],
            vec!["a 2 File 600 0 0", "d 4 Dir 600 0 0", "d/f 5 File 600 0 0"],
        ),
        (
            "a lost create is made again, and the old holder of its number keeps its name",
            vec![create(ROOT, "b", 2, File)],
            vec![C],
            vec![
                "a 0 File 600 0 0",
                "b 2 File 644 0 0",
                "d 4 Dir 600 0 0",
                "d/f 5 File 600 0 0",
            ],
        ),
        (
            "a create whose name a directory holds is left",
            vec![create(ROOT, "d", 7, File)],
            vec![S],
            vec!["a 2 File 600 0 0", "d 4 Dir 600 0 0", "d/f 5 File 600 0 0"],
        ),
        (
            "a create replaces a file at its name",
            vec![create(ROOT, "a", 7, File)],
            vec![C],
            vec!["a 7 File 644 0 0", "d 4 Dir 600 0 0", "d/f 5 File 600 0 0"],
        ),
        (
            "a link whose name is taken is left",
            vec![link(5, ROOT, "a")],
            vec![S],
            vec!["a 2 File 600 0 0", "d 4 Dir 600 0 0", "d/f 5 File 600 0 0"],
        ),
        (
            "an unlink of a directory that is not empty is left",
            vec![unlink(ROOT, "d", 4)],
            vec![S],
            vec!["a 2 File 600 0 0", "d 4 Dir 600 0 0", "d/f 5 File 600 0 0"],
        ),
        (
            "a rename whose source no longer names the file is left",
            vec![rename((ROOT, "x"), (ROOT, "y"), 2, 0, 0)],
            vec![S],
            vec!["a 2 File 600 0 0", "d 4 Dir 600 0 0", "d/f 5 File 600 0 0"],
        ),
        (
            "a rename of a file over a directory is left",
            vec![rename((ROOT, "a"), (ROOT, "d"), 2, 4, 0)],
            vec![S],
            vec!["a 2 File 600 0 0", "d 4 Dir 600 0 0", "d/f 5 File 600 0 0"],
        ),
        (
            "a rename over a file applies",
            vec![rename((4, "f"), (ROOT, "a"), 5, 2, 0)],
            vec![A],
            vec!["a 5 File 600 0 0", "d 4 Dir 600 0 0"],
        ),
        (
            "a write to an identity the source lost is left",
            vec![write(9, 0, "x", 1), write(4, 0, "x", 1)],
            vec![S, S],
            vec!["a 2 File 600 0 0", "d 4 Dir 600 0 0", "d/f 5 File 600 0 0"],
        ),
    ];
    for (what, ops, outcomes, want) in cases {
        eprintln!("case: {what}");
        check(converge(&src), ops, &outcomes, &want);
    }
}

#[test]
fn rename_fits_what_the_kernel_allows() {
    let cases = [
        (File, None, true),
        (File, Some((File, 0)), true),
        (File, Some((Dir, 0)), false),
        (Dir, Some((File, 0)), false),
        (Dir, Some((Dir, 0)), true),
        (Dir, Some((Dir, 2)), false),
        (Kind::Symlink, Some((Kind::Fifo, 0)), true),
    ];
    for (moving, over, want) in cases {
        assert_eq!(rename_fits(moving, over), want, "{moving:?} over {over:?}");
    }
}

#[test]
fn a_size_is_set_when_it_changes_or_is_zero() {
    for (model, size, want) in [(0, 0, true), (5, 5, false), (5, 6, true), (6, 5, true)] {
        assert_eq!(needs_resize(model, size), want, "{model} -> {size}");
    }
}

#[test]
fn a_replay_limited_to_some_identities_writes_only_their_data() {
    let mut r = exact();
    r.limit_data([2].into_iter().collect());
    for (i, op) in [
        create(ROOT, "a", 2, File),
        create(ROOT, "b", 3, File),
        write(2, 0, "abc", 3),
        write(3, 0, "abcd", 4),
    ]
    .into_iter()
    .enumerate()
    {
        r.apply(&rec(i as u64 + 1, 1000, op)).unwrap();
    }
    // Sizes follow the records either way; only the data is left out.
    assert_eq!(render(&r), ["a 2 File 644 3 3", "b 3 File 644 4 0"]);
}
