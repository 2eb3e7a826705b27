//! `microsvc:platform/state`: key-value buckets owned by the host, one transaction per invocation.
//!
//! An invocation (one HTTP request or one delivered message) reads through to the store and
//! buffers its writes and outgoing messages in a [`Txn`]. When it succeeds the host commits
//! everything at once with optimistic validation: if anything the invocation read changed in
//! the meantime, the commit is refused with [`CommitError::Conflict`] and the invocation is run
//! again. Components are stateless and request bodies are buffered, so re-running is safe and
//! gives serializable behaviour (no duplicate ids, no duplicate emails) without holding a lock
//! while guest code runs.

use crate::bindings::state::{self as wit, Error as WitError};
use crate::messaging::{outbox, Message};
use anyhow::{Context as _, Result};
use redb::{Database, Durability, ReadableTable, TableDefinition, WriteTransaction};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, Weak};

/// (service, bucket, key) -> value. The service part is set by the host, never by the guest.
const KV: TableDefinition<KvKey, &[u8]> = TableDefinition::new("kv");
type KvKey = (&'static str, &'static str, &'static str);
const MAX_NAME: usize = 256;
pub const MAX_VALUE: usize = 1 << 20;

/// The embedded store every durable piece of the host lives in (state, outbox, embedded log).
///
/// Invocations commit through one committer thread, which takes every commit that queued up
/// while it was busy and applies them all in one redb write transaction, with one fsync when
/// any of them must be durable (group commit). Concurrent writers thus share both the fsync and
/// redb's per-commit work (a non-durable redb commit alone costs about 100 µs here) instead of
/// taking turns at the writer lock. Bookkeeping writes ([`Db::write_lazily`]) commit without
/// fsync and become durable with the next durable commit.
#[derive(Clone)]
pub struct Db(Arc<Inner>);

/// (service, bucket, key) of an id sequence.
type SequenceKey = (Arc<str>, String, String);

struct Inner {
    db: Database,
    /// Write transactions begun so far, counted inside each (under redb's writer lock), so
    /// that a durable commit knows which writes it covers.
    written: AtomicU64,
    /// Last id handed out per (service, bucket, key) sequence, ahead of what is committed.
    sequences: Mutex<HashMap<SequenceKey, u64>>,
    sync: Mutex<Syncs>,
    synced: Condvar,
    /// To the committer thread, which stops when this is dropped.
    committer: mpsc::Sender<Pending>,
}

/// One invocation's commit, queued for the committer thread.
struct Pending {
    txn: Txn,
    durable: bool,
    done: tokio::sync::oneshot::Sender<Result<(), CommitError>>,
}

/// Most commits applied in one redb transaction: bounds the latency a batch adds.
const MAX_BATCH: usize = 256;

#[derive(Default)]
struct Syncs {
    /// Every write counted up to here is on disk.
    durable: u64,
    /// Durable commits done (for tests and curiosity).
    count: u64,
    running: bool,
}

impl Db {
    pub fn open(dir: &Path) -> Result<Db> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating data dir {}", dir.display()))?;
        let path = dir.join("state.redb");
        let db = Database::create(&path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Db::wrap(db))
    }

    /// Same layout, nothing on disk: for tests and throwaway runs.
    pub fn in_memory() -> Result<Db> {
        let db = Database::builder().create_with_backend(redb::backends::InMemoryBackend::new())?;
        Ok(Db::wrap(db))
    }

    fn wrap(db: Database) -> Db {
        let (committer, queue) = mpsc::channel();
        let inner = Arc::new(Inner {
            db,
            written: AtomicU64::new(0),
            sequences: Mutex::default(),
            sync: Mutex::default(),
            synced: Condvar::new(),
            committer,
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("state-committer".into())
            .spawn(move || commit_queued(weak, queue))
            .expect("spawning the state committer thread");
        Db(inner)
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

    fn read_value(&self, service: &str, bucket: &str, key: &str) -> Result<Option<Vec<u8>>> {
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

    fn read_keys(&self, service: &str, bucket: &str, prefix: &str) -> Result<Vec<String>> {
        let rtx = self.0.db.begin_read()?;
        match rtx.open_table(KV) {
            Ok(table) => scan_keys(&table, service, bucket, prefix),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }

    /// Applies an invocation's writes and messages atomically, or reports a conflict. Visible
    /// to later invocations at once; durable only after [`Db::wait_durable`]. Blocking.
    pub fn apply_blocking(&self, txn: &Txn) -> Result<(), CommitError> {
        self.apply_batch(&[txn], false)?
            .pop()
            .expect("one result per transaction")
    }

    /// Applies each of `txns` that does not conflict (with the store, or with one before it in
    /// `txns`) in one redb write transaction, with an fsync if `durable`. Per transaction: `Ok`
    /// or `Conflict`. A storage error fails them all.
    fn apply_batch(&self, txns: &[&Txn], durable: bool) -> Result<Vec<Result<(), CommitError>>> {
        let mut wtx = self.0.db.begin_write()?;
        wtx.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        });
        // Inside redb's writer lock: every write transaction counted before this one has
        // committed, so this one's durable commit covers them all.
        let covers = self.0.written.fetch_add(1, Ordering::SeqCst) + 1;
        let mut results = Vec::with_capacity(txns.len());
        {
            let mut table = wtx.open_table(KV)?;
            for txn in txns {
                results.push(if is_current(&table, txn)? {
                    write(&mut table, txn)?;
                    Ok(())
                } else {
                    Err(CommitError::Conflict)
                });
            }
        }
        for (txn, result) in txns.iter().zip(&results) {
            if result.is_ok() {
                outbox::append(&wtx, &txn.outbox)?;
            }
        }
        wtx.commit()?;
        if durable {
            let mut st = self.0.sync.lock().unwrap();
            st.durable = st.durable.max(covers);
            st.count += 1;
        }
        Ok(results)
    }

    /// Applies and waits until durable. Blocking.
    pub fn commit_blocking(&self, txn: &Txn) -> Result<(), CommitError> {
        self.apply_blocking(txn)?;
        Ok(self.wait_durable()?)
    }

    /// Applies `txn` (visible to later invocations, durable with a later durable commit), or
    /// reports a conflict.
    pub async fn apply(&self, txn: Txn) -> Result<(), CommitError> {
        self.queue(txn, false).await
    }

    /// [`Db::wait_durable`] off the async workers: an fsync must not run on a request thread.
    pub async fn durable(&self) -> Result<()> {
        let db = self.clone();
        tokio::task::spawn_blocking(move || db.wait_durable()).await?
    }

    /// Applies `txn` and returns once it is on disk, or reports a conflict.
    pub async fn commit(&self, txn: Txn) -> Result<(), CommitError> {
        self.queue(txn, true).await
    }

    async fn queue(&self, txn: Txn, durable: bool) -> Result<(), CommitError> {
        if txn.is_empty() {
            return Ok(());
        }
        let stopped = || CommitError::Storage(anyhow::anyhow!("the state committer stopped"));
        let (done, result) = tokio::sync::oneshot::channel();
        self.0
            .committer
            .send(Pending { txn, durable, done })
            .map_err(|_| stopped())?;
        result.await.map_err(|_| stopped())?
    }
}

/// The committer thread: applies queued commits in batches until the store is dropped.
fn commit_queued(db: Weak<Inner>, queue: mpsc::Receiver<Pending>) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
        let Some(inner) = db.upgrade() else { return };
        let durable = batch.iter().any(|p| p.durable);
        let txns: Vec<&Txn> = batch.iter().map(|p| &p.txn).collect();
        let results = match Db(inner).apply_batch(&txns, durable) {
            Ok(results) => results,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), commits = txns.len(), "state commit failed");
                txns.iter()
                    .map(|_| Err(CommitError::Storage(anyhow::anyhow!("{e:#}"))))
                    .collect()
            }
        };
        for (pending, result) in batch.into_iter().zip(results) {
            let _ = pending.done.send(result);
        }
    }
}

/// Whether nothing `txn` read has changed since.
fn is_current(table: &redb::Table<KvKey, &[u8]>, txn: &Txn) -> Result<bool> {
    for (bucket, key, seen) in &txn.reads {
        let now = table
            .get((&*txn.service, bucket.as_str(), key.as_str()))?
            .map(|v| v.value().to_vec());
        if now != *seen {
            return Ok(false);
        }
    }
    for (bucket, prefix, seen) in &txn.lists {
        if scan_keys(table, &txn.service, bucket, prefix)? != *seen {
            return Ok(false);
        }
    }
    Ok(true)
}

/// `txn`'s writes and the ids it took.
fn write(table: &mut redb::Table<KvKey, &[u8]>, txn: &Txn) -> Result<()> {
    for ((bucket, key), value) in &txn.writes {
        let k = (&*txn.service, bucket.as_str(), key.as_str());
        match value {
            Some(v) => table.insert(k, v.as_slice())?,
            None => table.remove(k)?,
        };
    }
    // Not validated: ids were handed out under the sequences lock, so the stored value only
    // has to move forward.
    for ((bucket, key), id) in &txn.sequences {
        let k = (&*txn.service, bucket.as_str(), key.as_str());
        let stored = table.get(k)?.map(|v| sequence_value(v.value()));
        if stored.is_none_or(|s| s.is_ok_and(|s| s < *id)) {
            table.insert(k, id.to_le_bytes().as_slice())?;
        }
    }
    Ok(())
}

fn scan_keys(
    table: &impl ReadableTable<(&'static str, &'static str, &'static str), &'static [u8]>,
    service: &str,
    bucket: &str,
    prefix: &str,
) -> Result<Vec<String>> {
    let mut keys = Vec::new();
    for entry in table.range((service, bucket, prefix)..)? {
        let (k, _) = entry?;
        let (s, b, key) = k.value();
        if s != service || b != bucket || !key.starts_with(prefix) {
            break;
        }
        keys.push(key.to_string());
    }
    Ok(keys)
}

#[derive(Debug)]
pub enum CommitError {
    /// Something this invocation read was changed by another one: run it again.
    Conflict,
    Storage(anyhow::Error),
}

impl From<anyhow::Error> for CommitError {
    fn from(e: anyhow::Error) -> Self {
        CommitError::Storage(e)
    }
}

impl std::fmt::Display for CommitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommitError::Conflict => write!(f, "conflicting concurrent update"),
            CommitError::Storage(e) => write!(f, "storage error: {e:#}"),
        }
    }
}

/// What one invocation has read and written so far.
#[derive(Default)]
pub struct Txn {
    service: Arc<str>,
    reads: Vec<(String, String, Option<Vec<u8>>)>,
    lists: Vec<(String, String, Vec<String>)>,
    writes: BTreeMap<(String, String), Option<Vec<u8>>>,
    /// Highest id taken per sequence.
    sequences: BTreeMap<(String, String), u64>,
    pub outbox: Vec<Message>,
}

impl Txn {
    pub fn new(service: Arc<str>) -> Txn {
        Txn {
            service,
            ..Txn::default()
        }
    }

    /// Nothing to commit: read-only invocations skip the write lock entirely.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.sequences.is_empty() && self.outbox.is_empty()
    }
}

/// The view a component's `state` imports operate on.
pub struct StateView<'a> {
    pub db: &'a Db,
    pub txn: &'a mut Txn,
}

pub struct StateData;
impl wasmtime::component::HasData for StateData {
    type Data<'a> = StateView<'a>;
}

fn check_name(what: &str, name: &str) -> Result<(), WitError> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(WitError::InvalidName(format!(
            "{what} must be 1..={MAX_NAME} bytes, got {}",
            name.len()
        )));
    }
    Ok(())
}

fn storage(e: anyhow::Error) -> WitError {
    tracing::error!(error = %format!("{e:#}"), "state read failed");
    WitError::Storage(format!("{e:#}"))
}

impl StateView<'_> {
    pub fn get_value(&mut self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, WitError> {
        check_name("bucket", bucket)?;
        check_name("key", key)?;
        if let Some(v) = self.txn.writes.get(&(bucket.to_string(), key.to_string())) {
            return Ok(v.clone());
        }
        let value = self
            .db
            .read_value(&self.txn.service, bucket, key)
            .map_err(storage)?;
        self.txn
            .reads
            .push((bucket.to_string(), key.to_string(), value.clone()));
        Ok(value)
    }

    pub fn put(
        &mut self,
        bucket: String,
        key: String,
        value: Option<Vec<u8>>,
    ) -> Result<(), WitError> {
        check_name("bucket", &bucket)?;
        check_name("key", &key)?;
        if let Some(v) = &value {
            if v.len() > MAX_VALUE {
                return Err(WitError::ValueTooLarge(v.len() as u64));
            }
        }
        self.txn.writes.insert((bucket, key), value);
        Ok(())
    }
}

/// A sequence is stored as 8 little-endian bytes, like a counter.
fn sequence_value(bytes: &[u8]) -> Result<u64, WitError> {
    let arr: [u8; 8] = bytes
        .try_into()
        .map_err(|_| WitError::NotACounter(format!("a sequence holds {} bytes", bytes.len())))?;
    Ok(u64::from_le_bytes(arr))
}

impl StateView<'_> {
    pub fn next_id_value(&mut self, bucket: String, key: String) -> Result<u64, WitError> {
        check_name("bucket", &bucket)?;
        check_name("key", &key)?;
        let mut sequences = self.db.0.sequences.lock().unwrap();
        let slot = (self.txn.service.clone(), bucket, key);
        let last = match sequences.get(&slot) {
            Some(&last) => last,
            None => match self
                .db
                .read_value(&slot.0, &slot.1, &slot.2)
                .map_err(storage)?
            {
                None => 0,
                Some(bytes) => sequence_value(&bytes)?,
            },
        };
        let id = last
            .checked_add(1)
            .ok_or_else(|| WitError::NotACounter("sequence exhausted".into()))?;
        sequences.insert(slot.clone(), id);
        let taken = self.txn.sequences.entry((slot.1, slot.2)).or_insert(0);
        *taken = (*taken).max(id);
        Ok(id)
    }
}

impl wit::Host for StateView<'_> {
    fn next_id(&mut self, bucket: String, key: String) -> Result<u64, WitError> {
        self.next_id_value(bucket, key)
    }

    fn get(&mut self, bucket: String, key: String) -> Result<Option<Vec<u8>>, WitError> {
        self.get_value(&bucket, &key)
    }

    fn set(&mut self, bucket: String, key: String, value: Vec<u8>) -> Result<(), WitError> {
        self.put(bucket, key, Some(value))
    }

    fn delete(&mut self, bucket: String, key: String) -> Result<(), WitError> {
        self.put(bucket, key, None)
    }

    fn list_keys(&mut self, bucket: String, prefix: String) -> Result<Vec<String>, WitError> {
        check_name("bucket", &bucket)?;
        let committed = self
            .db
            .read_keys(&self.txn.service, &bucket, &prefix)
            .map_err(storage)?;
        self.txn
            .lists
            .push((bucket.clone(), prefix.clone(), committed.clone()));
        let mut keys: std::collections::BTreeSet<String> = committed.into_iter().collect();
        for ((b, k), v) in &self.txn.writes {
            if *b == bucket && k.starts_with(&prefix) {
                match v {
                    Some(_) => keys.insert(k.clone()),
                    None => keys.remove(k),
                };
            }
        }
        Ok(keys.into_iter().collect())
    }

    fn increment(&mut self, bucket: String, key: String, delta: i64) -> Result<i64, WitError> {
        let current = match self.get_value(&bucket, &key)? {
            None => 0,
            Some(bytes) => {
                let arr: [u8; 8] = bytes.as_slice().try_into().map_err(|_| {
                    WitError::NotACounter(format!("{bucket}/{key} holds {} bytes", bytes.len()))
                })?;
                i64::from_le_bytes(arr)
            }
        };
        let next = current
            .checked_add(delta)
            .ok_or_else(|| WitError::NotACounter(format!("{bucket}/{key} would overflow")))?;
        self.put(bucket, key, Some(next.to_le_bytes().to_vec()))?;
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bindings::state::Host;

    fn view<'a>(db: &'a Db, txn: &'a mut Txn) -> StateView<'a> {
        StateView { db, txn }
    }

    #[test]
    fn ids_never_repeat_never_conflict_and_skip_only_after_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let take =
            |db: &Db, txn: &mut Txn| view(db, txn).next_id("m".into(), "seq".into()).unwrap();
        // Two invocations in flight at once get different ids, and both commit.
        let (mut a, mut b) = (Txn::new("user".into()), Txn::new("user".into()));
        assert_eq!((take(&db, &mut a), take(&db, &mut b)), (1, 2));
        db.commit_blocking(&b).unwrap();
        db.commit_blocking(&a).unwrap();
        // One that fails (never commits) leaves a gap; the next one moves on.
        let mut failed = Txn::new("user".into());
        assert_eq!(take(&db, &mut failed), 3);
        drop(failed);
        let mut c = Txn::new("user".into());
        assert_eq!(take(&db, &mut c), 4);
        db.commit_blocking(&c).unwrap();
        // After a restart the sequence continues from what was committed.
        drop(db);
        let db = Db::open(dir.path()).unwrap();
        let mut d = Txn::new("user".into());
        assert_eq!(take(&db, &mut d), 5);
        // Sequences are per service, like everything else.
        let mut other = Txn::new("order".into());
        assert_eq!(take(&db, &mut other), 1);
    }

    #[test]
    fn a_batch_applies_what_does_not_conflict_within_it_with_one_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let mut seed = Txn::new("user".into());
        view(&db, &mut seed)
            .set("b".into(), "k".into(), b"1".to_vec())
            .unwrap();
        db.commit_blocking(&seed).unwrap();
        // a and b both read k = 1 and write it: whichever is first in the batch wins.
        let update = |v: &[u8]| {
            let mut t = Txn::new("user".into());
            assert_eq!(
                view(&db, &mut t).get("b".into(), "k".into()).unwrap(),
                Some(b"1".to_vec())
            );
            view(&db, &mut t)
                .set("b".into(), "k".into(), v.to_vec())
                .unwrap();
            t
        };
        let (a, b) = (update(b"2"), update(b"3"));
        let mut c = Txn::new("user".into());
        view(&db, &mut c)
            .set("b".into(), "other".into(), b"x".to_vec())
            .unwrap();
        let syncs = db.0.sync.lock().unwrap().count;
        let results = db.apply_batch(&[&a, &b, &c], true).unwrap();
        assert!(matches!(
            results[..],
            [Ok(()), Err(CommitError::Conflict), Ok(())]
        ));
        assert_eq!(db.0.sync.lock().unwrap().count, syncs + 1);
        assert_eq!(
            db.read_value("user", "b", "k").unwrap(),
            Some(b"2".to_vec())
        );
        assert_eq!(
            db.read_value("user", "b", "other").unwrap(),
            Some(b"x".to_vec())
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn queued_commits_all_land_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let commits = (0..64u8).map(|i| {
            let db = db.clone();
            tokio::spawn(async move {
                let mut txn = Txn::new("user".into());
                view(&db, &mut txn)
                    .set("q".into(), format!("k{i}"), vec![i])
                    .unwrap();
                db.commit(txn).await
            })
        });
        for c in futures_util::future::join_all(commits).await {
            c.unwrap().unwrap();
        }
        drop(db);
        let db = Db::open(dir.path()).unwrap();
        for i in 0..64u8 {
            assert_eq!(
                db.read_value("user", "q", &format!("k{i}")).unwrap(),
                Some(vec![i])
            );
        }
    }

    #[test]
    fn concurrent_commits_share_fsyncs_and_all_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let writers: Vec<_> = (0..16)
            .map(|i| {
                let db = db.clone();
                std::thread::spawn(move || {
                    let mut txn = Txn::new("user".into());
                    view(&db, &mut txn)
                        .set("b".into(), format!("k{i}"), vec![i as u8])
                        .unwrap();
                    db.commit_blocking(&txn).unwrap();
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let syncs = db.0.sync.lock().unwrap().count;
        assert!((1..=16).contains(&syncs), "{syncs} durable commits");
        drop(db);
        let db = Db::open(dir.path()).unwrap();
        for i in 0..16u8 {
            let mut txn = Txn::new("user".into());
            assert_eq!(
                view(&db, &mut txn)
                    .get("b".into(), format!("k{i}"))
                    .unwrap(),
                Some(vec![i])
            );
        }
    }

    #[test]
    fn a_commit_is_visible_before_it_is_durable_and_conflicts_still_refuse() {
        let db = Db::in_memory().unwrap();
        let mut reader = Txn::new("user".into());
        assert_eq!(
            view(&db, &mut reader).get("b".into(), "k".into()).unwrap(),
            None
        );
        let mut writer = Txn::new("user".into());
        view(&db, &mut writer)
            .set("b".into(), "k".into(), b"1".to_vec())
            .unwrap();
        db.apply_blocking(&writer).unwrap();
        let mut later = Txn::new("user".into());
        assert_eq!(
            view(&db, &mut later).get("b".into(), "k".into()).unwrap(),
            Some(b"1".to_vec())
        );
        // `reader` saw the key absent; writing on that basis must conflict.
        view(&db, &mut reader)
            .set("b".into(), "k".into(), b"2".to_vec())
            .unwrap();
        assert!(matches!(
            db.apply_blocking(&reader),
            Err(CommitError::Conflict)
        ));
        db.wait_durable().unwrap();
    }

    #[test]
    fn writes_are_invisible_until_commit_and_visible_after() {
        let db = Db::in_memory().unwrap();
        let mut t1 = Txn::new("user".into());
        view(&db, &mut t1)
            .set("b".into(), "k".into(), b"v".to_vec())
            .unwrap();
        assert_eq!(
            view(&db, &mut t1).get("b".into(), "k".into()).unwrap(),
            Some(b"v".to_vec())
        );
        let mut t2 = Txn::new("user".into());
        assert_eq!(
            view(&db, &mut t2).get("b".into(), "k".into()).unwrap(),
            None
        );
        db.commit_blocking(&t1).unwrap();
        let mut t3 = Txn::new("user".into());
        assert_eq!(
            view(&db, &mut t3).get("b".into(), "k".into()).unwrap(),
            Some(b"v".to_vec())
        );
    }

    #[test]
    fn buckets_are_scoped_per_service() {
        let db = Db::in_memory().unwrap();
        let mut t = Txn::new("user".into());
        view(&db, &mut t)
            .set("b".into(), "k".into(), b"secret".to_vec())
            .unwrap();
        db.commit_blocking(&t).unwrap();
        let mut other = Txn::new("order".into());
        assert_eq!(
            view(&db, &mut other).get("b".into(), "k".into()).unwrap(),
            None
        );
        assert!(view(&db, &mut other)
            .list_keys("b".into(), "".into())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn racing_increments_conflict_instead_of_sharing_an_id() {
        let db = Db::in_memory().unwrap();
        let mut a = Txn::new("user".into());
        let mut b = Txn::new("user".into());
        assert_eq!(
            view(&db, &mut a)
                .increment("m".into(), "id".into(), 1)
                .unwrap(),
            1
        );
        assert_eq!(
            view(&db, &mut b)
                .increment("m".into(), "id".into(), 1)
                .unwrap(),
            1
        );
        db.commit_blocking(&a).unwrap();
        assert!(matches!(db.commit_blocking(&b), Err(CommitError::Conflict)));
        let mut c = Txn::new("user".into());
        assert_eq!(
            view(&db, &mut c)
                .increment("m".into(), "id".into(), 1)
                .unwrap(),
            2
        );
    }

    #[test]
    fn list_keys_merges_own_writes_and_detects_phantoms() {
        let db = Db::in_memory().unwrap();
        let mut seed = Txn::new("s".into());
        view(&db, &mut seed)
            .set("b".into(), "a1".into(), vec![1])
            .unwrap();
        view(&db, &mut seed)
            .set("b".into(), "a2".into(), vec![2])
            .unwrap();
        db.commit_blocking(&seed).unwrap();

        let mut t = Txn::new("s".into());
        view(&db, &mut t).delete("b".into(), "a1".into()).unwrap();
        view(&db, &mut t)
            .set("b".into(), "a3".into(), vec![3])
            .unwrap();
        assert_eq!(
            view(&db, &mut t).list_keys("b".into(), "a".into()).unwrap(),
            vec!["a2", "a3"]
        );

        let mut other = Txn::new("s".into());
        view(&db, &mut other)
            .set("b".into(), "a9".into(), vec![9])
            .unwrap();
        db.commit_blocking(&other).unwrap();
        assert!(matches!(db.commit_blocking(&t), Err(CommitError::Conflict)));
    }

    #[test]
    fn bad_names_and_non_counters_are_errors_not_traps() {
        let db = Db::in_memory().unwrap();
        let mut t = Txn::new("s".into());
        let mut v = view(&db, &mut t);
        assert!(matches!(
            v.get("".into(), "k".into()),
            Err(WitError::InvalidName(_))
        ));
        v.set("b".into(), "k".into(), b"text".to_vec()).unwrap();
        assert!(matches!(
            v.increment("b".into(), "k".into(), 1),
            Err(WitError::NotACounter(_))
        ));
        v.set("b".into(), "n".into(), i64::MAX.to_le_bytes().to_vec())
            .unwrap();
        assert!(matches!(
            v.increment("b".into(), "n".into(), 1),
            Err(WitError::NotACounter(_))
        ));
    }

    #[test]
    fn committed_data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Db::open(dir.path()).unwrap();
            let mut t = Txn::new("s".into());
            view(&db, &mut t)
                .set("b".into(), "k".into(), b"v".to_vec())
                .unwrap();
            db.commit_blocking(&t).unwrap();
        }
        let db = Db::open(dir.path()).unwrap();
        let mut t = Txn::new("s".into());
        assert_eq!(
            view(&db, &mut t).get("b".into(), "k".into()).unwrap(),
            Some(b"v".to_vec())
        );
    }
}
