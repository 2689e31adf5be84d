//! Store outages as `rewind run` reports them. This module owns the
//! decision of what to tell the operator and when: one line when an outage
//! begins (what failed, on which store, what to check), a short reminder at
//! most every [`REMINDER_EVERY`] while it lasts (how long, how much journal
//! waits to ship), and one line when it is over (how long it lasted, how
//! much was caught up). The decisions are a pure state machine
//! ([`Outage::step`], time passed in); [`StoreHealth`] feeds it and logs
//! what it says, and [`Watched`] is the store wrapper through which the
//! shipper and the base walk reach the store, so that every call they make
//! feeds it. It must not retry, hold or decide anything about data: the
//! callers keep retrying as before, this only watches and speaks.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;

use crate::record::Seq;
use crate::store::{Result, Store, StoreError};

/// The longest silence while an outage lasts.
pub(crate) const REMINDER_EVERY: Duration = Duration::from_secs(60);
/// How long the store must go without a failure before an outage counts
/// as over. Retries come back within seconds (the shipper's within 5 s),
/// so a store that still fails shows it well within this.
pub(crate) const SETTLE: Duration = Duration::from_secs(10);

/// What the shipper has done, sampled by the daemon's monitor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Progress {
    /// The last sequence number the store holds.
    pub stored_seq: Seq,
    /// The last sequence number the journal holds.
    pub last_seq: Seq,
    /// Journal bytes not yet in the store.
    pub waiting_bytes: u64,
}

/// What happened at the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// A call failed in a way callers retry (one line, the error's Display).
    Failed(String),
    /// The store took an object. Reads do not count: a store whose disk is
    /// full still answers them.
    Stored,
    /// Time passed (the monitor samples twice a second).
    Tick,
}

/// What to tell the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Say {
    Began {
        error: String,
    },
    Lasting {
        since: Duration,
        failures: u64,
        waiting_bytes: u64,
        /// The store answers again and the backlog is shipping.
        catching_up: bool,
    },
    Ended {
        lasted: Duration,
        failures: u64,
        caught_up_bytes: u64,
        catch_up: Duration,
    },
}

/// An outage in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
struct On {
    since: Instant,
    /// When the last line about it was said (for reminders).
    said: Instant,
    failures: u64,
    last_failure: Instant,
    /// Set when the store took an object after the last failure.
    back: Option<Back>,
}

/// The store took an object again: the outage is over once the journal it
/// held back (up to `target`) is stored and nothing failed for `settle`.
/// A failure meanwhile keeps the outage on, so a store that takes a few
/// objects between failures (a disk with a few blocks freed now and then)
/// makes one outage, not one per success.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Back {
    at: Instant,
    target: Seq,
    backlog: u64,
    /// When the store was first seen holding `target`.
    caught_up: Option<Instant>,
}

/// The outage state machine (see the module docs).
#[derive(Debug)]
pub(crate) struct Outage {
    on: Option<On>,
    reminder_every: Duration,
    settle: Duration,
}

impl Default for Outage {
    fn default() -> Self {
        Outage::new(REMINDER_EVERY, SETTLE)
    }
}

impl Outage {
    pub(crate) fn new(reminder_every: Duration, settle: Duration) -> Outage {
        Outage {
            on: None,
            reminder_every,
            settle,
        }
    }

    pub(crate) fn is_on(&self) -> bool {
        self.on.is_some()
    }

    /// Takes one event at `now` with the shipper's latest progress and
    /// says what, if anything, the operator should read.
    pub(crate) fn step(&mut self, now: Instant, ev: Event, p: Progress) -> Option<Say> {
        let Some(on) = self.on.as_mut() else {
            let Event::Failed(error) = ev else {
                return None;
            };
            self.on = Some(On {
                since: now,
                said: now,
                failures: 1,
                last_failure: now,
                back: None,
            });
            return Some(Say::Began { error });
        };
        match ev {
            Event::Failed(_) => {
                on.failures += 1;
                on.last_failure = now;
                on.back = None;
            }
            Event::Stored if on.back.is_none() => {
                on.back = Some(Back {
                    at: now,
                    target: p.last_seq,
                    backlog: p.waiting_bytes,
                    caught_up: None,
                })
            }
            Event::Stored | Event::Tick => {}
        }
        if let Some(b) = on.back.as_mut() {
            if p.stored_seq >= b.target {
                let caught_up = *b.caught_up.get_or_insert(now);
                if now.saturating_duration_since(on.last_failure) >= self.settle {
                    let said = Say::Ended {
                        lasted: b.at.saturating_duration_since(on.since),
                        failures: on.failures,
                        caught_up_bytes: b.backlog,
                        catch_up: caught_up.saturating_duration_since(b.at),
                    };
                    self.on = None;
                    return Some(said);
                }
            }
        }
        if now.saturating_duration_since(on.said) < self.reminder_every {
            return None;
        }
        on.said = now;
        Some(Say::Lasting {
            since: now.saturating_duration_since(on.since),
            failures: on.failures,
            waiting_bytes: p.waiting_bytes,
            catching_up: on.back.is_some(),
        })
    }
}

/// "1.5 MiB", "312 B": sizes in operator lines.
pub(crate) fn fmt_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// "2m 5s", "4.2s": durations in operator lines.
pub(crate) fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h {}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m {}s", s / 60, s % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// What the operator should check for an error the store's own message
/// does not already say how to fix (a local disk's errors).
fn what_to_check(e: &StoreError) -> &'static str {
    match e {
        StoreError::Io { source, .. } => match source.kind() {
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
                " (check the free space and quota of the store's filesystem)"
            }
            std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem => {
                " (check that the store directory is writable)"
            }
            _ => " (check the store's filesystem and disk)",
        },
        _ => "",
    }
}

/// Whether callers retry this error: the ones an outage is made of.
fn counts(e: &StoreError) -> bool {
    e.is_transient() || matches!(e, StoreError::Denied { .. })
}

/// The daemon's view of the store's health: feeds [`Outage`] and logs what
/// it says. Shared by the shipper, the base walk and the monitor.
pub(crate) struct StoreHealth {
    store: String,
    outage: Mutex<Outage>,
    progress: Mutex<Progress>,
}

impl StoreHealth {
    pub(crate) fn new(store: String) -> StoreHealth {
        StoreHealth {
            store,
            outage: Mutex::new(Outage::default()),
            progress: Mutex::new(Progress::default()),
        }
    }

    pub(crate) fn is_down(&self) -> bool {
        self.outage.lock().is_on()
    }

    pub(crate) fn failed(&self, e: &StoreError) {
        if counts(e) {
            self.event(Event::Failed(format!("{e}{}", what_to_check(e))));
        }
    }

    pub(crate) fn stored(&self) {
        self.event(Event::Stored);
    }

    /// The monitor's sample: progress for the next decisions, and a chance
    /// to remind or to end a caught-up outage while no call is made.
    pub(crate) fn tick(&self, p: Progress) {
        *self.progress.lock() = p;
        self.event(Event::Tick);
    }

    fn event(&self, ev: Event) {
        let p = *self.progress.lock();
        let said = self.outage.lock().step(Instant::now(), ev, p);
        if let Some(say) = said {
            self.log(say);
        }
    }

    fn log(&self, say: Say) {
        let store = &self.store;
        match say {
            Say::Began { error } => {
                tracing::warn!("store outage began: {error}; retrying, writes stay in the journal")
            }
            Say::Lasting {
                since,
                failures,
                waiting_bytes,
                catching_up: false,
            } => tracing::warn!(
                "store outage continues ({} so far, {failures} failed requests): {store}; \
                 {} of journal waiting to ship",
                fmt_duration(since),
                fmt_bytes(waiting_bytes)
            ),
            Say::Lasting {
                since,
                waiting_bytes,
                catching_up: true,
                ..
            } => tracing::info!(
                "store outage ({} so far): {store} takes objects again, catching up; {} of journal \
                 still waiting to ship",
                fmt_duration(since),
                fmt_bytes(waiting_bytes)
            ),
            Say::Ended {
                lasted,
                failures,
                caught_up_bytes,
                catch_up,
            } => tracing::info!(
                "store outage ended after {} ({failures} failed requests): {store} takes objects \
                 again; caught up {} of journal in {}",
                fmt_duration(lasted),
                fmt_bytes(caught_up_bytes),
                fmt_duration(catch_up)
            ),
        }
    }
}

/// A store whose calls report to a [`StoreHealth`]: failures of any call,
/// and successful puts (reads prove little: a full disk still reads).
pub(crate) struct Watched {
    inner: Arc<dyn Store>,
    health: Arc<StoreHealth>,
}

impl Watched {
    pub(crate) fn new(inner: Arc<dyn Store>, health: Arc<StoreHealth>) -> Watched {
        Watched { inner, health }
    }

    fn watch<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            self.health.failed(e);
        }
        r
    }
}

impl Store for Watched {
    fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let r = self.inner.put(key, data);
        if r.is_ok() {
            self.health.stored();
        }
        self.watch(r)
    }
    fn get(&self, key: &str) -> Result<Bytes> {
        self.watch(self.inner.get(key))
    }
    fn exists(&self, key: &str) -> Result<bool> {
        self.watch(self.inner.exists(key))
    }
    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        self.watch(self.inner.list(prefix))
    }
    fn list_sized(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        self.watch(self.inner.list_sized(prefix))
    }
    fn delete(&self, key: &str) -> Result<()> {
        // Only prune deletes, and prune does not run through the sidecar's
        // watched store; forwarding keeps the wrapper a faithful Store.
        self.watch(self.inner.delete(key))
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn abort_incomplete_uploads(&self, prefix: &str) -> Result<usize> {
        self.watch(self.inner.abort_incomplete_uploads(prefix))
    }
    fn chunk_naming(&self) -> Result<crate::crypt::ChunkNaming> {
        self.watch(self.inner.chunk_naming())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(stored_seq: Seq, last_seq: Seq, waiting_bytes: u64) -> Progress {
        Progress {
            stored_seq,
            last_seq,
            waiting_bytes,
        }
    }

    fn fail() -> Event {
        Event::Failed("store s3://b is unreachable: connection refused".into())
    }

    /// A table of (seconds since the start, event, progress, what is said);
    /// `None` in the last column means silence.
    #[test]
    fn one_line_to_begin_a_reminder_a_minute_one_line_to_end() {
        let began = || {
            Some(Say::Began {
                error: "store s3://b is unreachable: connection refused".into(),
            })
        };
        let secs = Duration::from_secs;
        let lasting = |since, failures, waiting_bytes, catching_up| {
            Some(Say::Lasting {
                since: secs(since),
                failures,
                waiting_bytes,
                catching_up,
            })
        };
        let cases: Vec<(u64, Event, Progress, Option<Say>)> = vec![
            (0, Event::Tick, p(10, 10, 0), None),
            (1, Event::Stored, p(10, 10, 0), None),
            (2, fail(), p(10, 12, 100), began()),
            // Every retry fails again: nothing new to say for a minute.
            (3, fail(), p(10, 14, 200), None),
            (30, fail(), p(10, 20, 300), None),
            (61, Event::Tick, p(10, 20, 300), None),
            (62, Event::Tick, p(10, 25, 400), lasting(60, 3, 400, false)),
            (100, fail(), p(10, 30, 500), None),
            (122, fail(), p(10, 30, 500), lasting(120, 5, 500, false)),
            // The store takes an object: catching up to seq 40 (600 bytes).
            (130, Event::Stored, p(10, 40, 600), None),
            // One more failure is the same outage: no second "began".
            (131, fail(), p(12, 41, 550), None),
            // Back again: catching up to seq 42.
            (133, Event::Stored, p(12, 42, 560), None),
            (134, Event::Tick, p(30, 43, 200), None),
            // Everything journaled when the store came back is stored, but
            // the last failure is too recent to call the outage over.
            (136, Event::Tick, p(42, 44, 20), None),
            (140, Event::Stored, p(44, 44, 0), None),
            // Ten seconds without a failure: over. The catch-up took 3 s.
            (
                141,
                Event::Tick,
                p(44, 45, 10),
                Some(Say::Ended {
                    lasted: secs(131),
                    failures: 6,
                    caught_up_bytes: 560,
                    catch_up: secs(3),
                }),
            ),
            (142, Event::Stored, p(45, 45, 0), None),
            // A new outage begins with a new line.
            (200, fail(), p(45, 46, 10), began()),
            // Nothing was waiting: over once it settled.
            (201, Event::Stored, p(46, 46, 0), None),
            (205, Event::Tick, p(46, 46, 0), None),
            (
                210,
                Event::Tick,
                p(46, 47, 5),
                Some(Say::Ended {
                    lasted: secs(1),
                    failures: 1,
                    caught_up_bytes: 0,
                    catch_up: secs(0),
                }),
            ),
        ];
        let t0 = Instant::now();
        let mut o = Outage::new(secs(60), secs(10));
        for (i, (at, ev, prog, want)) in cases.into_iter().enumerate() {
            let got = o.step(t0 + secs(at), ev.clone(), prog);
            assert_eq!(got, want, "row {i}: at {at}s, {ev:?}, {prog:?}");
        }
        assert!(!o.is_on());
    }

    #[test]
    fn catching_up_for_long_is_reminded_too() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut o = Outage::new(s(60), s(10));
        assert!(matches!(
            o.step(t0, fail(), p(0, 5, 9)),
            Some(Say::Began { .. })
        ));
        assert_eq!(o.step(t0 + s(10), Event::Stored, p(0, 100, 1000)), None);
        assert_eq!(
            o.step(t0 + s(61), Event::Tick, p(50, 120, 400)),
            Some(Say::Lasting {
                since: s(61),
                failures: 1,
                waiting_bytes: 400,
                catching_up: true,
            })
        );
        assert!(matches!(
            o.step(t0 + s(70), Event::Tick, p(100, 130, 100)),
            Some(Say::Ended {
                caught_up_bytes: 1000,
                ..
            })
        ));
    }

    #[test]
    fn formats() {
        assert_eq!(fmt_bytes(312), "312 B");
        assert_eq!(fmt_bytes(3 << 19), "1.5 MiB");
        assert_eq!(fmt_duration(Duration::from_millis(4200)), "4.2s");
        assert_eq!(fmt_duration(Duration::from_secs(125)), "2m 5s");
        assert_eq!(fmt_duration(Duration::from_secs(7300)), "2h 1m");
    }
}
