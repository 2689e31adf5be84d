//! Deltas: the compacted form of a run of records that `rewind prune`
//! writes for the minutes retention tier. A delta holds records that,
//! applied in order to the state after record `from_seq`, give exactly the
//! state after record `to_seq`; it is applied whole or not at all. This
//! module owns the delta encoding (lz4 blocks, blake3 trailer, explicit
//! version, like a segment) and the delta's object key, which carries the
//! time and sequence range of the records it replaces so that a LIST is in
//! timeline order. It must not do I/O or decide what to compact
//! (`compact` does that).
//!
//! Format (version 1), little-endian:
//!
//! ```text
//! delta := magic "RWDLT001" | version:u16 = 1 | flags:u16 | lineage:u64
//!          | from_seq:u64 | to_seq:u64 | first_ns:i64 | last_ns:i64
//!          | next_ns:i64 | count:u64 | raw_len:u64 | block*
//!          | blake3(everything before):32
//! block := raw_len:u32 | comp_len:u32 | lz4 block (comp_len bytes)
//! raw   := (len:u32 | record)*   -- record.rs, as in a segment of version 2
//! ```
//!
//! Key: `delta/<first_ns:020>-<last_ns:020>-<lineage:016x>-<from_seq:020>-<to_seq:020>-<next_ns:020>.rwd`.
//!
//! `first_ns` and `last_ns` are the times of records `from_seq + 1` and
//! `to_seq` of the original stream; `next_ns` is the time of record
//! `to_seq + 1` when prune had read it, else `last_ns + 1` (record times
//! only grow), so the state after the delta is the state at every instant
//! from `last_ns` to `next_ns - 1`, whatever later prunes delete (the delta's records carry the sequence
//! number and time of an original record they stand for, so every record's
//! seq lies in `from_seq+1..=to_seq` and its time in `first_ns..=last_ns`,
//! but they need not be in order). Flag bit 0 (`RAW`) says the records are
//! the original ones, uncompacted, in order and consecutive: prune writes
//! the records a base walk raced that way (docs/SEMANTICS.md, "Retention").

use bytes::{BufMut, Bytes};

use crate::clock::Nanos;
use crate::codec::{
    lz4_blocks_max_len, put_lz4_blocks, read_lz4_blocks, seal, unseal, DecodeError, Reader,
};
use crate::record::{decode_record, encode_record, Record, Seq};

pub const MAGIC: &[u8; 8] = b"RWDLT001";
/// The version this build writes and the only one it reads.
pub const VERSION: u16 = 1;
/// Flag bit: the records are the original stream, uncompacted.
pub const RAW: u16 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeltaMeta {
    pub lineage: u64,
    /// The delta applies to the state after this record...
    pub from_seq: Seq,
    /// ...and gives the state after this one.
    pub to_seq: Seq,
    /// Times of the first and last original records it stands for.
    pub first_ns: Nanos,
    pub last_ns: Nanos,
    /// The time of the record after `to_seq` (see the module docs).
    pub next_ns: Nanos,
}

impl DeltaMeta {
    pub fn key(&self) -> String {
        format!(
            "delta/{:020}-{:020}-{:016x}-{:020}-{:020}-{:020}.rwd",
            self.first_ns.max(0),
            self.last_ns.max(0),
            self.lineage,
            self.from_seq,
            self.to_seq,
            self.next_ns.max(0)
        )
    }

    /// Parses a key made by `key()`; None for anything else.
    pub fn from_key(key: &str) -> Option<DeltaMeta> {
        let name = key.strip_prefix("delta/")?.strip_suffix(".rwd")?;
        let p: Vec<&str> = name.split('-').collect();
        if p.len() != 6 {
            return None;
        }
        let m = DeltaMeta {
            first_ns: p[0].parse().ok()?,
            last_ns: p[1].parse().ok()?,
            lineage: u64::from_str_radix(p[2], 16).ok()?,
            from_seq: p[3].parse().ok()?,
            to_seq: p[4].parse().ok()?,
            next_ns: p[5].parse().ok()?,
        };
        (m.from_seq < m.to_seq && m.first_ns <= m.last_ns && m.last_ns < m.next_ns).then_some(m)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("delta is damaged: {0}")]
    Decode(#[from] DecodeError),
    #[error("delta is inconsistent: {0}")]
    Inconsistent(String),
    #[error("delta format version {0} is not supported by this build ({VERSION}); upgrade rewind")]
    Version(u16),
}

/// A decoded delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    pub meta: DeltaMeta,
    pub raw: bool,
    pub records: Vec<Record>,
}

/// Encodes `records` as the delta `meta` (with the `RAW` flag if `raw`).
pub fn encode(meta: &DeltaMeta, raw: bool, records: &[Record]) -> Bytes {
    let mut body = Vec::new();
    let mut tmp = Vec::new();
    for r in records {
        tmp.clear();
        encode_record(r, &mut tmp);
        body.put_u32_le(tmp.len() as u32);
        body.extend_from_slice(&tmp);
    }
    let mut out = Vec::with_capacity(lz4_blocks_max_len(body.len()) + 128);
    out.extend_from_slice(MAGIC);
    out.put_u16_le(VERSION);
    out.put_u16_le(if raw { RAW } else { 0 });
    out.put_u64_le(meta.lineage);
    out.put_u64_le(meta.from_seq);
    out.put_u64_le(meta.to_seq);
    out.put_i64_le(meta.first_ns);
    out.put_i64_le(meta.last_ns);
    out.put_i64_le(meta.next_ns);
    out.put_u64_le(records.len() as u64);
    out.put_u64_le(body.len() as u64);
    put_lz4_blocks(&mut out, &body);
    seal(&mut out);
    Bytes::from(out)
}

/// Decodes and fully checks a delta: checksum, version, flags, block
/// sizes, record count, and that every record lies in the delta's sequence
/// and time range (in order and consecutive when `RAW`).
pub fn decode(data: &[u8]) -> Result<Delta, DeltaError> {
    let body = unseal(data)?;
    let mut r = Reader::new(body);
    if r.take(8)? != MAGIC {
        return Err(DeltaError::Inconsistent(
            "not a Rewind delta (bad magic)".into(),
        ));
    }
    let version = r.u16()?;
    if version != VERSION {
        return Err(DeltaError::Version(version));
    }
    let flags = r.u16()?;
    if flags & !RAW != 0 {
        return Err(DeltaError::Inconsistent(format!(
            "unknown flags {flags:#x}"
        )));
    }
    let meta = DeltaMeta {
        lineage: r.u64()?,
        from_seq: r.u64()?,
        to_seq: r.u64()?,
        first_ns: r.i64()?,
        last_ns: r.i64()?,
        next_ns: r.i64()?,
    };
    if meta.to_seq <= meta.from_seq || meta.last_ns < meta.first_ns || meta.next_ns <= meta.last_ns
    {
        return Err(DeltaError::Inconsistent(format!(
            "empty or reversed range {}..{}",
            meta.from_seq, meta.to_seq
        )));
    }
    // A compacted delta may hold more records than it replaces (a write and
    // a truncation collapse into a size, the bytes and the final size), so
    // `count` is bounded only by the bytes that carry the records.
    let count = r.u64()?;
    let raw_len = r.u64()? as usize;
    let raw = flags & RAW != 0;
    let bytes = read_lz4_blocks(&mut r, raw_len)?;
    r.end()?;
    let mut rr = Reader::new(&bytes);
    let mut records = Vec::with_capacity((count as usize).min(bytes.len() / 16));
    while rr.remaining() > 0 {
        let mut one = Reader::new(rr.bytes()?);
        let rec = decode_record(&mut one)?;
        one.end()?;
        if rec.seq <= meta.from_seq
            || rec.seq > meta.to_seq
            || rec.time < meta.first_ns
            || rec.time > meta.last_ns
        {
            return Err(DeltaError::Inconsistent(format!(
                "record {} at {} lies outside the delta's range",
                rec.seq, rec.time
            )));
        }
        if raw {
            let want = meta.from_seq + 1 + records.len() as u64;
            let prev = records.last().map_or(meta.first_ns, |p: &Record| p.time);
            if rec.seq != want || rec.time < prev {
                return Err(DeltaError::Inconsistent(format!(
                    "raw record {} where {want} was expected, or out of time order",
                    rec.seq
                )));
            }
        }
        records.push(rec);
    }
    if records.len() as u64 != count {
        return Err(DeltaError::Inconsistent(format!(
            "{} records, header says {count}",
            records.len()
        )));
    }
    if raw && count != meta.to_seq - meta.from_seq {
        return Err(DeltaError::Inconsistent(
            "a raw delta must hold every record of its range".into(),
        ));
    }
    Ok(Delta { meta, raw, records })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Op;

    fn rec(seq: Seq, time: Nanos) -> Record {
        Record {
            seq,
            time,
            op: Op::Write {
                ino: 5,
                offset: seq * 10,
                size: seq * 10 + 3,
                mtime: time,
                data: Bytes::from_static(b"abc"),
            },
        }
    }

    fn meta() -> DeltaMeta {
        DeltaMeta {
            lineage: 0xab,
            from_seq: 9,
            to_seq: 12,
            first_ns: 100,
            last_ns: 300,
            next_ns: 450,
        }
    }

    #[test]
    fn round_trips_and_keys_parse() {
        let recs = vec![rec(12, 300), rec(10, 100)];
        let d = decode(&encode(&meta(), false, &recs)).unwrap();
        assert_eq!(d.meta, meta());
        assert!(!d.raw);
        assert_eq!(d.records, recs);
        assert_eq!(DeltaMeta::from_key(&meta().key()), Some(meta()));
        assert_eq!(DeltaMeta::from_key("delta/x.rwd"), None);
        let raw = vec![rec(10, 100), rec(11, 200), rec(12, 300)];
        assert!(decode(&encode(&meta(), true, &raw)).unwrap().raw);
    }

    #[test]
    fn a_compacted_delta_may_hold_more_records_than_it_replaces() {
        // A write and a truncation collapse into a size, the bytes and the
        // final size: more records than the range they stand for. A prune
        // wrote such a delta and verify called it damage.
        let recs = vec![
            rec(10, 100),
            rec(11, 200),
            rec(12, 300),
            rec(12, 300),
            rec(12, 300),
        ];
        let d = decode(&encode(&meta(), false, &recs)).unwrap();
        assert_eq!(d.records.len(), 5);
    }

    #[test]
    fn records_outside_the_range_or_a_partial_raw_delta_are_refused() {
        for (raw, recs) in [
            (false, vec![rec(9, 100)]),
            (false, vec![rec(13, 300)]),
            (false, vec![rec(10, 301)]),
            (true, vec![rec(10, 100), rec(12, 300)]),
            (true, vec![rec(10, 100), rec(11, 200)]),
            (true, vec![rec(10, 200), rec(11, 100), rec(12, 300)]),
        ] {
            assert!(
                decode(&encode(&meta(), raw, &recs)).is_err(),
                "{raw} {recs:?}"
            );
        }
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let bytes = encode(&meta(), false, &[rec(10, 100)]);
        for i in 0..bytes.len() {
            let mut b = bytes.to_vec();
            b[i] ^= 0x40;
            assert!(decode(&b).is_err(), "flip at {i} went unnoticed");
        }
    }
}
