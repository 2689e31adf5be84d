//! The shipping of `rewind run`: the thread that seals and uploads the
//! journal's records every segment interval and puts a heartbeat until the
//! daemon stops, and the final round of a shutdown, bounded by its
//! deadline. It must not decide whether a stop was clean.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Daemon;
use crate::ship::ShipError;

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

/// The final round of a shutdown: seal and upload everything, put the last
/// heartbeat, then abort the uploads a failed attempt could not abort
/// during an outage. It runs apart, so that a store that hangs inside one
/// request cannot hold the exit past the deadline.
pub(super) fn final_round(d: &Daemon, deadline: Instant) -> Result<(), ShipError> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    {
        let shipper = d.shipper.clone();
        let store = d.store.clone();
        std::thread::spawn(move || {
            let r = shipper
                .ship_once(Some(deadline))
                .and_then(|_| shipper.heartbeat(true, Some(deadline)));
            if r.is_ok() {
                for kind in crate::timeline::VOLUME_KEY_KINDS {
                    if let Err(e) = store.abort_incomplete_uploads(&format!("{kind}/")) {
                        tracing::warn!(
                            "cannot abort incomplete uploads: {e}; the next start retries"
                        );
                    }
                }
            }
            let _ = tx.send(r);
        });
    }
    rx.recv_deadline(deadline + Duration::from_secs(1))
        .unwrap_or(Err(ShipError::Timeout))
}
