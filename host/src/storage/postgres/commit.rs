//! Invocations' commits and ids on PostgreSQL, each one statement: a call of a function the
//! schema defines ([`FUNCTIONS`]), its own transaction, one round trip.
//!
//! Only what an acknowledgement depends on waits for the disk: a commit does; an id and a
//! message handler's applied writes are committed without waiting for their WAL flush
//! (`synchronous_commit` off for their transaction). That is safe because the WAL is one
//! ordered log: a later commit that waits for its flush makes every earlier record durable
//! with it. An id's record precedes the commit of the invocation that took it, so no durable
//! commit ever holds an id that a crash could hand out again; applied writes are made durable
//! by [`PostgresStore::flush`] before the consumer acknowledges their records.

use super::ids;
use super::locks::locks;
use super::{conflict_or_storage, list_start, partition, prefix_end, sql_limit, PostgresStore};
use crate::storage::txn::Txn;
use crate::storage::{CommitError, NextIdError};
use crate::types::budget::ENTRY_OVERHEAD;
use anyhow::Context as _;
use tokio_postgres::types::ToSql;

/// The functions commits and ids call, created with the tables.
///
/// `microsvc_commit` takes the advisory locks given (in the order given: one global order, so
/// commits never deadlock), then checks what the invocation read: each value (by its SHA-256,
/// NULL for absent) and each listed range (the SHA-256 of its keys, each prefixed by its
/// length as a big-endian u64, reading one key more than were found). Under READ COMMITTED
/// each statement of a function sees every commit that released those locks. A change raises
/// `serialization_failure` (the statement's transaction rolls back: a conflict); else it
/// writes (a NULL value deletes) and inserts the outbox rows in order.
///
/// Every read and delete of a key goes through the primary key (a subquery or a statement per
/// key, never a join of `kv` with the arrays): a plan the function caches while `kv` is small
/// would otherwise keep scanning the whole table as it grows.
pub(super) const FUNCTIONS: &str = r#"
CREATE OR REPLACE FUNCTION microsvc_commit(
    p_service text, p_durable boolean,
    p_lock1 int4[], p_lock2 int4[], p_exclusive boolean[],
    p_read_buckets text[], p_read_keys text[], p_read_seen bytea[],
    p_list_buckets text[], p_list_starts text[], p_list_prefixes text[], p_list_afters text[],
    p_list_uptos text[], p_list_ends text[], p_list_limits int8[], p_list_seen bytea[],
    p_write_buckets text[], p_write_keys text[], p_write_values bytea[],
    p_parts int4[], p_messages bytea[]
) RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
    IF NOT p_durable THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    PERFORM CASE WHEN x THEN pg_advisory_xact_lock(k1, k2) ELSE pg_advisory_xact_lock_shared(k1, k2) END
        FROM unnest(p_lock1, p_lock2, p_exclusive) WITH ORDINALITY AS t(k1, k2, x, n) ORDER BY n;
    IF EXISTS (
        SELECT 1 FROM unnest(p_read_buckets, p_read_keys, p_read_seen) AS r(b, k, seen)
        WHERE sha256((SELECT value FROM kv
            WHERE kv.service = p_service AND kv.bucket = r.b AND kv.key = r.k)) IS DISTINCT FROM r.seen
    ) THEN
        RAISE EXCEPTION 'a value the invocation read has changed' USING ERRCODE = 'serialization_failure';
    END IF;
    FOR i IN 1 .. coalesce(array_length(p_list_buckets, 1), 0) LOOP
        IF (
            SELECT sha256(coalesce(string_agg(int8send(octet_length(b)) || b, ''::bytea ORDER BY key), ''::bytea))
            FROM (
                SELECT key, convert_to(key, 'UTF8') AS b FROM kv
                WHERE service = p_service AND bucket = p_list_buckets[i] AND key >= p_list_starts[i]
                    AND starts_with(key, p_list_prefixes[i])
                    AND (p_list_afters[i] IS NULL OR key > p_list_afters[i])
                    AND (p_list_uptos[i] IS NULL OR key <= p_list_uptos[i])
                    AND (p_list_ends[i] IS NULL OR key < p_list_ends[i])
                ORDER BY key LIMIT p_list_limits[i]
            ) AS listed
        ) IS DISTINCT FROM p_list_seen[i] THEN
            RAISE EXCEPTION 'a range the invocation listed has changed' USING ERRCODE = 'serialization_failure';
        END IF;
    END LOOP;
    FOR i IN 1 .. coalesce(array_length(p_write_keys, 1), 0) LOOP
        IF p_write_values[i] IS NULL THEN
            DELETE FROM kv WHERE service = p_service AND bucket = p_write_buckets[i] AND key = p_write_keys[i];
        END IF;
    END LOOP;
    INSERT INTO kv (service, bucket, key, value)
        SELECT p_service, w.b, w.k, w.v FROM unnest(p_write_buckets, p_write_keys, p_write_values) AS w(b, k, v)
        WHERE w.v IS NOT NULL
        ON CONFLICT (service, bucket, key) DO UPDATE SET value = excluded.value;
    INSERT INTO outbox (part, message)
        SELECT part, message FROM unnest(p_parts, p_messages) WITH ORDINALITY AS o(part, message, n)
        ORDER BY n;
END
$fn$;
CREATE OR REPLACE FUNCTION microsvc_next_id(p_service text, p_bucket text, p_key text, p_count int8)
RETURNS bigint LANGUAGE plpgsql AS $fn$
DECLARE
    taken bigint;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    INSERT INTO sequences (service, bucket, key, last) VALUES (p_service, p_bucket, p_key, p_count)
        ON CONFLICT (service, bucket, key) DO UPDATE SET last = sequences.last + p_count
        RETURNING last INTO taken;
    RETURN taken;
END
$fn$;
"#;

const COMMIT: &str = "SELECT microsvc_commit($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, \
     $13, $14, $15, $16, $17, $18, $19, $20, $21)";
/// The last of `$4` ids reserved at once.
const NEXT_ID: &str = "SELECT microsvc_next_id($1, $2, $3, $4)";

impl PostgresStore {
    /// Commits `txn` if nothing it read has changed: its writes and outbox rows land together
    /// or not at all; on disk when this returns if `durable`, else at the next
    /// [`PostgresStore::flush`] (or any later commit that waits for the disk).
    ///
    /// One statement in a READ COMMITTED transaction of its own (see [`FUNCTIONS`]). Two
    /// commits wait for each other only when one writes what the other read or wrote (or
    /// lists), so unrelated commits never abort each other (SERIALIZABLE's predicate locks
    /// cover whole index pages, so keys side by side would).
    pub(super) async fn land(&self, txn: Txn, durable: bool) -> Result<(), CommitError> {
        if txn.is_empty() {
            // Read only: nothing to lock, check or write (as on redb).
            return Ok(());
        }
        let ((lock1, lock2), exclusive) = locks(&txn);
        let reads = &txn.reads;
        let read_buckets: Vec<String> = reads.iter().map(|(b, _, _)| b.to_string()).collect();
        let read_keys: Vec<String> = reads.iter().map(|(_, k, _)| k.to_string()).collect();
        let read_seen: Vec<Option<Vec<u8>>> = (reads.iter())
            .map(|(_, _, seen)| seen.as_ref().map(|d| d.to_vec()))
            .collect();
        let lists = &txn.lists;
        let list_buckets: Vec<String> = lists.iter().map(|(r, _)| r.bucket.to_string()).collect();
        let list_starts: Vec<String> = lists
            .iter()
            .map(|(r, _)| list_start(r).to_owned())
            .collect();
        let list_prefixes: Vec<String> = lists.iter().map(|(r, _)| r.prefix.to_string()).collect();
        let list_afters: Vec<Option<String>> = lists.iter().map(|(r, _)| r.after.clone()).collect();
        let list_uptos: Vec<Option<String>> = lists.iter().map(|(r, _)| r.upto.clone()).collect();
        let list_ends: Vec<Option<String>> =
            lists.iter().map(|(r, _)| prefix_end(&r.prefix)).collect();
        // One key more than were found is enough to see that the range changed.
        let list_limits: Vec<i64> = (lists.iter())
            .map(|(r, _)| sql_limit(r.found.saturating_add(1)))
            .collect();
        let list_seen: Vec<Vec<u8>> = lists.iter().map(|(_, seen)| seen.to_vec()).collect();
        let writes = &txn.writes;
        let write_buckets: Vec<String> = writes.keys().map(|(b, _)| b.to_string()).collect();
        let write_keys: Vec<String> = writes.keys().map(|(_, k)| k.to_string()).collect();
        let write_values: Vec<Option<Vec<u8>>> = writes.values().cloned().collect();
        let mut parts = Vec::with_capacity(txn.outbox.len());
        let mut messages = Vec::with_capacity(txn.outbox.len());
        for m in &txn.outbox {
            parts.push(partition(m));
            messages.push(postcard::to_allocvec(m).map_err(anyhow::Error::from)?);
        }
        let service: &str = &txn.service;
        let params: [&(dyn ToSql + Sync); 21] = [
            &service,
            &durable,
            &lock1,
            &lock2,
            &exclusive,
            &read_buckets,
            &read_keys,
            &read_seen,
            &list_buckets,
            &list_starts,
            &list_prefixes,
            &list_afters,
            &list_uptos,
            &list_ends,
            &list_limits,
            &list_seen,
            &write_buckets,
            &write_keys,
            &write_values,
            &parts,
            &messages,
        ];
        let client = self.client().await?;
        let commit = client
            .prepare_cached(COMMIT)
            .await
            .map_err(conflict_or_storage)?;
        client
            .execute(&commit, &params)
            .await
            .map_err(conflict_or_storage)?;
        if !messages.is_empty() {
            // Every host's relay is told after the commit, not in it: a NOTIFY in the
            // transaction takes a cluster-wide lock at commit, so every commit with events
            // would wait for the one before it, advisory locks held.
            self.rows_committed.notify_one();
        }
        txn.committed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// The next id of `bucket/key`: taken in a transaction of its own, outside any
    /// invocation's commit, so ids never repeat across hosts and never make invocations
    /// conflict (an id taken by an invocation that then fails is skipped). Callers waiting
    /// together share one statement ([`ids`](super::ids)), which does not wait for the disk
    /// (see the module's comment).
    pub(super) async fn take_id(
        &self,
        txn: &mut Txn,
        bucket: String,
        key: String,
    ) -> Result<u64, NextIdError> {
        txn.budget
            .charge(bucket.len() + key.len() + ENTRY_OVERHEAD)
            .map_err(|e| NextIdError::Storage(e.into()))?;
        let pool = self.pool.clone();
        let take = move |(service, bucket, key): ids::Sequence, count: u64| {
            let pool = pool.clone();
            async move {
                let client = super::client(&pool).await?;
                let stmt = client.prepare_cached(NEXT_ID).await?;
                let count = i64::try_from(count)?;
                let row = (client.query_one(&stmt, &[&&*service, &bucket, &key, &count])).await?;
                let last: i64 = row.get(0);
                u64::try_from(last).context("sequence exhausted")
            }
        };
        let sequence = (txn.service.clone(), bucket, key);
        (self.ids.next(sequence, take).await)
            .map_err(|e| NextIdError::Storage(anyhow::anyhow!("{e:#}")))
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
