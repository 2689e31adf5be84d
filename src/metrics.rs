//! The sidecar's health and metrics state: plain atomics the daemon sets as
//! it works (journal size, segments and bytes shipped, upload errors, the
//! restore window, the lineage, whether the mount is live and the journal
//! writable), rendered in the Prometheus text exposition format on demand.
//! Setters are cheap enough for hot paths (one relaxed atomic each). This
//! module only records and renders; it must not do I/O, read the clock
//! itself (render takes `now`), or decide health: the daemon tells it.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

/// Counters and gauges of one `rewind run`. Share it as `Arc<Metrics>`.
#[derive(Debug, Default)]
pub struct Metrics {
    volume: Mutex<String>,
    journal_bytes: AtomicU64,
    journal_written_bytes: AtomicU64,
    segments_shipped: AtomicU64,
    shipped_bytes: AtomicU64,
    upload_errors: AtomicU64,
    /// Wall time (ns since the epoch) of the oldest acknowledged change not
    /// yet in the store; 0 when everything is shipped.
    oldest_unshipped_ns: AtomicU64,
    /// Restore window bounds (ns since the epoch); 0 when unknown.
    window_earliest_ns: AtomicU64,
    window_latest_ns: AtomicU64,
    /// (tier, ns) of the oldest restorable point of each tier, as of the
    /// last read of the store's timeline.
    oldest_per_tier: Mutex<Vec<(&'static str, u64)>>,
    lineage: Mutex<String>,
    base_in_progress: AtomicBool,
    /// Wall time (ns since the epoch) the last base completed; 0 when none
    /// is known.
    last_base_completed_ns: AtomicU64,
    last_base_duration_ns: AtomicU64,
    last_base_files_read: AtomicU64,
    last_base_files_reused: AtomicU64,
    last_base_read_bytes: AtomicU64,
    /// Journal bytes appended since the last base started: what a restore
    /// at latest would replay, give or take compression.
    journal_bytes_since_base: AtomicU64,
    store_outage: AtomicBool,
    /// Journal drops (`--on-journal-full=gap`) and the bytes they dropped.
    journal_gaps: AtomicU64,
    journal_dropped_bytes: AtomicU64,
    mount_live: AtomicBool,
    journal_writable: AtomicBool,
}

fn nanos(t: SystemTime) -> u64 {
    // Times before 1970 do not occur in a journal; they read as "unknown".
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl Metrics {
    pub fn new(volume: &str) -> Metrics {
        let m = Metrics::default();
        *m.volume.lock() = volume.to_string();
        m
    }

    /// Bytes the journal currently holds (not yet reclaimed).
    pub fn set_journal_bytes(&self, bytes: u64) {
        self.journal_bytes.store(bytes, Relaxed);
    }
    /// Bytes appended to the journal, ever (records and their payloads).
    pub fn add_journal_written(&self, bytes: u64) {
        self.journal_written_bytes.fetch_add(bytes, Relaxed);
    }
    /// One segment of `bytes` (as stored, after compression) is in the store.
    pub fn record_segment_shipped(&self, bytes: u64) {
        self.segments_shipped.fetch_add(1, Relaxed);
        self.shipped_bytes.fetch_add(bytes, Relaxed);
    }
    /// Bytes of base snapshot chunks uploaded; they count as shipped bytes.
    pub fn add_shipped_bytes(&self, bytes: u64) {
        self.shipped_bytes.fetch_add(bytes, Relaxed);
    }
    /// One failed upload attempt (retried or not).
    pub fn add_upload_error(&self) {
        self.upload_errors.fetch_add(1, Relaxed);
    }
    /// The time of the oldest acknowledged change not yet in the store, or
    /// `None` when the store has everything. Replication lag is derived from
    /// it at scrape time, so it keeps growing while the shipper is stuck.
    pub fn set_oldest_unshipped(&self, at: Option<SystemTime>) {
        self.oldest_unshipped_ns.store(at.map_or(0, nanos), Relaxed);
    }
    /// The earliest and latest restorable instants.
    pub fn set_restore_window(&self, earliest: SystemTime, latest: SystemTime) {
        self.window_earliest_ns.store(nanos(earliest), Relaxed);
        self.window_latest_ns.store(nanos(latest), Relaxed);
    }
    /// The oldest restorable instant of each retention tier.
    pub fn set_oldest_per_tier(&self, tiers: Vec<(&'static str, SystemTime)>) {
        *self.oldest_per_tier.lock() = tiers.into_iter().map(|(t, at)| (t, nanos(at))).collect();
    }
    /// The lineage the daemon is writing.
    pub fn set_lineage(&self, lineage: &str) {
        *self.lineage.lock() = lineage.to_string();
    }
    pub fn set_base_in_progress(&self, running: bool) {
        self.base_in_progress.store(running, Relaxed);
    }
    /// A base completed at `at` after `took`; `files_read` files and
    /// `read_bytes` bytes were read from the source, `files_reused` taken
    /// from the previous base.
    pub fn set_last_base(
        &self,
        at: SystemTime,
        took: Duration,
        files_read: u64,
        files_reused: u64,
        read_bytes: u64,
    ) {
        self.last_base_completed_ns.store(nanos(at), Relaxed);
        self.last_base_duration_ns
            .store(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX), Relaxed);
        self.last_base_files_read.store(files_read, Relaxed);
        self.last_base_files_reused.store(files_reused, Relaxed);
        self.last_base_read_bytes.store(read_bytes, Relaxed);
    }
    /// The last base known from the store at start (its duration and
    /// counts are not known).
    pub fn set_last_base_completed(&self, at: SystemTime) {
        self.last_base_completed_ns.store(nanos(at), Relaxed);
    }
    pub fn set_journal_bytes_since_base(&self, bytes: u64) {
        self.journal_bytes_since_base.store(bytes, Relaxed);
    }
    /// A store outage is on (from its first failed request until the store
    /// has taken what the journal held back; see `outage.rs`).
    pub fn set_store_outage(&self, on: bool) {
        self.store_outage.store(on, Relaxed);
    }
    /// Gaps the journal declared in this run and the journal bytes dropped.
    pub fn set_journal_gaps(&self, gaps: u64, dropped_bytes: u64) {
        self.journal_gaps.store(gaps, Relaxed);
        self.journal_dropped_bytes.store(dropped_bytes, Relaxed);
    }
    /// The FUSE mount is serving requests.
    pub fn set_mount_live(&self, live: bool) {
        self.mount_live.store(live, Relaxed);
    }
    /// The journal accepts appends (false when full and writers wait, or on an I/O error).
    pub fn set_journal_writable(&self, writable: bool) {
        self.journal_writable.store(writable, Relaxed);
    }

    /// Startup and /healthz: the mount is live.
    pub fn is_live(&self) -> bool {
        self.mount_live.load(Relaxed)
    }
    /// Readiness: mount live and journal writable. The store's health is
    /// deliberately absent: an outage is buffered by the journal and shows
    /// in `rewind_replication_lag_seconds` and `rewind_upload_errors_total`.
    pub fn is_ready(&self) -> bool {
        self.is_live() && self.journal_writable.load(Relaxed)
    }

    /// Renders every metric in the Prometheus text format (version 0.0.4).
    pub fn render(&self, now: SystemTime) -> String {
        let mut out = String::with_capacity(2048);
        let info = format!(
            "{{version=\"{}\",volume=\"{}\"}}",
            env!("CARGO_PKG_VERSION"),
            escape(&self.volume.lock())
        );
        sample(
            &mut out,
            "rewind_build_info",
            "gauge",
            "Build and volume of this sidecar.",
            &info,
            1.0,
        );
        let gauge_u = |out: &mut String, name, help, v: &AtomicU64| {
            sample(out, name, "gauge", help, "", v.load(Relaxed) as f64)
        };
        let counter = |out: &mut String, name, help, v: &AtomicU64| {
            sample(out, name, "counter", help, "", v.load(Relaxed) as f64)
        };
        gauge_u(
            &mut out,
            "rewind_journal_bytes",
            "Bytes held in the local journal, not yet reclaimed.",
            &self.journal_bytes,
        );
        counter(
            &mut out,
            "rewind_journal_written_bytes_total",
            "Bytes appended to the journal since start.",
            &self.journal_written_bytes,
        );
        counter(
            &mut out,
            "rewind_journal_gaps_total",
            "Times the full journal dropped changes the store had not taken (--on-journal-full=gap), each a declared gap in the timeline.",
            &self.journal_gaps,
        );
        counter(
            &mut out,
            "rewind_journal_dropped_bytes_total",
            "Journal bytes dropped by those gaps.",
            &self.journal_dropped_bytes,
        );
        counter(
            &mut out,
            "rewind_segments_shipped_total",
            "Segments uploaded to the store.",
            &self.segments_shipped,
        );
        counter(
            &mut out,
            "rewind_shipped_bytes_total",
            "Bytes uploaded to the store (segments and base chunks).",
            &self.shipped_bytes,
        );
        counter(
            &mut out,
            "rewind_upload_errors_total",
            "Failed upload attempts.",
            &self.upload_errors,
        );
        let oldest = self.oldest_unshipped_ns.load(Relaxed);
        let lag = if oldest == 0 {
            0.0
        } else {
            now.duration_since(UNIX_EPOCH + Duration::from_nanos(oldest))
                .map_or(0.0, |d| d.as_secs_f64())
        };
        sample(
            &mut out,
            "rewind_replication_lag_seconds",
            "gauge",
            "Age of the oldest acknowledged change not yet in the store (0 when all is shipped).",
            "",
            lag,
        );
        // Unknown bounds are left out rather than reported as 1970.
        for (name, help, v) in [
            (
                "rewind_restore_window_earliest_seconds",
                "Earliest restorable instant, unix seconds.",
                &self.window_earliest_ns,
            ),
            (
                "rewind_restore_window_latest_seconds",
                "Latest restorable instant, unix seconds.",
                &self.window_latest_ns,
            ),
        ] {
            let ns = v.load(Relaxed);
            if ns != 0 {
                sample(&mut out, name, "gauge", help, "", ns as f64 / 1e9);
            }
        }
        let tiers = self.oldest_per_tier.lock().clone();
        if !tiers.is_empty() {
            let name = "rewind_oldest_restorable_seconds";
            let _ = writeln!(
                out,
                "# HELP {name} Oldest restorable instant of each retention tier of the lineage being written, unix seconds, as of the last read of the store's timeline.\n# TYPE {name} gauge"
            );
            for (tier, ns) in tiers {
                let _ = writeln!(out, "{name}{{tier=\"{tier}\"}} {}", ns as f64 / 1e9);
            }
        }
        let last_base = self.last_base_completed_ns.load(Relaxed);
        if last_base != 0 {
            sample(
                &mut out,
                "rewind_last_base_completed_seconds",
                "gauge",
                "When the last base snapshot completed, unix seconds.",
                "",
                last_base as f64 / 1e9,
            );
        }
        let took = self.last_base_duration_ns.load(Relaxed);
        if took != 0 {
            sample(
                &mut out,
                "rewind_last_base_duration_seconds",
                "gauge",
                "How long the last base snapshot of this run took.",
                "",
                took as f64 / 1e9,
            );
            let _ = writeln!(
                out,
                "# HELP rewind_last_base_files Regular files the last base read from the source or reused from the previous base.\n\
                 # TYPE rewind_last_base_files gauge\n\
                 rewind_last_base_files{{how=\"read\"}} {}\n\
                 rewind_last_base_files{{how=\"reused\"}} {}",
                self.last_base_files_read.load(Relaxed),
                self.last_base_files_reused.load(Relaxed)
            );
            gauge_u(
                &mut out,
                "rewind_last_base_read_bytes",
                "Bytes the last base read from the source.",
                &self.last_base_read_bytes,
            );
        }
        gauge_u(
            &mut out,
            "rewind_journal_bytes_since_base",
            "Journal bytes appended since the last base started (since the start of this run after a restart).",
            &self.journal_bytes_since_base,
        );
        let lineage = self.lineage.lock().clone();
        if !lineage.is_empty() {
            let labels = format!("{{lineage=\"{}\"}}", escape(&lineage));
            sample(
                &mut out,
                "rewind_lineage_info",
                "gauge",
                "The lineage being written.",
                &labels,
                1.0,
            );
        }
        let flag = |b: &AtomicBool| if b.load(Relaxed) { 1.0 } else { 0.0 };
        sample(
            &mut out,
            "rewind_base_in_progress",
            "gauge",
            "1 while a base snapshot is being taken.",
            "",
            flag(&self.base_in_progress),
        );
        sample(
            &mut out,
            "rewind_store_outage",
            "gauge",
            "1 while the store fails requests, until it has taken what the journal held back.",
            "",
            flag(&self.store_outage),
        );
        sample(
            &mut out,
            "rewind_mount_live",
            "gauge",
            "1 while the FUSE mount serves requests.",
            "",
            flag(&self.mount_live),
        );
        sample(
            &mut out,
            "rewind_journal_writable",
            "gauge",
            "1 while the journal accepts appends.",
            "",
            flag(&self.journal_writable),
        );
        out
    }
}

fn sample(out: &mut String, name: &str, kind: &str, help: &str, labels: &str, value: f64) {
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{labels} {value}"
    );
}

/// Escapes a label value as the exposition format requires.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_lag_and_window() {
        let m = Metrics::new("ns/\"claim\"");
        m.add_journal_written(4096);
        m.record_segment_shipped(100);
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        m.set_oldest_unshipped(Some(t0));
        m.set_restore_window(t0, t0 + Duration::from_secs(5));
        m.set_lineage("L1");
        let text = m.render(t0 + Duration::from_millis(2500));
        assert!(
            text.contains("\nrewind_journal_written_bytes_total 4096\n"),
            "{text}"
        );
        assert!(text.contains("\nrewind_shipped_bytes_total 100\n"));
        assert!(text.contains("\nrewind_replication_lag_seconds 2.5\n"));
        assert!(text.contains("\nrewind_restore_window_latest_seconds 1005\n"));
        assert!(text.contains("rewind_lineage_info{lineage=\"L1\"} 1\n"));
        assert!(text.contains("volume=\"ns/\\\"claim\\\"\""));
        m.set_last_base(
            t0 + Duration::from_secs(3),
            Duration::from_millis(1500),
            2,
            98,
            8192,
        );
        m.set_journal_bytes_since_base(777);
        let text = m.render(t0);
        assert!(
            text.contains("\nrewind_last_base_completed_seconds 1003\n"),
            "{text}"
        );
        assert!(text.contains("\nrewind_last_base_duration_seconds 1.5\n"));
        assert!(text.contains("\nrewind_last_base_files{how=\"read\"} 2\n"));
        assert!(text.contains("\nrewind_last_base_files{how=\"reused\"} 98\n"));
        assert!(text.contains("\nrewind_last_base_read_bytes 8192\n"));
        assert!(text.contains("\nrewind_journal_bytes_since_base 777\n"));
        m.set_journal_gaps(2, 5000);
        let text = m.render(SystemTime::now());
        assert!(text.contains("\nrewind_journal_gaps_total 2\n"), "{text}");
        assert!(
            text.contains("\nrewind_journal_dropped_bytes_total 5000\n"),
            "{text}"
        );
        assert!(text.contains("\nrewind_store_outage 0\n"));
        m.set_oldest_unshipped(None);
        m.set_store_outage(true);
        let text = m.render(t0);
        assert!(text.contains("\nrewind_replication_lag_seconds 0\n"));
        assert!(text.contains("\nrewind_store_outage 1\n"));
    }

    #[test]
    fn ready_needs_live_mount_and_writable_journal() {
        let m = Metrics::new("v");
        assert!(!m.is_live() && !m.is_ready());
        m.set_mount_live(true);
        assert!(m.is_live() && !m.is_ready());
        m.set_journal_writable(true);
        assert!(m.is_ready());
    }
}
