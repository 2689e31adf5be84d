//! Progress: how long-running commands (restore, verify) tell a person how
//! far they are. It owns the `Meter` that the work counts into from any
//! thread (a phase with a label, a unit and a total; `add` as work is done),
//! the pure renderings of a snapshot (a terminal bar with bytes, rate and
//! ETA; a plain line for logs; the closing line of a phase), and the thread
//! that draws them: on a terminal the bar is redrawn in place a few times a
//! second, elsewhere one plain line is printed every `every`, readable at
//! 3 a.m. in a pod's log. Every phase ends with one closing line holding its
//! exact total, on a terminal and off it.
//!
//! It must not decide what is being counted (the commands do) nor whether
//! stderr is a terminal (the binary does, and passes a `Style`).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender};
use parking_lot::Mutex;

/// What a phase counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Bytes,
    Objects,
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Nothing at all.
    Silent,
    /// A bar redrawn in place (stderr is a terminal).
    Bar,
    /// A plain line every so often (a log).
    Lines { every: Duration },
}

/// A phase's state at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub label: String,
    pub unit: Unit,
    pub done: u64,
    pub total: u64,
    pub elapsed: Duration,
}

struct Phase {
    label: String,
    unit: Unit,
    total: u64,
    started: Instant,
}

struct Inner {
    phase: Mutex<Option<Phase>>,
    done: AtomicU64,
    style: Style,
    out: Mutex<Box<dyn Write + Send>>,
}

impl Inner {
    fn snapshot(&self) -> Option<Snapshot> {
        let p = self.phase.lock();
        p.as_ref().map(|p| Snapshot {
            label: p.label.clone(),
            unit: p.unit,
            done: self.done.load(Ordering::Relaxed),
            total: p.total,
            elapsed: p.started.elapsed(),
        })
    }

    fn write(&self, text: &str) {
        // Progress is a courtesy: a closed stderr must not fail the work.
        let mut out = self.out.lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }
}

/// Counts work into phases and shows it (see the module docs). Cheap to
/// share by reference across threads.
pub struct Meter {
    inner: Arc<Inner>,
    stop: Option<Sender<()>>,
    drawer: Option<std::thread::JoinHandle<()>>,
}

impl Meter {
    /// A meter that counts and shows nothing.
    pub fn silent() -> Meter {
        Meter::new(Style::Silent, Box::new(std::io::sink()))
    }

    /// A meter drawing to `out` in `style`.
    pub fn new(style: Style, out: Box<dyn Write + Send>) -> Meter {
        let inner = Arc::new(Inner {
            phase: Mutex::new(None),
            done: AtomicU64::new(0),
            style,
            out: Mutex::new(out),
        });
        let tick = match style {
            Style::Silent => None,
            Style::Bar => Some(Duration::from_millis(200)),
            Style::Lines { every } => Some(every.max(Duration::from_millis(1))),
        };
        let (stop, drawer) = match tick {
            None => (None, None),
            Some(tick) => {
                let (tx, rx) = bounded::<()>(0);
                let inner = Arc::clone(&inner);
                let h = std::thread::Builder::new()
                    .name("progress".into())
                    .spawn(move || {
                        while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                            rx.recv_timeout(tick)
                        {
                            if let Some(s) = inner.snapshot() {
                                match inner.style {
                                    Style::Bar => inner.write(&format!("\r{}\x1b[K", bar(&s, 30))),
                                    _ => inner.write(&format!("rewind: {}\n", line(&s))),
                                }
                            }
                        }
                    })
                    .ok();
                (h.as_ref().map(|_| tx), h)
            }
        };
        Meter {
            inner,
            stop,
            drawer,
        }
    }

    /// Ends the current phase (printing its closing line) and starts one.
    pub fn begin(&self, label: &str, unit: Unit, total: u64) {
        self.end();
        self.inner.done.store(0, Ordering::Relaxed);
        *self.inner.phase.lock() = Some(Phase {
            label: label.to_string(),
            unit,
            total,
            started: Instant::now(),
        });
    }

    /// Counts `n` more units of the current phase as done.
    pub fn add(&self, n: u64) {
        self.inner.done.fetch_add(n, Ordering::Relaxed);
    }

    /// Ends the current phase, if any, printing its closing line.
    pub fn end(&self) {
        let Some(s) = self.inner.snapshot() else {
            return;
        };
        *self.inner.phase.lock() = None;
        match self.inner.style {
            Style::Silent => {}
            Style::Bar => self.inner.write(&format!("\r\x1b[K{}\n", closing(&s))),
            Style::Lines { .. } => self.inner.write(&format!("rewind: {}\n", closing(&s))),
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        // A phase still open was cut short by an error: no closing line,
        // which would read as a total; the bar is cleared.
        drop(self.stop.take());
        if let Some(h) = self.drawer.take() {
            let _ = h.join();
        }
        if self.inner.style == Style::Bar && self.inner.snapshot().is_some() {
            self.inner.write("\r\x1b[K");
        }
    }
}

/// "1.5 GiB", "512 B"; objects are plain counts.
fn amount(n: u64, unit: Unit) -> String {
    match unit {
        Unit::Objects => format!("{n}"),
        Unit::Bytes => {
            const STEPS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
            let mut v = n as f64;
            let mut i = 0;
            while v >= 1024.0 && i < STEPS.len() - 1 {
                v /= 1024.0;
                i += 1;
            }
            if i == 0 {
                format!("{n} B")
            } else {
                format!("{v:.1} {}", STEPS[i])
            }
        }
    }
}

/// Bytes as MB/s (10^6, as disks and networks are sold), objects as /s.
fn rate(s: &Snapshot) -> String {
    let secs = s.elapsed.as_secs_f64();
    if secs <= 0.0 {
        return "-".into();
    }
    let r = s.done as f64 / secs;
    match s.unit {
        Unit::Bytes => format!("{:.0} MB/s", r / 1e6),
        Unit::Objects => format!("{r:.0}/s"),
    }
}

/// Seconds left at the average rate so far, as "1h02m03s", "4m05s", "6s".
fn eta(s: &Snapshot) -> String {
    let secs = s.elapsed.as_secs_f64();
    if s.done == 0 || secs <= 0.0 || s.done >= s.total {
        return if s.done >= s.total {
            "0s".into()
        } else {
            "?".into()
        };
    }
    let left = ((s.total - s.done) as f64 * secs / s.done as f64).ceil() as u64;
    match (left / 3600, left / 60 % 60, left % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec:02}s"),
        (h, m, sec) => format!("{h}h{m:02}m{sec:02}s"),
    }
}

fn percent(s: &Snapshot) -> u64 {
    if s.total == 0 {
        100
    } else {
        (s.done.min(s.total) as u128 * 100 / s.total as u128) as u64
    }
}

/// The terminal bar: `base [#####>----]  1.2 GiB / 4.0 GiB  30%  512 MB/s  ETA 6s`.
pub fn bar(s: &Snapshot, width: usize) -> String {
    let filled = (percent(s) as usize * width) / 100;
    let mut b = "#".repeat(filled);
    if filled < width {
        b.push('>');
        b.push_str(&"-".repeat(width - filled - 1));
    }
    format!(
        "{} [{b}] {} / {}  {}%  {}  ETA {}",
        s.label,
        amount(s.done, s.unit),
        amount(s.total, s.unit),
        percent(s),
        rate(s),
        eta(s)
    )
}

/// The periodic log line: `base: 1.2 GiB of 4.0 GiB (30%), 512 MB/s, ETA 6s`.
pub fn line(s: &Snapshot) -> String {
    format!(
        "{}: {} of {} ({}%), {}, ETA {}",
        s.label,
        amount(s.done, s.unit),
        amount(s.total, s.unit),
        percent(s),
        rate(s),
        eta(s)
    )
}

/// The closing line of a phase, with the exact count:
/// `base: done, 4294967296 bytes (4.0 GiB) in 3.2s, 1342 MB/s`.
pub fn closing(s: &Snapshot) -> String {
    let exact = match s.unit {
        Unit::Bytes => format!("{} bytes ({})", s.done, amount(s.done, s.unit)),
        Unit::Objects => format!("{} objects", s.done),
    };
    format!(
        "{}: done, {exact} in {:.1}s, {}",
        s.label,
        s.elapsed.as_secs_f64(),
        rate(s)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(unit: Unit, done: u64, total: u64, ms: u64) -> Snapshot {
        Snapshot {
            label: "base".into(),
            unit,
            done,
            total,
            elapsed: Duration::from_millis(ms),
        }
    }

    #[test]
    fn renders() {
        const G: u64 = 1 << 30;
        // (snapshot, bar of width 10, log line, closing line)
        let cases = [
            (
                snap(Unit::Bytes, G, 4 * G, 1000),
                "base [##>-------] 1.0 GiB / 4.0 GiB  25%  1074 MB/s  ETA 3s",
                "base: 1.0 GiB of 4.0 GiB (25%), 1074 MB/s, ETA 3s",
                "base: done, 1073741824 bytes (1.0 GiB) in 1.0s, 1074 MB/s",
            ),
            (
                snap(Unit::Bytes, 0, 512, 0),
                "base [>---------] 0 B / 512 B  0%  -  ETA ?",
                "base: 0 B of 512 B (0%), -, ETA ?",
                "base: done, 0 bytes (0 B) in 0.0s, -",
            ),
            (
                snap(Unit::Objects, 10, 100, 2000),
                "base [#>--------] 10 / 100  10%  5/s  ETA 18s",
                "base: 10 of 100 (10%), 5/s, ETA 18s",
                "base: done, 10 objects in 2.0s, 5/s",
            ),
            (
                snap(Unit::Objects, 1, 7201, 1000),
                "base [>---------] 1 / 7201  0%  1/s  ETA 2h00m00s",
                "base: 1 of 7201 (0%), 1/s, ETA 2h00m00s",
                "base: done, 1 objects in 1.0s, 1/s",
            ),
            (
                snap(Unit::Objects, 0, 0, 5),
                "base [##########] 0 / 0  100%  0/s  ETA 0s",
                "base: 0 of 0 (100%), 0/s, ETA 0s",
                "base: done, 0 objects in 0.0s, 0/s",
            ),
            (
                snap(Unit::Bytes, 3 << 20, 10 << 20, 60_000),
                "base [###>------] 3.0 MiB / 10.0 MiB  30%  0 MB/s  ETA 2m20s",
                "base: 3.0 MiB of 10.0 MiB (30%), 0 MB/s, ETA 2m20s",
                "base: done, 3145728 bytes (3.0 MiB) in 60.0s, 0 MB/s",
            ),
        ];
        for (s, b, l, c) in cases {
            assert_eq!(bar(&s, 10), b);
            assert_eq!(line(&s), l);
            assert_eq!(closing(&s), c);
        }
    }

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_phase_closes_with_its_exact_total() {
        let buf = Buf::default();
        let m = Meter::new(
            Style::Lines {
                every: Duration::from_secs(3600),
            },
            Box::new(buf.clone()),
        );
        m.begin("base", Unit::Bytes, 300);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| m.add(100));
            }
        });
        m.begin("records", Unit::Objects, 2);
        m.add(2);
        m.end();
        drop(m);
        let text = String::from_utf8(buf.0.lock().clone()).unwrap();
        let closings: Vec<&str> = text.lines().filter(|l| l.contains(": done, ")).collect();
        assert_eq!(closings.len(), 2, "{text}");
        assert!(
            closings[0].starts_with("rewind: base: done, 300 bytes "),
            "{text}"
        );
        assert!(
            closings[1].starts_with("rewind: records: done, 2 objects "),
            "{text}"
        );
    }
}
