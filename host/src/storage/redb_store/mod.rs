//! State, id sequences and the outbox in redb, on this host's disk: the default store. It
//! also holds this host's own bookkeeping (the embedded message log, `messaging::embedded`).

mod committer;
mod outbox;
mod sequences;

use super::{CommitError, KeyRange, NextIdError, StateStore, Txn};
use anyhow::{Context as _, Result};
use async_trait::async_trait;
use redb::{Database, Durability, ReadableTable, TableDefinition, WriteTransaction};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};

#[cfg(test)]
pub(crate) use outbox::{append_raw, oldest_local};

/// (service, bucket, key) -> value. The service part is set by the host, never by the guest.
const KV: TableDefinition<KvKey, &[u8]> = TableDefinition::new("kv");
type KvKey = (&'static str, &'static str, &'static str);

/// The embedded store every durable piece of the host lives in (state, outbox, embedded log).
///
/// Invocations commit through one committer thread, which takes every commit that queued up
/// while it was busy and applies them all in one redb write transaction, with one fsync when
/// any of them must be durable (group commit). Concurrent writers thus share both the fsync and
/// redb's per-commit work (a non-durable redb commit alone costs about 100 µs here) instead of
/// taking turns at the writer lock. Bookkeeping writes ([`RedbStore::write_lazily`]) commit without
/// fsync and become durable with the next durable commit.
#[derive(Clone)]
pub struct RedbStore(Arc<Inner>);

struct Inner {
    db: Database,
    /// Write transactions begun so far, counted inside each (under redb's writer lock), so
    /// that a durable commit knows which writes it covers.
    written: AtomicU64,
    sequences: sequences::Sequences,
    /// Encoded bytes of the messages in the outbox, kept as they come and go.
    outbox_bytes: AtomicU64,
    sync: Mutex<Syncs>,
    synced: Condvar,
    /// To the committer thread, which stops when this is dropped.
    committer: mpsc::Sender<committer::Pending>,
}

#[derive(Default)]
struct Syncs {
    /// Every write counted up to here is on disk.
    durable: u64,
    /// Durable commits done (for tests and curiosity).
    count: u64,
    running: bool,
}

impl RedbStore {
    pub fn open(dir: &Path) -> Result<RedbStore> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating data dir {}", dir.display()))?;
        let path = dir.join("state.redb");
        let db = Database::create(&path).with_context(|| format!("opening {}", path.display()))?;
        RedbStore::wrap(db)
    }

    /// Same layout, nothing on disk: for tests and throwaway runs.
    pub fn in_memory() -> Result<RedbStore> {
        let db = Database::builder().create_with_backend(redb::backends::InMemoryBackend::new())?;
        RedbStore::wrap(db)
    }

    fn wrap(db: Database) -> Result<RedbStore> {
        let (committer, queue) = mpsc::channel();
        let outbox_bytes = AtomicU64::new(outbox::bytes_stored(&db)?);
        let inner = Arc::new(Inner {
            db,
            written: AtomicU64::new(0),
            sequences: Default::default(),
            outbox_bytes,
            sync: Mutex::default(),
            synced: Condvar::new(),
            committer,
        });
        committer::spawn(Arc::downgrade(&inner), queue);
        Ok(RedbStore(inner))
    }

    pub fn redb(&self) -> &Database {
        &self.0.db
    }

    /// Runs `f` in a write transaction that reaches the disk with the next durable commit: for
    /// bookkeeping whose loss in a crash only causes a redelivery. Blocking.
    pub fn write_lazily<R>(&self, f: impl FnOnce(&WriteTransaction) -> Result<R>) -> Result<R> {
        let mut wtx = self.0.db.begin_write()?;
        wtx.set_durability(Durability::None);
        self.0.written.fetch_add(1, Ordering::SeqCst);
        let r = f(&wtx)?;
        wtx.commit()?;
        Ok(r)
    }

    /// Returns once everything committed before the call is on disk. Whoever finds no durable
    /// commit running starts one; the others wait for it. Blocking.
    pub fn wait_durable(&self) -> Result<()> {
        let inner = &*self.0;
        let target = inner.written.load(Ordering::SeqCst);
        let mut st = inner.sync.lock().unwrap();
        loop {
            if st.durable >= target {
                return Ok(());
            }
            if st.running {
                st = inner.synced.wait(st).unwrap();
                continue;
            }
            st.running = true;
            drop(st);
            let result = (|| -> Result<u64> {
                let mut wtx = inner.db.begin_write()?;
                // Holding the writer lock: every write counted so far has committed.
                let covers = inner.written.load(Ordering::SeqCst);
                wtx.set_durability(Durability::Immediate);
                wtx.commit()?;
                Ok(covers)
            })();
            st = inner.sync.lock().unwrap();
            st.running = false;
            inner.synced.notify_all();
            // On failure the waiters try a durable commit of their own.
            let covers = result.context("durable commit")?;
            st.durable = st.durable.max(covers);
            st.count += 1;
        }
    }

    fn read_value_local(&self, service: &str, bucket: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let rtx = self.0.db.begin_read()?;
        let table = match rtx.open_table(KV) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(table
            .get((service, bucket, key))?
            .map(|v| v.value().to_vec()))
    }

    fn read_keys_local(
        &self,
        service: &str,
        range: &KeyRange,
        limit: usize,
    ) -> Result<Vec<String>> {
        let rtx = self.0.db.begin_read()?;
        match rtx.open_table(KV) {
            Ok(table) => scan_keys(&table, service, range, limit),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }
}

#[async_trait]
impl StateStore for RedbStore {
    async fn read_value(&self, service: &str, bucket: &str, key: &str) -> Result<Option<Vec<u8>>> {
        self.read_value_local(service, bucket, key)
    }

    async fn read_keys(
        &self,
        service: &str,
        range: &KeyRange,
        limit: usize,
    ) -> Result<Vec<String>> {
        self.read_keys_local(service, range, limit)
    }

    async fn next_id(
        &self,
        txn: &mut Txn,
        bucket: String,
        key: String,
    ) -> Result<u64, NextIdError> {
        self.next_id_local(txn, bucket, key)
    }

    async fn apply(&self, txn: Txn) -> Result<(), CommitError> {
        self.queue(txn, false).await
    }

    async fn commit(&self, txn: Txn) -> Result<(), CommitError> {
        self.queue(txn, true).await
    }

    /// [`RedbStore::wait_durable`] off the async workers: an fsync must not run on a request
    /// thread.
    async fn durable(&self) -> Result<()> {
        let db = self.clone();
        tokio::task::spawn_blocking(move || db.wait_durable()).await?
    }

    fn outbox(&self) -> &dyn super::Outbox {
        self
    }
}

/// Up to `limit` keys of `range`, in byte order.
fn scan_keys(
    table: &impl ReadableTable<KvKey, &'static [u8]>,
    service: &str,
    range: &KeyRange,
    limit: usize,
) -> Result<Vec<String>> {
    let start = match &range.after {
        Some(after) if after.as_str() > range.prefix.as_str() => after.as_str(),
        _ => range.prefix.as_str(),
    };
    let mut keys = Vec::new();
    for entry in table.range((service, range.bucket.as_str(), start)..)? {
        let (k, _) = entry?;
        let (s, b, key) = k.value();
        if s != service || b != range.bucket || !key.starts_with(&range.prefix) {
            break;
        }
        if range.upto.as_deref().is_some_and(|u| key > u) || keys.len() == limit {
            break;
        }
        if range.holds(key) {
            keys.push(key.to_string());
        }
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::ready;

    #[test]
    fn committed_data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = RedbStore::open(dir.path()).unwrap();
            let mut t = Txn::new("s".into());
            t.put("b".into(), "k".into(), Some(b"v".to_vec())).unwrap();
            db.commit_blocking(&t).unwrap();
        }
        let db = RedbStore::open(dir.path()).unwrap();
        let mut t = Txn::new("s".into());
        assert_eq!(ready(t.get(&db, "b", "k")).unwrap(), Some(b"v".to_vec()));
    }

    #[test]
    fn buckets_are_scoped_per_service() {
        let db = RedbStore::in_memory().unwrap();
        let mut t = Txn::new("user".into());
        t.put("b".into(), "k".into(), Some(b"secret".to_vec()))
            .unwrap();
        db.commit_blocking(&t).unwrap();
        let mut other = Txn::new("order".into());
        assert_eq!(ready(other.get(&db, "b", "k")).unwrap(), None);
        assert!(ready(other.list_keys(&db, "b", "")).unwrap().is_empty());
    }
}
