//! Segments: the sealed, shipped form of a run of journal records. This
//! module owns the segment encoding (lz4 blocks, blake3 trailer, explicit
//! version) and the segment's object key, which carries its time and
//! sequence range so that a LIST is in timeline order. It must not do I/O.
//!
//! Format (version 2), little-endian:
//!
//! ```text
//! segment := magic "RWSEG001" | version:u16 = 2 | reserved:u16 | lineage:u64
//!            | first_seq:u64 | last_seq:u64 | first_ns:i64 | last_ns:i64
//!            | count:u64 | raw_len:u64 | block* | blake3(everything before):32
//! block   := raw_len:u32 | comp_len:u32 | lz4 block (comp_len bytes)
//! raw     := (len:u32 | record)*   -- the concatenated, decompressed blocks
//! ```
//!
//! Key: `seg/<first_ns:020>-<last_ns:020>-<lineage:016x>-<first_seq:020>-<last_seq:020>.rws`.
//!
//! Version 2 has the layout of version 1; its records may also be Create
//! records of the kinds socket, character device and block device
//! (record.rs). Version 1 segments are decoded forever; a version 1 segment
//! that holds one of those kinds is refused as inconsistent, since no
//! writer of version 1 could have made it.

use bytes::{BufMut, Bytes};

use crate::clock::Nanos;
use crate::codec::{
    lz4_blocks_max_len, put_lz4_blocks, read_lz4_blocks, seal, unseal, DecodeError, Reader,
};
use crate::record::{decode_record, encode_record, record_head, Record, Seq};

pub const MAGIC: &[u8; 8] = b"RWSEG001";
/// The version this build writes. Version 2 added the special file kinds
/// (sockets and device nodes) to Create records; the layout is unchanged.
pub const VERSION: u16 = 2;
/// The oldest version this build reads.
pub const MIN_VERSION: u16 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentMeta {
    pub lineage: u64,
    pub first_seq: Seq,
    pub last_seq: Seq,
    pub first_ns: Nanos,
    pub last_ns: Nanos,
}

impl SegmentMeta {
    pub fn key(&self) -> String {
        format!(
            "seg/{:020}-{:020}-{:016x}-{:020}-{:020}.rws",
            self.first_ns.max(0),
            self.last_ns.max(0),
            self.lineage,
            self.first_seq,
            self.last_seq
        )
    }

    /// Parses a key made by `key()`; None for anything else.
    pub fn from_key(key: &str) -> Option<SegmentMeta> {
        let name = key.strip_prefix("seg/")?.strip_suffix(".rws")?;
        let p: Vec<&str> = name.split('-').collect();
        if p.len() != 5 {
            return None;
        }
        Some(SegmentMeta {
            first_ns: p[0].parse().ok()?,
            last_ns: p[1].parse().ok()?,
            lineage: u64::from_str_radix(p[2], 16).ok()?,
            first_seq: p[3].parse().ok()?,
            last_seq: p[4].parse().ok()?,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("segment is damaged: {0}")]
    Decode(#[from] DecodeError),
    #[error("segment is inconsistent: {0}")]
    Inconsistent(String),
    #[error(
        "segment format version {0} is newer than this build supports ({VERSION}); upgrade rewind"
    )]
    Version(u16),
}

/// Encodes records (consecutive sequence numbers, one lineage) as a segment.
pub fn encode(lineage: u64, records: &[Record]) -> (SegmentMeta, Bytes) {
    assert!(!records.is_empty(), "segments are never empty");
    let mut b = Builder::default();
    let mut tmp = Vec::new();
    for r in records {
        tmp.clear();
        encode_record(r, &mut tmp);
        b.push(&tmp);
    }
    b.finish(lineage)
}

/// Builds a segment from encoded records (record.rs) as they come, so that
/// the shipper copies journal frames into a segment without decoding them.
/// Its buffers are kept between segments: the records' buffer always,
/// the sealed output's when the shipper hands it back (`recycle`).
#[derive(Default)]
pub struct Builder {
    raw: Vec<u8>,
    /// A stored segment's buffer, to seal the next one into. A fresh
    /// buffer of several MiB costs a page fault per page when the
    /// compressor first writes it and an munmap when it is freed: under
    /// random 4 KiB writes that was about a tenth of the daemon's CPU.
    spare: Vec<u8>,
    count: u64,
    first: (Seq, Nanos),
    last: (Seq, Nanos),
}

impl Builder {
    /// Appends one encoded record; the caller keeps sequence numbers
    /// consecutive.
    pub fn push(&mut self, record: &[u8]) {
        let head = record_head(record);
        if self.count == 0 {
            self.first = head;
        }
        self.last = head;
        self.count += 1;
        self.raw.put_u32_le(record.len() as u32);
        self.raw.extend_from_slice(record);
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Compresses and seals what was pushed, and empties the builder.
    pub fn finish(&mut self, lineage: u64) -> (SegmentMeta, Bytes) {
        assert!(self.count > 0, "segments are never empty");
        let meta = SegmentMeta {
            lineage,
            first_seq: self.first.0,
            last_seq: self.last.0,
            first_ns: self.first.1,
            last_ns: self.last.1,
        };
        // Room for incompressible data (lz4's worst case), the header and
        // the seal, so the output is never reallocated while it grows.
        let mut out = std::mem::take(&mut self.spare);
        out.clear();
        out.reserve(lz4_blocks_max_len(self.raw.len()) + 128);
        out.extend_from_slice(MAGIC);
        out.put_u16_le(VERSION);
        out.put_u16_le(0);
        out.put_u64_le(lineage);
        out.put_u64_le(meta.first_seq);
        out.put_u64_le(meta.last_seq);
        out.put_i64_le(meta.first_ns);
        out.put_i64_le(meta.last_ns);
        out.put_u64_le(self.count);
        out.put_u64_le(self.raw.len() as u64);
        put_lz4_blocks(&mut out, &self.raw);
        seal(&mut out);
        self.raw.clear();
        self.count = 0;
        (meta, Bytes::from(out))
    }

    /// Takes back a sealed segment's buffer once nothing else holds it (a
    /// store may still hold a clone, e.g. an upload the SDK keeps): then
    /// it is kept for the next `finish`, without a copy.
    pub fn recycle(&mut self, sealed: Bytes) {
        if sealed.is_unique() {
            self.spare = Vec::from(sealed);
        }
    }
}

/// Decodes and fully checks a segment: checksum, version, block sizes,
/// record count, consecutive sequence numbers and time order.
pub fn decode(data: &[u8]) -> Result<(SegmentMeta, Vec<Record>), SegmentError> {
    let body = unseal(data)?;
    let mut r = Reader::new(body);
    if r.take(8)? != MAGIC {
        return Err(SegmentError::Inconsistent(
            "not a Rewind segment (bad magic)".into(),
        ));
    }
    let version = r.u16()?;
    if !(MIN_VERSION..=VERSION).contains(&version) {
        return Err(SegmentError::Version(version));
    }
    r.u16()?;
    let meta = SegmentMeta {
        lineage: r.u64()?,
        first_seq: r.u64()?,
        last_seq: r.u64()?,
        first_ns: r.i64()?,
        last_ns: r.i64()?,
    };
    let count = r.u64()?;
    let raw_len = r.u64()? as usize;
    if meta.last_seq < meta.first_seq || count != meta.last_seq - meta.first_seq + 1 {
        return Err(SegmentError::Inconsistent(format!(
            "{count} records cannot span sequence {}..={}",
            meta.first_seq, meta.last_seq
        )));
    }
    let raw = read_lz4_blocks(&mut r, raw_len)?;
    let mut rr = Reader::new(&raw);
    let mut records = Vec::with_capacity(count as usize);
    let mut prev_time = meta.first_ns;
    while rr.remaining() > 0 {
        let rec_bytes = rr.bytes()?;
        let mut one = Reader::new(rec_bytes);
        let rec = decode_record(&mut one)?;
        one.end()?;
        if let crate::record::Op::Create { kind, .. } = &rec.op {
            if !kind.in_version(version) {
                return Err(SegmentError::Inconsistent(format!(
                    "record {} creates a {kind:?}, which segments of version {version} cannot hold",
                    rec.seq
                )));
            }
        }
        let want = meta.first_seq + records.len() as u64;
        if rec.seq != want {
            return Err(SegmentError::Inconsistent(format!(
                "record sequence {} where {want} was expected",
                rec.seq
            )));
        }
        if rec.time < prev_time || rec.time > meta.last_ns {
            return Err(SegmentError::Inconsistent(format!(
                "record {} is out of time order",
                rec.seq
            )));
        }
        prev_time = rec.time;
        records.push(rec);
    }
    if records.len() as u64 != count {
        return Err(SegmentError::Inconsistent(format!(
            "{} records, header says {count}",
            records.len()
        )));
    }
    Ok((meta, records))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Op;

    fn sample(n: u64) -> Vec<Record> {
        (0..n)
            .map(|i| Record {
                seq: 10 + i,
                time: 1_000 + i as i64,
                op: Op::Write {
                    ino: 7,
                    offset: i * 100,
                    size: i * 100 + 100,
                    mtime: 5,
                    data: Bytes::from(vec![i as u8; 100]),
                },
            })
            .collect()
    }

    #[test]
    fn round_trips_and_keys_parse() {
        let recs = sample(50);
        let (meta, bytes) = encode(0xabc, &recs);
        let (m2, r2) = decode(&bytes).unwrap();
        assert_eq!(meta, m2);
        assert_eq!(recs, r2);
        assert_eq!(SegmentMeta::from_key(&meta.key()), Some(meta));
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let (_, bytes) = encode(1, &sample(3));
        for i in 0..bytes.len() {
            let mut b = bytes.to_vec();
            b[i] ^= 0x40;
            assert!(decode(&b).is_err(), "flip at {i} went unnoticed");
        }
        for cut in [1, 10, bytes.len() - 1] {
            assert!(
                decode(&bytes[..bytes.len() - cut]).is_err(),
                "truncation by {cut} went unnoticed"
            );
        }
    }

    #[test]
    fn a_recycled_buffer_seals_the_same_bytes_as_a_fresh_one() {
        let push_all = |b: &mut Builder, recs: &[Record]| {
            let mut tmp = Vec::new();
            for r in recs {
                tmp.clear();
                encode_record(r, &mut tmp);
                b.push(&tmp);
            }
        };
        let (big, small) = (sample(200), sample(3));
        let mut b = Builder::default();
        push_all(&mut b, &big);
        let (_, first) = b.finish(9);
        let held = first.clone();
        // A buffer something else still holds is not taken back.
        b.recycle(held);
        assert!(b.spare.is_empty());
        // A unique one is kept as it is: the same allocation, no copy.
        let at = first.as_ptr();
        b.recycle(first);
        assert_eq!(
            b.spare.as_ptr(),
            at,
            "the sealed buffer was copied, not kept"
        );
        push_all(&mut b, &small);
        let (meta, sealed) = b.finish(9);
        assert_eq!(
            sealed,
            encode(9, &small).1,
            "a recycled buffer leaked old bytes"
        );
        assert_eq!(decode(&sealed).unwrap(), (meta, small));
    }
}
