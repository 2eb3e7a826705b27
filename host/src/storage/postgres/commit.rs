//! Invocations' commits and ids on PostgreSQL: a commit alone is one statement (a call of a
//! function the schema defines, [`FUNCTIONS`]) in its own transaction; a group of commits is
//! one transaction of such calls, pipelined; the ids of callers waiting together, one statement.
//!
//! Only what an acknowledgement depends on waits for the disk: a commit does; an id and a
//! message handler's applied writes are committed without waiting for their WAL flush
//! (`synchronous_commit` off for their transaction). That is safe because the WAL is one
//! ordered log: a later commit that waits for its flush makes every earlier record durable
//! with it. An id's record precedes the commit of the invocation that took it, so no durable
//! commit ever holds an id that a crash could hand out again; applied writes are made durable
//! by [`PostgresStore::flush`] before the consumer acknowledges their records.

use super::connection::Session;
use super::group::{Lands, Outcome};
use super::ids;
use super::locks::locks;
use super::{conflict_or_storage, list_start, partition, prefix_end, sql_limit, PostgresStore};
use crate::storage::txn::Txn;
use crate::storage::{CommitError, NextIdError};
use crate::types::budget::ENTRY_OVERHEAD;
use anyhow::Context as _;
use async_trait::async_trait;
use deadpool_postgres::Pool;
use futures_util::future::{join, join_all};
use tokio_postgres::types::ToSql;

/// The functions commits and ids call, created with the tables.
///
/// `microsvc_commit` takes the advisory locks given: waiting for them in the order given
/// (`p_wait`: a commit alone; one global order, so commits never deadlock), or only trying
/// them (a commit of a group: `busy` if another transaction holds one). Then it checks what
/// the invocation read: each value (by its SHA-256, NULL for absent) and each listed range
/// (the SHA-256 of its keys, each prefixed by its length as a big-endian u64, reading one key
/// more than were found). Under READ COMMITTED each statement of a function sees every commit
/// that released those locks. A change is a `conflict`, with nothing written; else it writes
/// (a NULL value deletes), inserts the outbox rows in order, and has `landed`.
///
/// Every read and delete of a key goes through the primary key (a subquery or a statement per
/// key, never a join of `kv` with the arrays): a plan the function caches while `kv` is small
/// would otherwise keep scanning the whole table as it grows.
pub(super) const FUNCTIONS: &str = r#"
CREATE OR REPLACE FUNCTION microsvc_commit(
    p_service text, p_durable boolean, p_wait boolean,
    p_lock1 int4[], p_lock2 int4[], p_exclusive boolean[],
    p_read_buckets text[], p_read_keys text[], p_read_seen bytea[],
    p_list_buckets text[], p_list_starts text[], p_list_prefixes text[], p_list_afters text[],
    p_list_uptos text[], p_list_ends text[], p_list_limits int8[], p_list_seen bytea[],
    p_write_buckets text[], p_write_keys text[], p_write_values bytea[],
    p_parts int4[], p_messages bytea[]
) RETURNS text LANGUAGE plpgsql AS $fn$
BEGIN
    IF NOT p_durable THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    IF p_wait THEN
        PERFORM CASE WHEN x THEN pg_advisory_xact_lock(k1, k2) ELSE pg_advisory_xact_lock_shared(k1, k2) END
            FROM unnest(p_lock1, p_lock2, p_exclusive) WITH ORDINALITY AS t(k1, k2, x, n) ORDER BY n;
    ELSIF EXISTS (
        SELECT 1 FROM unnest(p_lock1, p_lock2, p_exclusive) AS t(k1, k2, x)
        WHERE NOT CASE WHEN x THEN pg_try_advisory_xact_lock(k1, k2)
            ELSE pg_try_advisory_xact_lock_shared(k1, k2) END
    ) THEN
        RETURN 'busy';
    END IF;
    IF EXISTS (
        SELECT 1 FROM unnest(p_read_buckets, p_read_keys, p_read_seen) AS r(b, k, seen)
        WHERE sha256((SELECT value FROM kv
            WHERE kv.service = p_service AND kv.bucket = r.b AND kv.key = r.k)) IS DISTINCT FROM r.seen
    ) THEN
        RETURN 'conflict';
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
            RETURN 'conflict';
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
    RETURN 'landed';
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
     $13, $14, $15, $16, $17, $18, $19, $20, $21, $22)";
/// The last of `$4` ids reserved at once.
const NEXT_ID: &str = "SELECT microsvc_next_id($1, $2, $3, $4)";

/// One invocation's commit as the functions take it: its locks, what it read, what it writes.
pub(super) struct Prepared {
    service: String,
    durable: bool,
    lock1: Vec<i32>,
    lock2: Vec<i32>,
    exclusive: Vec<bool>,
    read_buckets: Vec<String>,
    read_keys: Vec<String>,
    read_seen: Vec<Option<Vec<u8>>>,
    list_buckets: Vec<String>,
    list_starts: Vec<String>,
    list_prefixes: Vec<String>,
    list_afters: Vec<Option<String>>,
    list_uptos: Vec<Option<String>>,
    list_ends: Vec<Option<String>>,
    list_limits: Vec<i64>,
    list_seen: Vec<Vec<u8>>,
    write_buckets: Vec<String>,
    write_keys: Vec<String>,
    write_values: Vec<Option<Vec<u8>>>,
    parts: Vec<i32>,
    messages: Vec<Vec<u8>>,
}

impl Prepared {
    fn new(txn: &Txn, durable: bool) -> Result<Prepared, CommitError> {
        let ((lock1, lock2), exclusive) = locks(txn);
        let (reads, lists, writes) = (&txn.reads, &txn.lists, &txn.writes);
        let mut parts = Vec::with_capacity(txn.outbox.len());
        let mut messages = Vec::with_capacity(txn.outbox.len());
        for m in &txn.outbox {
            parts.push(partition(m));
            messages.push(postcard::to_allocvec(m).map_err(anyhow::Error::from)?);
        }
        Ok(Prepared {
            service: txn.service.to_string(),
            durable,
            lock1,
            lock2,
            exclusive,
            read_buckets: reads.iter().map(|(b, _, _)| b.to_string()).collect(),
            read_keys: reads.iter().map(|(_, k, _)| k.to_string()).collect(),
            read_seen: (reads.iter())
                .map(|(_, _, seen)| seen.as_ref().map(|d| d.to_vec()))
                .collect(),
            list_buckets: lists.iter().map(|(r, _)| r.bucket.to_string()).collect(),
            list_starts: (lists.iter())
                .map(|(r, _)| list_start(r).to_owned())
                .collect(),
            list_prefixes: lists.iter().map(|(r, _)| r.prefix.to_string()).collect(),
            list_afters: lists.iter().map(|(r, _)| r.after.clone()).collect(),
            list_uptos: lists.iter().map(|(r, _)| r.upto.clone()).collect(),
            list_ends: lists.iter().map(|(r, _)| prefix_end(&r.prefix)).collect(),
            // One key more than were found is enough to see that the range changed.
            list_limits: (lists.iter())
                .map(|(r, _)| sql_limit(r.found.saturating_add(1)))
                .collect(),
            list_seen: lists.iter().map(|(_, seen)| seen.to_vec()).collect(),
            write_buckets: writes.keys().map(|(b, _)| b.to_string()).collect(),
            write_keys: writes.keys().map(|(_, k)| k.to_string()).collect(),
            write_values: writes.values().cloned().collect(),
            parts,
            messages,
        })
    }

    /// The parameters of [`COMMIT`]: waiting for the disk or not, waiting for the locks or
    /// only trying them.
    fn params(&self, durable: bool, wait: bool) -> [&(dyn ToSql + Sync); 22] {
        let flag = |on: bool| -> &'static bool {
            if on {
                &true
            } else {
                &false
            }
        };
        [
            &self.service,
            flag(durable),
            flag(wait),
            &self.lock1,
            &self.lock2,
            &self.exclusive,
            &self.read_buckets,
            &self.read_keys,
            &self.read_seen,
            &self.list_buckets,
            &self.list_starts,
            &self.list_prefixes,
            &self.list_afters,
            &self.list_uptos,
            &self.list_ends,
            &self.list_limits,
            &self.list_seen,
            &self.write_buckets,
            &self.write_keys,
            &self.write_values,
            &self.parts,
            &self.messages,
        ]
    }
}

/// Commits on the store's pool, alone or in groups ([`group`](super::group)).
pub(super) struct Committer {
    pub(super) pool: Pool,
}

#[async_trait]
impl Lands for Committer {
    type Commit = Prepared;

    fn locks(commit: &Prepared) -> usize {
        commit.exclusive.len()
    }

    async fn alone(&self, commit: &Prepared) -> Result<(), CommitError> {
        let client = super::client(&self.pool).await?;
        let statement = (client.prepare_cached(COMMIT).await).map_err(conflict_or_storage)?;
        let row = (client.query_one(&statement, &commit.params(commit.durable, true))).await;
        match outcome(row.map_err(conflict_or_storage)?) {
            Outcome::Landed => Ok(()),
            Outcome::Conflict => Err(CommitError::Conflict),
            Outcome::Alone => {
                Err(anyhow::anyhow!("a commit that waits for its locks was busy").into())
            }
        }
    }

    /// `BEGIN` and every commit's statement go out at once (pipelined on one connection),
    /// then `COMMIT`: two round trips and one wait for the disk for the whole group, which
    /// waits if any of its commits does. One commit is one statement.
    async fn together(&self, commits: &[Prepared]) -> Result<Vec<Outcome>, CommitError> {
        let session = Session::new(super::client(&self.pool).await?);
        let statement = (session.prepare_cached(COMMIT).await).map_err(conflict_or_storage)?;
        let durable = commits.iter().any(|c| c.durable);
        let params: Vec<_> = commits.iter().map(|c| c.params(durable, false)).collect();
        if let [one] = &params[..] {
            let row = session.query_one(&statement, one).await;
            // Its own transaction, ended whatever the statement did.
            session.ended();
            return row
                .map(|row| vec![outcome(row)])
                .map_err(conflict_or_storage);
        }
        let tries = params.iter().map(|p| session.query_one(&statement, p));
        // `join` polls in order: each request is sent at its first poll, `BEGIN` first.
        let (began, tried) = join(session.batch_execute(BEGIN), join_all(tries)).await;
        let outcomes: Result<Vec<_>, _> =
            began.and_then(|()| tried.into_iter().map(|r| r.map(outcome)).collect());
        let ended = match outcomes {
            Ok(outcomes) => session.batch_execute("COMMIT").await.map(|()| outcomes),
            // The server refused a statement (a key it cannot store, a timeout): nothing
            // landed, and each commit finds its own outcome alone.
            Err(e) if e.as_db_error().is_some() => (session.batch_execute("ROLLBACK").await)
                .map(|()| vec![Outcome::Alone; commits.len()]),
            Err(e) => Err(e),
        };
        let outcomes = ended.map_err(conflict_or_storage)?;
        session.ended();
        Ok(outcomes)
    }
}

/// A group's transaction, pinned: each statement of a function sees what committed before it.
const BEGIN: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";

/// What `microsvc_commit` answered.
fn outcome(row: tokio_postgres::Row) -> Outcome {
    match row.get::<_, &str>(0) {
        "landed" => Outcome::Landed,
        "conflict" => Outcome::Conflict,
        _ => Outcome::Alone,
    }
}

impl PostgresStore {
    /// Commits `txn` if nothing it read has changed: its writes and outbox rows land together
    /// or not at all; on disk when this returns if `durable`, else at the next
    /// [`PostgresStore::flush`] (or any later commit that waits for the disk).
    ///
    /// In a READ COMMITTED transaction, alone or with the commits waiting with it (see
    /// [`FUNCTIONS`]). Two commits wait for each other only when one writes what the other
    /// read or wrote (or lists), so unrelated commits never abort each other (SERIALIZABLE's
    /// predicate locks cover whole index pages, so keys side by side would).
    pub(super) async fn land(&self, txn: Txn, durable: bool) -> Result<(), CommitError> {
        if txn.is_empty() {
            // Read only: nothing to lock, check or write (as on redb).
            return Ok(());
        }
        let commit = Prepared::new(&txn, durable)?;
        let sends = !commit.messages.is_empty();
        self.commits.commit(commit).await?;
        if sends {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres_server::Postgres;
    use crate::storage::postgres::locks::lock_id;
    use crate::storage::{Outbox as _, StateStore as _};
    use crate::types::Message;
    use std::time::{Duration, Instant};

    async fn session(url: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    }

    async fn xid(probe: &tokio_postgres::Client) -> i64 {
        let row = probe.query_one("SELECT txid_current()", &[]).await;
        row.unwrap().get(0)
    }

    /// A commit of `svc` that read `read` (absent) and writes `write`.
    async fn commit(db: &PostgresStore, read: Option<&str>, write: &str) -> Prepared {
        let mut txn = Txn::new("svc".into());
        if let Some(key) = read {
            assert_eq!(txn.get(db, "b", key).await.unwrap(), None);
        }
        txn.put("b".into(), write.into(), Some(write.as_bytes().to_vec()))
            .unwrap();
        let message = Message {
            topic: "t".into(),
            key: Some(write.into()),
            payload: vec![],
            headers: vec![],
        };
        txn.send(message).unwrap();
        Prepared::new(&txn, true).unwrap()
    }

    /// One group is one server transaction. In it a commit whose lock another session holds
    /// goes alone at once (not waited for), a commit that read what an earlier one of the group
    /// wrote conflicts, and the rest land; a statement the server refuses rolls the group back,
    /// and each of its commits then finds its own outcome alone.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_group_is_one_transaction_that_never_waits_for_a_lock() {
        let server = Postgres::start().expect("a PostgreSQL server for the tests");
        let url = server.create_database("group").unwrap();
        // A database whose sessions default to a snapshot per transaction: the store's own
        // sessions still take one per statement.
        let setup = session(&url).await;
        (setup.batch_execute(
            "ALTER DATABASE \"group\" SET default_transaction_isolation TO 'repeatable read'",
        ))
        .await
        .unwrap();
        let wait = Duration::from_secs(5);
        let db = PostgresStore::connect(&url, wait, None, 2).await.unwrap();
        let isolation = (db.client().await.unwrap())
            .query_one("SHOW transaction_isolation", &[])
            .await
            .unwrap();
        assert_eq!(isolation.get::<_, &str>(0), "read committed");
        let committer = Committer {
            pool: db.pool.clone(),
        };
        let (holder, probe) = (session(&url).await, session(&url).await);
        let (k1, k2) = lock_id("svc", "b", Some("held"));
        holder.batch_execute("BEGIN").await.unwrap();
        (holder.execute("SELECT pg_advisory_xact_lock($1, $2)", &[&k1, &k2]))
            .await
            .unwrap();

        let group = [
            commit(&db, Some("x"), "x").await,
            commit(&db, Some("x"), "x").await,
            commit(&db, None, "held").await,
            commit(&db, None, "y").await,
        ];
        let (before, began) = (xid(&probe).await, Instant::now());
        let outcomes = committer.together(&group).await.unwrap();
        let used = xid(&probe).await - before - 1;
        use Outcome::*;
        assert_eq!(outcomes, [Landed, Conflict, Alone, Landed]);
        assert!(began.elapsed() < wait, "the group waited for the held lock");
        assert_eq!(used, 1, "one group, {used} transactions");
        let value = |key: &'static str| {
            let db = &db;
            async move { db.read_value("svc", "b", key).await.unwrap() }
        };
        assert_eq!(value("x").await.as_deref(), Some(&b"x"[..]));
        assert_eq!(value("y").await.as_deref(), Some(&b"y"[..]));
        assert_eq!(value("held").await, None);
        assert_eq!(db.oldest(10).await.unwrap().len(), 2);

        // Alone in its group, the same: told at once.
        assert_eq!(committer.together(&group[2..3]).await.unwrap(), [Alone]);
        assert!(
            began.elapsed() < wait,
            "a group of one waited for the held lock"
        );

        // A key PostgreSQL refuses (text holds no NUL): nothing of its group lands, and alone
        // only that commit fails.
        let failing = [
            commit(&db, None, "z").await,
            commit(&db, None, "nul\0").await,
        ];
        assert_eq!(committer.together(&failing).await.unwrap(), [Alone, Alone]);
        assert_eq!(value("z").await, None);
        committer.alone(&failing[0]).await.unwrap();
        let refused = committer.alone(&failing[1]).await;
        assert!(
            matches!(refused, Err(CommitError::Storage(_))),
            "{refused:?}"
        );
        assert_eq!(value("z").await.as_deref(), Some(&b"z"[..]));
        let after = [commit(&db, None, "v").await, commit(&db, None, "w").await];
        assert_eq!(committer.together(&after).await.unwrap(), [Landed, Landed]);

        // The busy commit, alone, waits for its lock and lands once the holder is done.
        let alone = committer.alone(&group[2]);
        let release = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            holder.batch_execute("COMMIT").await.unwrap();
        };
        let (landed, ()) = tokio::join!(alone, release);
        landed.unwrap();
        assert_eq!(value("held").await.as_deref(), Some(&b"held"[..]));
    }

    /// Commits made at once through one store share transactions and all land.
    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_commits_share_transactions() {
        let server = Postgres::start().expect("a PostgreSQL server for the tests");
        let url = server.create_database("groups").unwrap();
        let db = std::sync::Arc::new(
            PostgresStore::connect(&url, Duration::from_secs(5), None, 8)
                .await
                .unwrap(),
        );
        let probe = session(&url).await;
        let before = xid(&probe).await;
        let commits = (0..60).map(|i| {
            let db = db.clone();
            async move {
                let mut txn = Txn::new("svc".into());
                txn.put("b".into(), format!("k{i}"), Some(vec![1])).unwrap();
                db.commit(txn).await
            }
        });
        let results = futures_util::future::join_all(commits).await;
        let used = xid(&probe).await - before - 1;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        let bucket = crate::storage::KeyRange {
            bucket: "b".into(),
            ..Default::default()
        };
        let keys = db.read_keys("svc", &bucket, 100).await.unwrap();
        assert_eq!(keys.len(), 60);
        assert!(used <= 20, "60 commits took {used} transactions");
    }
}
