//! The chunk mark and sweep of `rewind prune`, against a file:// store
//! built with the library's own encoders: a chunk is deleted only once it
//! was condemned more than the grace period ago and no manifest in the
//! store names it (condemned ones included), and never while a base is
//! being uploaded. The end-to-end suite (tests/e2e/test_prune.py) covers
//! the timeline side against real mounts and S3.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rewind::base::{self, chunk_key, BaseKind, BaseMeta, Extent, Manifest, Object};
use rewind::clock::wall_now;
use rewind::prune::{prune, PruneOptions, PruneReport};
use rewind::record::Kind;
use rewind::retention::Policy;
use rewind::store::{file::FileStore, Prefixed, Store};
use rewind::timeline::Condemned;

const L: u64 = 0x77;
const SEC: i64 = 1_000_000_000;

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
}

fn chunk(store: &dyn Store, n: u8) -> [u8; 32] {
    let raw = vec![n; 1000];
    let hash = *blake3::hash(&raw).as_bytes();
    store
        .put(&chunk_key(&hash), base::encode_chunk(&raw))
        .unwrap();
    hash
}

fn manifest(store: &dyn Store, start_seq: u64, completed_ns: i64, chunks: &[[u8; 32]]) -> BaseMeta {
    let dir = Object::dir(1);
    let file = Object {
        ino: 2,
        kind: Kind::File,
        mode: 0o644,
        size: 1000 * chunks.len() as u64,
        extents: chunks
            .iter()
            .enumerate()
            .map(|(i, h)| Extent {
                offset: i as u64 * (1 << 20),
                len: 1000,
                hash: *h,
            })
            .collect(),
        ..dir.clone()
    };
    let m = Manifest {
        lineage: L,
        start_seq,
        started_ns: completed_ns - SEC,
        completed_ns,
        kind: if start_seq == 0 {
            BaseKind::Initial
        } else {
            BaseKind::Periodic
        },
        root: 1,
        objects: vec![dir, file],
        links: vec![],
    };
    base::store_manifest(store, &m).unwrap();
    m.meta()
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root: Arc<dyn Store> = Arc::new(FileStore::open(dir.path().join("store")).unwrap());
        Fixture {
            _dir: dir,
            store: Arc::new(Prefixed::new(root, "vol")),
        }
    }

    fn prune(&self, grace: Duration) -> PruneReport {
        let opts = PruneOptions {
            // Every instant for a day: the bases here are all kept or
            // condemned by hand, so only chunks are in play.
            policy: Policy {
                seconds: Duration::from_secs(86_400),
                ..Policy::default()
            },
            grace,
            dry_run: false,
        };
        prune(self.store.as_ref(), &opts).unwrap()
    }

    fn has(&self, h: &[u8; 32]) -> bool {
        self.store.exists(&chunk_key(h)).unwrap()
    }

    fn keys(&self, prefix: &str) -> Vec<String> {
        self.store.list(prefix).unwrap()
    }
}

const HOUR: Duration = Duration::from_secs(3600);

#[test]
fn an_orphan_chunk_is_condemned_then_deleted_after_the_grace() {
    let f = Fixture::new();
    let now = wall_now();
    let kept = chunk(f.store.as_ref(), 1);
    let orphan = chunk(f.store.as_ref(), 2);
    manifest(f.store.as_ref(), 0, now - 60 * SEC, &[kept]);
    let r = f.prune(HOUR);
    assert_eq!(r.kinds["chunks"].condemned.objects, 1, "{r:?}");
    assert_eq!(r.kinds["chunks"].deleted.objects, 0);
    assert!(f.has(&orphan), "deleted before the grace period");
    // The same list is not written again.
    let r = f.prune(HOUR);
    assert_eq!(r.kinds["chunks"].condemned.objects, 0, "{r:?}");
    assert_eq!(f.keys("condemned/").len(), 1);
    let r = f.prune(Duration::ZERO);
    assert_eq!(r.kinds["chunks"].deleted.objects, 1, "{r:?}");
    assert!(!f.has(&orphan) && f.has(&kept));
    assert!(f.keys("condemned/").is_empty());
    assert!(f.keys("lock/").is_empty());
}

#[test]
fn a_condemned_chunk_named_again_by_a_new_base_stays() {
    let f = Fixture::new();
    let now = wall_now();
    let a = chunk(f.store.as_ref(), 1);
    let c = chunk(f.store.as_ref(), 3);
    manifest(f.store.as_ref(), 0, now - 60 * SEC, &[a]);
    f.prune(HOUR);
    assert_eq!(f.keys("condemned/").len(), 1, "c is condemned");
    // A new base finds c in the store and names it.
    manifest(f.store.as_ref(), 10, now - SEC, &[a, c]);
    let r = f.prune(Duration::ZERO);
    assert_eq!(r.kinds["chunks"].deleted.objects, 0, "{r:?}");
    assert!(f.has(&c));
    assert!(f.keys("condemned/").is_empty(), "the list is done with");
}

#[test]
fn a_chunk_named_by_a_condemned_base_stays_until_that_base_is_deleted() {
    let f = Fixture::new();
    let now = wall_now();
    let a = chunk(f.store.as_ref(), 1);
    let c = chunk(f.store.as_ref(), 4);
    let old = manifest(f.store.as_ref(), 0, now - 120 * SEC, &[a, c]);
    manifest(f.store.as_ref(), 10, now - 60 * SEC, &[a]);
    // An old list already names c (condemned long ago, named again since),
    // and the base naming it was condemned just now: a restore planned
    // before that may be reading it.
    let list = Condemned::Chunks {
        ns: now - 7200 * SEC,
        id: 1,
    };
    let mut body = Vec::new();
    body.extend_from_slice(b"RWCND001");
    body.extend_from_slice(&1u16.to_le_bytes());
    body.extend_from_slice(&1u64.to_le_bytes());
    body.extend_from_slice(&c);
    body.extend_from_slice(blake3::hash(&body).as_bytes());
    f.store.put(&list.key(), Bytes::from(body)).unwrap();
    f.store
        .put(
            &Condemned::Base {
                ns: now,
                base: old.clone(),
            }
            .key(),
            Bytes::new(),
        )
        .unwrap();
    let r = f.prune(HOUR);
    assert!(
        f.has(&c),
        "deleted while a condemned manifest names it: {r:?}"
    );
    assert!(f.store.exists(&old.key()).unwrap());
    // Once the grace is over, the base goes and so does its chunk.
    let r = f.prune(Duration::ZERO);
    assert!(!f.store.exists(&old.key()).unwrap());
    assert!(!f.has(&c), "{r:?}");
    assert!(f.has(&a));
}

#[test]
fn no_chunk_is_deleted_while_a_base_is_in_flight() {
    let f = Fixture::new();
    let now = wall_now();
    let a = chunk(f.store.as_ref(), 1);
    manifest(f.store.as_ref(), 0, now - 60 * SEC, &[a]);
    // A base that started at seq 10 has uploaded a chunk, no manifest yet.
    let inflight = format!("inflight/{:020}-{L:016x}-{:020}", now - SEC, 10);
    f.store.put(&inflight, Bytes::new()).unwrap();
    let fresh = chunk(f.store.as_ref(), 5);
    let r = f.prune(Duration::ZERO);
    assert!(f.has(&fresh), "{r:?}");
    assert!(
        r.notes.iter().any(|n| n.contains("being uploaded")),
        "{:?}",
        r.notes
    );
    assert!(f.store.exists(&inflight).unwrap());
    // The manifest lands: the marker is resolved and removed, the chunk
    // is named and stays.
    manifest(f.store.as_ref(), 10, now, &[a, fresh]);
    let r = f.prune(Duration::ZERO);
    assert!(f.has(&fresh), "{r:?}");
    assert!(!f.store.exists(&inflight).unwrap());
}

#[test]
fn a_dry_run_changes_nothing() {
    let f = Fixture::new();
    let now = wall_now();
    let a = chunk(f.store.as_ref(), 1);
    chunk(f.store.as_ref(), 2);
    manifest(f.store.as_ref(), 0, now - 60 * SEC, &[a]);
    let before: Vec<String> = f.store.list("").unwrap();
    let opts = PruneOptions {
        policy: Policy::default(),
        grace: Duration::ZERO,
        dry_run: true,
    };
    let r = prune(f.store.as_ref(), &opts).unwrap();
    assert_eq!(r.kinds["chunks"].deleted.objects, 1, "{r:?}");
    assert_eq!(f.store.list("").unwrap(), before);
}

#[test]
fn a_damaged_manifest_stops_the_chunk_sweep_not_the_prune() {
    let f = Fixture::new();
    let now = wall_now();
    let a = chunk(f.store.as_ref(), 1);
    let orphan = chunk(f.store.as_ref(), 2);
    let m = manifest(f.store.as_ref(), 0, now - 60 * SEC, &[a]);
    let mut data = f.store.get(&m.key()).unwrap().to_vec();
    let n = data.len();
    data[n / 2] ^= 0xff;
    f.store.put(&m.key(), Bytes::from(data)).unwrap();
    let r = f.prune(Duration::ZERO);
    assert!(f.has(&orphan) && f.has(&a), "{r:?}");
    assert!(
        r.notes.iter().any(|n| n.contains("cannot be read")),
        "{:?}",
        r.notes
    );
}

/// A manifest of one file `f` (ino 2) holding `content`, under root 1.
fn file_base(store: &dyn Store, start_seq: u64, completed_ns: i64, content: &[u8]) -> BaseMeta {
    let hash = *blake3::hash(content).as_bytes();
    store
        .put(&chunk_key(&hash), base::encode_chunk(content))
        .unwrap();
    let dir = Object::dir(1);
    let file = Object {
        ino: 2,
        kind: Kind::File,
        mode: 0o644,
        size: content.len() as u64,
        mtime: completed_ns - SEC,
        extents: vec![Extent {
            offset: 0,
            len: content.len() as u32,
            hash,
        }],
        ..dir.clone()
    };
    let m = Manifest {
        lineage: L,
        start_seq,
        started_ns: completed_ns - SEC,
        completed_ns,
        kind: if start_seq == 0 {
            BaseKind::Initial
        } else {
            BaseKind::Periodic
        },
        root: 1,
        objects: vec![dir, file],
        links: vec![rewind::base::Link {
            parent: 1,
            name: Bytes::from_static(b"f"),
            ino: 2,
        }],
    };
    base::store_manifest(store, &m).unwrap();
    m.meta()
}

/// What a restore at `at` gives: the file's bytes, mode and mtime.
fn restored(
    store: &dyn Store,
    at: rewind::clock::At,
    dir: &std::path::Path,
) -> ((Vec<u8>, u32, i64), (usize, usize)) {
    use std::os::unix::fs::MetadataExt;
    let plan = rewind::restore::plan(store, at, None).unwrap();
    if dir.exists() {
        std::fs::remove_dir_all(dir).unwrap();
    }
    let r = rewind::restore::restore(store, &plan, dir, false, &mut |_| {}).unwrap();
    let md = std::fs::metadata(dir.join("f")).unwrap();
    let out = (
        std::fs::read(dir.join("f")).unwrap(),
        md.mode(),
        md.mtime() * SEC + md.mtime_nsec(),
    );
    std::fs::remove_dir_all(dir).unwrap();
    (out, (r.segments, r.deltas))
}

/// An overwrite-heavy history: one 4 KiB page rewritten with fresh random
/// bytes every second for 17 minutes, a segment a second, between an
/// initial base and a later one. Pruned with every instant for a minute
/// and a point a minute for an hour: every kept minute restores after the
/// prune (from deltas) exactly as it did from the raw segments before it,
/// verify passes, an instant between two minutes is refused naming both
/// (the earlier's state lasts until the record after it, a second later),
/// and the deltas are a small fraction of the segments they replace.
#[test]
fn the_minutes_tier_is_compacted_into_deltas_that_restore_exactly() {
    use rewind::clock::At;
    use rewind::record::{Op, Record};
    let f = Fixture::new();
    let store = f.store.as_ref();
    let now = wall_now();
    const MIN: i64 = 60 * SEC;
    let start = (now - 20 * MIN).div_euclid(MIN) * MIN;
    let original: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    file_base(store, 0, start, &original);
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut page = vec![0u8; 4096];
    let mut seq = 0;
    let mut raw_bytes = 0u64;
    // Records half a second off the whole seconds, so that no record lies
    // on a kept minute: each minute restores from a delta whose span runs
    // to the next record, which for the last minute of a compaction job is
    // the first record of a segment the job does not read.
    let mut ns = start + SEC + SEC / 2;
    while ns < now - 3 * MIN {
        for b in page.iter_mut() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            *b = rng as u8;
        }
        seq += 1;
        let rec = Record {
            seq,
            time: ns,
            op: Op::Write {
                ino: 2,
                offset: 4096,
                size: 8192,
                mtime: ns,
                data: Bytes::copy_from_slice(&page),
            },
        };
        let (meta, data) = rewind::segment::encode(L, &[rec]);
        raw_bytes += data.len() as u64;
        store.put(&meta.key(), data).unwrap();
        ns += SEC;
    }
    let mut last = original.clone();
    last[4096..].copy_from_slice(&page);
    file_base(store, seq, now - 2 * MIN, &last);
    let opts = PruneOptions {
        policy: Policy {
            seconds: Duration::from_secs(60),
            minutes: HOUR,
            hours: Duration::ZERO,
            days: Duration::ZERO,
        },
        grace: Duration::ZERO,
        dry_run: true,
    };
    let dry = prune(store, &opts).unwrap();
    let minutes: Vec<i64> = dry
        .points
        .iter()
        .filter(|p| p.tier == rewind::retention::Tier::Minutes)
        .map(|p| p.ns)
        .collect();
    assert!(minutes.len() >= 15, "{:?}", dry.points);
    assert!(minutes.iter().all(|m| m % MIN == 0), "{minutes:?}");
    let tmp = tempfile::tempdir().unwrap();
    let before: Vec<_> = minutes
        .iter()
        .map(|&m| restored(store, At::Instant(m), &tmp.path().join("r")).0)
        .collect();

    let first = prune(
        store,
        &PruneOptions {
            dry_run: false,
            ..opts.clone()
        },
    )
    .unwrap();
    let c = first.compaction;
    // One delta a minute (the first minute is the base's own state).
    assert!(
        c.deltas_written.objects as usize >= minutes.len() - 1,
        "{c:?} for minutes {:?} after the base",
        minutes
            .iter()
            .map(|m| (m - start) / SEC)
            .collect::<Vec<_>>()
    );
    assert!(
        c.deltas_written.bytes * 20 < c.segments_read.bytes,
        "deltas are not much smaller than the segments they replace: {c:?}"
    );
    eprintln!(
        "FIGURES overwrite-heavy: {} segments ({} bytes, {} records of 4 KiB) compacted into {} deltas ({} bytes, {} records); all segments written: {raw_bytes} bytes",
        c.segments_read.objects,
        c.segments_read.bytes,
        c.records_in,
        c.deltas_written.objects,
        c.deltas_written.bytes,
        c.records_out
    );
    // A second prune deletes what the first condemned.
    prune(
        store,
        &PruneOptions {
            dry_run: false,
            ..opts.clone()
        },
    )
    .unwrap();
    let segs_left = f.keys("seg/").len();
    assert!(segs_left < 90, "{segs_left} segments are left");
    for (m, want) in minutes.iter().zip(&before) {
        let (got, (segments, deltas)) = restored(store, At::Instant(*m), &tmp.path().join("r"));
        // From deltas alone (the first minute is its base's own state):
        // minutes that still replayed segments would restore the same.
        assert_eq!(segments, 0, "the minute {m} replayed segments");
        assert!(
            deltas > 0 || *m == minutes[0],
            "the minute {m} replayed no delta"
        );
        assert!(
            got == *want,
            "the minute {m} restores differently from deltas"
        );
    }
    let rep = rewind::verify::verify(store, &mut |_| {}).unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
    assert!(rep.deltas >= minutes.len() - 1, "{rep:?}");
    // Between two minutes: refused, naming both spans (each runs from the
    // last record at or before its minute to just before the next record);
    // --or-earlier takes the end of the earlier one.
    let t = rewind::timeline::Timeline::load(store).unwrap();
    let between = minutes[3] + 30 * SEC;
    let err = t.plan(At::Instant(between), None).unwrap_err().to_string();
    assert!(
        err.contains("between two kept points")
            && err.contains(&rewind::clock::fmt_ns(minutes[3] + SEC / 2 - 1))
            && err.contains(&rewind::clock::fmt_ns(minutes[4] - SEC / 2))
            && err.contains("--or-earlier"),
        "{err}"
    );
    let p = t.plan_at(At::Instant(between), None, true).unwrap();
    assert_eq!(p.at_ns, minutes[3] + SEC / 2 - 1);
}
