//! A `Store` wrapper that fails on command, for tests of the code above the
//! store (the shipper, restore, verify): an outage that comes and goes,
//! failures of the next N calls of one kind, and the nastiest case for a
//! retrying writer, a put that lands but whose answer is lost. The binary
//! never constructs it; it lives in the library only so that integration
//! tests can reach it. Faults at the HTTP level (5xx, throttling, hangs,
//! cut connections) are tested against the real S3 client instead, through
//! the misbehaving proxy in `tests/support/proxy.rs`.

use std::sync::Arc;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

use super::{Result, Store, StoreError};

/// The calls a fault can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Put,
    Get,
    Exists,
    List,
    Delete,
}

/// What an injected fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fail with `StoreError::Unreachable` without touching the inner store.
    Unreachable,
    /// Fail with `StoreError::Denied`.
    Denied,
    /// Puts and deletes only: do it, then report `Unreachable` (the answer
    /// was lost), so the caller retries a call that already happened.
    LandThenFail,
}

#[derive(Default)]
struct State {
    down: bool,
    /// (op, fault, remaining count), consumed first to last.
    queued: Vec<(Op, Fault, usize)>,
    calls: [u64; 5],
    failures: u64,
}

/// See the module docs. Cheap to share: wrap it in an `Arc`.
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    state: Mutex<State>,
    /// Signalled whenever a call fails, so tests wait on a condition
    /// ("the shipper has hit the outage") instead of sleeping.
    changed: Condvar,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn Store>) -> FaultyStore {
        FaultyStore {
            inner,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        }
    }

    /// While down, every call fails with `Unreachable`.
    pub fn set_down(&self, down: bool) {
        self.state.lock().down = down;
    }

    /// Makes the next `times` calls of `op` fail with `fault`.
    pub fn fail_next(&self, op: Op, fault: Fault, times: usize) {
        self.state.lock().queued.push((op, fault, times));
    }

    /// How many calls of `op` reached this wrapper (failed ones included).
    pub fn calls(&self, op: Op) -> u64 {
        self.state.lock().calls[op as usize]
    }

    /// How many calls failed because of an injected fault.
    pub fn failures(&self) -> u64 {
        self.state.lock().failures
    }

    /// Blocks until at least `n` injected failures happened or `timeout`
    /// passed; returns whether the condition was met.
    pub fn wait_for_failures(&self, n: u64, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut st = self.state.lock();
        while st.failures < n {
            if self.changed.wait_until(&mut st, deadline).timed_out() {
                return st.failures >= n;
            }
        }
        true
    }

    /// Counts the call and picks the fault to apply to it, if any.
    fn fault_for(&self, op: Op) -> Option<Fault> {
        let mut st = self.state.lock();
        st.calls[op as usize] += 1;
        let fault = if st.down {
            Some(Fault::Unreachable)
        } else if let Some(i) = st.queued.iter().position(|(o, _, n)| *o == op && *n > 0) {
            st.queued[i].2 -= 1;
            let f = st.queued[i].1;
            st.queued.retain(|q| q.2 > 0);
            Some(f)
        } else {
            None
        };
        if fault.is_some() {
            st.failures += 1;
            self.changed.notify_all();
        }
        fault
    }

    fn error(&self, fault: Fault, what: &str) -> StoreError {
        let store = self.describe();
        match fault {
            Fault::Denied => StoreError::Denied {
                store,
                detail: format!("injected fault on {what}"),
            },
            Fault::Unreachable | Fault::LandThenFail => StoreError::Unreachable {
                store,
                detail: format!("injected fault on {what}"),
            },
        }
    }
}

impl Store for FaultyStore {
    fn put(&self, key: &str, data: Bytes) -> Result<()> {
        match self.fault_for(Op::Put) {
            None => self.inner.put(key, data),
            Some(Fault::LandThenFail) => {
                self.inner.put(key, data)?;
                Err(self.error(Fault::LandThenFail, key))
            }
            Some(f) => Err(self.error(f, key)),
        }
    }

    fn get(&self, key: &str) -> Result<Bytes> {
        match self.fault_for(Op::Get) {
            None => self.inner.get(key),
            Some(f) => Err(self.error(f, key)),
        }
    }

    fn exists(&self, key: &str) -> Result<bool> {
        match self.fault_for(Op::Exists) {
            None => self.inner.exists(key),
            Some(f) => Err(self.error(f, key)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        match self.fault_for(Op::List) {
            None => self.inner.list(prefix),
            Some(f) => Err(self.error(f, prefix)),
        }
    }

    fn list_sized(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        match self.fault_for(Op::List) {
            None => self.inner.list_sized(prefix),
            Some(f) => Err(self.error(f, prefix)),
        }
    }

    fn delete(&self, key: &str) -> Result<()> {
        match self.fault_for(Op::Delete) {
            None => self.inner.delete(key),
            Some(Fault::LandThenFail) => {
                self.inner.delete(key)?;
                Err(self.error(Fault::LandThenFail, key))
            }
            Some(f) => Err(self.error(f, key)),
        }
    }

    fn abort_incomplete_uploads(&self, prefix: &str) -> Result<usize> {
        self.inner.abort_incomplete_uploads(prefix)
    }

    fn describe(&self) -> String {
        format!("faulty({})", self.inner.describe())
    }

    fn chunk_naming(&self) -> Result<crate::crypt::ChunkNaming> {
        self.inner.chunk_naming()
    }
}
