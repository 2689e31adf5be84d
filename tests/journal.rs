//! The journal's recovery modes, one test per kind of damage: a torn tail
//! is cut and reported and every complete record survives; damage in the
//! middle is refused; sequence numbers continue after a restart.

use std::path::Path;

use bytes::Bytes;
use rewind::journal::{Journal, JournalReader};
use rewind::record::Op;

fn write_op(i: u64) -> Op {
    Op::Write {
        ino: 5,
        offset: i * 10,
        size: i * 10 + 10,
        mtime: 1,
        data: Bytes::from(vec![i as u8; 10]),
    }
}

fn fill(dir: &Path, n: u64) -> Vec<(u64, u64)> {
    let (j, _) = Journal::open(dir, 1, 1, 0, u64::MAX).unwrap();
    for i in 0..n {
        j.append(&[write_op(i)]).unwrap();
    }
    j.sync().unwrap();
    let files = j.files();
    files.iter().map(|f| (f.first_seq, f.end)).collect()
}

fn journal_file(dir: &Path) -> std::path::PathBuf {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "rwj"))
        .collect();
    v.sort();
    v.into_iter().next().unwrap()
}

fn records(j: &Journal) -> Vec<u64> {
    let mut r = JournalReader::new(1);
    let mut out = Vec::new();
    while let Some((_, recs)) = r.read(&j.files(), 1 << 20).unwrap() {
        if recs.is_empty() {
            break;
        }
        out.extend(recs.iter().map(|r| r.seq));
    }
    out
}

#[test]
fn a_torn_tail_is_cut_and_complete_records_survive() {
    let d = tempfile::tempdir().unwrap();
    let ends = fill(d.path(), 20);
    let end = ends[0].1 as usize;
    let p = journal_file(d.path());
    // Tear the last record: keep its first half, then garbage.
    let mut b = std::fs::read(&p).unwrap();
    let cut = end - 20;
    for x in &mut b[cut..end] {
        *x = 0xAA;
    }
    std::fs::write(&p, &b).unwrap();
    let (j, rec) = Journal::open(d.path(), 1, 1, 0, u64::MAX).unwrap();
    assert_eq!(rec.torn.len(), 1, "the torn tail is reported");
    assert_eq!(records(&j), (1..=19).collect::<Vec<_>>());
    // New appends continue the sequence after the last complete record.
    let (seq, _) = j.append(&[write_op(99)]).unwrap();
    assert_eq!(seq, 20);
}

#[test]
fn damage_in_the_middle_is_refused() {
    let d = tempfile::tempdir().unwrap();
    fill(d.path(), 20);
    let p = journal_file(d.path());
    let mut b = std::fs::read(&p).unwrap();
    b[64 + 40] ^= 0x10; // inside the first record
    std::fs::write(&p, &b).unwrap();
    let err = Journal::open(d.path(), 1, 1, 0, u64::MAX)
        .err()
        .expect("must refuse");
    let msg = err.to_string();
    assert!(
        msg.contains("damaged") && msg.contains("move the journal directory aside"),
        "{msg}"
    );
}

#[test]
fn sequence_continues_across_restarts_and_files() {
    let d = tempfile::tempdir().unwrap();
    fill(d.path(), 5);
    let (j, rec) = Journal::open(d.path(), 1, 1, 0, u64::MAX).unwrap();
    assert_eq!((rec.records, rec.unstored), (5, 5));
    let (seq, _) = j.append(&[write_op(7)]).unwrap();
    assert_eq!(seq, 6);
    assert_eq!(records(&j), (1..=6).collect::<Vec<_>>());
}

#[test]
fn one_operation_is_one_timestamp() {
    let d = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open(d.path(), 1, 1, 0, u64::MAX).unwrap();
    j.append(&[write_op(1), write_op(2)]).unwrap();
    let mut r = JournalReader::new(1);
    let (_, recs) = r.read(&j.files(), 1 << 20).unwrap().unwrap();
    assert_eq!(recs.len(), 2);
    assert_eq!(
        recs[0].time, recs[1].time,
        "records of one operation share a time, so a restore sees all or none"
    );
}

#[test]
fn writers_wait_past_the_bound_until_space_is_released() {
    let d = tempfile::tempdir().unwrap();
    // 4 KiB files and a 12 KiB bound: a few appends fill it.
    let (j, _) = Journal::open_sized(d.path(), 1, 1, 0, 12 << 10, 4 << 10).unwrap();
    let j = std::sync::Arc::new(j);
    let big = |i: u64| Op::Write {
        ino: 5,
        offset: 0,
        size: 1000,
        mtime: 1,
        data: Bytes::from(vec![i as u8; 1000]),
    };
    let j2 = j.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for i in 0..40 {
            j2.append(&[big(i)]).unwrap();
            tx.send(i).unwrap();
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !j.writers_waiting() {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer never started waiting"
        );
        std::thread::yield_now();
    }
    let acked_before = rx.try_iter().count();
    assert!(acked_before < 40, "the bound must hold writers back");
    // Everything appended so far is "stored": releasing it lets them go on.
    let mut released = 0;
    while released < 39 {
        let last = j.last_seq();
        j.release_through(last).unwrap();
        released = last;
        assert!(
            std::time::Instant::now() < deadline,
            "writers did not proceed after release"
        );
        std::thread::yield_now();
    }
    let all: Vec<u64> = rx.iter().collect();
    assert_eq!(
        acked_before + all.len(),
        40,
        "every append completed, none dropped"
    );
}

/// Released files are recycled (renamed, new header) so appends overwrite
/// written blocks; the stale frames they still hold must never be read as
/// records, neither by readers nor by the recovery scan after a restart,
/// including when a machine crash lost the end mark after the last frame.
#[test]
fn recycled_files_never_yield_stale_frames() {
    let d = tempfile::tempdir().unwrap();
    let size = 64 << 10;
    let big = |i: u64| Op::Write {
        ino: 7,
        offset: i,
        size: i + 1000,
        mtime: 1,
        data: Bytes::from(vec![i as u8; 1000]),
    };
    let (j, _) = Journal::open_sized(d.path(), 1, 1, 0, u64::MAX, size).unwrap();
    // Fill several files, release them all: they become spares.
    let mut last = 0;
    for i in 0..200 {
        last = j.append(&[big(i)]).unwrap().0;
    }
    j.release_through(last).unwrap();
    let spares = || {
        std::fs::read_dir(d.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "spare")
            })
            .count()
    };
    assert!(spares() >= 1, "released full-size files are kept as spares");
    // Fill the current file until the journal moves to a recycled spare,
    // then put a few short records there.
    let before = j.files().last().unwrap().first_seq;
    let mut i = 0;
    while j.files().last().unwrap().first_seq == before {
        last = j.append(&[big(i)]).unwrap().0;
        i += 1;
    }
    assert!(
        std::fs::metadata(&j.files().last().unwrap().path)
            .unwrap()
            .len()
            == size,
        "the new file is a recycled one"
    );
    let first = last;
    for i in 0..3 {
        last = j.append(&[write_op(i)]).unwrap().0;
    }
    j.sync().unwrap();
    let mut r = JournalReader::new(first);
    let (_, recs) = r.read(&j.files(), 1 << 20).unwrap().unwrap();
    assert_eq!(
        recs.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (first..=last).collect::<Vec<_>>()
    );
    let files = j.files();
    drop(j);
    // A machine crash that lost the end mark where a stale frame began:
    // copy a complete old frame (from a spare, which still holds its first
    // life's frames) right after the last frame of the current file.
    let cur = files.last().unwrap();
    let mut b = std::fs::read(&cur.path).unwrap();
    let end = cur.end as usize;
    assert!(
        b[end + 12..].iter().any(|&x| x != 0),
        "the recycled file holds stale frames past its end"
    );
    let spare = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "spare"))
        .unwrap();
    let old = std::fs::read(spare).unwrap();
    let len = u32::from_le_bytes(old[64..68].try_into().unwrap()) as usize + 12;
    b[end..end + len].copy_from_slice(&old[64..64 + len]);
    std::fs::write(&cur.path, &b).unwrap();
    let (j, rec) = Journal::open_sized(d.path(), 1, 1, 0, u64::MAX, size).unwrap();
    assert_eq!(
        rec.next_seq,
        last + 1,
        "recovery stops at the last real record"
    );
    assert!(
        rec.torn.is_empty(),
        "a stale frame is an end, not a torn record"
    );
    let mut r = JournalReader::new(first);
    let (_, recs) = r.read(&j.files(), 1 << 20).unwrap().unwrap();
    assert_eq!(recs.len(), 4);
}

/// After a restart the shipper's cursor can sit far into a journal file
/// (records before it are stored): more stored records than one read
/// window holds must be skipped, not mistaken for the end of the journal.
#[test]
fn a_reader_starting_deep_in_a_file_finds_the_records_after_it() {
    let d = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open(d.path(), 1, 1, 0, u64::MAX).unwrap();
    let mib = |i: u64| Op::Write {
        ino: 3,
        offset: i << 20,
        size: (i + 1) << 20,
        mtime: 1,
        data: Bytes::from(vec![i as u8; 1 << 20]),
    };
    for i in 0..30 {
        j.append(&[mib(i)]).unwrap();
    }
    let mut r = JournalReader::new(25);
    let (_, recs) = r
        .read(&j.files(), 2 << 20)
        .unwrap()
        .expect("records after the cursor");
    assert_eq!(recs.first().map(|r| r.seq), Some(25));
    let mut seqs: Vec<u64> = recs.iter().map(|r| r.seq).collect();
    while let Some((_, more)) = r.read(&j.files(), 2 << 20).unwrap() {
        if more.is_empty() {
            break;
        }
        seqs.extend(more.iter().map(|r| r.seq));
    }
    assert_eq!(seqs, (25..=30).collect::<Vec<_>>());
}

/// The shipper copies frames into segments without decoding them: the
/// segment built from raw frames must be byte for byte the one encoded from
/// the decoded records, across windows and file boundaries, and must stop
/// at max_seq.
#[test]
fn raw_frames_build_the_same_segment_as_decoded_records() {
    let d = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open(d.path(), 1, 1, 0, u64::MAX).unwrap();
    for i in 0..3000u64 {
        j.append(&[Op::Write {
            ino: 7,
            offset: i * 512,
            size: i * 512 + 512,
            mtime: i as i64,
            data: Bytes::from(vec![(i % 251) as u8; 512]),
        }])
        .unwrap();
    }
    j.sync().unwrap();
    let files = j.files();
    let mut decoded = JournalReader::new(1);
    let mut raw = JournalReader::new(1);
    let mut builder = rewind::segment::Builder::default();
    let mut segments = 0;
    loop {
        // Small batches, so that both readers cross window and batch limits.
        let Some((lineage, recs)) = decoded.read_upto(&files, 100_000, 2500).unwrap() else {
            break;
        };
        let l = raw
            .read_raw_upto(&files, 100_000, 2500, |rec| {
                builder.push(rec);
                Ok(())
            })
            .unwrap();
        assert_eq!(l, Some(lineage));
        let (meta, bytes) = builder.finish(lineage);
        let (want_meta, want) = rewind::segment::encode(lineage, &recs);
        assert_eq!(meta, want_meta);
        assert_eq!(bytes, want, "segment {segments} differs");
        segments += 1;
    }
    assert!(segments > 5, "{segments} batches");
    assert_eq!(raw.next_seq(), 2501, "max_seq bounds the raw reader");
    assert_eq!(decoded.next_seq(), 2501);
}

/// Appends write whole pages (the page's earlier bytes again, then zeros):
/// across page boundaries, a reopen (the tail is read back from disk) and
/// rotations into recycled files full of stale bytes, every record reads
/// back, and the rest of the last page is zero.
#[test]
fn page_sized_appends_keep_every_record_across_reopens_and_rotations() {
    let d = tempfile::tempdir().unwrap();
    let op = |i: u64| Op::Write {
        ino: 9,
        offset: i,
        size: i + 1,
        mtime: 1,
        // Sizes that never line up with a page.
        data: Bytes::from(vec![(i % 255) as u8 + 1; 97 + (i as usize * 131) % 3000]),
    };
    let mut n = 0u64;
    let mut from = 1u64;
    for round in 0..3 {
        // 64 KiB files: a few dozen appends rotate, and released files come
        // back as spares holding old frames.
        let (j, _) = Journal::open_sized(d.path(), 1, 1, 0, u64::MAX, 64 << 10).unwrap();
        for _ in 0..60 {
            n += 1;
            j.append(&[op(n)]).unwrap();
        }
        j.sync().unwrap();
        let mut r = JournalReader::new(from);
        let mut got = Vec::new();
        while let Some((_, recs)) = r.read(&j.files(), 1 << 20).unwrap() {
            for rec in recs {
                assert_eq!(
                    rec.op,
                    op(rec.seq),
                    "record {} reads back as written",
                    rec.seq
                );
                got.push(rec.seq);
            }
        }
        assert_eq!(got, (from..=n).collect::<Vec<_>>(), "round {round}");
        let last = j.files().last().cloned().unwrap();
        let bytes = std::fs::read(&last.path).unwrap();
        let page_end = (last.end as usize).div_ceil(4096) * 4096;
        assert!(
            bytes[last.end as usize..page_end.max(last.end as usize + 12).min(bytes.len())]
                .iter()
                .all(|&b| b == 0),
            "zeros after the last frame"
        );
        if round == 1 {
            // Release everything but the current file: those become spares.
            j.release_through(n - 1).unwrap();
            from = j.files()[0].first_seq;
            assert!(from > 1, "files were released");
        }
    }
}

/// Group commit with callbacks: every `sync_then` callback runs exactly once,
/// only after the records appended before the call are durable, whichever
/// thread runs it; blocking `sync` callers mixed in see the same guarantee.
#[test]
fn every_sync_then_callback_runs_once_after_its_records_are_durable() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open(dir.path(), 1, 1, 0, u64::MAX).unwrap();
    let j = Arc::new(j);
    let answered = Arc::new(AtomicU64::new(0));
    let early = Arc::new(AtomicU64::new(0));
    let other_thread = Arc::new(AtomicU64::new(0));
    const THREADS: u64 = 6;
    const EACH: u64 = 300;
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (j, answered, early, other_thread) = (
                j.clone(),
                answered.clone(),
                early.clone(),
                other_thread.clone(),
            );
            s.spawn(move || {
                for i in 0..EACH {
                    let (seq, _) = j.append(&[write_op(t * EACH + i)]).unwrap();
                    if i % 50 == 49 {
                        j.sync().unwrap();
                        assert!(
                            j.synced_seq() >= seq,
                            "sync returned before seq {seq} was durable"
                        );
                        continue;
                    }
                    let caller = std::thread::current().id();
                    let jj = j.clone();
                    let (answered, early, other_thread) =
                        (answered.clone(), early.clone(), other_thread.clone());
                    j.sync_then(Box::new(move |r| {
                        r.unwrap();
                        if jj.synced_seq() < seq {
                            early.fetch_add(1, Ordering::Relaxed);
                        }
                        if std::thread::current().id() != caller {
                            other_thread.fetch_add(1, Ordering::Relaxed);
                        }
                        answered.fetch_add(1, Ordering::Relaxed);
                    }));
                }
            });
        }
    });
    let want = THREADS * (EACH - EACH / 50);
    let deadline = Instant::now() + Duration::from_secs(30);
    while answered.load(Ordering::Relaxed) < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(answered.load(Ordering::Relaxed), want, "callbacks answered");
    assert_eq!(
        early.load(Ordering::Relaxed),
        0,
        "callbacks ran before their records were durable"
    );
    // Nothing is left for a sync that will never run.
    assert_eq!(j.synced_seq(), THREADS * EACH);
    eprintln!(
        "{} of {want} callbacks ran on another caller's thread",
        other_thread.load(Ordering::Relaxed)
    );
}

/// After a failed fdatasync the kernel may have dropped the pages it could
/// not write, so a later sync could succeed without them: the journal must
/// refuse every later append and sync instead of acknowledging records that
/// may be gone. The failure is real: the current file's descriptor is
/// replaced by a pipe, on which fdatasync fails with EINVAL.
#[test]
fn a_failed_sync_fails_the_journal_for_good() {
    use std::os::fd::AsRawFd;

    let dir = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open(dir.path(), 1, 1, 0, u64::MAX).unwrap();
    j.append(&[write_op(0)]).unwrap();
    j.sync().unwrap();
    let (seq, _) = j.append(&[write_op(1)]).unwrap();

    let file_fd = j.files().last().unwrap().file.as_raw_fd();
    let mut pipe = [0; 2];
    // SAFETY: plain syscalls on descriptors this test owns; dup2 swaps what
    // the journal's descriptor number refers to, and the journal closes it.
    unsafe {
        assert_eq!(libc::pipe(pipe.as_mut_ptr()), 0);
        assert_eq!(libc::dup2(pipe[1], file_fd), file_fd);
    }
    let err = j.sync().unwrap_err().to_string();
    assert!(err.contains(&dir.path().display().to_string()), "{err}");
    assert!(j.synced_seq() < seq);
    assert!(j.has_failed(), "readiness reads this");

    // Every later sync and append is refused, with the first cause.
    let again = j.sync().unwrap_err().to_string();
    assert!(
        again.contains("stopped accepting") && again.contains("Invalid argument"),
        "{again}"
    );
    let (tx, rx) = std::sync::mpsc::channel();
    j.sync_then(Box::new(move |r| {
        tx.send(r.map_err(|e| e.to_string())).unwrap()
    }));
    assert!(rx
        .recv()
        .unwrap()
        .unwrap_err()
        .contains("stopped accepting"));
    assert!(j.append(&[write_op(2)]).is_err());
    assert!(j.synced_seq() < seq);
    // SAFETY: the pipe's own descriptors, not used elsewhere.
    unsafe {
        libc::close(pipe[0]);
        libc::close(pipe[1]);
    }
}

#[test]
fn recovery_counts_as_unstored_only_records_the_store_lacks() {
    // A clean stop leaves stored records in the journal; the next start
    // must not call them unshipped (it did, with every record since the
    // files were last reused).
    for (stored, want) in [(0, 5), (2, 3), (5, 0), (9, 0)] {
        let d = tempfile::tempdir().unwrap();
        fill(d.path(), 5);
        let (_j, rec) = Journal::open(d.path(), 1, stored + 1, 0, u64::MAX).unwrap();
        assert_eq!(
            (rec.records, rec.unstored),
            (5, want),
            "store holds up to {stored}"
        );
    }
}

/// `--on-journal-full=gap`: past the bound the journal drops what the store
/// has not taken instead of holding writers, keeps a note of the gap that
/// survives a restart until the store records it, and goes on in a new
/// lineage (one lineage for drops while the gap is open).
#[test]
fn gap_mode_drops_unshipped_records_and_notes_the_gap() {
    use rewind::gap::GapMark;
    use std::sync::{Arc, Mutex};
    let d = tempfile::tempdir().unwrap();
    let (file, max) = (4u64 << 10, 6u64 << 10);
    let (j, _) = Journal::open_sized(d.path(), 1, 1, 0, max, file).unwrap();
    let j = Arc::new(j);
    let prepared: Arc<Mutex<Vec<GapMark>>> = Arc::default();
    let p = prepared.clone();
    j.set_gap_mode(Box::new(move |g| {
        p.lock().unwrap().push(g.clone());
        Ok(())
    }));
    let big = |i: u64| Op::Write {
        ino: 5,
        offset: 0,
        size: 1000,
        mtime: 1,
        data: Bytes::from(vec![i as u8; 1000]),
    };
    // Records 1..=2 are stored; nothing is released yet.
    j.append(&[big(0)]).unwrap();
    j.append(&[big(1)]).unwrap();
    j.note_stored(2, None);
    let j2 = j.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for i in 2..40 {
            j2.append(&[big(i)]).unwrap();
            assert!(j2.bytes() <= max + file, "the journal outgrew its bound");
        }
        tx.send(()).unwrap();
    });
    rx.recv_timeout(std::time::Duration::from_secs(20))
        .expect("writers must not wait in gap mode");
    let gaps = j.pending_gaps();
    assert!(!gaps.is_empty(), "no gap was noted");
    assert_eq!(
        *prepared.lock().unwrap(),
        gaps,
        "each drop was prepared first"
    );
    assert_eq!(j.gap_epoch(), gaps.len() as u64);
    let first = &gaps[0];
    assert_eq!((first.from_lineage, first.from_seq), (1, 3), "{first:?}");
    assert!(first.bytes >= 1000, "{first:?}");
    let l2 = j.lineage();
    assert_ne!(l2, 1);
    // The gap stays open until a base of its lineage is stored: every drop
    // continues it, and the sequence runs on.
    for (a, b) in gaps.iter().zip(gaps.iter().skip(1)) {
        assert_eq!((b.from_lineage, b.to_lineage), (1, l2));
        assert_eq!(b.from_seq, a.to_seq + 1);
    }
    assert_eq!(j.dropped_through(), gaps.last().unwrap().to_seq);
    // What is left reads from just after the last drop, in the new lineage.
    let mut r = JournalReader::new(j.dropped_through() + 1);
    let (lineage, recs) = r.read(&j.files(), 1 << 20).unwrap().unwrap();
    assert_eq!(lineage, l2);
    assert_eq!(recs.last().unwrap().seq, j.last_seq());

    // The notes survive a restart (a kill -9: nothing closed cleanly).
    drop(j);
    let (j, _) = Journal::open_sized(d.path(), l2, 1, 0, max, file).unwrap();
    assert_eq!(j.pending_gaps(), gaps);
    assert_eq!(j.dropped_through(), gaps.last().unwrap().to_seq);
    for g in &gaps {
        j.settle_gap(g).unwrap();
    }
    assert!(j.pending_gaps().is_empty());
    drop(j);
    let (j, _) = Journal::open_sized(d.path(), l2, 1, 0, max, file).unwrap();
    assert!(j.pending_gaps().is_empty(), "a settled note came back");
}

/// A drop whose preparation fails (the source cannot be synced) drops
/// nothing and leaves no note: writers wait as without gap mode.
#[test]
fn gap_mode_waits_when_the_drop_cannot_be_prepared() {
    let d = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open_sized(d.path(), 1, 1, 0, 6 << 10, 4 << 10).unwrap();
    let j = std::sync::Arc::new(j);
    j.set_gap_mode(Box::new(|_| Err("cannot sync the source: EIO".into())));
    let j2 = j.clone();
    std::thread::spawn(move || {
        for i in 0..40u64 {
            let _ = j2.append(&[Op::Write {
                ino: 5,
                offset: 0,
                size: 1000,
                mtime: 1,
                data: Bytes::from(vec![i as u8; 1000]),
            }]);
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !j.writers_waiting() {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer never started waiting"
        );
        std::thread::yield_now();
    }
    assert!(j.pending_gaps().is_empty());
    assert_eq!(j.gap_epoch(), 0);
    assert!(!std::fs::read_dir(d.path()).unwrap().any(|e| e
        .unwrap()
        .path()
        .extension()
        .is_some_and(|x| x == "gap")));
    // Release so the writer thread ends.
    let mut last = 0;
    while last < 40 {
        last = j.last_seq();
        j.release_through(last).unwrap();
        assert!(
            std::time::Instant::now() < deadline,
            "the writer did not finish"
        );
        std::thread::yield_now();
    }
}

/// A writer whose drop could not be prepared waits; a later writer's drop
/// that succeeds makes space, and must wake it (the store, which would
/// otherwise wake it by taking records, may be away for hours).
#[test]
fn gap_mode_wakes_a_writer_parked_by_a_failed_drop() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let d = tempfile::tempdir().unwrap();
    let (j, _) = Journal::open_sized(d.path(), 1, 1, 0, 6 << 10, 4 << 10).unwrap();
    let j = std::sync::Arc::new(j);
    let calls = std::sync::Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    j.set_gap_mode(Box::new(move |_| {
        if c.fetch_add(1, Ordering::SeqCst) == 0 {
            Err("cannot sync the source: EIO".into())
        } else {
            Ok(())
        }
    }));
    let big = |i: u64| Op::Write {
        ino: 5,
        offset: 0,
        size: 1000,
        mtime: 1,
        data: Bytes::from(vec![i as u8; 1000]),
    };
    let j2 = j.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for i in 0..20 {
            j2.append(&[big(i)]).unwrap();
        }
        tx.send(()).unwrap();
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !j.writers_waiting() {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer never parked"
        );
        std::thread::yield_now();
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // A second writer: its drop is prepared, and nothing is released.
    j.append(&[big(99)]).unwrap();
    assert_eq!(j.gap_epoch(), 1);
    rx.recv_timeout(std::time::Duration::from_secs(10))
        .expect("the parked writer was not woken by the drop");
}
