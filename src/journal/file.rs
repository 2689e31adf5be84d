//! One journal file: its header, its frames, and the scan that decides
//! where the valid prefix ends.
//!
//! Format (version 3):
//!
//! ```text
//! header (64 bytes) := magic "RWJRNL01" | version:u16 = 3 | reserved:u16 | reserved:u32
//!                      | lineage:u64 | first_seq:u64 | created_ns:i64 | zero padding to 64
//! frame             := len:u32 | check:8 bytes | record (len bytes, see record.rs)
//! check             := xxh3_64(len_le || record), little-endian   (version 3)
//!                    | first 8 bytes of blake3(len_le || record)  (versions 1 and 2)
//! ```
//!
//! A frame whose `len` and `check` are all zeros ends the file. A new file
//! is zero-filled (or preallocated), and every append also writes such an
//! end mark right after its frames when it fits: a recycled file (a
//! released journal file renamed and given a new header, so that appends
//! land in blocks that are already written and `fdatasync` has no extent
//! metadata to commit) still holds stale frames after the end mark, which
//! the scan never reaches. A frame that fails its check is a torn tail when
//! nothing valid follows it (cut and reported) and damage otherwise
//! (refused: records after it would be replayed without their predecessor).
//!
//! Version 2 has the layout of version 1; its frames may also hold Create
//! records of the kinds socket, character device and block device (see
//! record.rs), which a build that knows only version 1 could not decode,
//! so it refuses the file by its header instead of failing on a record.
//! Version 1 files (left by an older build) are read as before.
//!
//! Version 3 changes only the check, from blake3 to xxh3-64: the check
//! guards against torn and damaged frames on the machine's own disk, not
//! against an adversary (a journal never leaves the machine; segments and
//! chunks, which do, keep blake3), and blake3 over every frame was about a
//! tenth of the daemon's CPU under random 4 KiB writes. The check a file
//! uses follows its header's version, so files of versions 1 and 2 that an
//! older build left are still read; a new build never appends to them (a
//! start always begins a new file).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::BufMut;

use super::JournalFile;
use crate::clock::Nanos;
use crate::codec::Reader;
use crate::record::{decode_record, encode_op, Record, Seq, MIN_RECORD_LEN};

pub const FILE_EXT: &str = "rwj";
pub const MAGIC: &[u8; 8] = b"RWJRNL01";
/// The version new and recycled files get (3: the xxh3 frame check; 2:
/// special file kinds in Create records, same layout as 1).
pub const VERSION: u16 = 3;
/// The oldest version this build reads.
pub const MIN_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 64;
pub const FRAME_HEAD: usize = 12;
/// The unit appends write in (see `Journal::append_with`): the page size,
/// and the block size of the filesystems journals live on.
pub const PAGE: u64 = 4096;
/// No record is larger than a 1 MiB write plus its fields; anything larger
/// in a length field is damage, not a record.
const MAX_FRAME: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("journal file {path} is damaged at byte {offset}: {why}. Records after the damage cannot be trusted; \
             move the journal directory aside to start fresh (unshipped changes in it will be lost)")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        why: String,
    },
    #[error("the journal stopped accepting records after an earlier error: {0}")]
    Failed(String),
}

impl JournalError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        JournalError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// ENOSPC or EDQUOT: nothing was written, and space may come back.
    pub fn is_no_space(&self) -> bool {
        matches!(self, JournalError::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)))
    }
}

/// How a file's frames are checked, which its header's version decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Versions 1 and 2.
    Blake3,
    /// Version 3.
    Xxh3,
}

impl Header {
    pub fn check(&self) -> Check {
        Check::of_version(self.version)
    }
}

impl Check {
    fn of_version(version: u16) -> Check {
        if version >= 3 {
            Check::Xxh3
        } else {
            Check::Blake3
        }
    }

    /// The check of the files this build writes.
    pub const CURRENT: Check = Check::Xxh3;

    /// The 8 check bytes of `len_le || record`, given contiguous.
    fn of(self, framed: &[u8]) -> [u8; 8] {
        match self {
            Check::Blake3 => blake3::hash(framed).as_bytes()[..8].try_into().unwrap(),
            Check::Xxh3 => xxhash_rust::xxh3::xxh3_64(framed).to_le_bytes(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Header {
    /// The file's format version; it decides the frame check.
    pub version: u16,
    pub lineage: u64,
    pub first_seq: Seq,
    pub created_ns: Nanos,
}

pub fn encode_header(h: &Header) -> [u8; HEADER_LEN] {
    let mut v = Vec::with_capacity(HEADER_LEN);
    v.extend_from_slice(MAGIC);
    v.put_u16_le(h.version);
    v.put_u16_le(0);
    v.put_u32_le(0);
    v.put_u64_le(h.lineage);
    v.put_u64_le(h.first_seq);
    v.put_i64_le(h.created_ns);
    v.resize(HEADER_LEN, 0);
    v.try_into().unwrap()
}

pub fn decode_header(b: &[u8]) -> Result<Header, String> {
    if b.len() < HEADER_LEN || &b[..8] != MAGIC {
        return Err("not a Rewind journal file (bad magic)".into());
    }
    let mut r = Reader::new(&b[8..HEADER_LEN]);
    let version = r.u16().unwrap();
    if !(MIN_VERSION..=VERSION).contains(&version) {
        return Err(format!(
            "journal format version {version} is not supported by this build (reads {MIN_VERSION} to {VERSION})"
        ));
    }
    r.u16().unwrap();
    r.u32().unwrap();
    Ok(Header {
        version,
        lineage: r.u64().unwrap(),
        first_seq: r.u64().unwrap(),
        created_ns: r.i64().unwrap(),
    })
}

/// The check of the frame at `off` whose record is `len` bytes long. The
/// hash input `len_le || record` is made contiguous by putting the length
/// in the frame's 4 bytes right before the record for the duration (they
/// are restored): both hashes are faster over one slice than fed in two
/// pieces (blake3 hashes whole 1 KiB chunks in parallel only then).
fn check_at(data: &mut [u8], off: usize, len: usize, check: Check) -> [u8; 8] {
    let at = off + FRAME_HEAD - 4;
    let saved: [u8; 4] = data[at..at + 4].try_into().unwrap();
    data[at..at + 4].copy_from_slice(&(len as u32).to_le_bytes());
    let h = check.of(&data[at..at + 4 + len]);
    data[at..at + 4].copy_from_slice(&saved);
    h
}

pub fn encode_frame(rec: &Record, out: &mut Vec<u8>) {
    encode_frame_with(rec.seq, rec.time, out, |o| encode_op(&rec.op, o))
}

/// Encodes one frame whose record is `seq`, `time` and the body `body`
/// writes (tag and fields, see record.rs), so that callers holding
/// borrowed data can encode it without building an `Op` first.
pub fn encode_frame_with(
    seq: Seq,
    time: Nanos,
    out: &mut Vec<u8>,
    body: impl FnOnce(&mut Vec<u8>),
) {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEAD]);
    out.put_u64_le(seq);
    out.put_i64_le(time);
    body(out);
    let len = out.len() - start - FRAME_HEAD;
    let c = check_at(out, start, len, Check::CURRENT);
    out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    out[start + 4..start + FRAME_HEAD].copy_from_slice(&c);
}

pub fn create(path: &Path, lineage: u64, first_seq: Seq, size: u64) -> Result<File, JournalError> {
    let f = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| JournalError::io(path, e))?;
    // Preallocate so that appends never allocate: a full disk shows up
    // here, at rotation, not in the middle of a record. A failed attempt
    // leaves no file behind to hold the space it did get.
    if let Err(e) = rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, size) {
        let _ = std::fs::remove_file(path);
        return Err(JournalError::io(path, e.into()));
    }
    let h = encode_header(&Header {
        version: VERSION,
        lineage,
        first_seq,
        created_ns: crate::clock::wall_now(),
    });
    f.write_all_at(&h, 0)
        .map_err(|e| JournalError::io(path, e))?;
    f.sync_all().map_err(|e| JournalError::io(path, e))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| JournalError::io(dir, e))?;
    }
    Ok(f)
}

/// Extension of spare files: released (or zero-filled) journal files kept
/// for reuse. The scan of the journal ignores them.
pub const SPARE_EXT: &str = "spare";

/// Creates a spare of `size` zero bytes, every block written and synced:
/// appends into it later overwrite initialised blocks, so an `fdatasync`
/// of the journal flushes data without committing extent changes (on ext4
/// about half the cost of a sync into preallocated space).
pub fn create_spare(path: &Path, size: u64) -> Result<(), JournalError> {
    let tmp = path.with_extension("tmp");
    let f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| JournalError::io(&tmp, e))?;
    let zeros = vec![0u8; 1 << 20];
    let mut off = 0;
    let filled = (|| {
        while off < size {
            let n = zeros.len().min((size - off) as usize);
            f.write_all_at(&zeros[..n], off)?;
            off += n as u64;
        }
        f.sync_data()
    })();
    if let Err(e) = filled {
        // On a full disk a half-written spare would keep what it got.
        let _ = std::fs::remove_file(&tmp);
        return Err(JournalError::io(&tmp, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| JournalError::io(path, e))?;
    Ok(())
}

/// Starts the kernel's writeback of `len` bytes of `f` at `offset` without
/// waiting for it (sync_file_range with SYNC_FILE_RANGE_WRITE): a hint that
/// makes a later fdatasync shorter, not a durability step, so an error (a
/// filesystem without it) changes nothing and is not reported.
pub fn start_writeback(f: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the call's duration (`f` is
    // borrowed), and sync_file_range reads no memory of ours.
    unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Turns the spare at `spare` into the journal file `path`: a new header
/// and an end mark are written and synced under the spare's name first, so
/// a crash never leaves a journal file with a stale header.
pub fn recycle(
    spare: &Path,
    path: &Path,
    lineage: u64,
    first_seq: Seq,
) -> Result<File, JournalError> {
    let f = File::options()
        .read(true)
        .write(true)
        .open(spare)
        .map_err(|e| JournalError::io(spare, e))?;
    let mut head = encode_header(&Header {
        version: VERSION,
        lineage,
        first_seq,
        created_ns: crate::clock::wall_now(),
    })
    .to_vec();
    // The end mark, and zeros to the end of the first page: appends only
    // pad pages they reach into (see Journal::append_with), and a whole
    // page is written without reading the stale one from disk.
    let len = f.metadata().map_err(|e| JournalError::io(spare, e))?.len();
    head.resize((len as usize).clamp(head.len(), PAGE as usize), 0);
    f.write_all_at(&head, 0)
        .map_err(|e| JournalError::io(spare, e))?;
    f.sync_data().map_err(|e| JournalError::io(spare, e))?;
    std::fs::rename(spare, path).map_err(|e| JournalError::io(path, e))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| JournalError::io(dir, e))?;
    }
    Ok(f)
}

/// Result of scanning one file.
#[derive(Debug)]
pub struct FileScan {
    pub header: Header,
    pub frames: u64,
    pub last_seq: Seq,
    pub last_time: Nanos,
    /// Offset just past the last valid frame.
    pub end: u64,
    /// Bytes of a torn tail that were cut (zeroed), if any.
    pub torn_bytes: Option<u64>,
}

enum Frame {
    Ok(Record, usize),
    End,
    Bad(String),
}

/// A frame whose checksum holds, before its record is decoded.
enum RawFrame<'a> {
    /// The record's bytes (record.rs); the frame is FRAME_HEAD longer.
    Ok(&'a [u8]),
    End,
    Bad(String),
}

/// Reads the frame at `off`. `data` is borrowed mutably only to check the
/// frame in one pass (see `check_at`); it is left as it was.
fn read_raw_frame(data: &mut [u8], off: usize, check: Check) -> RawFrame<'_> {
    if data.len() - off < FRAME_HEAD {
        return RawFrame::End;
    }
    let len = u32::from_le_bytes(data[off..off + 4].try_into().unwrap()) as usize;
    if len == 0 && data[off + 4..off + FRAME_HEAD].iter().all(|&b| b == 0) {
        return RawFrame::End;
    }
    if len > MAX_FRAME || off + FRAME_HEAD + len > data.len() {
        return RawFrame::Bad(format!("frame length {len} runs past the end of the file"));
    }
    if check_at(data, off, len, check) != data[off + 4..off + FRAME_HEAD] {
        return RawFrame::Bad("frame checksum mismatch".into());
    }
    let body = &data[off + FRAME_HEAD..off + FRAME_HEAD + len];
    if len < MIN_RECORD_LEN {
        return RawFrame::Bad(format!(
            "checksummed frame of {len} bytes is too short for a record"
        ));
    }
    RawFrame::Ok(body)
}

/// Decodes a record's bytes, with the message a damaged frame reports.
pub fn decode_body(body: &[u8]) -> Result<Record, String> {
    let mut r = Reader::new(body);
    decode_record(&mut r)
        .and_then(|rec| r.end().map(|_| rec))
        .map_err(|e| format!("checksummed frame does not decode: {e}"))
}

fn read_frame(data: &mut [u8], off: usize, check: Check) -> Frame {
    match read_raw_frame(data, off, check) {
        RawFrame::End => Frame::End,
        RawFrame::Bad(why) => Frame::Bad(why),
        RawFrame::Ok(body) => match decode_body(body) {
            Ok(rec) => Frame::Ok(rec, FRAME_HEAD + body.len()),
            Err(why) => Frame::Bad(why),
        },
    }
}

/// Scans a journal file. `expect_seq` is the sequence number the first
/// frame must carry (continuity with the previous file). A bad frame in the
/// last file with nothing valid after it is a torn tail: it is zeroed on
/// disk so that later appends and readers never see it.
pub fn scan_file(
    path: &Path,
    expect_seq: Option<Seq>,
    is_last: bool,
) -> Result<FileScan, JournalError> {
    let mut data = std::fs::read(path).map_err(|e| JournalError::io(path, e))?;
    let corrupt = |offset: usize, why: String| JournalError::Corrupt {
        path: path.to_path_buf(),
        offset: offset as u64,
        why,
    };
    let header = decode_header(&data).map_err(|why| corrupt(0, why))?;
    if let Some(e) = expect_seq {
        if header.first_seq > e {
            return Err(corrupt(
                0,
                format!(
                    "file starts at sequence {} but {} was expected: a journal file is missing",
                    header.first_seq, e
                ),
            ));
        }
    }
    let mut off = HEADER_LEN;
    let mut scan = FileScan {
        header: header.clone(),
        frames: 0,
        last_seq: 0,
        last_time: 0,
        end: off as u64,
        torn_bytes: None,
    };
    let mut next = header.first_seq;
    let check = Check::of_version(header.version);
    loop {
        match read_frame(&mut data, off, check) {
            Frame::End => break,
            // A checksummed frame older than the file is a stale frame of
            // a recycled file whose end mark a machine crash lost: the
            // valid prefix ends here.
            Frame::Ok(rec, _) if rec.seq < header.first_seq => break,
            Frame::Ok(rec, n) => {
                if rec.seq != next {
                    return Err(corrupt(
                        off,
                        format!("sequence {} where {} was expected", rec.seq, next),
                    ));
                }
                next += 1;
                scan.frames += 1;
                scan.last_seq = rec.seq;
                scan.last_time = rec.time;
                off += n;
                scan.end = off as u64;
            }
            Frame::Bad(why) => {
                // Is anything valid after the bad frame? Try the position its
                // length field points to, then look for any non-zero byte.
                let len = u32::from_le_bytes(data[off..off + 4].try_into().unwrap()) as usize;
                let after = off + FRAME_HEAD + len;
                let valid_after = after < data.len()
                    && matches!(read_frame(&mut data, after, check), Frame::Ok(ref r, _) if r.seq == next + 1);
                if valid_after || !is_last {
                    return Err(corrupt(off, why));
                }
                let tail_len = data[off..]
                    .iter()
                    .rposition(|&b| b != 0)
                    .map(|p| p + 1)
                    .unwrap_or(0);
                let f = File::options()
                    .write(true)
                    .open(path)
                    .map_err(|e| JournalError::io(path, e))?;
                f.write_all_at(&vec![0u8; tail_len], off as u64)
                    .map_err(|e| JournalError::io(path, e))?;
                f.sync_data().map_err(|e| JournalError::io(path, e))?;
                tracing::warn!(path = %path.display(), offset = off, bytes = tail_len, "cut a torn journal tail ({why}); records after the last complete one were never acknowledged as durable");
                scan.torn_bytes = Some(tail_len as u64);
                break;
            }
        }
    }
    Ok(scan)
}

/// Iterates over the frames of a journal file between two offsets.
pub struct FrameIter {
    data: Vec<u8>,
    off: usize,
    path: PathBuf,
    base: u64,
    check: Check,
    /// The window ends before the file's valid end: a frame crossing it is
    /// simply not read yet, not damage.
    windowed: bool,
}

impl FrameIter {
    /// Reads the window into `data` (a buffer kept from an earlier
    /// iterator, see `into_buf`): the shipper reads many megabytes per
    /// second, and a fresh buffer per window costs a page fault per 4 KiB.
    pub fn new(
        f: &JournalFile,
        from: u64,
        to: u64,
        mut data: Vec<u8>,
    ) -> Result<FrameIter, JournalError> {
        let to = to.min(f.end);
        // Only growth is zero-filled: the read overwrites the rest.
        data.resize(to.saturating_sub(from) as usize, 0);
        f.file
            .read_exact_at(&mut data, from)
            .map_err(|e| JournalError::io(&f.path, e))?;
        Ok(FrameIter {
            data,
            off: 0,
            path: f.path.clone(),
            base: from,
            check: f.check,
            windowed: to < f.end,
        })
    }

    /// Offset in the file just past the last frame returned.
    pub fn offset(&self) -> u64 {
        self.base + self.off as u64
    }

    /// The buffer, for the next iterator's `with_buf`.
    pub fn into_buf(self) -> Vec<u8> {
        self.data
    }

    /// The next frame's record bytes (record.rs), checksum verified but not
    /// decoded: the shipper copies them into a segment as they are, and
    /// `decode_body` makes a `Record` of them.
    pub fn next_raw(&mut self) -> Option<Result<&[u8], JournalError>> {
        if self.off >= self.data.len() {
            return None;
        }
        if self.windowed && self.data.len() - self.off >= 4 {
            let len =
                u32::from_le_bytes(self.data[self.off..self.off + 4].try_into().unwrap()) as usize;
            if self.off + FRAME_HEAD + len > self.data.len() && len <= MAX_FRAME {
                return None;
            }
        } else if self.windowed {
            return None;
        }
        let at = self.off;
        match read_raw_frame(&mut self.data, at, self.check) {
            RawFrame::End => None,
            RawFrame::Ok(body) => {
                self.off = at + FRAME_HEAD + body.len();
                Some(Ok(&self.data[at + FRAME_HEAD..self.off]))
            }
            RawFrame::Bad(why) => Some(Err(self.corrupt_at(at, why))),
        }
    }

    /// Stops the iteration at damage found at `at` and describes it.
    fn corrupt_at(&mut self, at: usize, why: String) -> JournalError {
        self.off = self.data.len();
        JournalError::Corrupt {
            path: self.path.clone(),
            offset: self.base + at as u64,
            why,
        }
    }
}

/// Lists the valid frames of a journal file without modifying it:
/// `(offset, length, record)` each.
pub fn dump_file(path: &Path) -> Result<Vec<(u64, u64, Record)>, JournalError> {
    let mut data = std::fs::read(path).map_err(|e| JournalError::io(path, e))?;
    let header = decode_header(&data).map_err(|why| JournalError::Corrupt {
        path: path.to_path_buf(),
        offset: 0,
        why,
    })?;
    let mut off = HEADER_LEN;
    let mut out = Vec::new();
    let check = Check::of_version(header.version);
    while let Frame::Ok(rec, n) = read_frame(&mut data, off, check) {
        if rec.seq < header.first_seq {
            break;
        }
        out.push((off as u64, n as u64, rec));
        off += n;
    }
    Ok(out)
}
