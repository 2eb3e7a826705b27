//! The outbox drainer: moves committed messages from the outbox table to the backend, in order.

use super::{Backend, Unpublishable};
use crate::storage::outbox::Undecodable;
use crate::storage::StateStore;
use crate::types::trace;
use crate::types::Message;
use anyhow::Result;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// Messages published per backend round trip.
const BATCH: usize = 256;

/// How long a drainer fails to publish before it gives its outbox partitions (with
/// `STATE_URL`) to other hosts, which may reach the backend, and for how long.
const STEP_BACK_AFTER: Duration = Duration::from_secs(10);
const STAY_AWAY: Duration = Duration::from_secs(30);

/// Publishes the outbox of a store, woken by the bell commits ring.
#[derive(Clone)]
pub struct Drainer {
    store: Arc<dyn StateStore>,
    wake: Arc<Notify>,
}

impl Drainer {
    pub fn new(store: Arc<dyn StateStore>) -> Drainer {
        Drainer {
            store,
            wake: Arc::new(Notify::new()),
        }
    }

    /// Tells the drainer that a commit added messages.
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    pub fn depth(&self) -> Result<u64> {
        self.store.outbox().depth()
    }

    /// Messages set aside because the backend refused them for good.
    pub fn parked(&self) -> Result<u64> {
        self.store.outbox().parked()
    }

    /// Sets aside the message of the batch (`seqs`, `messages`) the backend refused for good,
    /// with those before it (published), so that the ones after it flow.
    async fn park(&self, refused: &Unpublishable, seqs: &[u64], messages: &[Message]) {
        let index = refused.index.min(seqs.len() - 1);
        let m = &messages[index];
        tracing::error!(
            topic = %m.topic,
            key = m.key.as_deref().unwrap_or_default(),
            bytes = m.payload.len(),
            error = %refused.reason,
            "message refused for good; set aside in the outbox's parked table so later ones flow"
        );
        self.set_aside(&m.topic, &seqs[..index], seqs[index], &refused.reason)
            .await;
    }

    /// Sets aside an outbox entry that does not decode, so that the ones after it flow.
    async fn park_undecodable(&self, entry: &Undecodable) {
        tracing::error!(
            seq = entry.seq,
            error = %entry.reason,
            "outbox entry cannot be decoded (written by another version of the host?); set aside in the outbox's parked table so later ones flow"
        );
        self.set_aside("", &[], entry.seq, &entry.to_string()).await;
    }

    /// Parks entry `seq` (of `topic`, for the metric) with `reason`, and removes `published`.
    async fn set_aside(&self, topic: &str, published: &[u64], seq: u64, reason: &str) {
        crate::metrics::get()
            .parked
            .get_or_create(&crate::metrics::labels([("topic", topic)]))
            .inc();
        if let Err(e) = self.store.outbox().park(published, seq, reason).await {
            tracing::error!(error = %format!("{e:#}"), "parking the entry failed");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Moves batches to the backend, oldest first, forever. A batch leaves the outbox only
    /// after the backend confirmed it, so a crash or an unreachable backend loses nothing
    /// (it may deliver a batch twice; handlers are idempotent).
    pub async fn drain(self, backend: Arc<dyn Backend>) {
        let mut failures = 0u32;
        let mut failing_since: Option<std::time::Instant> = None;
        loop {
            let batch = match self.store.outbox().oldest(BATCH).await {
                Ok(b) => b,
                Err(e) if e.is::<Undecodable>() => {
                    let undecodable = e.downcast::<Undecodable>().expect("checked");
                    self.park_undecodable(&undecodable).await;
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "reading the outbox failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if batch.is_empty() {
                // Wake on the next commit; the timeout covers messages left by a previous run.
                let woken = async {
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = self.store.outbox().committed_elsewhere() => {}
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(1), woken).await;
                continue;
            };
            let seqs: Vec<u64> = batch.iter().map(|(seq, _)| *seq).collect();
            let messages: Vec<Message> = batch.into_iter().map(|(_, m)| m).collect();
            let spans: Vec<_> = (messages.iter())
                .map(|m| trace::send(backend.system(), &m.topic, &m.headers))
                .collect();
            let published = backend.publish(&messages).await;
            drop(spans);
            let refused = published
                .as_ref()
                .err()
                .and_then(|e| e.chain().find_map(|c| c.downcast_ref::<Unpublishable>()));
            if let Some(refused) = refused {
                self.park(refused, &seqs, &messages).await;
                continue;
            }
            match published {
                Ok(()) => {
                    failures = 0;
                    failing_since = None;
                    for m in &messages {
                        crate::metrics::get()
                            .produced
                            .get_or_create(&crate::metrics::labels([("topic", &m.topic)]))
                            .inc();
                    }
                    if let Err(e) = self.store.outbox().remove(&seqs).await {
                        tracing::error!(error = %format!("{e:#}"), "trimming the outbox failed")
                    }
                }
                Err(e) => {
                    failures += 1;
                    let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() >= STEP_BACK_AFTER {
                        self.store.outbox().step_back(STAY_AWAY).await;
                        failing_since = None;
                    }
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
    use crate::messaging::Subscription;
    use crate::storage::{RedbStore, Txn};
    use std::sync::Mutex;

    /// A backend that refuses for good any message whose payload is `huge`.
    #[derive(Default)]
    struct Picky(Mutex<Vec<String>>);

    #[async_trait::async_trait]
    impl Backend for Picky {
        fn describe(&self) -> String {
            "picky".into()
        }
        async fn publish(&self, messages: &[Message]) -> Result<()> {
            for (index, m) in messages.iter().enumerate() {
                if m.payload == b"huge" {
                    return Err(Unpublishable {
                        index,
                        reason: "too large".into(),
                    }
                    .into());
                }
                self.0
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&m.payload).into());
            }
            Ok(())
        }
        async fn subscribe(
            &self,
            _: &str,
            _: &str,
            _: crate::config::Start,
        ) -> Result<Box<dyn Subscription>> {
            unimplemented!("publish only")
        }
        async fn read_tail(&self, _: &str, _: usize) -> Result<Vec<crate::types::Delivery>> {
            unimplemented!("publish only")
        }
    }

    /// `db`'s outbox after a drainer into a [`Picky`] backend emptied it (or 10 s went by).
    async fn drained(db: RedbStore) -> (Drainer, Arc<Picky>) {
        let backend = Arc::new(Picky::default());
        let outbox = Drainer::new(Arc::new(db));
        let drainer = tokio::spawn(outbox.clone().drain(backend.clone()));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while outbox.depth().unwrap() > 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drainer.abort();
        (outbox, backend)
    }

    #[tokio::test]
    async fn an_entry_that_does_not_decode_is_set_aside_and_the_rest_flow_once() {
        let db = RedbStore::in_memory().unwrap();
        let commit = |payload: &str| {
            let mut txn = Txn::new("user".into());
            txn.send(msg("t", "1", payload)).unwrap();
            db.commit_blocking(&txn).unwrap();
        };
        commit("a");
        // Not a postcard `Message`: a topic length past the end of the bytes.
        crate::storage::redb_store::append_raw(&db, &[0xff, 0xff, 0xff, 0x0f]);
        commit("b");
        let (outbox, backend) = drained(db).await;
        assert_eq!(outbox.depth().unwrap(), 0);
        assert_eq!(outbox.parked().unwrap(), 1);
        assert_eq!(*backend.0.lock().unwrap(), ["a", "b"]);
    }

    #[tokio::test]
    async fn a_message_refused_for_good_is_set_aside_and_the_rest_flow_once() {
        let db = RedbStore::in_memory().unwrap();
        let mut txn = Txn::new("user".into());
        for p in ["a", "huge", "b", "c"] {
            txn.send(msg("t", "1", p)).unwrap();
        }
        db.commit_blocking(&txn).unwrap();
        let (outbox, backend) = drained(db).await;
        assert_eq!(outbox.depth().unwrap(), 0);
        assert_eq!(outbox.parked().unwrap(), 1);
        assert_eq!(*backend.0.lock().unwrap(), ["a", "b", "c"]);
    }
}
