//! Golden files: every format version's encoding of a fixed sample is kept
//! in tests/golden/ forever. A build must decode every golden file and
//! encode the sample to exactly the same bytes; a change to a format needs
//! a new version (and new golden files), never an edit of the old ones.
//! Regenerate only new files with REWIND_BLESS=1. Files of versions this
//! build no longer writes are decoded only (`old_golden`), and a store made
//! by an older build (`tests/golden/store-v1`) must still restore.

use std::path::PathBuf;

use bytes::Bytes;
use rewind::base::{self, BaseKind, Extent, Link, Manifest, Object};
use rewind::delta::{self, DeltaMeta};
use rewind::record::{Kind, Op, Record};
use rewind::segment;

fn golden(name: &str, bytes: &[u8]) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("REWIND_BLESS").is_some() && !p.exists() {
        std::fs::write(&p, bytes).unwrap();
    }
    let want = std::fs::read(&p).unwrap_or_else(|_| {
        panic!(
            "missing golden file {}; create it with REWIND_BLESS=1",
            p.display()
        )
    });
    assert_eq!(
        bytes,
        &want[..],
        "encoding of {name} changed: formats are versioned, add a new version instead"
    );
    want
}

/// A golden file of a version this build reads but no longer writes.
fn old_golden(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|_| panic!("missing golden file {}", p.display()))
}

/// The records of version 2 beyond version 1's: Create records of the
/// special kinds, device numbers at the edges of the kernel's encoding.
fn sample_records_v2() -> Vec<Record> {
    let mut recs = sample_records();
    let specials = [
        (b"sock".as_slice(), 20, Kind::Socket, 0o755, 0),
        (b"null".as_slice(), 21, Kind::CharDev, 0o666, (1 << 8) | 3),
        // major 4095, minor 1048575: the largest the kernel encodes.
        (b"big".as_slice(), 22, Kind::CharDev, 0o640, 0xffff_ffff),
        (
            b"loop".as_slice(),
            23,
            Kind::BlockDev,
            0o660,
            (7 << 8) | 200,
        ),
    ];
    let last = recs.last().unwrap().clone();
    for (i, (name, ino, kind, mode, rdev)) in specials.into_iter().enumerate() {
        recs.push(Record {
            seq: last.seq + 1 + i as u64,
            time: last.time + 1 + i as i64,
            op: Op::Create {
                parent: 2,
                name: Bytes::copy_from_slice(name),
                ino,
                kind,
                mode,
                uid: 1234,
                gid: 2000,
                mtime: 8,
                rdev,
                target: Bytes::new(),
            },
        });
    }
    recs
}

fn sample_records() -> Vec<Record> {
    let ops = vec![
        Op::Create {
            parent: 2,
            name: Bytes::from_static(b"dir"),
            ino: 10,
            kind: Kind::Dir,
            mode: 0o2775,
            uid: 999,
            gid: 999,
            mtime: 1,
            rdev: 0,
            target: Bytes::new(),
        },
        Op::Create {
            parent: 10,
            name: Bytes::from_static(b"f"),
            ino: 11,
            kind: Kind::File,
            mode: 0o644,
            uid: 999,
            gid: 999,
            mtime: 2,
            rdev: 0,
            target: Bytes::new(),
        },
        Op::Write {
            ino: 11,
            offset: 4096,
            size: 4101,
            mtime: 3,
            data: Bytes::from_static(b"hello"),
        },
        Op::Link {
            ino: 11,
            parent: 2,
            name: Bytes::from_static(b"hl"),
        },
        Op::Rename {
            from_parent: 10,
            from_name: Bytes::from_static(b"f"),
            to_parent: 2,
            to_name: Bytes::from_static(b"g"),
            ino: 11,
            replaced: 0,
            flags: 0,
        },
        Op::SetAttr {
            ino: 11,
            mode: 0o600,
            uid: 1,
            gid: 2,
            size: 10,
            mtime: 4,
        },
        Op::Fallocate {
            ino: 11,
            mode: 3,
            offset: 0,
            len: 4096,
            size: 10,
            mtime: 5,
        },
        Op::SetXattr {
            ino: 11,
            name: Bytes::from_static(b"user.k"),
            value: Bytes::from_static(b"v"),
        },
        Op::RemoveXattr {
            ino: 11,
            name: Bytes::from_static(b"user.k"),
        },
        Op::Create {
            parent: 2,
            name: Bytes::from_static(b"s"),
            ino: 12,
            kind: Kind::Symlink,
            mode: 0o777,
            uid: 0,
            gid: 0,
            mtime: 6,
            rdev: 0,
            target: Bytes::from_static(b"g"),
        },
        Op::Unlink {
            parent: 2,
            name: Bytes::from_static(b"hl"),
            ino: 11,
        },
        Op::ClockStep { back_ns: 5_000_000 },
    ];
    ops.into_iter()
        .enumerate()
        .map(|(i, op)| Record {
            seq: 100 + i as u64,
            time: 1_795_780_805_000_000_000 + i as i64,
            op,
        })
        .collect()
}

#[test]
fn segment_v1() {
    let g = old_golden("segment-v1.rws");
    assert_eq!(u16::from_le_bytes([g[8], g[9]]), 1);
    let (meta, decoded) = segment::decode(&g).unwrap();
    assert_eq!(decoded, sample_records());
    assert_eq!(meta.lineage, 0xfeed);
}

#[test]
fn segment_v2() {
    let recs = sample_records_v2();
    let (_, data) = segment::encode(0xfeed, &recs);
    let g = golden("segment-v2.rws", &data);
    assert_eq!(u16::from_le_bytes([g[8], g[9]]), 2);
    let (meta, decoded) = segment::decode(&g).unwrap();
    assert_eq!(decoded, recs);
    assert_eq!(meta.lineage, 0xfeed);
}

/// No build of version 1 made a socket or device record: a version 1
/// segment that holds one is damage, not data.
#[test]
fn a_v1_segment_with_a_v2_kind_is_refused() {
    let (_, data) = segment::encode(0xfeed, &sample_records_v2());
    let mut body = data[..data.len() - 32].to_vec();
    body[8..10].copy_from_slice(&1u16.to_le_bytes());
    let hash = *blake3::hash(&body).as_bytes();
    body.extend_from_slice(&hash);
    let err = segment::decode(&body).unwrap_err().to_string();
    assert!(err.contains("version 1"), "{err}");
}

#[test]
fn delta_v1() {
    let recs = sample_records_v2();
    let (first, last) = (recs.first().unwrap(), recs.last().unwrap());
    let meta = DeltaMeta {
        lineage: 0xfeed,
        from_seq: first.seq - 1,
        to_seq: last.seq,
        first_ns: first.time,
        last_ns: last.time,
        next_ns: last.time + 5,
    };
    let g = golden("delta-v1.rwd", &delta::encode(&meta, true, &recs));
    assert_eq!(&g[..8], b"RWDLT001");
    assert_eq!(u16::from_le_bytes([g[8], g[9]]), 1);
    let d = delta::decode(&g).unwrap();
    assert_eq!((d.meta, d.raw, d.records), (meta.clone(), true, recs));
    assert_eq!(DeltaMeta::from_key(&meta.key()), Some(meta));
}

#[test]
fn chunk_v1() {
    let raw: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let g = golden("chunk-v1.rwc", &base::encode_chunk(&raw));
    assert_eq!(
        base::decode_chunk(
            &g,
            blake3::hash(&raw).as_bytes(),
            &rewind::crypt::ChunkNaming::Plain
        )
        .unwrap(),
        raw
    );
}

fn sample_manifest() -> Manifest {
    Manifest {
        lineage: 0xfeed,
        start_seq: 99,
        started_ns: 1,
        completed_ns: 2,
        kind: BaseKind::Repair,
        root: 2,
        objects: vec![
            Object::dir(2),
            Object {
                ino: 11,
                kind: Kind::File,
                mode: 0o644,
                uid: 999,
                gid: 999,
                size: 1 << 21,
                mtime: 7,
                rdev: 0,
                target: Bytes::new(),
                xattrs: vec![(Bytes::from_static(b"user.a"), Bytes::from_static(b"1"))],
                extents: vec![Extent {
                    offset: 1 << 20,
                    len: 4096,
                    hash: [7; 32],
                }],
            },
        ],
        links: vec![Link {
            parent: 2,
            name: Bytes::from_static(b"f"),
            ino: 11,
        }],
    }
}

#[test]
fn manifest_v1() {
    let g = old_golden("manifest-v1.rwb");
    assert_eq!(u16::from_le_bytes([g[8], g[9]]), 1);
    assert_eq!(base::decode_manifest(&g).unwrap(), sample_manifest());
}

#[test]
fn manifest_v2() {
    let mut m = sample_manifest();
    for (ino, kind, mode, rdev, name) in [
        (20, Kind::Socket, 0o755, 0, "sock"),
        (21, Kind::CharDev, 0o666, (1 << 8) | 3, "null"),
        (22, Kind::BlockDev, 0o660, 0xffff_ffff, "big"),
    ] {
        m.objects.push(Object {
            ino,
            kind,
            mode,
            uid: 1234,
            gid: 2000,
            size: 0,
            mtime: 9,
            rdev,
            target: Bytes::new(),
            xattrs: vec![],
            extents: vec![],
        });
        m.links.push(Link {
            parent: 2,
            name: Bytes::copy_from_slice(name.as_bytes()),
            ino,
        });
    }
    let g = golden("manifest-v2.rwb", &base::encode_manifest(&m));
    assert_eq!(u16::from_le_bytes([g[8], g[9]]), 2);
    assert_eq!(base::decode_manifest(&g).unwrap(), m);
}

/// A journal file of version 1 or 2: a golden header, then one frame per
/// record checked with blake3 (see src/journal/file.rs), then the zeros
/// that end it.
fn journal_file_blake3(header: &[u8], recs: &[Record]) -> Vec<u8> {
    let mut out = header.to_vec();
    for r in recs {
        let mut body = Vec::new();
        rewind::record::encode_record(r, &mut body);
        let len = (body.len() as u32).to_le_bytes();
        let mut h = blake3::Hasher::new();
        h.update(&len);
        h.update(&body);
        out.extend_from_slice(&len);
        out.extend_from_slice(&h.finalize().as_bytes()[..8]);
        out.extend_from_slice(&body);
    }
    out.resize(out.len() + 4096, 0);
    out
}

fn read_journal(name: &str, bytes: &[u8]) -> Vec<Record> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(name);
    std::fs::write(&p, bytes).unwrap();
    rewind::journal::dump_file(&p)
        .unwrap()
        .into_iter()
        .map(|(_, _, r)| r)
        .collect()
}

#[test]
fn journal_header_v1() {
    let g = old_golden("journal-header-v1.bin");
    assert_eq!(&g[..8], b"RWJRNL01");
    assert_eq!(u16::from_le_bytes([g[8], g[9]]), 1);
    // A journal file an older build left behind reads as before.
    let recs = sample_records();
    assert_eq!(
        read_journal("00000000000000000100.rwj", &journal_file_blake3(&g, &recs)),
        recs
    );
}

#[test]
fn journal_header_v2() {
    let g = old_golden("journal-header-v2.bin");
    assert_eq!(&g[..8], b"RWJRNL01");
    assert_eq!(u16::from_le_bytes([g[8], g[9]]), 2);
    let recs = sample_records_v2();
    assert_eq!(
        read_journal("00000000000000000100.rwj", &journal_file_blake3(&g, &recs)),
        recs
    );
    // A version 2 file whose frames carry version 3's check is damage.
    let mut v3_frames = g.clone();
    v3_frames.extend_from_slice(&rewind::journal::file_frames(&recs));
    v3_frames.resize(v3_frames.len() + 4096, 0);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("00000000000000000100.rwj");
    std::fs::write(&p, &v3_frames).unwrap();
    assert!(rewind::journal::dump_file(&p).unwrap().is_empty());
}

/// Version 3: the whole file is golden, since the frame check (xxh3-64)
/// is what changed.
#[test]
fn journal_v3() {
    let recs = sample_records_v2();
    let mut bytes = rewind::journal::file_header(0xfeed, 100, 1_795_780_805_000_000_000).to_vec();
    bytes.extend_from_slice(&rewind::journal::file_frames(&recs));
    bytes.resize(bytes.len() + 4096, 0);
    let g = golden("journal-v3.rwj", &bytes);
    assert_eq!(u16::from_le_bytes([g[8], g[9]]), 3);
    // The first frame's check is xxh3-64 of its length and record, as
    // FORMAT.md says, computed here independently of the encoder.
    let len = u32::from_le_bytes(g[64..68].try_into().unwrap()) as usize;
    let mut framed = g[64..68].to_vec();
    framed.extend_from_slice(&g[76..76 + len]);
    assert_eq!(g[68..76], xxhash_rust::xxh3::xxh3_64(&framed).to_le_bytes());
    assert_eq!(read_journal("00000000000000000100.rwj", &g), recs);
    // A flipped byte in a record is caught by the check: the valid
    // prefix ends before it.
    let mut bad = g.clone();
    bad[80] ^= 1;
    let p = tempfile::tempdir().unwrap();
    let f = p.path().join("00000000000000000100.rwj");
    std::fs::write(&f, &bad).unwrap();
    assert!(rewind::journal::dump_file(&f).unwrap().is_empty());
}

/// A store written by the build before format version 2 (3847756: `rewind
/// run` over a source holding a setgid directory, a file with an xattr and
/// a second hard link, a symlink and a fifo, then through the mount a new
/// file, a 0700 directory, an append, a rename, a symlink, a fifo and a
/// sparse file) restores exactly with this build.
#[test]
fn a_store_made_by_version_1_restores() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let golden = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/store-v1");
    let root: std::sync::Arc<dyn rewind::store::Store> =
        std::sync::Arc::new(rewind::store::file::FileStore::open(golden).unwrap());
    let store = rewind::store::Prefixed::new(root, "vol");
    let plan = rewind::timeline::Timeline::load(&store)
        .unwrap()
        .plan(rewind::clock::At::Latest, None)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t");
    let r = rewind::restore::restore(&store, &plan, &t, false, &mut |_| {}).unwrap();
    assert!(r.skipped.is_empty());
    let meta = |p: &str| std::fs::symlink_metadata(t.join(p)).unwrap();
    let mode = |p: &str| meta(p).permissions().mode() & 0o7777;
    assert_eq!(std::fs::read(t.join("d/a")).unwrap(), b"base file\nmore\n");
    assert_eq!((mode("d"), mode("d/a"), mode("e")), (0o2775, 0o644, 0o700));
    assert_eq!((meta("d/a").uid(), meta("d/a").gid()), (1234, 2000));
    assert_eq!(meta("d/a").ino(), meta("hl").ino());
    assert_eq!(
        xattr_of(&t.join("d/a"), "user.k").as_deref(),
        Some(&b"val"[..])
    );
    assert_eq!(
        std::fs::read_link(t.join("sym")).unwrap(),
        PathBuf::from("d/a")
    );
    assert_eq!(
        std::fs::read_link(t.join("e/dl")).unwrap(),
        PathBuf::from("../d")
    );
    assert!(meta("fifo").file_type().is_fifo() && mode("fifo") == 0o640);
    assert!(meta("e/p").file_type().is_fifo());
    assert_eq!(std::fs::read(t.join("e/b")).unwrap(), b"segment file\n");
    let sparse = std::fs::read(t.join("e/sparse")).unwrap();
    assert_eq!(sparse.len(), 100_004);
    assert!(sparse[..100_000].iter().all(|&b| b == 0) && &sparse[100_000..] == b"tail");
    assert_eq!(mode("e/sparse"), 0o600);
    let mut names: Vec<String> = std::fs::read_dir(&t)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["d", "e", "fifo", "hl", "sym"]);
}

fn xattr_of(p: &std::path::Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    let n = rustix::fs::getxattr(p, name, &mut buf).ok()?;
    buf.truncate(n);
    Some(buf)
}

fn sample_state() -> rewind::layout::LocalState {
    rewind::layout::LocalState {
        volume: "db".into(),
        lineage: rewind::timeline::LineageId(0xfeed_beef),
        boot_id: "3b0c1f1e-5d2a-4f43-9a57-6d1f0e7c2a10".into(),
        clean: true,
    }
}

/// Version 1 of the state file, written by builds before the format had a
/// version field.
#[test]
fn state_v1() {
    let g = old_golden("state-v1.json");
    assert_eq!(rewind::layout::decode_state(&g).unwrap(), sample_state());
}

#[test]
fn state_v2() {
    let g = golden(
        "state-v2.json",
        &rewind::layout::encode_state(&sample_state()),
    );
    assert_eq!(rewind::layout::decode_state(&g).unwrap(), sample_state());
}

/// A store of an older build restores through the store every command
/// opens (`store::open_volume`) without a key, and is refused with one.
#[test]
fn a_plaintext_store_of_version_1_opens_without_a_key_and_refuses_one() {
    use rewind::store::sealed::{Encryption, KeyError};
    use rewind::store::{open_volume, StoreError, StoreOptions};
    let url = format!("{}/tests/golden/store-v1", env!("CARGO_MANIFEST_DIR"));
    let store = open_volume(&url, "vol", &StoreOptions::default(), Encryption::Off).unwrap();
    let plan = rewind::timeline::Timeline::load(store.as_ref())
        .unwrap()
        .plan(rewind::clock::At::Latest, None)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    rewind::restore::restore(
        store.as_ref(),
        &plan,
        &dir.path().join("t"),
        false,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("t/d/a")).unwrap(),
        b"base file\nmore\n"
    );
    let kek = rewind::crypt::Kek::parse(&[1; 32]).unwrap();
    let keyed = open_volume(
        &url,
        "vol",
        &StoreOptions::default(),
        Encryption::Key { kek, create: true },
    )
    .unwrap();
    assert!(matches!(
        keyed.check(),
        Err(StoreError::Key {
            source: KeyError::PlaintextVolume,
            ..
        })
    ));
}

fn sealed_sample_key() -> rewind::crypt::DataKey {
    rewind::crypt::DataKey::from_raw([7; 32])
}

/// The sealed envelope (version 1) of a fixed object under a fixed data key:
/// sealing is deterministic, so the bytes are pinned, and they open.
#[test]
fn sealed_v1() {
    let dk = sealed_sample_key();
    let plain = b"a segment's bytes, sealed under its key";
    let g = golden("sealed-v1.rwe", &dk.seal("seg/sample", plain));
    assert_eq!(dk.open("seg/sample", &g).unwrap(), plain);
    assert!(dk.open("seg/other", &g).is_err());
}

/// The wrapped data key (version 1) for a fixed KEK and nonce.
#[test]
fn wrapped_key_v1() {
    let kek = rewind::crypt::Kek::parse(&[9; 32]).unwrap();
    let key = format!("keys/{}.rwk", kek.id());
    let g = golden(
        "wrapped-key-v1.rwk",
        &kek.wrap(&sealed_sample_key(), &key, &[5; 24]),
    );
    let dk = kek.unwrap(&g, &key).unwrap();
    assert_eq!(dk.seal("x", b"y"), sealed_sample_key().seal("x", b"y"));
}

/// An encrypted store written by `rewind run` (a base file, an append and a
/// new file through the mount; key in store-sealed-v1.key) restores with
/// its key, whose whole schedule (wrapping, sealing, chunk names) it pins,
/// and is refused without it.
#[test]
fn an_encrypted_store_of_version_1_restores_with_its_key() {
    use rewind::store::sealed::{read_key_file, Encryption, KeyError};
    use rewind::store::{open_volume, StoreError, StoreOptions};
    let golden = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let url = golden.join("store-sealed-v1").display().to_string();
    let kek = read_key_file(&golden.join("store-sealed-v1.key")).unwrap();
    let mode = Encryption::Key { kek, create: false };
    let store = open_volume(&url, "vol", &StoreOptions::default(), mode).unwrap();
    let plan = rewind::timeline::Timeline::load(store.as_ref())
        .unwrap()
        .plan(rewind::clock::At::Latest, None)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t");
    rewind::restore::restore(store.as_ref(), &plan, &t, false, &mut |_| {}).unwrap();
    assert_eq!(std::fs::read(t.join("d/a")).unwrap(), b"base file\nmore\n");
    assert_eq!(std::fs::read(t.join("d/b")).unwrap(), b"segment file\n");
    let rep = rewind::verify::verify(store.as_ref(), &mut |_| {}).unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
    let plain = open_volume(&url, "vol", &StoreOptions::default(), Encryption::Off).unwrap();
    assert!(matches!(
        plain.check(),
        Err(StoreError::Key {
            source: KeyError::KeyRequired { .. },
            ..
        })
    ));
}
