//! The metrics threads of `rewind run`: one samples the journal, the
//! shipper and the store's health into `Metrics`; the timeline reader lists
//! the store every `--timeline-interval` for what only the store knows once
//! `rewind prune` runs elsewhere (where the window starts, each tier's
//! oldest point). They must not change the journal, the shipper or the
//! store.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use std::sync::Arc;

use super::{ns_time, Daemon};
use crate::outage;
use crate::retention::Tier;
use crate::timeline::{LineageId, Timeline};

/// Samples the daemon's state into the metrics twice a second, and logs
/// replication lag once a minute. It runs apart from the shipper so that
/// metrics stay current while an upload is stuck in retries.
pub(super) fn monitor(d: &Daemon, mut earliest: Option<crate::clock::Nanos>, mut lineage: u64) {
    let m = &d.metrics;
    let s = &d.shipper.stats;
    let (mut written, mut segments, mut bytes, mut errors) = (0u64, 0u64, 0u64, 0u64);
    let mut unshipped_since: Option<crate::clock::Nanos> = None;
    let mut last_log = Instant::now();
    while !d.stop.load(Ordering::Acquire) {
        let w = d.journal.written_bytes();
        m.add_journal_written(w - written);
        written = w;
        m.set_journal_bytes(d.journal.bytes());
        let segs = s.segments.load(Ordering::Relaxed);
        let b = s.bytes.load(Ordering::Relaxed);
        if segs > segments {
            // Per-segment sizes are not kept; spread the bytes evenly.
            let per = (b - bytes) / (segs - segments);
            for _ in segments..segs {
                m.record_segment_shipped(per);
            }
        }
        segments = segs;
        bytes = b;
        let e = s.errors.load(Ordering::Relaxed);
        for _ in errors..e {
            m.add_upload_error();
        }
        errors = e;
        let stored_seq = s.stored_seq.load(Ordering::Relaxed);
        let stored_ns = s.stored_ns.load(Ordering::Relaxed);
        let last_seq = d.journal.last_seq();
        d.health.tick(outage::Progress {
            stored_seq,
            last_seq,
            waiting_bytes: d.shipper.waiting_bytes(),
        });
        if last_seq > stored_seq {
            let since = *unshipped_since.get_or_insert_with(crate::clock::wall_now);
            m.set_oldest_unshipped(Some(ns_time(since.max(stored_ns))));
        } else {
            unshipped_since = None;
            m.set_oldest_unshipped(None);
        }
        let current = d.journal.lineage();
        if current != lineage {
            // A journal gap began a new lineage: its window opens on its base.
            lineage = current;
            earliest = None;
            m.set_lineage(&crate::timeline::LineageId(lineage).to_string());
        }
        m.set_journal_gaps(d.journal.gap_epoch(), d.journal.dropped_bytes());
        if d.based() && earliest.is_none() && d.shipper.pending_control() == 0 {
            earliest = Some(d.base_completed_ns.load(Ordering::Acquire));
        }
        if let Some(e) = earliest.map(|e| e.max(d.listed_earliest.load(Ordering::Acquire))) {
            m.set_restore_window(ns_time(e), ns_time(stored_ns.max(e)));
        }
        m.set_journal_writable(!d.journal.writers_waiting() && !d.journal.has_failed());
        m.set_journal_bytes_since_base(w.saturating_sub(d.written_at_base.load(Ordering::Relaxed)));
        m.set_store_outage(d.health.is_down());
        // During an outage its own reminders say how far behind shipping is.
        if last_log.elapsed() >= Duration::from_secs(60) && !d.health.is_down() {
            last_log = Instant::now();
            tracing::info!(
                segments = segs,
                bytes = b,
                lag_ms = s.lag_ns.load(Ordering::Relaxed) / 1_000_000,
                journal_bytes = d.journal.bytes(),
                "shipping"
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Reads the store's timeline every `interval` for the metrics that only the
/// store knows once `rewind prune` runs elsewhere: where the current
/// lineage's window starts and the oldest point of each tier. A failed read
/// keeps the previous figures (the outage tracker reports the store).
pub(super) fn spawn_timeline_reader(d: Arc<Daemon>, interval: Duration) {
    let spawned = std::thread::Builder::new()
        .name("rewind-timeline".into())
        .spawn(move || loop {
            let until = Instant::now() + interval;
            while Instant::now() < until {
                if d.stop.load(Ordering::Acquire) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200).min(interval));
            }
            let t = match Timeline::load(d.store.as_ref()) {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!("cannot read the store's timeline for the metrics: {e}");
                    continue;
                }
            };
            let lineage = LineageId(d.journal.lineage()).to_string();
            let spans: Vec<_> = crate::retention::tier_spans(&t)
                .into_iter()
                .filter(|s| s.lineage == lineage)
                .collect();
            if let Some(w) = spans.iter().find(|s| s.tier == Some(Tier::Seconds)) {
                d.listed_earliest.store(w.from_ns, Ordering::Release);
            }
            d.metrics.set_oldest_per_tier(
                spans
                    .iter()
                    .map(|s| (s.tier.map_or("points", Tier::name), ns_time(s.from_ns)))
                    .collect(),
            );
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the timeline reader for the metrics: {e}");
    }
}
