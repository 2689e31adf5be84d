//! Little-endian field encoding shared by every on-disk and on-store format
//! (records, segments, manifests, chunks). It owns bounds checking on
//! decode, so that a damaged or hostile object becomes a `DecodeError`
//! rather than a panic or a huge allocation. It knows no format.

use bytes::{BufMut, Bytes};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed data at byte {at}: {what}")]
pub struct DecodeError {
    pub at: usize,
    pub what: String,
}

pub fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.put_u32_le(b.len() as u32);
    out.extend_from_slice(b);
}

/// A cursor over a byte slice whose every read is checked.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    pub fn pos(&self) -> usize {
        self.pos
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub fn err(&self, what: impl Into<String>) -> DecodeError {
        DecodeError {
            at: self.pos,
            what: what.into(),
        }
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(self.err(format!("needs {n} bytes, {} left", self.remaining())));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    pub fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(self.u64()? as i64)
    }
    pub fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub fn owned(&mut self) -> Result<Bytes, DecodeError> {
        Ok(Bytes::copy_from_slice(self.bytes()?))
    }
    pub fn hash(&mut self) -> Result<[u8; 32], DecodeError> {
        Ok(self.take(32)?.try_into().unwrap())
    }
    pub fn end(&self) -> Result<(), DecodeError> {
        if self.remaining() != 0 {
            return Err(self.err(format!("{} unexpected trailing bytes", self.remaining())));
        }
        Ok(())
    }
}

/// Appends the blake3 of everything in `out` so far: the trailer that makes
/// every stored object self-verifying.
pub fn seal(out: &mut Vec<u8>) {
    let h = blake3::hash(out);
    out.extend_from_slice(h.as_bytes());
}

/// Checks and strips the trailer that `seal` added.
pub fn unseal(data: &[u8]) -> Result<&[u8], DecodeError> {
    if data.len() < 32 {
        return Err(DecodeError {
            at: 0,
            what: "shorter than its checksum (truncated)".into(),
        });
    }
    let (body, trailer) = data.split_at(data.len() - 32);
    if blake3::hash(body).as_bytes() != trailer {
        return Err(DecodeError {
            at: body.len(),
            what: "blake3 checksum mismatch (the object is damaged or truncated)".into(),
        });
    }
    Ok(body)
}

/// Largest raw block compressed as one lz4 block.
pub const LZ4_BLOCK: usize = 1 << 20;

/// Appends `raw` as a run of lz4 blocks: `(raw_len:u32 comp_len:u32 bytes)*`.
pub fn put_lz4_blocks(out: &mut Vec<u8>, raw: &[u8]) {
    for block in raw.chunks(LZ4_BLOCK) {
        // Compressed in place at the end of `out`: no buffer per block.
        let at = out.len();
        out.put_u32_le(block.len() as u32);
        out.put_u32_le(0);
        out.resize(
            at + 8 + lz4_flex::block::get_maximum_output_size(block.len()),
            0,
        );
        let n = lz4_flex::block::compress_into(block, &mut out[at + 8..])
            .expect("the output was sized for the worst case");
        out.truncate(at + 8 + n);
        out[at + 4..at + 8].copy_from_slice(&(n as u32).to_le_bytes());
    }
}

/// An upper bound of what `put_lz4_blocks` appends for `raw_len` bytes.
pub fn lz4_blocks_max_len(raw_len: usize) -> usize {
    lz4_flex::block::get_maximum_output_size(raw_len) + 8 * (raw_len / LZ4_BLOCK + 1)
}

/// Reads lz4 blocks until the reader is exhausted; `raw_len` is the total
/// the header declared, which bounds every allocation.
pub fn read_lz4_blocks(r: &mut Reader<'_>, raw_len: usize) -> Result<Vec<u8>, DecodeError> {
    if raw_len > r.remaining().saturating_mul(255).saturating_add(64) {
        return Err(r.err(format!(
            "declares {raw_len} raw bytes, more than the compressed data can hold"
        )));
    }
    let mut raw = Vec::with_capacity(raw_len);
    while r.remaining() > 0 {
        let blen = r.u32()? as usize;
        let clen = r.u32()? as usize;
        if blen > LZ4_BLOCK || raw.len() + blen > raw_len {
            return Err(r.err(format!("block of {blen} bytes exceeds the declared sizes")));
        }
        let c = r.take(clen)?;
        let start = raw.len();
        raw.resize(start + blen, 0);
        match lz4_flex::block::decompress_into(c, &mut raw[start..]) {
            Ok(n) if n == blen => {}
            Ok(_) => return Err(r.err("lz4 block decompressed to the wrong size")),
            Err(e) => return Err(r.err(format!("lz4: {e}"))),
        }
    }
    if raw.len() != raw_len {
        return Err(r.err(format!("{} raw bytes, header says {raw_len}", raw.len())));
    }
    Ok(raw)
}
