//! State, id sequences and the outbox on PostgreSQL (`STATE_URL`): one database that every
//! host using it shares.
//!
//! An invocation never holds a database transaction while its guest runs: its reads are single
//! statements, and its commit is one short transaction that locks what the invocation read and
//! writes (transaction-scoped advisory locks on keys and buckets), re-reads it (values, keys
//! read as absent, listed ranges), compares digests, writes, and inserts its outbox rows. A
//! change is a conflict, which re-runs the invocation as a conflict on redb does. Without the
//! locks, two commits that each insert a key the other read as absent would both land (write
//! skew) under READ COMMITTED; SERIALIZABLE prevents that too, but aborts unrelated commits
//! whose keys share an index page.
//!
//! The outbox is split into [`PARTITIONS`] by message key. A host drains a partition while it
//! holds that partition's session advisory lock on its relay connection, so each key's events
//! are published in commit order by one host at a time; a host that dies drops its locks with
//! its connection, and another host takes its partitions over.

mod commit;
mod connection;
mod group;
mod ids;
mod locks;
mod relay;

use connection::{connection_config, tls, Session};
#[cfg(test)]
pub(super) use locks::lock_id;

use super::txn::Txn;
use super::{CommitError, KeyRange, NextIdError, Outbox, StateStore};
use crate::types::Message;
use anyhow::{Context as _, Result};
use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::error::SqlState;
use tokio_postgres_rustls::MakeRustlsConnect;

/// Outbox partitions: the most hosts that drain at once.
pub const PARTITIONS: i32 = 16;

/// Advisory lock keys of the outbox partitions are this plus the partition; the schema's
/// creation takes this one.
const LOCK_BASE: i64 = 0x6d69_6372_6f73_7600;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS kv (
    service text COLLATE "C" NOT NULL,
    bucket text COLLATE "C" NOT NULL,
    key text COLLATE "C" NOT NULL,
    value bytea NOT NULL,
    PRIMARY KEY (service, bucket, key)
);
CREATE TABLE IF NOT EXISTS sequences (
    service text NOT NULL,
    bucket text NOT NULL,
    key text NOT NULL,
    last bigint NOT NULL,
    PRIMARY KEY (service, bucket, key)
);
CREATE TABLE IF NOT EXISTS outbox (
    seq bigserial PRIMARY KEY,
    part integer NOT NULL,
    message bytea NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_by_part ON outbox (part, seq);
CREATE TABLE IF NOT EXISTS flushes (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    count bigint NOT NULL DEFAULT 0
);
INSERT INTO flushes DEFAULT VALUES ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS outbox_parked (
    seq bigserial PRIMARY KEY,
    reason text NOT NULL,
    message bytea NOT NULL
);
"#;

/// The shared store.
pub struct PostgresStore {
    pool: Pool,
    url: String,
    /// For the relay's own connection.
    tls: MakeRustlsConnect,
    /// How long a commit may wait for its locks.
    wait: Duration,
    relay: tokio::sync::Mutex<relay::Relay>,
    /// Outbox rows and bytes as last counted by the relay (for readiness, metrics and
    /// `OUTBOX_MAX`); counted at most once a second.
    depth: AtomicU64,
    bytes: AtomicU64,
    parked: AtomicU64,
    /// Rung when any host commits outbox rows (LISTEN on the relay connection).
    committed: Arc<tokio::sync::Notify>,
    /// Rung when this host committed outbox rows: the other hosts' relays are told.
    rows_committed: Arc<tokio::sync::Notify>,
    /// Callers of `next_id` waiting together, served by one statement per batch.
    ids: ids::IdBatches,
    /// Commits waiting together, landed in one transaction per group.
    commits: group::Group<commit::Committer>,
}

fn conflict_or_storage(e: tokio_postgres::Error) -> CommitError {
    let conflict = [
        SqlState::T_R_SERIALIZATION_FAILURE,
        SqlState::T_R_DEADLOCK_DETECTED,
        SqlState::UNIQUE_VIOLATION,
    ];
    match e.code() {
        Some(code) if conflict.contains(code) => CommitError::Conflict,
        _ => CommitError::Storage(anyhow::Error::new(e).context("PostgreSQL commit")),
    }
}

/// The outbox partition of a message: by key, so that one key's events stay in order.
fn partition(message: &Message) -> i32 {
    let digest = Sha256::digest(message.key.as_deref().unwrap_or_default().as_bytes());
    let n = u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]]);
    (n % PARTITIONS as u32) as i32
}

/// `LIMIT` for `limit` keys.
fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// Keys of `range` in `service`, in byte order, at most `limit`.
const LIST: &str = "SELECT key FROM kv WHERE service = $1 AND bucket = $2 AND key >= $3 \
     AND starts_with(key, $4) AND ($5::text IS NULL OR key > $5) \
     AND ($6::text IS NULL OR key <= $6) AND ($8::text IS NULL OR key < $8) \
     ORDER BY key LIMIT $7";
const GET: &str = "SELECT value FROM kv WHERE service = $1 AND bucket = $2 AND key = $3";

impl PostgresStore {
    /// Connects to `url` and creates the tables if they do not exist. A commit waits at most
    /// `wait` for the locks it needs (then fails as the store being unavailable). TLS as the
    /// URL's `sslmode` says, trusting also the authorities of `ca_file`. At most
    /// `connections` are open for reads, commits and ids; callers wait for one at most `wait`.
    pub async fn connect(
        url: &str,
        wait: Duration,
        ca_file: Option<&Path>,
        connections: usize,
    ) -> Result<PostgresStore> {
        let config = connection_config(url, wait)?;
        let tls = tls(ca_file)?;
        let manager = Manager::from_config(
            config,
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(connections)
            // Waiting for a connection is bounded like waiting for a lock: a request that
            // finds every connection busy still gets the store's 503 before its deadline.
            .wait_timeout(Some(wait))
            .create_timeout(Some(Duration::from_secs(5)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .context("PostgreSQL pool")?;
        let pg = PostgresStore {
            pool: pool.clone(),
            url: url.to_string(),
            tls,
            wait,
            relay: Default::default(),
            depth: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            parked: AtomicU64::new(0),
            committed: Arc::default(),
            rows_committed: Arc::default(),
            ids: Default::default(),
            commits: group::Group::new(commit::Committer { pool }, lanes(connections)),
        };
        tokio::spawn(notify_relays(pg.pool.clone(), pg.rows_committed.clone()));
        let mut client = pg.client().await?;
        let tx = client.transaction().await?;
        // Hosts starting together would race on CREATE ... IF NOT EXISTS.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_BASE])
            .await?;
        tx.batch_execute(SCHEMA).await?;
        tx.batch_execute(commit::FUNCTIONS).await?;
        tx.commit().await.context("creating the tables")?;
        Ok(pg)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        client(&self.pool).await
    }

    /// The server, for logs (no password).
    pub fn describe(&self) -> String {
        let config: Option<tokio_postgres::Config> = self.url.parse().ok();
        match config {
            Some(c) => format!(
                "postgresql ({:?}:{:?}/{})",
                c.get_hosts(),
                c.get_ports(),
                c.get_dbname().unwrap_or_default()
            ),
            None => "postgresql".into(),
        }
    }
}

#[async_trait]
impl StateStore for PostgresStore {
    async fn read_value(&self, service: &str, bucket: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(GET).await?;
        let row = client.query_opt(&stmt, &[&service, &bucket, &key]).await?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn read_keys(
        &self,
        service: &str,
        range: &KeyRange,
        limit: usize,
    ) -> Result<Vec<String>> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(LIST).await?;
        Ok(list(&**client, &stmt, service, range, limit).await?)
    }

    async fn next_id(
        &self,
        txn: &mut Txn,
        bucket: String,
        key: String,
    ) -> Result<u64, NextIdError> {
        self.take_id(txn, bucket, key).await
    }

    async fn apply(&self, txn: Txn) -> Result<(), CommitError> {
        self.land(txn, false).await
    }

    async fn commit(&self, txn: Txn) -> Result<(), CommitError> {
        self.land(txn, true).await
    }

    async fn durable(&self) -> Result<()> {
        self.flush().await
    }

    fn outbox(&self) -> &dyn Outbox {
        self
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // Ends `notify_relays`, which holds a handle on the pool.
        self.pool.close();
        self.rows_committed.notify_one();
    }
}

/// Sends `NOTIFY outbox` (outside any transaction) after commits that added outbox rows,
/// one for all those that came while the last was sent, until the pool is gone.
async fn notify_relays(pool: Pool, committed: Arc<tokio::sync::Notify>) {
    loop {
        committed.notified().await;
        if pool.is_closed() {
            return;
        }
        let sent = async {
            // A failed NOTIFY may leave its transaction open: the session is not pooled again.
            let session = Session::new(pool.get().await?);
            // A NOTIFY commits as a write does; nothing waits for its flush.
            (session.batch_execute(
                "BEGIN; SET LOCAL synchronous_commit TO off; NOTIFY outbox; COMMIT",
            ))
            .await?;
            session.ended();
            anyhow::Ok(())
        };
        if let Err(e) = sent.await {
            // The relays also look every second by themselves.
            tracing::debug!(error = %format!("{e:#}"), "NOTIFY outbox failed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Groups of commits in flight at once on `connections`: a quarter of them, so that reads and
/// ids find connections free, and commits that arrive while groups are in flight make the
/// next group large.
fn lanes(connections: usize) -> usize {
    (connections / 4).max(1)
}

/// A connection of `pool`, for work that outlives a borrow of the store.
async fn client(pool: &Pool) -> Result<deadpool_postgres::Object> {
    pool.get()
        .await
        .context("connecting to PostgreSQL (STATE_URL)")
}

/// The least string above every string that starts with `prefix`, in byte order (UTF-8 keeps
/// code point order): the scan of a prefix stops there. `None` for the empty prefix.
fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        if let Some(next) = (last as u32 + 1..=char::MAX as u32).find_map(char::from_u32) {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// The least key `range` may hold: the scan starts there.
fn list_start(range: &KeyRange) -> &str {
    match &range.after {
        Some(after) if after.as_str() > range.prefix.as_str() => after.as_str(),
        _ => range.prefix.as_str(),
    }
}

/// Keys of `range` through `client`, with `stmt` prepared from [`LIST`].
async fn list(
    client: &impl tokio_postgres::GenericClient,
    stmt: &tokio_postgres::Statement,
    service: &str,
    range: &KeyRange,
    limit: usize,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let start = list_start(range);
    let rows = client
        .query(
            stmt,
            &[
                &service,
                &range.bucket,
                &start,
                &range.prefix,
                &range.after,
                &range.upto,
                &sql_limit(limit),
                &prefix_end(&range.prefix),
            ],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

#[cfg(test)]
mod tests {
    use super::{prefix_end, PostgresStore};
    use crate::postgres_server::Postgres;
    use crate::storage::Outbox as _;
    use std::time::Duration;

    /// A certificate authority, and a certificate it signed for 127.0.0.1 with its key (PEM).
    fn authority_and_server() -> (String, String, String) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertifiedIssuer::self_signed(params, key).unwrap();
        let server_key = rcgen::KeyPair::generate().unwrap();
        let server = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&server_key, &ca)
            .unwrap();
        (ca.pem(), server.pem(), server_key.serialize_pem())
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn sslmode_require_uses_tls_on_every_connection_and_verifies_the_server() {
        let (ca, cert, key) = authority_and_server();
        let mut server = Postgres::start().expect("a PostgreSQL server for the tests");
        server.enable_ssl(&cert, &key).unwrap();
        let url = format!("{}?sslmode=require", server.create_database("tls").unwrap());
        let wait = Duration::from_secs(5);
        // Its authority is not one of the public ones: refused, saying why.
        let refused = PostgresStore::connect(&url, wait, None, 4)
            .await
            .err()
            .expect("an unverified server");
        assert!(
            format!("{refused:#}").contains("certificate"),
            "{refused:#}"
        );
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca).unwrap();
        let pg = PostgresStore::connect(&url, wait, Some(&ca_file), 4)
            .await
            .unwrap();
        // The relay connects on its first look at the outbox.
        assert!(pg.oldest(1).await.unwrap().is_empty());
        let client = pg.client().await.unwrap();
        let rows = client
            .query(
                "SELECT a.application_name, s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a \
                 USING (pid) WHERE a.datname = 'tls' AND a.backend_type = 'client backend'",
                &[],
            )
            .await
            .unwrap();
        let sessions: Vec<(String, bool)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        assert!(sessions.len() >= 2, "{sessions:?}");
        assert!(sessions.iter().all(|(_, ssl)| *ssl), "{sessions:?}");
        assert!(sessions
            .iter()
            .any(|(name, _)| name == "microsvc-outbox-relay"));
        // Not a file of certificates: a clear error, not a panic.
        std::fs::write(&ca_file, "not PEM").unwrap();
        let bad = PostgresStore::connect(&url, wait, Some(&ca_file), 4)
            .await
            .err()
            .unwrap();
        assert!(format!("{bad:#}").contains("STATE_CA_FILE"), "{bad:#}");
    }

    #[test]
    fn a_prefix_ends_below_every_key_after_its_own() {
        assert_eq!(prefix_end(""), None);
        assert_eq!(prefix_end("user:").as_deref(), Some("user;"));
        assert_eq!(prefix_end("a\u{D7FF}").as_deref(), Some("a\u{E000}"));
        assert_eq!(prefix_end("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_end("\u{10FFFF}"), None);
        let end = prefix_end("user:").unwrap();
        for key in ["user:", "user:1", "user:\u{10FFFF}\u{10FFFF}"] {
            assert!(key < end.as_str(), "{key}");
        }
        assert!("user;" >= end.as_str());
    }
}
