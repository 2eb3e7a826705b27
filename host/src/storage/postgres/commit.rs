//! Invocations' commits and ids on PostgreSQL, each one pipelined flight of statements.
//!
//! Only what an acknowledgement depends on waits for the disk: a commit does; an id, a message
//! handler's applied writes and the relays' bell are committed without waiting for their WAL
//! flush (`synchronous_commit = off`). That is safe because the WAL is one ordered log: a
//! later commit that waits for its flush makes every earlier record durable with it. An id's
//! record precedes the commit of the invocation that took it, so no durable commit ever holds
//! an id that a crash could hand out again; applied writes are made durable by
//! [`PostgresStore::flush`] before the consumer acknowledges their records.

use super::locks::{locks, LOCK};
use super::{conflict_or_storage, list, partition, PostgresStore, GET, LIST};
use crate::storage::txn::{digest_keys, digest_of, Txn};
use crate::storage::{CommitError, NextIdError};
use crate::types::budget::ENTRY_OVERHEAD;
use anyhow::Context as _;
use futures_util::future::{join, join3, try_join_all};
use tokio_postgres::types::ToSql;

const UPSERT: &str = "INSERT INTO kv (service, bucket, key, value) VALUES ($1, $2, $3, $4) \
     ON CONFLICT (service, bucket, key) DO UPDATE SET value = excluded.value";
const DELETE: &str = "DELETE FROM kv WHERE service = $1 AND bucket = $2 AND key = $3";
const SEND: &str = "INSERT INTO outbox (part, message) VALUES ($1, $2)";
const NEXT_ID: &str = "INSERT INTO sequences (service, bucket, key, last) VALUES ($1, $2, $3, 1) \
     ON CONFLICT (service, bucket, key) DO UPDATE SET last = sequences.last + 1 RETURNING last";

/// Opens a transaction whose commit does not wait for the disk.
const BEGIN_UNFLUSHED: &str = "BEGIN; SET LOCAL synchronous_commit TO off";

/// A pooled connection with a transaction open on it. Dropped before [`InTransaction::end`]
/// succeeded (a cancelled or failed flight), it leaves the pool and closes, which rolls the
/// transaction back: no connection returns to the pool inside a transaction.
struct InTransaction(Option<deadpool_postgres::Object>);

impl InTransaction {
    fn client(&self) -> &tokio_postgres::Client {
        self.0.as_ref().expect("open until ended")
    }

    /// Sends `sql` (`COMMIT` or `ROLLBACK`) and gives the connection back to the pool.
    async fn end(self, sql: &str) -> Result<(), tokio_postgres::Error> {
        self.client().batch_execute(sql).await?;
        self.ended();
        Ok(())
    }

    /// The flight itself ended the transaction: the connection goes back to the pool.
    fn ended(mut self) {
        self.0.take();
    }
}

impl Drop for InTransaction {
    fn drop(&mut self) {
        if let Some(object) = self.0.take() {
            drop(deadpool_postgres::Object::take(object));
        }
    }
}

impl PostgresStore {
    /// Commits `txn` if nothing it read has changed: its writes and outbox rows land together
    /// or not at all; on disk when this returns if `durable`, else at the next
    /// [`PostgresStore::flush`] (or any later commit that waits for the disk).
    ///
    /// One READ COMMITTED transaction, `BEGIN` and all sent as one flight: take the locks of
    /// what it read and writes ([`locks`], in one global order, so commits never deadlock),
    /// re-read (each statement sees every commit that released those locks), write, insert the
    /// outbox rows; then commit if the re-reads match, roll back if not. Two commits wait for
    /// each other only when one writes what the other read or wrote (or lists), so unrelated
    /// commits never abort each other (SERIALIZABLE's predicate locks cover whole index pages,
    /// so keys side by side would).
    pub(super) async fn land(&self, txn: Txn, durable: bool) -> Result<(), CommitError> {
        if txn.is_empty() {
            // Read only: nothing to lock, check or write (as on redb).
            return Ok(());
        }
        let client = self.client().await?;
        // Prepared (once per connection) before the flight, which must go out in order.
        let statements = [LOCK, GET, LIST, UPSERT, DELETE, SEND];
        let prepared = try_join_all(statements.map(|sql| client.prepare_cached(sql)))
            .await
            .map_err(conflict_or_storage)?;
        let [lock, get, list_stmt, upsert, delete, send]: [_; 6] =
            prepared.try_into().expect("one per statement");
        let service = &*txn.service;
        let (ids, exclusive) = locks(&txn);
        let mut encoded = Vec::with_capacity(txn.outbox.len());
        for m in &txn.outbox {
            encoded.push((
                partition(m),
                postcard::to_allocvec(m).map_err(anyhow::Error::from)?,
            ));
        }
        let open = InTransaction(Some(client));
        let tx = open.client();
        // tokio-postgres sends a statement when its future is first polled, and `join` polls
        // in argument order: `BEGIN` goes first, then the locks, and the server runs what
        // follows after them.
        let begin = tx.batch_execute(if durable { "BEGIN" } else { BEGIN_UNFLUSHED });
        let lock_params: [&(dyn ToSql + Sync); 3] = [&ids.0, &ids.1, &exclusive];
        let locked = tx.execute(&lock, &lock_params);
        let reads = try_join_all(txn.reads.iter().map(|(bucket, key, _)| {
            let get = &get;
            async move { tx.query_opt(get, &[&service, bucket, key]).await }
        }));
        let lists = try_join_all(txn.lists.iter().map(|(range, _)| {
            let stmt = &list_stmt;
            // One key more than were found is enough to see that the range changed.
            async move { list(tx, stmt, service, range, range.found.saturating_add(1)).await }
        }));
        let writes = try_join_all(txn.writes.iter().map(|((bucket, key), value)| {
            let (upsert, delete) = (&upsert, &delete);
            async move {
                match value {
                    Some(v) => tx.execute(upsert, &[&service, bucket, key, v]).await,
                    None => tx.execute(delete, &[&service, bucket, key]).await,
                }
            }
        }));
        let sends = try_join_all(encoded.iter().map(|(part, bytes)| {
            let send = &send;
            async move { tx.execute(send, &[part, bytes]).await }
        }));
        let (begun, (locked, ((reads, lists), (writes, sends)))) = join(
            begin,
            join(locked, join(join(reads, lists), join(writes, sends))),
        )
        .await;
        begun.map_err(conflict_or_storage)?;
        let outcome = locked
            .and(writes)
            .and(sends)
            .and_then(|_| Ok((reads?, lists?)));
        let (reads, lists) = match outcome {
            Ok(found) => found,
            Err(e) => {
                open.end("ROLLBACK").await.map_err(conflict_or_storage)?;
                return Err(conflict_or_storage(e));
            }
        };
        let changed = txn.reads.iter().zip(&reads).any(|((_, _, seen), row)| {
            row.as_ref().map(|r| digest_of(r.get::<_, &[u8]>(0))) != *seen
        }) || txn
            .lists
            .iter()
            .zip(&lists)
            .any(|((_, seen), keys)| digest_keys(keys) != *seen);
        if changed {
            open.end("ROLLBACK").await.map_err(conflict_or_storage)?;
            return Err(CommitError::Conflict);
        }
        open.end("COMMIT").await.map_err(conflict_or_storage)?;
        if !encoded.is_empty() {
            // Every host's relay is told after the commit, not in it: a NOTIFY in the
            // transaction takes a cluster-wide lock at commit, so every commit with events
            // would wait for the one before it, advisory locks held.
            self.rows_committed.notify_one();
        }
        txn.committed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// The next id of `bucket/key`: a transaction of its own, outside any invocation's
    /// commit, so ids never repeat across hosts and never make invocations conflict (an id
    /// taken by an invocation that then fails is skipped). Sent as one flight, and not
    /// waiting for the disk (see the module's comment).
    pub(super) async fn take_id(
        &self,
        txn: &mut Txn,
        bucket: String,
        key: String,
    ) -> Result<u64, NextIdError> {
        txn.budget
            .charge(bucket.len() + key.len() + ENTRY_OVERHEAD)
            .map_err(|e| NextIdError::Storage(e.into()))?;
        let storage = |e: tokio_postgres::Error| NextIdError::Storage(e.into());
        let client = self.client().await.map_err(NextIdError::Storage)?;
        let stmt = client.prepare_cached(NEXT_ID).await.map_err(storage)?;
        let open = InTransaction(Some(client));
        let tx = open.client();
        let (begun, row, committed) = join3(
            tx.batch_execute(BEGIN_UNFLUSHED),
            tx.query_one(&stmt, &[&&*txn.service, &bucket, &key]),
            tx.batch_execute("COMMIT"),
        )
        .await;
        begun.and(committed).map_err(storage)?;
        // Ended either way: after a failed statement, `COMMIT` rolls back.
        open.ended();
        let last: i64 = row.map_err(storage)?.get(0);
        u64::try_from(last).map_err(|_| NextIdError::NotASequence("sequence exhausted".into()))
    }

    /// Returns once every transaction committed before the call is on disk: commits a write
    /// and waits for its flush. (A transaction that writes nothing, even one holding a
    /// transaction id, commits without waiting for the disk.)
    pub(super) async fn flush(&self) -> anyhow::Result<()> {
        let client = self.client().await?;
        client
            .batch_execute("UPDATE flushes SET count = count + 1")
            .await
            .context("waiting for PostgreSQL's disk")
    }
}
