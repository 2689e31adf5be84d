//! Restore against hostile and damaged stores, built with the library's own
//! encoders so each case is exactly one kind of damage. Every case checks
//! that the restore fails with a message naming the problem and that
//! nothing was written outside the target.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use rewind::base::{self, Object};
use rewind::clock::At;
use rewind::record::{Kind, Op, Record};
use rewind::store::Store;
use rewind::timeline::Timeline;
use support::stores::{file_store, put_base, put_chunks, put_segment, records};

const ROOT: u64 = 100;
const LINEAGE: u64 = 0x1234;

struct Fixture {
    dir: tempfile::TempDir,
    store: Arc<dyn Store>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = file_store(dir.path());
        put_base(
            store.as_ref(),
            LINEAGE,
            ROOT,
            vec![Object::dir(ROOT)],
            vec![],
        );
        Fixture { dir, store }
    }

    fn segment(&self, ops: Vec<Op>) {
        put_segment(self.store.as_ref(), LINEAGE, &records(ops));
    }

    fn target(&self) -> PathBuf {
        self.dir.path().join("target")
    }

    fn restore(&self) -> Result<(), String> {
        let t = Timeline::load(self.store.as_ref()).map_err(|e| e.to_string())?;
        let plan = t.plan(At::Latest, None).map_err(|e| e.to_string())?;
        rewind::restore::restore(
            self.store.as_ref(),
            &plan,
            &self.target(),
            false,
            &mut |_| {},
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    /// Everything under the fixture directory except the store and target.
    fn outside(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.dir.path()).unwrap() {
            let p = e.unwrap().path();
            if p.file_name().unwrap() != "store" && p.file_name().unwrap() != "target" {
                out.push(p);
            }
        }
        out
    }
}

fn create(parent: u64, name: &str, ino: u64, kind: Kind, target: &str) -> Op {
    Op::Create {
        parent,
        name: Bytes::copy_from_slice(name.as_bytes()),
        ino,
        kind,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: 5,
        rdev: 0,
        target: Bytes::copy_from_slice(target.as_bytes()),
    }
}

fn check_refused(ops: Vec<Op>, want: &str) {
    let f = Fixture::new();
    f.segment(ops);
    let err = f.restore().expect_err("a hostile segment must be refused");
    assert!(err.contains(want), "error {err:?} should mention {want:?}");
    assert!(
        f.outside().is_empty(),
        "restore wrote outside the target: {:?}",
        f.outside()
    );
    assert!(
        f.target().join(".rewind/restore-incomplete").exists(),
        "a failed restore must stay marked incomplete"
    );
}

#[test]
fn names_that_leave_the_directory_are_refused() {
    for name in ["..", "../evil", "a/b", ".", "", "x\0y"] {
        check_refused(vec![create(ROOT, name, 7, Kind::File, "")], "hostile");
    }
}

#[test]
fn renames_to_hostile_names_are_refused() {
    check_refused(
        vec![
            create(ROOT, "ok", 7, Kind::File, ""),
            Op::Rename {
                from_parent: ROOT,
                from_name: Bytes::from_static(b"ok"),
                to_parent: ROOT,
                to_name: Bytes::from_static(b"../../escaped"),
                ino: 7,
                replaced: 0,
                flags: 0,
            },
        ],
        "hostile",
    );
}

#[test]
fn the_reserved_name_is_refused() {
    check_refused(vec![create(ROOT, ".rewind", 7, Kind::Dir, "")], "reserved");
}

#[test]
fn writes_through_a_symlink_never_leave_the_target() {
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    std::fs::write(&victim, b"untouched").unwrap();
    let f = Fixture::new();
    f.segment(vec![
        create(ROOT, "link", 7, Kind::Symlink, victim.to_str().unwrap()),
        Op::Write {
            ino: 7,
            offset: 0,
            size: 4,
            mtime: 1,
            data: Bytes::from_static(b"evil"),
        },
    ]);
    assert!(
        f.restore().is_err(),
        "a write to a symlink's identity must fail"
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
    let f = Fixture::new();
    f.segment(vec![
        create(
            ROOT,
            "link",
            7,
            Kind::Symlink,
            outside.path().to_str().unwrap(),
        ),
        create(7, "planted", 8, Kind::File, ""),
    ]);
    assert!(f.restore().unwrap_err().contains("not a directory"));
    assert!(
        !outside.path().join("planted").exists(),
        "a file was created through a symlink"
    );
}

#[test]
fn records_naming_unknown_files_are_refused() {
    check_refused(
        vec![Op::Write {
            ino: 999,
            offset: 0,
            size: 1,
            mtime: 1,
            data: Bytes::from_static(b"x"),
        }],
        "never created",
    );
}

fn damage(path: &Path, how: &str) {
    let mut b = std::fs::read(path).unwrap();
    match how {
        "flip" => {
            let i = b.len() / 2;
            b[i] ^= 0x01;
        }
        "truncate" => b.truncate(b.len() - 7),
        _ => unreachable!(),
    }
    std::fs::write(path, b).unwrap();
}

fn find(dir: &Path, part: &str) -> PathBuf {
    walk(dir)
        .into_iter()
        .find(|p| p.to_string_lossy().contains(part))
        .unwrap_or_else(|| panic!("no {part} under {}", dir.display()))
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn damaged_objects_are_refused_with_a_clear_error() {
    for (part, how, want) in [
        ("/seg/", "flip", "checksum"),
        ("/seg/", "truncate", "checksum"),
        ("/base/", "flip", "checksum"),
        ("/base/", "truncate", "checksum"),
        ("/chunk/", "flip", "checksum"),
        ("/chunk/", "truncate", "checksum"),
    ] {
        let f = Fixture::new();
        // A base with one real chunk, so there is a chunk to damage.
        let data = vec![42u8; 5000];
        let extents = put_chunks(f.store.as_ref(), &data, data.len());
        let mut m = base::load_manifest(
            f.store.as_ref(),
            &Timeline::load(f.store.as_ref()).unwrap().bases[0],
        )
        .unwrap();
        m.objects.push(Object {
            ino: 7,
            kind: Kind::File,
            mode: 0o600,
            uid: 0,
            gid: 0,
            size: 5000,
            mtime: 9,
            rdev: 0,
            target: Bytes::new(),
            xattrs: vec![],
            extents,
        });
        m.links.push(base::Link {
            parent: ROOT,
            name: Bytes::from_static(b"f"),
            ino: 7,
        });
        std::fs::remove_dir_all(f.dir.path().join("store/vol/base")).unwrap();
        base::store_manifest(f.store.as_ref(), &m).unwrap();
        f.segment(vec![Op::Write {
            ino: 7,
            offset: 0,
            size: 5000,
            mtime: 10,
            data: Bytes::from_static(b"hello"),
        }]);
        assert!(f.restore().is_ok(), "the undamaged fixture restores");
        std::fs::remove_dir_all(f.target()).unwrap();
        damage(&find(&f.dir.path().join("store"), part), how);
        let err = f.restore().expect_err("damage must be refused");
        assert!(
            err.contains(want) || err.contains("damaged"),
            "{part} {how}: {err}"
        );
        let rep = rewind::verify::verify(f.store.as_ref(), &mut |_| {}).unwrap();
        assert!(!rep.problems.is_empty(), "verify must report {part} {how}");
    }
}

#[test]
fn a_time_outside_the_window_names_the_window() {
    let f = Fixture::new();
    f.segment(vec![create(ROOT, "a", 7, Kind::File, "")]);
    let t = Timeline::load(f.store.as_ref()).unwrap();
    let err = t.plan(At::Instant(10), None).unwrap_err().to_string();
    assert!(
        err.contains("outside the restore window") && err.contains("1970-01-01T00:00:00.000002Z"),
        "{err}"
    );
    let err = t
        .plan(At::Instant(1_000_000_000_000_000_000), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("outside the restore window"), "{err}");
}

#[test]
fn a_missing_segment_is_a_gap_not_a_silent_skip() {
    let f = Fixture::new();
    let recs: Vec<Record> = (1..=4)
        .map(|s| Record {
            seq: s,
            time: 3_000 + s as i64,
            op: create(ROOT, &format!("f{s}"), 10 + s, Kind::File, ""),
        })
        .collect();
    for part in [&recs[0..1], &recs[2..4]] {
        put_segment(f.store.as_ref(), LINEAGE, part);
    }
    let t = Timeline::load(f.store.as_ref()).unwrap();
    let err = t.plan(At::Instant(3_004), None).unwrap_err().to_string();
    assert!(err.contains("outside") || err.contains("missing"), "{err}");
    assert!(
        t.plan(At::Instant(3_001), None).is_ok(),
        "the time before the gap restores"
    );
    let rep = rewind::verify::verify(f.store.as_ref(), &mut |_| {}).unwrap();
    assert!(
        rep.problems.iter().any(|p| p.contains("missing")),
        "{:?}",
        rep.problems
    );
}

#[test]
fn a_non_empty_target_is_refused_without_force() {
    let f = Fixture::new();
    f.segment(vec![create(ROOT, "a", 7, Kind::File, "")]);
    std::fs::create_dir_all(f.target()).unwrap();
    std::fs::write(f.target().join("precious"), b"keep").unwrap();
    let err = f.restore().unwrap_err();
    assert!(
        err.contains("not empty") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(std::fs::read(f.target().join("precious")).unwrap(), b"keep");
}
