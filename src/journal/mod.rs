//! The write-ahead journal: the local, crash-safe log every acknowledged
//! operation is appended to before its reply leaves the daemon. It owns the
//! global sequence (assigned under the append lock, so sequence order is
//! append order), the record clock, journal files on disk (preallocated so
//! appends never hit ENOSPC mid-record; a full disk at rotation is waited
//! out), group commit for fsync, the bound on unshipped bytes (writers wait,
//! or with `--on-journal-full=gap` unshipped records are dropped behind a
//! note that keeps the gap until the store records it: `drop_unshipped`),
//! and the recovery scan that cuts a torn tail and refuses damage in the
//! middle.
//! It must not know about the store or the
//! filesystem it protects: shipping reads it through `JournalReader`, and
//! space is released only when the shipper says records are stored.
//!
//! # State
//! `Inner` (one mutex) holds the open file, the write offset and the next
//! sequence number; `SyncState` (another mutex + condvar) holds how far the
//! journal is known durable, whether a sync runs, and the callbacks of
//! `sync_then` callers waiting for the next one. A writer never holds both.
//!
//! # Group commit
//! One thread at a time runs `fdatasync`. Callers that arrive meanwhile
//! either block (`sync`) or leave a callback (`sync_then`, for FUSE workers,
//! which must not be parked) and return; the syncing thread runs one more
//! round for them, since their records may have been appended after its
//! round began, and answers them.
//!
//! # Rotation
//! A full file is fdatasynced under the append lock before records land in
//! the next one (a machine crash must not keep newer records and lose older
//! ones). So that this flush is short, appends start the kernel's writeback
//! of the current file every `WRITEBACK_STEP` bytes, outside the lock.

mod file;

pub use file::{dump_file, scan_file, FileScan, FrameIter, JournalError, FILE_EXT, SPARE_EXT};

use std::collections::VecDeque;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::clock::{Nanos, RecordClock};
use crate::gap::{self, Full, GapMark};
use crate::record::{encode_op, encode_write, record_head, Ino, Op, Record, Seq};
use file::PAGE;

/// Size each journal file is preallocated to; a larger record gets a file
/// of its own size.
pub const DEFAULT_FILE_SIZE: u64 = 64 << 20;

/// A spare is zero-filled ahead of time only while the journal's disk has
/// this many files' worth of free space.
const SPARE_HEADROOM: u64 = 4;
/// Released journal files kept for reuse (see `file::recycle`).
const MAX_SPARES: usize = 2;
/// Appends start the kernel's writeback of the current file in steps of
/// this size (`file::start_writeback`): a file that is still mostly dirty
/// when it fills makes the rotation's fdatasync, under the append lock,
/// stall every writer while it flushes up to a whole file (tens of
/// milliseconds on the CI machine kind). Started early, that flush has
/// little left to do. It writes no byte that would not be written anyway.
const WRITEBACK_STEP: u64 = 4 << 20;

/// One journal file as the writer and the readers see it.
#[derive(Clone)]
pub struct JournalFile {
    pub path: PathBuf,
    pub file: Arc<File>,
    pub first_seq: Seq,
    /// Offset just past the last complete frame.
    pub end: u64,
    /// Sequence number of the last frame (first_seq - 1 when empty).
    pub last_seq: Seq,
    pub lineage: u64,
    /// Preallocated size of the file.
    pub cap: u64,
    /// How its frames are checked (its header's version).
    pub check: file::Check,
}

struct Inner {
    files: VecDeque<JournalFile>,
    next_seq: Seq,
    file_size: u64,
    lineage: u64,
    buf: Vec<u8>,
    /// Total bytes of all journal files still on disk (unreleased).
    bytes: u64,
    rotated_since_sync: bool,
    /// Offset in the current file up to which writeback was started.
    writeback_from: u64,
    /// Spare files (zero-filled or released), reused by `rotate`.
    spares: Vec<PathBuf>,
    spare_counter: u64,
    /// Set in gap mode (`set_gap_mode`): what must be made durable
    /// elsewhere before records are dropped.
    prepare_drop: Option<PrepareDrop>,
    /// The last sequence number the store holds as the shipper reported
    /// it, and where in the journal it ends (see `JournalReader::position`).
    stored: (Seq, Option<(Seq, u64)>),
    /// Gaps whose notes are on disk: the store does not hold their markers yet.
    notes: Vec<GapMark>,
    /// The (from, to) lineages of the last gap while its new lineage has no
    /// stored base (see `gap::drop_lineages`).
    open_gap: Option<(u64, u64)>,
}

/// What the daemon makes durable before the journal drops records: the
/// source they describe (fsync waited for the journal alone, so without a
/// sync a machine crash could lose what fsync acknowledged), and its own
/// record of the new lineage. An error keeps the records (writers wait).
pub type PrepareDrop = Box<dyn Fn(&GapMark) -> Result<(), String> + Send>;

struct SyncState {
    synced_seq: Seq,
    syncing: bool,
    /// `sync_then` callbacks that arrived while a sync ran, with the
    /// sequence number each needs durable.
    deferred: Vec<(Seq, SyncDone)>,
}

/// A writer counted as waiting (`Journal::full_waiters`, `disk_waiters`)
/// for as long as it lives, however the wait ends: readiness reports it,
/// and a writer that leaves cannot uncount one still waiting.
struct Waiter<'a> {
    waiters: &'a AtomicU32,
    since: std::time::Instant,
}

impl<'a> Waiter<'a> {
    fn new(waiters: &'a AtomicU32) -> Self {
        waiters.fetch_add(1, Ordering::Relaxed);
        Waiter {
            waiters,
            since: std::time::Instant::now(),
        }
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.waiters.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What `Journal::sync_then` calls once the caller's records are durable,
/// or the sync failed.
pub type SyncDone = Box<dyn FnOnce(Result<(), JournalError>) + Send>;

pub struct Journal {
    dir: PathBuf,
    inner: Mutex<Inner>,
    space: Condvar,
    clock: RecordClock,
    sync: Mutex<SyncState>,
    synced: Condvar,
    /// Highest sequence number appended (readable without the lock).
    appended: AtomicU64,
    /// Total payload bytes ever appended, for metrics.
    written_bytes: AtomicU64,
    max_bytes: u64,
    /// Writers waiting because the journal holds more than `max_bytes`.
    full_waiters: AtomicU32,
    /// Writers waiting because a new journal file found the disk full.
    disk_waiters: AtomicU32,
    failed: Mutex<Option<String>>,
    /// Set together with `failed`, so appends check one atomic, not a lock.
    has_failed: AtomicBool,
    /// Drops in this run (readers compare it to notice one).
    gap_epoch: AtomicU64,
    /// The highest sequence number dropped (this run or a noted earlier one).
    dropped_through: AtomicU64,
    /// Journal bytes dropped in this run, for metrics.
    dropped_bytes: AtomicU64,
}

impl Journal {
    /// Opens the journal directory, scanning existing files (cutting a torn
    /// tail, refusing damage in the middle). New appends go to a fresh file
    /// of `lineage`, numbered after everything found.
    pub fn open(
        dir: &Path,
        lineage: u64,
        min_next_seq: Seq,
        clock_floor: Nanos,
        max_bytes: u64,
    ) -> Result<(Journal, Recovered), JournalError> {
        Self::open_sized(
            dir,
            lineage,
            min_next_seq,
            clock_floor,
            max_bytes,
            DEFAULT_FILE_SIZE,
        )
    }

    /// `open` with a chosen preallocation size per journal file.
    pub fn open_sized(
        dir: &Path,
        lineage: u64,
        min_next_seq: Seq,
        clock_floor: Nanos,
        max_bytes: u64,
        file_size: u64,
    ) -> Result<(Journal, Recovered), JournalError> {
        fs::create_dir_all(dir).map_err(|e| JournalError::io(dir, e))?;
        let mut paths: Vec<PathBuf> = fs::read_dir(dir)
            .map_err(|e| JournalError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == FILE_EXT))
            .collect();
        paths.sort();
        let mut spares = Vec::new();
        for e in fs::read_dir(dir)
            .map_err(|e| JournalError::io(dir, e))?
            .flatten()
        {
            let p = e.path();
            match p.extension().and_then(|x| x.to_str()) {
                Some(SPARE_EXT)
                    if e.metadata().is_ok_and(|m| m.len() == file_size)
                        && spares.len() < MAX_SPARES =>
                {
                    spares.push(p)
                }
                // Unfinished spares, and spares of another size or beyond the pool.
                Some(SPARE_EXT) | Some("tmp") => {
                    fs::remove_file(&p).map_err(|e| JournalError::io(&p, e))?
                }
                _ => {}
            }
        }
        let mut notes: Vec<GapMark> = fs::read_dir(dir)
            .map_err(|e| JournalError::io(dir, e))?
            .flatten()
            .filter_map(|e| GapMark::from_note_name(e.file_name().to_str()?))
            .collect();
        notes.sort_by_key(|g| g.ns);
        let mut files = VecDeque::new();
        let mut recovered = Recovered::default();
        let mut expect_seq: Option<Seq> = None;
        let mut last_time = clock_floor;
        let n = paths.len();
        for (i, p) in paths.iter().enumerate() {
            let scan = scan_file(p, expect_seq, i + 1 == n)?;
            if let Some(t) = scan.torn_bytes {
                recovered.torn.push((p.clone(), t));
            }
            if scan.frames > 0 {
                expect_seq = Some(scan.last_seq + 1);
                last_time = last_time.max(scan.last_time);
                recovered.records += scan.frames;
                // Sequence numbers run without holes within and across files.
                let from = scan.header.first_seq.max(min_next_seq);
                recovered.unstored += (scan.last_seq + 1).saturating_sub(from);
            } else if expect_seq.is_none() {
                expect_seq = Some(scan.header.first_seq);
            }
            let file = File::options()
                .read(true)
                .write(true)
                .open(p)
                .map_err(|e| JournalError::io(p, e))?;
            let len = file.metadata().map_err(|e| JournalError::io(p, e))?.len();
            files.push_back(JournalFile {
                path: p.clone(),
                file: Arc::new(file),
                first_seq: scan.header.first_seq,
                end: scan.end,
                last_seq: if scan.frames > 0 {
                    scan.last_seq
                } else {
                    scan.header.first_seq - 1
                },
                lineage: scan.header.lineage,
                cap: len,
                check: scan.header.check(),
            });
            recovered.bytes += len;
        }
        let next_seq = expect_seq.unwrap_or(1).max(min_next_seq).max(1);
        recovered.next_seq = next_seq;
        recovered.last_time = last_time;
        let bytes = recovered.bytes;
        let dropped_through = notes.iter().map(|g| g.to_seq).max().unwrap_or(0);
        let open_gap = notes.last().map(|g| (g.from_lineage, g.to_lineage));
        let j = Journal {
            dir: dir.to_path_buf(),
            inner: Mutex::new(Inner {
                files,
                next_seq,
                file_size,
                lineage,
                buf: Vec::with_capacity(1 << 20),
                bytes,
                rotated_since_sync: false,
                writeback_from: 0,
                spares,
                spare_counter: 0,
                prepare_drop: None,
                // What the caller knows the store holds (records of earlier
                // runs after it are still unshipped).
                stored: (min_next_seq.saturating_sub(1).min(next_seq - 1), None),
                notes,
                open_gap,
            }),
            space: Condvar::new(),
            clock: RecordClock::new(last_time),
            sync: Mutex::new(SyncState {
                synced_seq: next_seq - 1,
                syncing: false,
                deferred: Vec::new(),
            }),
            synced: Condvar::new(),
            appended: AtomicU64::new(next_seq - 1),
            written_bytes: AtomicU64::new(0),
            max_bytes,
            full_waiters: AtomicU32::new(0),
            disk_waiters: AtomicU32::new(0),
            failed: Mutex::new(None),
            has_failed: AtomicBool::new(false),
            gap_epoch: AtomicU64::new(0),
            dropped_through: AtomicU64::new(dropped_through),
            dropped_bytes: AtomicU64::new(0),
        };
        // The first file is a spare left by an earlier run when there is
        // one; otherwise it is preallocated, and the shipper zero-fills a
        // spare in the background (not here: a restart would wait for it).
        {
            let mut inner = j.inner.lock();
            j.rotate(&mut inner, 0)?;
        }
        Ok((j, recovered))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends the records of one operation: consecutive sequence numbers,
    /// one timestamp, so a restore sees the operation whole or not at all.
    /// Returns the last sequence number and the time. The caller holds the
    /// locks that applied the operation, so seq order is application order.
    pub fn append(&self, ops: &[Op]) -> Result<(Seq, Nanos), JournalError> {
        let payload = ops.iter().map(|o| o.payload_len()).sum();
        self.append_with(ops.len() as u64, payload, |seq, time, buf| {
            for (i, op) in ops.iter().enumerate() {
                file::encode_frame_with(seq + i as u64, time, buf, |o| encode_op(op, o));
            }
        })
    }

    /// Appends one Write record straight from the request's buffer (the
    /// hot path: no copy of the data into an `Op`).
    pub fn append_write(
        &self,
        ino: Ino,
        offset: u64,
        size: u64,
        mtime: Nanos,
        data: &[u8],
    ) -> Result<(Seq, Nanos), JournalError> {
        self.append_with(1, data.len(), |seq, time, buf| {
            file::encode_frame_with(seq, time, buf, |o| {
                encode_write(o, ino, offset, size, mtime, data)
            });
        })
    }

    /// Appends `count` records that `encode(first_seq, time, buf)` encodes
    /// as frames into `buf`, under the append lock.
    fn append_with(
        &self,
        count: u64,
        payload: usize,
        mut encode: impl FnMut(Seq, Nanos, &mut Vec<u8>),
    ) -> Result<(Seq, Nanos), JournalError> {
        self.check_failed()?;
        let mut inner = self.inner.lock();
        // Past the bound writers wait for the shipper to release space, or
        // in gap mode the unshipped records are dropped (`gap::when_full`).
        let mut full_wait: Option<Waiter<'_>> = None;
        let mut drop_failed = false;
        loop {
            let full = if inner.bytes <= self.max_bytes {
                Full::Append
            } else if inner.prepare_drop.is_some() && !drop_failed {
                let (seq, pos) = inner.stored;
                gap::when_full(
                    inner.bytes,
                    self.max_bytes,
                    bytes_after(&inner.files, pos, seq),
                    inner.files.len(),
                )
            } else {
                Full::Wait
            };
            match full {
                Full::Append => break,
                Full::Drop => {
                    if let Err(e) = self.drop_unshipped(&mut inner) {
                        tracing::error!("journal full and the gap cannot be recorded ({e}); writers wait until the store catches up instead");
                        drop_failed = true;
                    }
                }
                Full::Wait => {
                    full_wait.get_or_insert_with(|| {
                        tracing::warn!(
                            bytes = inner.bytes,
                            max = self.max_bytes,
                            "journal full: writers wait until the store catches up"
                        );
                        Waiter::new(&self.full_waiters)
                    });
                    self.space.wait(&mut inner);
                }
            }
        }
        drop(full_wait);
        // A full disk at rotation is waited out, not failed: the operation
        // is applied to the source already, so its record must land, and
        // the shipper frees journal space as it stores records (the current
        // file itself once everything in it is stored). The frames are
        // encoded again after a wait, with a fresh time.
        let mut disk_wait: Option<Waiter<'_>> = None;
        let (time, last, need, mut buf) = loop {
            let (time, step) = self.clock.tick();
            let mut buf = std::mem::take(&mut inner.buf);
            buf.clear();
            let mut first = inner.next_seq;
            if let Some(back_ns) = step {
                file::encode_frame(
                    &Record {
                        seq: first,
                        time,
                        op: Op::ClockStep { back_ns },
                    },
                    &mut buf,
                );
                first += 1;
            }
            encode(first, time, &mut buf);
            let last = first + count - 1;
            let need = buf.len() as u64;
            let cur_end = inner.files.back().map(|f| f.end).unwrap_or(0);
            let cur_cap = inner.files.back().map(|f| f.cap).unwrap_or(0);
            if cur_end + need > cur_cap {
                match self.rotate(&mut inner, need) {
                    Ok(()) => {}
                    Err(e) if e.is_no_space() => {
                        inner.buf = buf;
                        disk_wait.get_or_insert_with(|| {
                            tracing::warn!("journal disk full ({e}): writers wait until shipping frees journal space");
                            Waiter::new(&self.disk_waiters)
                        });
                        self.space
                            .wait_for(&mut inner, std::time::Duration::from_secs(1));
                        self.check_failed()?;
                        continue;
                    }
                    Err(e) => {
                        // Among these a failed flush of the old file: the
                        // journal cannot go on (see `fail`).
                        inner.buf = buf;
                        self.fail(&e);
                        return Err(e);
                    }
                }
            }
            break (time, last, need, buf);
        };
        if let Some(w) = disk_wait {
            tracing::info!(
                waited_ms = w.since.elapsed().as_millis() as u64,
                "journal space found again"
            );
        }
        let res = {
            let cur = inner.files.back_mut().expect("a current file");
            let new_end = cur.end + need;
            // Zeros after the frames, at least an end mark's worth, keep
            // stale frames of a recycled file out of every scan; the next
            // append overwrites them. An append that reaches into a page
            // the file has not written since it became current pads that
            // page to its end: a write over part of a page that is not in
            // the page cache makes the filesystem read it from disk first,
            // under this lock, and a recycled file's pages mostly are not
            // cached. The page where the append starts was written whole
            // by an earlier append (or by `recycle`), so it is cached.
            let mark = new_end + file::FRAME_HEAD as u64;
            let padded = if page_start(mark) > page_start(cur.end) {
                page_start(mark + PAGE - 1)
            } else {
                mark
            }
            .min(cur.cap);
            buf.resize((padded - cur.end) as usize, 0);
            match cur.file.write_all_at(&buf, cur.end) {
                Ok(()) => {
                    cur.end = new_end;
                    cur.last_seq = last;
                    Ok(())
                }
                Err(e) => Err(JournalError::io(&cur.path, e)),
            }
        };
        inner.buf = buf;
        if let Err(e) = res {
            // A failed append leaves the file's tail undefined; refuse all
            // further appends rather than write after a hole.
            self.fail(&e);
            return Err(e);
        }
        inner.next_seq = last + 1;
        self.appended.store(last, Ordering::Release);
        self.written_bytes
            .fetch_add(payload as u64, Ordering::Relaxed);
        // Every whole step this append completed goes to writeback, outside
        // the lock: the call may wait for the device's queue.
        let cur = inner.files.back().expect("a current file");
        let upto = cur.end / WRITEBACK_STEP * WRITEBACK_STEP;
        let kick = (upto > inner.writeback_from).then(|| (cur.file.clone(), inner.writeback_from));
        if kick.is_some() {
            inner.writeback_from = upto;
        }
        drop(inner);
        if let Some((f, from)) = kick {
            file::start_writeback(&f, from, upto - from);
        }
        Ok((last, time))
    }

    /// Drops every record the store has not taken (`--on-journal-full=gap`):
    /// notes the gap durably in the journal directory, lets the daemon make
    /// the records' effects and the new lineage durable (`PrepareDrop`),
    /// then releases every journal file and goes on in a fresh file of the
    /// gap's lineage. Called under the append lock, so no record lands
    /// between the last dropped one and the first of the new lineage.
    ///
    /// The note comes first: a crash after it and before the files are
    /// released keeps records the note says are dropped, which are shipped
    /// as usual (the marker then overstates the loss); a crash after the
    /// release finds the note, so the gap is never lost.
    fn drop_unshipped(&self, inner: &mut Inner) -> Result<(), JournalError> {
        let held = inner.bytes;
        let (stored, pos) = inner.stored;
        let bytes = bytes_after(&inner.files, pos, stored);
        let retiring = inner.files.len();
        let dropping = inner.lineage;
        let (from_lineage, to_lineage) =
            gap::drop_lineages(inner.lineage, inner.open_gap, rand::random::<u64>() >> 1);
        let mark = GapMark {
            ns: self.clock.tick().0,
            from_lineage,
            to_lineage,
            from_seq: stored + 1,
            to_seq: inner.next_seq - 1,
            bytes,
        };
        let note = self.dir.join(mark.note_name());
        File::create(&note)
            .and_then(|_| File::open(&self.dir)?.sync_all())
            .map_err(|e| JournalError::io(&note, e))?;
        let prepared = inner.prepare_drop.as_ref().map_or(Ok(()), |p| p(&mark));
        if let Err(e) = prepared {
            let _ = fs::remove_file(&note);
            return Err(JournalError::Failed(e));
        }
        // The drop is decided (the note and the state file say so): the
        // journal follows it before any file goes, so that a file that
        // cannot be removed is a leftover of dropped records, not a hole.
        inner.lineage = to_lineage;
        inner.stored = (mark.to_seq, None);
        inner.open_gap = Some((from_lineage, to_lineage));
        inner.notes.push(mark.clone());
        self.dropped_through
            .fetch_max(mark.to_seq, Ordering::AcqRel);
        self.dropped_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.gap_epoch.fetch_add(1, Ordering::AcqRel);
        for _ in 0..retiring {
            self.retire_front(inner)?;
        }
        // Writers parked after a drop of their own could not be prepared
        // wait for space: this drop made it.
        self.space.notify_all();
        tracing::warn!(
            "journal full: it holds {}, more than --max-journal-bytes {}, and the store has not taken {} of it: dropping those changes (records {}..={} of lineage {:016x}) because --on-journal-full=gap; writers go on, the timeline records a gap, and lineage {:016x} begins with a new base once the store takes objects",
            crate::outage::fmt_bytes(held),
            self.max_bytes,
            crate::outage::fmt_bytes(bytes),
            mark.from_seq,
            mark.to_seq,
            dropping,
            to_lineage,
        );
        self.rotate(inner, 0)
    }

    fn rotate(&self, inner: &mut Inner, need: u64) -> Result<(), JournalError> {
        if let Some(cur) = inner.files.back() {
            // The old file's tail must be durable before records land in a
            // newer file, or a machine crash could keep the newer records
            // and lose older ones.
            cur.file
                .sync_data()
                .map_err(|e| JournalError::io(&cur.path, e))?;
            if cur.end == file::HEADER_LEN as u64 && cur.last_seq + 1 == inner.next_seq {
                // An empty file: reuse it, or replace it (its name is the
                // next file's name).
                if need + file::HEADER_LEN as u64 <= cur.cap && cur.lineage == inner.lineage {
                    return Ok(());
                }
                let cur = inner.files.pop_back().unwrap();
                fs::remove_file(&cur.path).map_err(|e| JournalError::io(&cur.path, e))?;
                inner.bytes = inner.bytes.saturating_sub(cur.cap);
            }
        }
        let size = inner.file_size.max(need + file::HEADER_LEN as u64);
        let path = self.dir.join(format!("{:020}.{FILE_EXT}", inner.next_seq));
        let f = match inner.spares.pop() {
            Some(spare) if size == inner.file_size => {
                file::recycle(&spare, &path, inner.lineage, inner.next_seq)?
            }
            other => {
                inner.spares.extend(other);
                file::create(&path, inner.lineage, inner.next_seq, size)?
            }
        };
        inner.bytes += size;
        inner.rotated_since_sync = true;
        inner.writeback_from = 0;
        inner.files.push_back(JournalFile {
            path,
            file: Arc::new(f),
            first_seq: inner.next_seq,
            end: file::HEADER_LEN as u64,
            last_seq: inner.next_seq - 1,
            lineage: inner.lineage,
            cap: size,
            check: file::Check::CURRENT,
        });
        Ok(())
    }

    /// Refuses every later append and sync; every error an append or a sync
    /// returns comes through here, except a full disk at rotation (waited
    /// out). After a failed append the operation it records is applied to
    /// the source but not journaled, and the file's tail is undefined;
    /// after a failed fdatasync the kernel may
    /// have dropped the dirty pages it could not write and marked them
    /// clean, so a later sync could succeed without them, and an fsync
    /// would acknowledge records that are gone.
    fn fail(&self, e: &JournalError) {
        let mut f = self.failed.lock();
        if f.is_none() {
            tracing::error!("journal failed, refusing all further changes: {e}");
            *f = Some(e.to_string());
        }
        self.has_failed.store(true, Ordering::Release);
    }

    /// Whether the journal refuses changes after an I/O error.
    pub fn has_failed(&self) -> bool {
        self.has_failed.load(Ordering::Acquire)
    }

    fn check_failed(&self) -> Result<(), JournalError> {
        if self.has_failed.load(Ordering::Acquire) {
            let why = self.failed.lock().clone().unwrap_or_default();
            return Err(JournalError::Failed(why));
        }
        Ok(())
    }

    /// Makes every record appended so far durable, blocking until it is
    /// (group commit: one fdatasync serves every caller waiting while it runs).
    pub fn sync(&self) -> Result<(), JournalError> {
        self.check_failed()?;
        let target = self.appended.load(Ordering::Acquire);
        let mut st = self.sync.lock();
        loop {
            if st.synced_seq >= target {
                return Ok(());
            }
            if !st.syncing {
                break;
            }
            self.synced.wait(&mut st);
        }
        st.syncing = true;
        drop(st);
        let mut out = Ok(());
        self.sync_rounds(|r| out = r);
        out
    }

    /// Calls `done` once every record appended so far is durable, without
    /// waiting for a sync another thread runs: then `done` is left to that
    /// thread and this returns at once. Otherwise the sync runs here, and
    /// this thread also answers callbacks left meanwhile.
    pub fn sync_then(&self, done: SyncDone) {
        if let Err(e) = self.check_failed() {
            return done(Err(e));
        }
        let target = self.appended.load(Ordering::Acquire);
        let mut st = self.sync.lock();
        if st.synced_seq >= target {
            drop(st);
            return done(Ok(()));
        }
        if st.syncing {
            st.deferred.push((target, done));
            return;
        }
        st.syncing = true;
        drop(st);
        self.sync_rounds(done);
    }

    /// How far the journal is known durable.
    pub fn synced_seq(&self) -> Seq {
        self.sync.lock().synced_seq
    }

    /// Runs syncs on the thread that set `syncing` until no callback is
    /// left waiting. `first` (the caller's own) hears after the first round,
    /// which covers every record appended before the caller came in.
    fn sync_rounds(&self, first: impl FnOnce(Result<(), JournalError>)) {
        let mut first = Some(first);
        loop {
            let res = self.sync_once();
            if let Err(e) = &res {
                self.fail(e);
            }
            let mut st = self.sync.lock();
            if let Ok(upto) = res {
                st.synced_seq = st.synced_seq.max(upto);
            }
            // After a failure every waiter hears of it; after a success,
            // those whose records the round covered.
            let synced = st.synced_seq;
            let ready: Vec<_> = st
                .deferred
                .extract_if(.., |(t, _)| res.is_err() || *t <= synced)
                .collect();
            let finished = st.deferred.is_empty();
            if finished {
                st.syncing = false;
            }
            self.synced.notify_all();
            drop(st);
            let failed = res.as_ref().err().map(|e| format!("journal sync: {e}"));
            for (_, cb) in ready {
                cb(failed
                    .clone()
                    .map_or(Ok(()), |e| Err(JournalError::Failed(e))));
            }
            if let Some(f) = first.take() {
                f(res.map(drop));
            }
            if finished {
                return;
            }
        }
    }

    /// One fdatasync of the current file (and of the directory after a
    /// rotation); returns the last sequence number it made durable.
    fn sync_once(&self) -> Result<Seq, JournalError> {
        self.check_failed()?;
        let (upto, file, dirsync) = {
            let mut inner = self.inner.lock();
            let Some(cur) = inner.files.back().cloned() else {
                // Only after a failed reuse of the current file, whose
                // records were all stored: nothing to flush.
                return Ok(inner.next_seq - 1);
            };
            let d = std::mem::take(&mut inner.rotated_since_sync);
            (inner.next_seq - 1, cur, d)
        };
        let mut res = file
            .file
            .sync_data()
            .map_err(|e| JournalError::io(&file.path, e));
        if res.is_ok() && dirsync {
            res = File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| JournalError::io(&self.dir, e));
        }
        if res.is_err() && dirsync {
            // The next round must sync the directory again.
            self.inner.lock().rotated_since_sync = true;
        }
        res.map(|_| upto)
    }

    /// Makes sure one spare file is ready for the next rotation, zero-filling
    /// a new one if none was released yet (the shipper calls this between
    /// rounds, so the request path rarely preallocates). Not on a nearly
    /// full disk: a spare is only a head start, and the application's last
    /// free space is not the journal's to take (the rotation allocates what
    /// it needs when it comes).
    pub fn keep_spare(&self) -> Result<(), JournalError> {
        let (path, size) = {
            let mut inner = self.inner.lock();
            if !inner.spares.is_empty() {
                return Ok(());
            }
            let free = rustix::fs::statvfs(&self.dir)
                .map(|v| v.f_bavail.saturating_mul(v.f_frsize))
                .map_err(|e| JournalError::io(&self.dir, e.into()))?;
            if free < inner.file_size.saturating_mul(SPARE_HEADROOM) {
                return Ok(());
            }
            inner.spare_counter += 1;
            (
                self.dir
                    .join(format!("new-{}.{SPARE_EXT}", inner.spare_counter)),
                inner.file_size,
            )
        };
        file::create_spare(&path, size)?;
        let mut inner = self.inner.lock();
        if inner.spares.len() < MAX_SPARES {
            inner.spares.push(path);
        } else {
            drop(inner);
            fs::remove_file(&path).map_err(|e| JournalError::io(&path, e))?;
        }
        Ok(())
    }

    /// A snapshot of the journal files, oldest first, for readers.
    pub fn files(&self) -> Vec<JournalFile> {
        self.inner.lock().files.iter().cloned().collect()
    }

    pub fn last_seq(&self) -> Seq {
        self.appended.load(Ordering::Acquire)
    }

    /// A timestamp later than every record appended so far.
    pub fn now(&self) -> Nanos {
        self.clock.tick().0
    }

    pub fn last_time(&self) -> Nanos {
        self.clock.last()
    }

    pub fn bytes(&self) -> u64 {
        self.inner.lock().bytes
    }

    pub fn written_bytes(&self) -> u64 {
        self.written_bytes.load(Ordering::Relaxed)
    }

    pub fn writers_waiting(&self) -> bool {
        self.full_waiters.load(Ordering::Relaxed) + self.disk_waiters.load(Ordering::Relaxed) > 0
    }

    /// Switches new appends to `lineage` (after a gap or a machine crash).
    pub fn set_lineage(&self, lineage: u64) -> Result<(), JournalError> {
        let mut inner = self.inner.lock();
        inner.lineage = lineage;
        self.rotate(&mut inner, 0)
    }

    /// Gap mode (`--on-journal-full=gap`): past the bound, unshipped
    /// records are dropped after `prepare` succeeded, instead of writers
    /// waiting.
    pub fn set_gap_mode(&self, prepare: PrepareDrop) {
        self.inner.lock().prepare_drop = Some(prepare);
    }

    /// The shipper's report that the store holds every record up to `seq`,
    /// which ends at `pos` in the journal: what a drop would lose starts
    /// after it. Records a drop already gave up (a segment put that was in
    /// flight during the drop) do not move it back.
    pub fn note_stored(&self, seq: Seq, pos: Option<(Seq, u64)>) {
        let mut inner = self.inner.lock();
        if seq > inner.stored.0 {
            inner.stored = (seq, pos);
        }
    }

    /// The lineage new records belong to.
    pub fn lineage(&self) -> u64 {
        self.inner.lock().lineage
    }

    /// How many drops happened in this run: a change means a new gap.
    pub fn gap_epoch(&self) -> u64 {
        self.gap_epoch.load(Ordering::Acquire)
    }

    /// The highest sequence number a drop gave up (0 when none): readers
    /// skip past it.
    pub fn dropped_through(&self) -> Seq {
        self.dropped_through.load(Ordering::Acquire)
    }

    /// Journal bytes dropped in this run.
    pub fn dropped_bytes(&self) -> u64 {
        self.dropped_bytes.load(Ordering::Relaxed)
    }

    /// Gaps whose markers the store does not hold yet, oldest first (noted
    /// in this run or found at open).
    pub fn pending_gaps(&self) -> Vec<GapMark> {
        self.inner.lock().notes.clone()
    }

    /// The store holds this gap's marker: its note is no longer needed.
    pub fn settle_gap(&self, mark: &GapMark) -> Result<(), JournalError> {
        let mut inner = self.inner.lock();
        inner.notes.retain(|g| g != mark);
        let note = self.dir.join(mark.note_name());
        match fs::remove_file(&note) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(JournalError::io(&note, e)),
            _ => Ok(()),
        }
    }

    /// A base of `lineage` is stored: a gap that began it is closed, and a
    /// later drop starts a lineage of its own.
    pub fn gap_closed(&self, lineage: u64) {
        let mut inner = self.inner.lock();
        if inner.open_gap.is_some_and(|(_, to)| to == lineage) {
            inner.open_gap = None;
        }
    }

    /// Whether `release_through(seq)` would release a file (so the caller
    /// syncs the source only when it matters).
    pub fn releasable(&self, seq: Seq) -> bool {
        let inner = self.inner.lock();
        (inner.files.len() > 1 && inner.files.front().is_some_and(|f| f.last_seq <= seq))
            || self.current_reusable(&inner, seq)
    }

    /// Whether writers wait for disk space and every record of the current
    /// (and only) file is stored: then the file itself is reused.
    fn current_reusable(&self, inner: &Inner, seq: Seq) -> bool {
        self.disk_waiters.load(Ordering::Relaxed) > 0
            && inner.files.len() == 1
            && inner.files.back().is_some_and(|f| {
                f.last_seq <= seq && f.last_seq >= f.first_seq && f.cap == inner.file_size
            })
    }

    /// Takes the oldest journal file out of the journal: kept as a spare
    /// for reuse when it has the standard size (its blocks are written
    /// already) and the pool has room, deleted otherwise.
    fn retire_front(&self, inner: &mut Inner) -> Result<(), JournalError> {
        let Some(f) = inner.files.front().cloned() else {
            return Ok(());
        };
        if f.cap == inner.file_size && inner.spares.len() < MAX_SPARES {
            inner.spare_counter += 1;
            let spare = self.dir.join(format!(
                "{:020}-{}.{SPARE_EXT}",
                f.first_seq, inner.spare_counter
            ));
            fs::rename(&f.path, &spare).map_err(|e| JournalError::io(&f.path, e))?;
            inner.spares.push(spare);
        } else {
            fs::remove_file(&f.path).map_err(|e| JournalError::io(&f.path, e))?;
        }
        inner.bytes = inner.bytes.saturating_sub(f.cap);
        inner.files.pop_front();
        Ok(())
    }

    /// Deletes journal files whose records are all stored (`seq` and
    /// below). The caller must have synced the source past them.
    pub fn release_through(&self, seq: Seq) -> Result<(), JournalError> {
        let mut inner = self.inner.lock();
        // The current file stays, unless writers wait for it.
        let keep = usize::from(!self.current_reusable(&inner, seq));
        while inner.files.len() > keep {
            if inner.files.front().is_some_and(|f| f.last_seq > seq) {
                break;
            }
            self.retire_front(&mut inner)?;
        }
        let res = if inner.files.is_empty() {
            // The current file was released as a spare: it becomes the
            // next current file at once (the store holds every record it
            // had, and the source was synced past them).
            self.rotate(&mut inner, 0)
        } else {
            Ok(())
        };
        drop(inner);
        self.space.notify_all();
        res
    }
}

/// What `Journal::open` found on disk.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Every record the journal files hold, stored ones included: files
    /// are reused only once everything in them is stored and synced.
    pub records: u64,
    /// Records numbered `min_next_seq` or later, which the caller's store
    /// has not confirmed: what the next start still has to ship.
    pub unstored: u64,
    pub next_seq: Seq,
    pub last_time: Nanos,
    pub bytes: u64,
    /// Files whose torn tail was cut, with the number of bytes dropped.
    pub torn: Vec<(PathBuf, u64)>,
}

/// Reads records from journal files in sequence order, from a cursor.
pub struct JournalReader {
    next_seq: Seq,
    /// (first_seq of the file, offset) just past the last record read.
    pos: Option<(Seq, u64)>,
    /// The read window, kept between reads (see `FrameIter::new`).
    buf: Vec<u8>,
}

fn page_start(off: u64) -> u64 {
    off / PAGE * PAGE
}

/// Largest encoded record: a 1 MiB write plus its fields, with slack.
const MAX_RECORD: u64 = 2 << 20;

impl JournalReader {
    pub fn new(from_seq: Seq) -> Self {
        JournalReader {
            next_seq: from_seq,
            pos: None,
            buf: Vec::new(),
        }
    }

    pub fn next_seq(&self) -> Seq {
        self.next_seq
    }

    /// Where the reader stands: the file (by its first sequence number)
    /// and the offset just past the last record read, once it read any.
    pub fn position(&self) -> Option<(Seq, u64)> {
        self.pos
    }

    /// Reads records with seq >= the cursor, about `max_payload` bytes of
    /// encoded records at most (at least one record if any is available),
    /// stopping at a change of lineage. Returns the lineage and records.
    pub fn read(
        &mut self,
        files: &[JournalFile],
        max_payload: usize,
    ) -> Result<Option<(u64, Vec<Record>)>, JournalError> {
        self.read_upto(files, max_payload, Seq::MAX)
    }

    /// `read`, but never past sequence number `max_seq`.
    pub fn read_upto(
        &mut self,
        files: &[JournalFile],
        max_payload: usize,
        max_seq: Seq,
    ) -> Result<Option<(u64, Vec<Record>)>, JournalError> {
        let mut out = Vec::new();
        let lineage = self.read_raw_upto(files, max_payload, max_seq, |body| {
            out.push(file::decode_body(body)?);
            Ok(())
        })?;
        Ok(lineage.map(|l| (l, out)))
    }

    /// `read_upto` without decoding: `sink` gets each record's bytes
    /// (record.rs, checksum verified) in sequence order, and an error it
    /// returns (a message) is reported as damage at that frame. Returns the lineage of
    /// the records given, or None if there were none. The shipper copies
    /// these bytes into a segment as they are.
    pub fn read_raw_upto(
        &mut self,
        files: &[JournalFile],
        max_payload: usize,
        max_seq: Seq,
        mut sink: impl FnMut(&[u8]) -> Result<(), String>,
    ) -> Result<Option<u64>, JournalError> {
        let mut lineage = None;
        let mut bytes = 0usize;
        for f in files {
            if f.last_seq < self.next_seq || f.end <= file::HEADER_LEN as u64 {
                continue;
            }
            if let Some(l) = lineage {
                if l != f.lineage {
                    break;
                }
            }
            // Windows over this file until the cursor passes its end, the
            // batch is full, or max_seq is reached. Records below the
            // cursor (already stored, before a restart) are skipped, and
            // the position moves past them too: a file that starts with
            // more stored records than one window holds is still read.
            loop {
                let start = match self.pos {
                    Some((first, off)) if first == f.first_seq => off,
                    _ => file::HEADER_LEN as u64,
                };
                let to = start + (max_payload.saturating_sub(bytes)) as u64 + MAX_RECORD;
                let mut it = FrameIter::new(f, start, to, std::mem::take(&mut self.buf))?;
                let mut progressed = false;
                let mut full = false;
                while let Some(frame) = it.next_raw() {
                    let body = frame?;
                    let (seq, _) = record_head(body);
                    let len = file::FRAME_HEAD + body.len();
                    progressed = true;
                    if seq < self.next_seq {
                        self.pos = Some((f.first_seq, it.offset()));
                        continue;
                    }
                    if seq > max_seq {
                        full = true;
                        break;
                    }
                    if seq != self.next_seq {
                        return Err(JournalError::Corrupt {
                            path: f.path.clone(),
                            offset: it.offset() - len as u64,
                            why: format!("sequence jumps from {} to {}", self.next_seq, seq),
                        });
                    }
                    if let Err(why) = sink(body) {
                        return Err(JournalError::Corrupt {
                            path: f.path.clone(),
                            offset: it.offset() - len as u64,
                            why,
                        });
                    }
                    lineage = Some(f.lineage);
                    bytes += len;
                    self.next_seq += 1;
                    self.pos = Some((f.first_seq, it.offset()));
                    if bytes >= max_payload {
                        full = true;
                        break;
                    }
                }
                self.buf = it.into_buf();
                if full {
                    return Ok(lineage);
                }
                if self.next_seq > f.last_seq || !progressed {
                    break;
                }
            }
            if self.next_seq <= f.last_seq {
                // Not every record of this file could be read yet.
                break;
            }
        }
        Ok(lineage)
    }
}

/// Bytes of journal frames in `files` that a reader standing at `pos` (see
/// [`JournalReader::position`]) has not read yet: what is still waiting to
/// ship when `pos` is where the last stored segment ended. Without a
/// position, every file holding a record after `seq` counts whole.
pub fn bytes_after<'a>(
    files: impl IntoIterator<Item = &'a JournalFile>,
    pos: Option<(Seq, u64)>,
    seq: Seq,
) -> u64 {
    let header = file::HEADER_LEN as u64;
    files
        .into_iter()
        .map(|f| match pos {
            Some((first, _)) if f.first_seq < first => 0,
            Some((first, off)) if f.first_seq == first => f.end.saturating_sub(off.max(header)),
            None if f.last_seq <= seq => 0,
            _ => f.end.saturating_sub(header),
        })
        .sum()
}

/// The encoded header of a journal file (for golden tests and tools).
pub fn file_header(lineage: u64, first_seq: Seq, created_ns: Nanos) -> [u8; 64] {
    file::encode_header(&file::Header {
        version: file::VERSION,
        lineage,
        first_seq,
        created_ns,
    })
}

/// The encoded frames of `recs` as this build appends them (for golden
/// tests and tools).
pub fn file_frames(recs: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in recs {
        file::encode_frame(r, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_waiting_after_a_position() {
        let null = Arc::new(File::open("/dev/null").unwrap());
        let f = |first_seq: Seq, last_seq: Seq, end: u64| JournalFile {
            path: PathBuf::from(format!("{first_seq:020}.rwj")),
            file: null.clone(),
            first_seq,
            end,
            last_seq,
            lineage: 1,
            cap: 1 << 26,
            check: file::Check::CURRENT,
        };
        // Three files: records 1-10 (1000 bytes of frames), 11-20 (500), 21-20 (empty).
        let files = [f(1, 10, 1064), f(11, 20, 564), f(21, 20, 64)];
        let cases: &[(Option<(Seq, u64)>, Seq, u64)] = &[
            // Read up to the middle of the first file.
            (Some((1, 564)), 0, 500 + 500),
            // Up to the end of the first file.
            (Some((1, 1064)), 0, 500),
            // Into the second one: the first counts no more.
            (Some((11, 164)), 0, 400),
            (Some((11, 564)), 0, 0),
            // No position: whole files holding records after seq.
            (None, 0, 1500),
            (None, 10, 500),
            (None, 20, 0),
        ];
        for &(pos, seq, want) in cases {
            assert_eq!(bytes_after(&files, pos, seq), want, "pos {pos:?} seq {seq}");
        }
    }
}
