//! Criterion benches for the pieces on the write and restore paths: journal
//! append (one and several threads), journal frames (encode with their
//! check, and the scan that verifies them), segment encode and decode (lz4 +
//! blake3), sealing and opening an encrypted volume's object, restore
//! replay, and a base written through the restore's job pool.
//! `scripts/test-all` runs them in quick mode
//! (`cargo bench -- --test`) so they cannot rot; `cargo bench` measures.

use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use rewind::journal::Journal;
use rewind::record::{Kind, Op, Record};
use rewind::segment;

fn incompressible(n: usize, seed: u64) -> Bytes {
    // xorshift: cheap bytes that lz4 cannot shrink, so figures are honest.
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    Bytes::from(v)
}

fn journal_append(c: &mut Criterion) {
    let mut g = c.benchmark_group("journal_append");
    // `append` builds an `Op`; `append_write` is the FUSE write path, which
    // encodes the record straight from the request's buffer.
    for (name, via_op) in [("1 thread", true), ("append_write 1 thread", false)] {
        for size in [4096usize, 1 << 20] {
            let data = incompressible(size, 7);
            g.throughput(Throughput::Bytes(size as u64));
            g.bench_function(format!("{name} {size} B"), |b| {
                let d = tempfile::tempdir().unwrap();
                let (j, _) = Journal::open(d.path(), 1, 1, 0, u64::MAX).unwrap();
                let mut i = 0u64;
                b.iter(|| {
                    i += 1;
                    let (offset, end) = (i * size as u64, (i + 1) * size as u64);
                    if via_op {
                        j.append(&[Op::Write {
                            ino: 5,
                            offset,
                            size: end,
                            mtime: 1,
                            data: data.clone(),
                        }])
                        .unwrap();
                    } else {
                        j.append_write(5, offset, end, 1, &data).unwrap();
                    }
                    // Keep the directory bounded: rotate away and release.
                    if i % 4096 == 0 {
                        j.release_through(j.last_seq()).unwrap();
                    }
                });
            });
        }
    }
    let data = incompressible(4096, 9);
    g.throughput(Throughput::Bytes(4 * 4096));
    g.bench_function("4 threads 4096 B", |b| {
        let d = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(d.path(), 1, 1, 0, u64::MAX).unwrap();
        let j = Arc::new(j);
        b.iter(|| {
            std::thread::scope(|s| {
                for t in 0..4u64 {
                    let j = j.clone();
                    let data = data.clone();
                    s.spawn(move || {
                        j.append(&[Op::Write {
                            ino: t,
                            offset: 0,
                            size: 4096,
                            mtime: 1,
                            data,
                        }])
                        .unwrap()
                    });
                }
            });
            if j.last_seq() % 4096 < 4 {
                j.release_through(j.last_seq()).unwrap();
            }
        });
    });
    g.finish();
}

fn records(total: usize, size: usize) -> Vec<Record> {
    (0..total / size)
        .map(|i| Record {
            seq: 1 + i as u64,
            time: 1_000 + i as i64,
            op: Op::Write {
                ino: 5,
                offset: (i * size) as u64,
                size: ((i + 1) * size) as u64,
                mtime: 1,
                data: incompressible(size, i as u64),
            },
        })
        .collect()
}

/// The journal's frames alone: encoding with the check (xxh3 since journal
/// version 3) and the scan that verifies every check, as a restart and the
/// shipper do.
fn journal_frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("journal_frames");
    let recs = records(8 << 20, 4096);
    g.throughput(Throughput::Bytes(8 << 20));
    g.bench_function("encode 8 MiB of 4 KiB writes", |b| {
        b.iter(|| rewind::journal::file_frames(&recs))
    });
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("00000000000000000001.rwj");
    let mut file = rewind::journal::file_header(1, 1, 1).to_vec();
    file.extend_from_slice(&rewind::journal::file_frames(&recs));
    file.resize(file.len() + 4096, 0);
    std::fs::write(&p, &file).unwrap();
    g.bench_function("scan 8 MiB of 4 KiB writes", |b| {
        b.iter(|| rewind::journal::dump_file(&p).unwrap())
    });
    g.finish();
}

fn segments(c: &mut Criterion) {
    let mut g = c.benchmark_group("segment");
    let recs = records(8 << 20, 4096);
    g.throughput(Throughput::Bytes(8 << 20));
    g.bench_function("encode 8 MiB of 4 KiB writes", |b| {
        b.iter(|| segment::encode(1, &recs))
    });
    // As the shipper seals: encoded records pushed into a builder that
    // lives across segments, each sealed segment handed back once stored
    // (`Builder::recycle`), against a fresh output buffer every time.
    let encoded: Vec<Vec<u8>> = recs
        .iter()
        .map(|r| {
            let mut v = Vec::new();
            rewind::record::encode_record(r, &mut v);
            v
        })
        .collect();
    for recycled in [false, true] {
        let mut builder = segment::Builder::default();
        let name = if recycled { "recycled" } else { "fresh" };
        g.bench_function(format!("seal 8 MiB of 4 KiB writes, {name} buffer"), |b| {
            b.iter(|| {
                for e in &encoded {
                    builder.push(e);
                }
                let (_, sealed) = builder.finish(1);
                if recycled {
                    builder.recycle(sealed);
                }
            })
        });
    }
    let (_, data) = segment::encode(1, &recs);
    g.bench_function("decode 8 MiB of 4 KiB writes", |b| {
        b.iter(|| segment::decode(&data).unwrap())
    });
    g.finish();
}

fn sealing(c: &mut Criterion) {
    let mut g = c.benchmark_group("seal");
    let dk = rewind::crypt::DataKey::from_raw([7; 32]);
    let data = incompressible(8 << 20, 3);
    g.throughput(Throughput::Bytes(8 << 20));
    g.bench_function("seal 8 MiB", |b| b.iter(|| dk.seal("seg/x", &data)));
    let sealed = dk.seal("seg/x", &data);
    g.bench_function("open 8 MiB", |b| {
        b.iter(|| dk.open("seg/x", &sealed).unwrap())
    });
    g.finish();
}

fn replay(c: &mut Criterion) {
    let mut g = c.benchmark_group("restore");
    let root = 2u64;
    let mut recs = vec![Record {
        seq: 1,
        time: 1,
        op: Op::Create {
            parent: root,
            name: Bytes::from_static(b"f"),
            ino: 5,
            kind: Kind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 1,
            rdev: 0,
            target: Bytes::new(),
        },
    }];
    recs.extend(records(16 << 20, 65536).into_iter().map(|mut r| {
        r.seq += 1;
        r
    }));
    let manifest = rewind::base::Manifest {
        lineage: 1,
        start_seq: 0,
        started_ns: 0,
        completed_ns: 0,
        kind: rewind::base::BaseKind::Initial,
        root,
        objects: vec![rewind::base::Object::dir(root)],
        links: vec![],
    };
    g.throughput(Throughput::Bytes(16 << 20));
    g.sample_size(10);
    g.bench_function("replay 16 MiB of 64 KiB writes", |b| {
        b.iter_batched(
            || tempfile::tempdir().unwrap(),
            |d| {
                let mut t = rewind::restore::Tree::prepare(&d.path().join("t"), false).unwrap();
                t.apply_base(&manifest, &|_| unreachable!(), 1, &mut |_, _| {})
                    .unwrap();
                for r in &recs {
                    t.apply(r).unwrap();
                }
                t.finish().unwrap();
            },
            BatchSize::PerIteration,
        )
    });
    // A base of 256 files of 256 KiB: chunk fetch (a copy here, no store),
    // the length check and the positioned writes on the restore's job pool,
    // against one job, so the pool's own cost shows.
    let root = 1;
    let chunk = incompressible(256 << 10, 9).to_vec();
    let hash = *blake3::hash(&chunk).as_bytes();
    let mut objects = vec![rewind::base::Object::dir(root)];
    let mut links = vec![];
    for i in 0..256u64 {
        let mut o = rewind::base::Object::dir(100 + i);
        o.kind = Kind::File;
        o.mode = 0o644;
        o.size = chunk.len() as u64;
        o.extents = vec![rewind::base::Extent {
            offset: 0,
            len: chunk.len() as u32,
            hash,
        }];
        objects.push(o);
        links.push(rewind::base::Link {
            parent: root,
            name: Bytes::from(format!("f{i}")),
            ino: 100 + i,
        });
    }
    let base = rewind::base::Manifest {
        lineage: 1,
        start_seq: 0,
        started_ns: 0,
        completed_ns: 0,
        kind: rewind::base::BaseKind::Initial,
        root,
        objects,
        links,
    };
    g.throughput(Throughput::Bytes(256 * chunk.len() as u64));
    for jobs in [1, 4] {
        g.bench_function(format!("base of 256 x 256 KiB files, {jobs} jobs"), |b| {
            b.iter_batched(
                || tempfile::tempdir().unwrap(),
                |d| {
                    let mut t = rewind::restore::Tree::prepare(&d.path().join("t"), false).unwrap();
                    t.apply_base(&base, &|_| Ok(chunk.clone()), jobs, &mut |_, _| {})
                        .unwrap();
                    t.finish().unwrap();
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    // The daemon's allocator settings first, so buffers are allocated (and
    // faulted in) as in `rewind run`.
    config = {
        rewind::run::bound_malloc();
        Criterion::default()
    };
    targets = journal_append, journal_frames, segments, sealing, replay
}
criterion_main!(benches);
