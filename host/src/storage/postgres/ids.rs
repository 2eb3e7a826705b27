//! Ids of `microsvc_next_id` for every caller waiting at once: one statement per batch.
//!
//! The first caller of a sequence starts a task that takes ids for all callers waiting when
//! its statement is sent (`last = last + n`), hands them out in the order they came, and goes
//! on while callers keep coming. A call that begins after another call returned is in a later
//! statement, so it gets a larger id, on any host: ids still increase in the order calls are
//! made, while concurrent calls share one transaction.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// A sequence: service, bucket, key.
pub(super) type Sequence = (Arc<str>, String, String);

/// What a caller gets: its id, or why none was taken (shared by the batch).
type Taken = Result<u64, Arc<anyhow::Error>>;

/// Callers waiting for ids, per sequence. A sequence is in the map while its task runs.
#[derive(Default, Clone)]
pub(super) struct IdBatches(Arc<Mutex<HashMap<Sequence, Vec<oneshot::Sender<Taken>>>>>);

impl IdBatches {
    /// The next id of `sequence`. `take(sequence, n)` reserves `n` ids in one statement and
    /// returns the last of them.
    pub(super) async fn next<F, Fut>(&self, sequence: Sequence, take: F) -> Taken
    where
        F: Fn(Sequence, u64) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<u64>> + Send + 'static,
    {
        let (sender, receiver) = oneshot::channel();
        let lead = match self.lock().entry(sequence.clone()) {
            Entry::Occupied(mut waiting) => {
                waiting.get_mut().push(sender);
                false
            }
            Entry::Vacant(slot) => {
                slot.insert(vec![sender]);
                true
            }
        };
        if lead {
            // A task, not this caller: a caller that gives up must not strand the others.
            tokio::spawn(self.clone().serve(sequence, take));
        }
        receiver
            .await
            .unwrap_or_else(|_| Err(Arc::new(anyhow::anyhow!("the id task ended"))))
    }

    /// Takes ids for whoever waits on `sequence` until nobody does.
    async fn serve<F, Fut>(self, sequence: Sequence, take: F)
    where
        F: Fn(Sequence, u64) -> Fut,
        Fut: Future<Output = anyhow::Result<u64>>,
    {
        // Should this task end early (a panic), its waiters hear so and the next caller
        // starts a new one.
        let mut guard = Forget(Some((self.clone(), sequence.clone())));
        loop {
            let waiting = {
                let mut batches = self.lock();
                match batches.get_mut(&sequence) {
                    Some(waiting) if !waiting.is_empty() => std::mem::take(waiting),
                    _ => {
                        batches.remove(&sequence);
                        guard.0 = None;
                        return;
                    }
                }
            };
            let n = waiting.len() as u64;
            match take(sequence.clone(), n).await {
                Ok(last) => {
                    let first = last.saturating_sub(n - 1);
                    for (id, sender) in (first..=last).zip(waiting) {
                        // A caller gone by now leaves its id skipped.
                        let _ = sender.send(Ok(id));
                    }
                }
                Err(e) => {
                    let e = Arc::new(e);
                    for sender in waiting {
                        let _ = sender.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Sequence, Vec<oneshot::Sender<Taken>>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Removes a sequence whose task ended without emptying it (its waiters' senders drop).
struct Forget(Option<(IdBatches, Sequence)>);

impl Drop for Forget {
    fn drop(&mut self) {
        if let Some((batches, sequence)) = self.0.take() {
            batches.lock().remove(&sequence);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres_server::Postgres;
    use crate::storage::postgres::PostgresStore;
    use crate::storage::{StateStore, Txn};
    use std::sync::atomic::{AtomicU64, Ordering};

    fn sequence() -> Sequence {
        ("svc".into(), "b".into(), "k".into())
    }

    /// A counter in memory standing in for the `sequences` row, counting statements.
    fn counter() -> (Arc<AtomicU64>, Arc<AtomicU64>) {
        (Arc::default(), Arc::default())
    }

    #[tokio::test]
    async fn callers_waiting_together_share_a_statement_and_get_distinct_ids_in_order() {
        let batches = IdBatches::default();
        let (last, statements) = counter();
        let take = {
            let (last, statements) = (last.clone(), statements.clone());
            move |_: Sequence, n: u64| {
                let (last, statements) = (last.clone(), statements.clone());
                async move {
                    statements.fetch_add(1, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    Ok(last.fetch_add(n, Ordering::SeqCst) + n)
                }
            }
        };
        let calls = (0..50).map(|_| batches.next(sequence(), take.clone()));
        let ids: Vec<u64> = futures_util::future::join_all(calls)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(ids, (1..=50).collect::<Vec<_>>());
        assert_eq!(statements.load(Ordering::SeqCst), 1);
        // One after another: a statement each, ids still increasing.
        let later = batches.next(sequence(), take.clone()).await.unwrap();
        let last_one = batches.next(sequence(), take).await.unwrap();
        assert_eq!((later, last_one), (51, 52));
        assert_eq!(statements.load(Ordering::SeqCst), 3);
        assert!(
            batches.lock().is_empty(),
            "a sequence nobody waits on is forgotten"
        );
    }

    #[tokio::test]
    async fn a_failed_statement_fails_its_batch_only_and_a_panicked_task_strands_nobody() {
        let batches = IdBatches::default();
        let failing = |_: Sequence, _: u64| async { Err::<u64, _>(anyhow::anyhow!("server gone")) };
        let (a, b) = tokio::join!(
            batches.next(sequence(), failing),
            batches.next(sequence(), failing)
        );
        assert!(a.is_err() && b.is_err());
        let panicking = |_: Sequence, n: u64| async move {
            assert_eq!(n, 0, "a bug");
            anyhow::Ok(n)
        };
        assert!(batches.next(sequence(), panicking).await.is_err());
        assert!(batches.lock().is_empty());
        let ok = |_: Sequence, n: u64| async move { Ok(7 + n) };
        assert_eq!(batches.next(sequence(), ok).await.unwrap(), 8);
    }

    /// Ids taken at once through one handle share PostgreSQL transactions: 50 of them take far
    /// fewer than 50 (the server's transaction ids count them), and are still all distinct.
    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_ids_share_transactions() {
        let server = Postgres::start().expect("a PostgreSQL server for the tests");
        let url = server.create_database("ids").unwrap();
        let wait = std::time::Duration::from_secs(5);
        let db = Arc::new(PostgresStore::connect(&url, wait, None, 8).await.unwrap());
        let (probe, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        async fn xid(probe: &tokio_postgres::Client) -> i64 {
            let row = probe.query_one("SELECT txid_current()", &[]).await;
            row.unwrap().get(0)
        }
        // The sequence's row exists: later statements update it.
        db.next_id(&mut Txn::new("svc".into()), "ids".into(), "n".into())
            .await
            .unwrap();
        let before = xid(&probe).await;
        let takes = (0..50).map(|_| {
            let db = db.clone();
            async move {
                db.next_id(&mut Txn::new("svc".into()), "ids".into(), "n".into())
                    .await
                    .unwrap()
            }
        });
        let mut ids = futures_util::future::join_all(takes).await;
        let used = xid(&probe).await - before - 1;
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 50);
        assert!(used < 10, "50 ids took {used} transactions");
    }
}
