//! The parallel restore (base chunks on a job pool, segments fetched
//! ahead): whatever the number of jobs it builds the same tree as one job,
//! records written after the base land on top of every base chunk, and a
//! store that fails mid-restore (the chunk or the segment that fails is
//! chosen by the case) stops it with that store's error, leaves the
//! incomplete marker and writes nothing outside the target.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use rewind::base::{Link, Object, CHUNK_SIZE};
use rewind::progress::Meter;
use rewind::record::{Kind, Op};
use rewind::restore::{restore_with, Options};
use rewind::store::{Result as StoreResult, Store, StoreError};
use support::stores::{file_store, latest_plan, put_base, put_chunks, put_segment, records};

const ROOT: u64 = 100;
const LINEAGE: u64 = 0x77;
const FILES: u64 = 40;

/// A store whose gets fail from the `at`-th get of a key containing
/// `part` on (the store went away and stays away): a fault injected beside
/// the real file store, counted so the test knows the failure happened.
struct FailFrom {
    inner: Arc<dyn Store>,
    part: &'static str,
    at: u64,
    seen: AtomicU64,
    gets_after: AtomicU64,
}

impl Store for FailFrom {
    fn put(&self, key: &str, data: Bytes) -> StoreResult<()> {
        self.inner.put(key, data)
    }
    fn get(&self, key: &str) -> StoreResult<Bytes> {
        if key.contains(self.part) && self.seen.fetch_add(1, Ordering::SeqCst) + 1 >= self.at {
            self.gets_after.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::Unreachable {
                store: "test".into(),
                detail: format!("injected failure on {key}"),
            });
        }
        self.inner.get(key)
    }
    fn exists(&self, key: &str) -> StoreResult<bool> {
        self.inner.exists(key)
    }
    fn list_sized(&self, prefix: &str) -> StoreResult<Vec<(String, u64)>> {
        self.inner.list_sized(prefix)
    }
    fn delete(&self, key: &str) -> StoreResult<()> {
        self.inner.delete(key)
    }
    fn describe(&self) -> String {
        "failing test store".into()
    }
    fn chunk_naming(&self) -> StoreResult<rewind::crypt::ChunkNaming> {
        self.inner.chunk_naming()
    }
}

/// File `i` is `i % 4` whole chunks plus a tail of `i * 1000` bytes, so
/// there are empty, single-chunk and multi-chunk files.
fn size_of(i: u64) -> u64 {
    (i % 4) * CHUNK_SIZE + i * 1000
}

/// A store holding a base of FILES files and one segment of records
/// that overwrite the start of every file and append to every fifth.
fn store(dir: &Path) -> (Arc<dyn Store>, Vec<(String, Vec<u8>)>) {
    let store = file_store(dir);
    let mut objects = vec![Object::dir(ROOT)];
    let mut links = vec![];
    let mut want = vec![];
    let mut recs = vec![];
    for i in 0..FILES {
        let ino = 1000 + i;
        // Bytes that differ per file and chunk.
        let mut data = support::pattern(size_of(i) as usize, 2 * i + 1).to_vec();
        let extents = put_chunks(store.as_ref(), &data, CHUNK_SIZE as usize);
        let mut o = Object::dir(ino);
        o.kind = Kind::File;
        o.mode = 0o640;
        o.size = data.len() as u64;
        o.mtime = 7;
        o.extents = extents;
        objects.push(o);
        let name = format!("f{i:03}");
        links.push(Link {
            parent: ROOT,
            name: Bytes::from(name.clone()),
            ino,
        });
        // A record over the base: it must win over the base's chunk.
        let patch = format!("record {i}").into_bytes();
        let end = (patch.len() as u64).max(data.len() as u64);
        let mut size = end;
        if i % 5 == 0 {
            size = end + 10;
        }
        recs.push(Op::Write {
            ino,
            offset: 0,
            size,
            mtime: 9,
            data: Bytes::from(patch.clone()),
        });
        if data.len() < patch.len() {
            data.resize(patch.len(), 0);
        }
        data[..patch.len()].copy_from_slice(&patch);
        data.resize(size as usize, 0);
        want.push((name, data));
    }
    put_base(store.as_ref(), LINEAGE, ROOT, objects, links);
    // Two segments, so that one is fetched ahead while the other applies.
    let recs = records(recs);
    let half = recs.len() / 2;
    for part in [&recs[..half], &recs[half..]] {
        put_segment(store.as_ref(), LINEAGE, part);
    }
    (store, want)
}

fn restore(store: &dyn Store, target: &Path, jobs: usize) -> Result<(), String> {
    let plan = latest_plan(store);
    let meter = Meter::silent();
    restore_with(
        store,
        &plan,
        target,
        false,
        &Options {
            jobs,
            meter: &meter,
            paths: &[],
        },
        &mut |_| {},
    )
    .map(|_| ())
    .map_err(|e| e.to_string())
}

#[test]
fn any_number_of_jobs_restores_the_same_tree() {
    let dir = tempfile::tempdir().unwrap();
    let (store, want) = store(dir.path());
    for jobs in [1, 2, 8, 64] {
        let target = dir.path().join(format!("t{jobs}"));
        restore(store.as_ref(), &target, jobs).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&target)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let want_names: Vec<String> = want.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(names, want_names, "jobs={jobs}: names (and no marker)");
        for (name, data) in &want {
            let got = std::fs::read(target.join(name)).unwrap();
            assert!(got == *data, "jobs={jobs}: {name} differs");
        }
    }
}

#[test]
fn a_store_failing_mid_restore_stops_it_marked_incomplete() {
    // (what fails, from which get of it, jobs)
    let cases = [
        ("chunk/", 1, 1),
        ("chunk/", 10, 4),
        ("chunk/", 30, 16),
        ("seg/", 1, 8),
        ("seg/", 2, 8),
        ("seg/", 2, 1),
    ];
    for (part, at, jobs) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (inner, _) = store(dir.path());
        let failing = FailFrom {
            inner,
            part,
            at,
            seen: AtomicU64::new(0),
            gets_after: AtomicU64::new(0),
        };
        let target = dir.path().join("target");
        let err = restore(&failing, &target, jobs).expect_err("a failing store fails the restore");
        let case = format!("{part} from get {at}, {jobs} jobs");
        assert!(
            err.contains("unreachable") && err.contains("injected failure"),
            "{case}: the error names the store's failure: {err}"
        );
        assert!(
            target.join(".rewind/restore-incomplete").exists(),
            "{case}: the target stays marked incomplete"
        );
        // The first failure stops the fetching: only the jobs already
        // queued or running may still try the store.
        let after = failing.gets_after.load(Ordering::SeqCst);
        assert!(
            after <= 1 + 3 * jobs as u64 + 4,
            "{case}: {after} gets after the failure"
        );
        let outside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != "store" && n != "target")
            .collect();
        assert!(
            outside.is_empty(),
            "{case}: wrote outside the target: {outside:?}"
        );
    }
}
