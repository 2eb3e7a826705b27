//! The outbox drainer: moves committed messages from the outbox table to the backend, in order.

use super::Backend;
use crate::storage::{outbox, Db};
use crate::types::Message;
use anyhow::Result;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// Messages published per backend round trip.
const BATCH: usize = 256;

/// The outbox of a store, and the bell that wakes its drainer.
#[derive(Clone)]
pub struct Outbox {
    db: Db,
    wake: Arc<Notify>,
}

impl Outbox {
    pub fn new(db: Db) -> Outbox {
        Outbox {
            db,
            wake: Arc::new(Notify::new()),
        }
    }

    /// Tells the drainer that a commit added messages.
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    pub fn depth(&self) -> Result<u64> {
        outbox::depth(&self.db)
    }

    /// Moves batches to the backend, oldest first, forever. A batch leaves the outbox only
    /// after the backend confirmed it, so a crash or an unreachable backend loses nothing
    /// (it may deliver a batch twice; handlers are idempotent).
    pub async fn drain(self, backend: Arc<dyn Backend>) {
        let mut failures = 0u32;
        loop {
            let this = self.clone();
            let batch =
                match tokio::task::spawn_blocking(move || outbox::oldest(&this.db, BATCH)).await {
                    Ok(Ok(b)) => b,
                    Ok(Err(e)) => {
                        tracing::error!(error = %format!("{e:#}"), "reading the outbox failed");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "outbox reader panicked");
                        continue;
                    }
                };
            let Some(&(last, _)) = batch.last() else {
                // Wake on the next commit; the timeout covers messages left by a previous run.
                let _ = tokio::time::timeout(Duration::from_secs(1), self.wake.notified()).await;
                continue;
            };
            let messages: Vec<Message> = batch.into_iter().map(|(_, m)| m).collect();
            match backend.publish(&messages).await {
                Ok(()) => {
                    failures = 0;
                    for m in &messages {
                        crate::metrics::get()
                            .produced
                            .get_or_create(&crate::metrics::labels([("topic", &m.topic)]))
                            .inc();
                    }
                    let this = self.clone();
                    match tokio::task::spawn_blocking(move || {
                        outbox::remove_through(&this.db, last)
                    })
                    .await
                    {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::error!(error = %format!("{e:#}"), "trimming the outbox failed")
                        }
                        Err(e) => tracing::error!(error = %e, "outbox trim panicked"),
                    }
                }
                Err(e) => {
                    failures += 1;
                    let depth = self.depth().unwrap_or(0);
                    tracing::warn!(
                        waiting = depth,
                        backend = %backend.describe(),
                        error = %format!("{e:#}"),
                        "messaging backend unavailable; events are waiting in the outbox"
                    );
                    let delay = Duration::from_millis(100 * (1u64 << failures.min(6)));
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}
