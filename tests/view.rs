//! The mount view's core (`rewind::view::View`) against a store built with
//! the library's own encoders: a base file of several chunks, then records
//! that overwrite, extend, punch, truncate and link it. Reads at every
//! interesting offset must equal a plain model of the file; nothing but
//! the manifest and the segments is fetched to open the view; a store
//! outage makes a read fail with EIO (never other bytes) and the same
//! read succeeds once the store is back.

mod support;

use std::sync::Arc;

use bytes::Bytes;
use rewind::base::{self, Object};
use rewind::record::{Kind, Op};
use rewind::store::faulty::{self, FaultyStore};
use rewind::store::{file::FileStore, Prefixed, Store};
use rewind::view::{ReadOnlyTree, View};
use support::pattern;
use support::stores::{latest_plan, put_base, put_chunks, put_segment, records};

const ROOT: u64 = 100;
const FILE: u64 = 101;
const LINEAGE: u64 = 0x1234;
const MIB: usize = 1 << 20;
const PUNCH_HOLE_KEEP_SIZE: u32 = 0x02 | 0x01;

fn build(store: &dyn Store) -> Vec<u8> {
    // The base: FILE holds 2.5 MiB in three chunks, whose bytes never
    // repeat (so no two chunks dedupe to one).
    let data = pattern(5 * MIB / 2, 7).to_vec();
    let extents = put_chunks(store, &data, MIB);
    let file = Object {
        ino: FILE,
        kind: Kind::File,
        mode: 0o640,
        uid: 7,
        gid: 8,
        size: data.len() as u64,
        mtime: 1_500,
        rdev: 0,
        target: Bytes::new(),
        xattrs: vec![(Bytes::from_static(b"user.a"), Bytes::from_static(b"1"))],
        extents,
    };
    let links = vec![base::Link {
        parent: ROOT,
        name: Bytes::from_static(b"f"),
        ino: FILE,
    }];
    put_base(store, LINEAGE, ROOT, vec![Object::dir(ROOT), file], links);

    // The records, and the same changes on the model.
    let mut model = data;
    let over = pattern(100_000, 99);
    let at = MIB - 50_000;
    model[at..at + over.len()].copy_from_slice(&over);
    let tail = pattern(700_000, 3);
    model.extend_from_slice(&tail);
    let grown = model.len() as u64;
    model[2 * MIB..2 * MIB + 4096].fill(0);
    model.truncate(3 * MIB);
    let w = |offset: usize, data: &[u8], size: u64| Op::Write {
        ino: FILE,
        offset: offset as u64,
        size,
        mtime: 3_000,
        data: Bytes::copy_from_slice(data),
    };
    let ops = vec![
        w(at, &over, 5 * MIB as u64 / 2),
        w(5 * MIB / 2, &tail, grown),
        Op::Fallocate {
            ino: FILE,
            mode: PUNCH_HOLE_KEEP_SIZE,
            offset: 2 * MIB as u64,
            len: 4096,
            size: grown,
            mtime: 3_001,
        },
        Op::SetAttr {
            ino: FILE,
            mode: 0o600,
            uid: 7,
            gid: 8,
            size: 3 * MIB as u64,
            mtime: 3_002,
        },
        Op::Link {
            ino: FILE,
            parent: ROOT,
            name: Bytes::from_static(b"g"),
        },
    ];
    put_segment(store, LINEAGE, &records(ops));
    model
}

#[test]
fn view_reads_equal_the_model_and_fail_with_eio_while_the_store_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let root: Arc<dyn Store> = Arc::new(FileStore::open(dir.path().join("store")).unwrap());
    let faulty = Arc::new(FaultyStore::new(root));
    let store: Arc<dyn Store> = Arc::new(Prefixed::new(faulty.clone(), "vol"));
    let model = build(store.as_ref());
    let plan = latest_plan(store.as_ref());

    let gets_before = faulty.calls(faulty::Op::Get);
    // A cache of one chunk: every read of another chunk fetches again.
    let silent = rewind::progress::Meter::silent();
    let (view, opened) =
        View::open(store.clone(), &plan, MIB as u64, &silent, &mut |_| {}).unwrap();
    assert_eq!(opened.records, 5);
    assert_eq!(
        faulty.calls(faulty::Op::Get) - gets_before,
        2,
        "opening the view fetches the manifest and the segment, no chunk"
    );

    let f = view.lookup(ROOT, b"f").unwrap();
    let g = view.lookup(ROOT, b"g").unwrap();
    assert_eq!(
        (f.ino, f.nlink, f.size, f.perm, f.uid, f.gid),
        (FILE, 2, model.len() as u64, 0o600, 7, 8)
    );
    assert_eq!(g.ino, f.ino, "two names of one file show one inode");
    assert_eq!(f.mtime, 3_002);
    assert_eq!(view.getxattr(FILE, b"user.a").unwrap().as_ref(), b"1");
    let names: Vec<Vec<u8>> = view
        .readdir(ROOT)
        .unwrap()
        .into_iter()
        .map(|e| e.0.to_vec())
        .collect();
    assert_eq!(names, vec![b"f".to_vec(), b"g".to_vec()]);

    let len = model.len() as u64;
    let cases: &[(&str, u64, u32)] = &[
        ("start", 0, 4096),
        ("across a chunk and a write", MIB as u64 - 60_000, 200_000),
        ("the punched hole", 2 * MIB as u64 - 10, 5000),
        ("record data past the base", 5 * MIB as u64 / 2 + 5, 70_000),
        ("up to the end", len - 100, 4096),
        ("past the end", len + 10, 4096),
        ("a whole chunk, sequentially", 0, MIB as u32),
        ("the next one", MIB as u64, MIB as u32),
    ];
    for (what, off, size) in cases {
        let end = (off + u64::from(*size)).min(len);
        let want = if *off >= len {
            &[][..]
        } else {
            &model[*off as usize..end as usize]
        };
        assert_eq!(view.read(FILE, *off, *size).unwrap(), want, "{what}");
    }

    // The store goes away: a read of a chunk the cache no longer holds
    // fails with EIO; record bytes are in memory and still read.
    faulty.set_down(true);
    assert_eq!(view.read(FILE, 10, 100), Err(rustix::io::Errno::IO));
    let rec = 5 * MIB / 2 + 5;
    assert_eq!(
        view.read(FILE, rec as u64, 100).unwrap(),
        &model[rec..rec + 100]
    );
    faulty.set_down(false);
    assert_eq!(
        view.read(FILE, 10, 100).unwrap(),
        &model[10..110],
        "works again once the store is back"
    );
}
