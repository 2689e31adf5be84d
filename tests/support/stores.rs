//! Small stores built with the library's own encoders, for the restore and
//! view suites: a file store under the volume prefix `vol`, a first base
//! (started at 1 µs, completed at 2 µs), its chunks, and segments of
//! records numbered from 1 and timed from 3 µs on.

use std::path::Path;
use std::sync::Arc;

use rewind::base::{self, BaseKind, Extent, Link, Manifest, Object};
use rewind::clock::At;
use rewind::record::{Op, Record};
use rewind::segment;
use rewind::store::{file::FileStore, Prefixed, Store};
use rewind::timeline::{Plan, Timeline};

/// A file store in `dir/store`, seen through the volume prefix `vol`.
pub fn file_store(dir: &Path) -> Arc<dyn Store> {
    let root: Arc<dyn Store> = Arc::new(FileStore::open(dir.join("store")).unwrap());
    Arc::new(Prefixed::new(root, "vol"))
}

/// Stores the first base of `lineage`: the directory `root` and `objects`
/// (the root's own object among them) named by `links`.
pub fn put_base(
    store: &dyn Store,
    lineage: u64,
    root: u64,
    objects: Vec<Object>,
    links: Vec<Link>,
) {
    let m = Manifest {
        lineage,
        start_seq: 0,
        started_ns: 1_000,
        completed_ns: 2_000,
        kind: BaseKind::Initial,
        root,
        objects,
        links,
    };
    base::store_manifest(store, &m).unwrap();
}

/// Stores `data` as chunks of `chunk_size` bytes and returns the extents
/// that name them, for a base object.
pub fn put_chunks(store: &dyn Store, data: &[u8], chunk_size: usize) -> Vec<Extent> {
    data.chunks(chunk_size)
        .enumerate()
        .map(|(i, c)| {
            let hash = *blake3::hash(c).as_bytes();
            store
                .put(&base::chunk_key(&hash), base::encode_chunk(c))
                .unwrap();
            Extent {
                offset: (i * chunk_size) as u64,
                len: c.len() as u32,
                hash,
            }
        })
        .collect()
}

/// `ops` as the records after the base: sequence numbers from 1, times
/// from 3 µs, one apart.
pub fn records(ops: Vec<Op>) -> Vec<Record> {
    ops.into_iter()
        .enumerate()
        .map(|(i, op)| Record {
            seq: 1 + i as u64,
            time: 3_000 + i as i64,
            op,
        })
        .collect()
}

/// Stores `recs` as one segment of `lineage`.
pub fn put_segment(store: &dyn Store, lineage: u64, recs: &[Record]) {
    let (meta, data) = segment::encode(lineage, recs);
    store.put(&meta.key(), data).unwrap();
}

/// The plan of a restore at the latest instant the store holds.
pub fn latest_plan(store: &dyn Store) -> Plan {
    Timeline::load(store)
        .unwrap()
        .plan(At::Latest, None)
        .unwrap()
}
