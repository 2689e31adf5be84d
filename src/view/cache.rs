//! The view's chunk cache: base chunks fetched from the store on first
//! read, verified against their hash (as restore does) and kept in memory
//! up to a byte budget, least recently used first out. A chunk that cannot
//! be fetched or does not verify is never cached: the read that needed it
//! fails with EIO and a log line, and the next read tries the store again.
//! Readahead fetches on a few background threads at most.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use rustix::io::Errno;

use crate::base::{chunk_key, decode_chunk};
use crate::crypt::ChunkNaming;
use crate::store::Store;

/// How many readahead fetches may run at once.
const MAX_PREFETCH: usize = 4;

#[derive(Default)]
struct Lru {
    chunks: HashMap<[u8; 32], (Arc<Vec<u8>>, u64)>,
    by_use: BTreeMap<u64, [u8; 32]>,
    tick: u64,
    bytes: u64,
}

impl Lru {
    fn get(&mut self, hash: &[u8; 32]) -> Option<Arc<Vec<u8>>> {
        self.tick += 1;
        let tick = self.tick;
        let (data, used) = self.chunks.get_mut(hash)?;
        self.by_use.remove(used);
        *used = tick;
        self.by_use.insert(tick, *hash);
        Some(data.clone())
    }

    /// Adds a chunk and evicts the least recently used ones until the
    /// budget holds; a chunk larger than the whole budget is not kept.
    fn put(&mut self, hash: [u8; 32], data: Arc<Vec<u8>>, budget: u64) {
        if self.chunks.contains_key(&hash) || data.len() as u64 > budget {
            return;
        }
        self.tick += 1;
        self.bytes += data.len() as u64;
        self.chunks.insert(hash, (data, self.tick));
        self.by_use.insert(self.tick, hash);
        while self.bytes > budget {
            let Some((_, old)) = self.by_use.pop_first() else {
                break;
            };
            if let Some((d, _)) = self.chunks.remove(&old) {
                self.bytes -= d.len() as u64;
            }
        }
    }
}

pub(crate) struct ChunkCache {
    inner: Arc<Shared>,
}

struct Shared {
    store: Arc<dyn Store>,
    /// How the volume names its chunks (keyed when it is encrypted).
    naming: ChunkNaming,
    budget: u64,
    lru: Mutex<Lru>,
    /// Chunks a readahead thread is fetching now.
    fetching: Mutex<HashSet<[u8; 32]>>,
    prefetching: AtomicUsize,
}

impl Shared {
    fn fetch(&self, hash: &[u8; 32]) -> Result<Arc<Vec<u8>>, Errno> {
        if let Some(d) = self.lru.lock().get(hash) {
            return Ok(d);
        }
        let key = chunk_key(hash);
        let data = match self.store.get(&key) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(chunk = %key, error = %e, "cannot fetch a chunk from the store; the read fails with EIO (it is retried on the next read)");
                return Err(Errno::IO);
            }
        };
        let raw = match decode_chunk(&data, hash, &self.naming) {
            Ok(r) => Arc::new(r),
            Err(e) => {
                tracing::error!(chunk = %key, error = %e, "chunk from the store is damaged; the read fails with EIO");
                return Err(Errno::IO);
            }
        };
        self.lru.lock().put(*hash, raw.clone(), self.budget);
        Ok(raw)
    }
}

impl ChunkCache {
    pub(crate) fn new(store: Arc<dyn Store>, naming: ChunkNaming, budget: u64) -> ChunkCache {
        ChunkCache {
            inner: Arc::new(Shared {
                store,
                naming,
                budget,
                lru: Mutex::new(Lru::default()),
                fetching: Mutex::new(HashSet::new()),
                prefetching: AtomicUsize::new(0),
            }),
        }
    }

    /// A verified chunk, from the cache or the store.
    pub(crate) fn get(&self, hash: &[u8; 32]) -> Result<Arc<Vec<u8>>, Errno> {
        self.inner.fetch(hash)
    }

    /// Starts fetching `hashes` in the background, unless cached, already
    /// being fetched, or too many fetches run already. Failures are left
    /// for the read that needs the chunk to report.
    pub(crate) fn prefetch(&self, hashes: Vec<[u8; 32]>) {
        for hash in hashes {
            if self.inner.lru.lock().chunks.contains_key(&hash) {
                continue;
            }
            if self.inner.prefetching.fetch_add(1, Ordering::SeqCst) >= MAX_PREFETCH {
                self.inner.prefetching.fetch_sub(1, Ordering::SeqCst);
                return;
            }
            if !self.inner.fetching.lock().insert(hash) {
                self.inner.prefetching.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            let shared = self.inner.clone();
            std::thread::spawn(move || {
                let _ = shared.fetch(&hash);
                shared.fetching.lock().remove(&hash);
                shared.prefetching.fetch_sub(1, Ordering::SeqCst);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u8) -> [u8; 32] {
        [n; 32]
    }

    #[test]
    fn lru_keeps_the_budget_and_the_recently_used() {
        // (budget, chunk sizes put in order with reads between, expected kept)
        let cases: Vec<(&str, u64, Vec<(char, u8, usize)>, Vec<u8>)> = vec![
            ("all fit", 10, vec![('p', 1, 4), ('p', 2, 4)], vec![1, 2]),
            (
                "oldest goes",
                10,
                vec![('p', 1, 4), ('p', 2, 4), ('p', 3, 4)],
                vec![2, 3],
            ),
            (
                "a read keeps one",
                10,
                vec![('p', 1, 4), ('p', 2, 4), ('g', 1, 0), ('p', 3, 4)],
                vec![1, 3],
            ),
            ("too big for the budget", 3, vec![('p', 1, 4)], vec![]),
        ];
        for (what, budget, steps, want) in cases {
            let mut l = Lru::default();
            for (op, n, size) in steps {
                match op {
                    'p' => l.put(h(n), Arc::new(vec![n; size]), budget),
                    _ => drop(l.get(&h(n))),
                }
            }
            let mut kept: Vec<u8> = l.chunks.keys().map(|k| k[0]).collect();
            kept.sort();
            assert_eq!(kept, want, "{what}");
            assert!(l.bytes <= budget, "{what}");
        }
    }
}
