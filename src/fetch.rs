//! Fetch: bounded parallelism for reading a store. It owns two shapes of
//! work. `Pool` runs independent jobs (a restore's "get this chunk, verify
//! it, write it into its file") on a fixed number of scoped threads behind a
//! bounded queue, and stops at the first error: later jobs are dropped
//! unrun and `finish` returns that error. `ahead` gets a sequence of objects
//! on several threads and hands them back strictly in order, a bounded
//! number ahead of the consumer, so that the next segments are on their way
//! while the current one is applied.
//!
//! Memory is bounded by construction rather than by accounting: a `Pool`
//! job holds what it fetched only while it runs, so at most `jobs` objects
//! are in memory, plus a queue of `2 * jobs` jobs that have fetched
//! nothing yet; `ahead` holds at most two objects per thread (one being
//! fetched, one waiting for the consumer).
//!
//! This module must not know what the objects are: callers fetch, decode
//! and verify inside the closures they pass, and only they touch a target.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{Scope, ScopedJoinHandle};

use crossbeam_channel::{bounded, Receiver, Sender};
use parking_lot::Mutex;

/// Parallel fetches when the user does not say: enough to hide a remote
/// store's latency (each request waits on the network, not the CPU), few
/// enough that a local store does not thrash two cores.
pub const DEFAULT_JOBS: usize = 8;

type Job<'scope, E> = Box<dyn FnOnce() -> Result<(), E> + Send + 'scope>;

/// A fixed set of worker threads running jobs until the first error.
pub(crate) struct Pool<'scope, E> {
    tx: Option<Sender<Job<'scope, E>>>,
    failed: Arc<AtomicBool>,
    first: Arc<Mutex<Option<E>>>,
    workers: Vec<ScopedJoinHandle<'scope, ()>>,
}

impl<'scope, E: Send + 'scope> Pool<'scope, E> {
    /// Starts `jobs` workers (at least one) in `scope`.
    pub(crate) fn start<'env>(scope: &'scope Scope<'scope, 'env>, jobs: usize) -> Self {
        let jobs = jobs.max(1);
        let (tx, rx): (Sender<Job<'scope, E>>, Receiver<Job<'scope, E>>) = bounded(jobs * 2);
        let failed = Arc::new(AtomicBool::new(false));
        let first = Arc::new(Mutex::new(None));
        let workers = (0..jobs)
            .map(|_| {
                let (rx, failed, first) = (rx.clone(), Arc::clone(&failed), Arc::clone(&first));
                scope.spawn(move || {
                    for job in rx {
                        // After a failure the queue is drained unrun, so
                        // that nothing more is fetched or written.
                        if failed.load(Ordering::Acquire) {
                            continue;
                        }
                        if let Err(e) = job() {
                            first.lock().get_or_insert(e);
                            failed.store(true, Ordering::Release);
                        }
                    }
                })
            })
            .collect();
        Pool {
            tx: Some(tx),
            failed,
            first,
            workers,
        }
    }

    /// Queues `job`, waiting while the queue is full. Returns false once a
    /// job has failed: the caller stops submitting and calls `finish`.
    pub(crate) fn submit(&self, job: impl FnOnce() -> Result<(), E> + Send + 'scope) -> bool {
        if self.failed.load(Ordering::Acquire) {
            return false;
        }
        let sent = self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.send(Box::new(job)).is_ok());
        sent && !self.failed.load(Ordering::Acquire)
    }

    /// Waits for every queued job and returns the first error, if any.
    pub(crate) fn finish(mut self) -> Result<(), E> {
        drop(self.tx.take());
        for w in self.workers.drain(..) {
            if let Err(panic) = w.join() {
                std::panic::resume_unwind(panic);
            }
        }
        match self.first.lock().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl<E> Drop for Pool<'_, E> {
    /// A pool dropped without `finish` (its caller failed first) runs no
    /// more jobs; the scope still joins its threads.
    fn drop(&mut self) {
        self.failed.store(true, Ordering::Release);
    }
}

/// Gets items `0..count` with `get` on `threads` threads (at least one) and
/// yields them in order. Thread `w` gets items `w, w + threads, ...` and
/// waits until the consumer has taken its previous one, so at most two
/// items per thread exist at a time. A thread stops after its first error
/// (the consumer stops there too) or when the iterator is dropped.
pub(crate) fn ahead<'scope, 'env, T, E, F>(
    scope: &'scope Scope<'scope, 'env>,
    threads: usize,
    count: usize,
    get: F,
) -> impl Iterator<Item = Result<T, E>> + 'scope
where
    T: Send + 'scope,
    E: Send + 'scope,
    F: Fn(usize) -> Result<T, E> + Send + Sync + 'scope,
{
    let threads = threads.clamp(1, count.max(1));
    let get = Arc::new(get);
    let rxs: Vec<Receiver<Result<T, E>>> = (0..threads)
        .map(|w| {
            let (tx, rx) = bounded(1);
            let get = Arc::clone(&get);
            scope.spawn(move || {
                for i in (w..count).step_by(threads) {
                    let r = get(i);
                    let failed = r.is_err();
                    if tx.send(r).is_err() || failed {
                        break;
                    }
                }
            });
            rx
        })
        .collect();
    // A thread that stopped early (an error it already sent) has dropped
    // its sender; `recv` then fails and the sequence ends, but the consumer
    // has stopped at that error before it gets there.
    (0..count).map_while(move |i| rxs[i % threads].recv().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn pool_runs_every_job_or_stops_at_the_first_error() {
        // (jobs, number of jobs, the job that fails, expected outcome)
        let cases: &[(usize, usize, Option<usize>, Result<(), usize>)] = &[
            (1, 0, None, Ok(())),
            (1, 100, None, Ok(())),
            (4, 1000, None, Ok(())),
            (4, 1000, Some(10), Err(10)),
            (1, 5, Some(0), Err(0)),
        ];
        for &(jobs, n, fail, ref want) in cases {
            let ran = AtomicUsize::new(0);
            let got = std::thread::scope(|s| {
                let pool = Pool::start(s, jobs);
                for i in 0..n {
                    let ran = &ran;
                    if !pool.submit(move || {
                        ran.fetch_add(1, Ordering::Relaxed);
                        if Some(i) == fail {
                            Err(i)
                        } else {
                            Ok(())
                        }
                    }) {
                        break;
                    }
                }
                pool.finish()
            });
            assert_eq!(&got, want, "jobs={jobs} n={n} fail={fail:?}");
            let ran = ran.load(Ordering::Relaxed);
            match fail {
                None => assert_eq!(ran, n),
                // Stopping is prompt: at most the queue and the running
                // jobs go on after the failure.
                Some(f) => assert!(ran <= f + 1 + 3 * jobs, "ran {ran} after a failure at {f}"),
            }
        }
    }

    #[test]
    fn ahead_yields_in_order_and_stops_at_an_error() {
        // (threads, count, the item that fails)
        let cases: &[(usize, usize, Option<usize>)] = &[
            (1, 0, None),
            (1, 10, None),
            (4, 3, None),
            (4, 100, None),
            (3, 100, Some(50)),
            (8, 20, Some(0)),
        ];
        for &(threads, count, fail) in cases {
            let got: Vec<Result<usize, usize>> = std::thread::scope(|s| {
                let items = ahead(s, threads, count, move |i| {
                    if Some(i) == fail {
                        Err(i)
                    } else {
                        Ok(i * 2)
                    }
                });
                let mut out = Vec::new();
                for r in items {
                    let stop = r.is_err();
                    out.push(r);
                    if stop {
                        break;
                    }
                }
                out
            });
            let want: Vec<Result<usize, usize>> = match fail {
                None => (0..count).map(|i| Ok(i * 2)).collect(),
                Some(f) => (0..f).map(|i| Ok(i * 2)).chain([Err(f)]).collect(),
            };
            assert_eq!(got, want, "threads={threads} count={count} fail={fail:?}");
        }
    }
}
