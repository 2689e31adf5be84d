//! Golden files: every format version's encoding of a fixed sample is kept
//! in tests/golden/ forever. A build must decode every golden file and
//! encode the sample to exactly the same bytes; a change to a format needs
//! a new version (and new golden files), never an edit of the old ones.
//! Regenerate only new files with REWIND_BLESS=1.

use std::path::PathBuf;

use bytes::Bytes;
use rewind::base::{self, BaseKind, Extent, Link, Manifest, Object};
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
    let recs = sample_records();
    let (_, data) = segment::encode(0xfeed, &recs);
    let g = golden("segment-v1.rws", &data);
    let (meta, decoded) = segment::decode(&g).unwrap();
    assert_eq!(decoded, recs);
    assert_eq!(meta.lineage, 0xfeed);
}

#[test]
fn chunk_v1() {
    let raw: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let g = golden("chunk-v1.rwc", &base::encode_chunk(&raw));
    assert_eq!(
        base::decode_chunk(&g, blake3::hash(&raw).as_bytes()).unwrap(),
        raw
    );
}

#[test]
fn manifest_v1() {
    let m = Manifest {
        lineage: 0xfeed,
        start_seq: 99,
        started_ns: 1,
        completed_ns: 2,
        kind: BaseKind::Repair,
        root: 2,
        objects: vec![
            Object {
                ino: 2,
                kind: Kind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                size: 0,
                mtime: 0,
                rdev: 0,
                target: Bytes::new(),
                xattrs: vec![],
                extents: vec![],
            },
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
    };
    let g = golden("manifest-v1.rwb", &base::encode_manifest(&m));
    assert_eq!(base::decode_manifest(&g).unwrap(), m);
}

#[test]
fn journal_header_v1() {
    let h = rewind::journal::file_header(0xfeed, 100, 1_795_780_805_000_000_000);
    let g = golden("journal-header-v1.bin", &h);
    assert_eq!(&g[..8], b"RWJRNL01");
}
