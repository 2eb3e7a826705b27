//! The transactional outbox: messages of committed invocations, waiting to reach the backend.

use super::{Backend, Message};
use crate::state::Db;
use anyhow::Result;
use redb::{ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// sequence number -> postcard-encoded [`Message`], in commit order.
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
const BATCH: usize = 256;

/// Called inside the state commit, so messages exist if and only if their writes do.
pub fn append(wtx: &WriteTransaction, messages: &[Message]) -> Result<()> {
    if messages.is_empty() {
        return Ok(());
    }
    let mut table = wtx.open_table(OUTBOX)?;
    let first = table.last()?.map(|(k, _)| k.value() + 1).unwrap_or(0);
    for (seq, m) in (first..).zip(messages) {
        table.insert(seq, postcard::to_allocvec(m)?.as_slice())?;
    }
    Ok(())
}

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
        let rtx = self.db.redb().begin_read()?;
        match rtx.open_table(OUTBOX) {
            Ok(t) => Ok(t.len()?),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    fn oldest(&self) -> Result<Vec<(u64, Message)>> {
        let rtx = self.db.redb().begin_read()?;
        let table = match rtx.open_table(OUTBOX) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for entry in table.iter()?.take(BATCH) {
            let (k, v) = entry?;
            out.push((k.value(), postcard::from_bytes(v.value())?));
        }
        if !out.is_empty() {
            // Commits are visible before they are durable (group commit): never publish a
            // message whose invocation a crash could still undo.
            self.db.wait_durable()?;
        }
        Ok(out)
    }

    /// Lazily durable: after a crash, a batch whose removal was lost is published again.
    fn remove_through(&self, last: u64) -> Result<()> {
        self.db.write_lazily(|wtx| {
            wtx.open_table(OUTBOX)?.retain_in(..=last, |_, _| false)?;
            Ok(())
        })
    }

    /// Moves batches to the backend, oldest first, forever. A batch leaves the outbox only
    /// after the backend confirmed it, so a crash or an unreachable backend loses nothing
    /// (it may deliver a batch twice; handlers are idempotent).
    pub async fn drain(self, backend: Arc<dyn Backend>) {
        let mut failures = 0u32;
        loop {
            let this = self.clone();
            let batch = match tokio::task::spawn_blocking(move || this.oldest()).await {
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
                    match tokio::task::spawn_blocking(move || this.remove_through(last)).await {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messaging::tests::msg;

    #[test]
    fn append_then_remove_keeps_order() {
        let db = Db::in_memory().unwrap();
        let outbox = Outbox::new(db.clone());
        for batch in [
            vec![msg("t", "1", "a"), msg("t", "1", "b")],
            vec![msg("t", "2", "c")],
        ] {
            let wtx = db.redb().begin_write().unwrap();
            append(&wtx, &batch).unwrap();
            wtx.commit().unwrap();
        }
        let pending = outbox.oldest().unwrap();
        let payloads: Vec<_> = pending.iter().map(|(_, m)| m.payload.clone()).collect();
        assert_eq!(payloads, [b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        outbox.remove_through(pending[1].0).unwrap();
        assert_eq!(outbox.depth().unwrap(), 1);
        assert_eq!(outbox.oldest().unwrap()[0].1.payload, b"c");
    }
}
