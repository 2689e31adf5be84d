//! The shipping thread of `rewind run`: seals and uploads the journal's
//! records every segment interval and puts a heartbeat, until the daemon
//! stops. It must not run the final round of a shutdown, which the caller
//! bounds by the shutdown deadline.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Daemon;

pub(super) fn spawn(d: Arc<Daemon>, interval: Duration) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("rewind-ship".into())
        .spawn(move || {
            while !d.stop.load(Ordering::Acquire) {
                let t0 = Instant::now();
                if let Err(e) = d.shipper.ship_once(None) {
                    tracing::error!("shipping failed: {e}");
                }
                let _ = d.shipper.heartbeat(false, None);
                let spent = t0.elapsed();
                if spent < interval {
                    std::thread::sleep(interval - spent);
                }
            }
        })
        .unwrap()
}
