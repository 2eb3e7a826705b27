//! The committer thread: applies queued invocation commits in batches (group commit).

use super::{outbox, scan_keys, sequences, CommitError, Inner, KvKey, RedbStore, Txn, KV};
use crate::storage::txn::{digest_keys, digest_of};
use anyhow::Result;
use redb::Durability;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Weak};

/// One invocation's commit, queued for the committer thread.
pub(super) struct Pending {
    txn: Txn,
    durable: bool,
    done: tokio::sync::oneshot::Sender<Result<(), CommitError>>,
}

/// Most commits applied in one redb transaction: bounds the latency a batch adds.
const MAX_BATCH: usize = 256;

pub(super) fn spawn(db: Weak<Inner>, queue: mpsc::Receiver<Pending>) {
    std::thread::Builder::new()
        .name("state-committer".into())
        .spawn(move || commit_queued(db, queue))
        .expect("spawning the state committer thread");
}

impl RedbStore {
    pub(super) async fn queue(&self, txn: Txn, durable: bool) -> Result<(), CommitError> {
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

    /// Queues `txn` for the committer without waiting for it: for bookkeeping nobody waits on.
    pub(super) fn queue_lazily(&self, txn: Txn) {
        let (done, _) = tokio::sync::oneshot::channel();
        let _ = self.0.committer.send(Pending {
            txn,
            durable: false,
            done,
        });
    }

    /// Applies an invocation's writes and messages atomically, or reports a conflict. Visible
    /// to later invocations at once; durable only after [`RedbStore::wait_durable`]. Blocking.
    pub fn apply_blocking(&self, txn: &Txn) -> Result<(), CommitError> {
        self.apply_batch(&[txn], false)?
            .pop()
            .expect("one result per transaction")
    }

    /// Applies and waits until durable. Blocking.
    pub fn commit_blocking(&self, txn: &Txn) -> Result<(), CommitError> {
        self.apply_blocking(txn)?;
        Ok(self.wait_durable()?)
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
        let mut appended = 0;
        for (txn, result) in txns.iter().zip(&results) {
            if result.is_ok() {
                appended += outbox::append(&wtx, &txn.outbox)?;
            }
        }
        wtx.commit()?;
        self.0.outbox_bytes.fetch_add(appended, Ordering::SeqCst);
        for (txn, result) in txns.iter().zip(&results) {
            if result.is_ok() {
                txn.committed.store(true, Ordering::SeqCst);
                self.settle(txn);
            }
        }
        if durable {
            let mut st = self.0.sync.lock().unwrap();
            st.durable = st.durable.max(covers);
            st.count += 1;
        }
        Ok(results)
    }
}

/// Applies queued commits in batches until the store is dropped.
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
        let results = match RedbStore(inner).apply_batch(&txns, durable) {
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
pub(super) fn is_current(table: &redb::Table<KvKey, &[u8]>, txn: &Txn) -> Result<bool> {
    use redb::ReadableTable;
    for (bucket, key, seen) in &txn.reads {
        let now = table
            .get((&*txn.service, bucket.as_str(), key.as_str()))?
            .map(|v| digest_of(v.value()));
        if now != *seen {
            return Ok(false);
        }
    }
    for (range, seen) in &txn.lists {
        let now = scan_keys(table, &txn.service, range, range.found.saturating_add(1))?;
        if digest_keys(&now) != *seen {
            return Ok(false);
        }
    }
    Ok(true)
}

/// `txn`'s writes and the ids it took.
pub(super) fn write(table: &mut redb::Table<KvKey, &[u8]>, txn: &Txn) -> Result<()> {
    for ((bucket, key), value) in &txn.writes {
        let k = (&*txn.service, bucket.as_str(), key.as_str());
        match value {
            Some(v) => table.insert(k, v.as_slice())?,
            None => table.remove(k)?,
        };
    }
    sequences::write(table, txn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::ready;
    use crate::storage::StateStore as _;

    fn set(t: &mut Txn, key: &str, value: &[u8]) {
        t.put("b".into(), key.into(), Some(value.to_vec())).unwrap();
    }

    #[test]
    fn a_batch_applies_what_does_not_conflict_within_it_with_one_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let db = RedbStore::open(dir.path()).unwrap();
        let mut seed = Txn::new("user".into());
        set(&mut seed, "k", b"1");
        db.commit_blocking(&seed).unwrap();
        // a and b both read k = 1 and write it: whichever is first in the batch wins.
        let update = |v: &[u8]| {
            let mut t = Txn::new("user".into());
            assert_eq!(ready(t.get(&db, "b", "k")).unwrap(), Some(b"1".to_vec()));
            set(&mut t, "k", v);
            t
        };
        let (a, b) = (update(b"2"), update(b"3"));
        let mut c = Txn::new("user".into());
        set(&mut c, "other", b"x");
        let syncs = db.0.sync.lock().unwrap().count;
        let results = db.apply_batch(&[&a, &b, &c], true).unwrap();
        assert!(matches!(
            results[..],
            [Ok(()), Err(CommitError::Conflict), Ok(())]
        ));
        assert_eq!(db.0.sync.lock().unwrap().count, syncs + 1);
        assert_eq!(
            db.read_value_local("user", "b", "k").unwrap(),
            Some(b"2".to_vec())
        );
        assert_eq!(
            db.read_value_local("user", "b", "other").unwrap(),
            Some(b"x".to_vec())
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn queued_commits_all_land_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let db = RedbStore::open(dir.path()).unwrap();
        let commits = (0..64u8).map(|i| {
            let db = db.clone();
            tokio::spawn(async move {
                let mut txn = Txn::new("user".into());
                txn.put("q".into(), format!("k{i}"), Some(vec![i])).unwrap();
                db.commit(txn).await
            })
        });
        for c in futures_util::future::join_all(commits).await {
            c.unwrap().unwrap();
        }
        drop(db);
        let db = RedbStore::open(dir.path()).unwrap();
        for i in 0..64u8 {
            assert_eq!(
                db.read_value_local("user", "q", &format!("k{i}")).unwrap(),
                Some(vec![i])
            );
        }
    }

    #[test]
    fn concurrent_commits_share_fsyncs_and_all_survive_a_reopen() {
        use std::future::Future as _;
        let dir = tempfile::tempdir().unwrap();
        let db = RedbStore::open(dir.path()).unwrap();
        let syncs = db.0.sync.lock().unwrap().count;
        // The committer waits behind this write transaction while 16 durable commits queue up.
        let held = db.redb().begin_write().unwrap();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let commits: Vec<_> = (0..16)
            .map(|i| {
                let mut txn = Txn::new("user".into());
                set(&mut txn, &format!("k{i}"), &[i as u8]);
                let mut commit = Box::pin(db.queue(txn, true));
                assert!(commit.as_mut().poll(&mut cx).is_pending(), "queued");
                commit
            })
            .collect();
        drop(held);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for commit in commits {
            rt.block_on(commit).unwrap();
        }
        // At most two batches: the first commit alone if the committer took it before the
        // others came, then the rest together. One fsync per commit would be 16.
        let synced = db.0.sync.lock().unwrap().count - syncs;
        assert!((1..=2).contains(&synced), "{synced} fsyncs for 16 commits");
        drop(db);
        let db = RedbStore::open(dir.path()).unwrap();
        for i in 0..16u8 {
            let mut txn = Txn::new("user".into());
            assert_eq!(
                ready(txn.get(&db, "b", &format!("k{i}"))).unwrap(),
                Some(vec![i])
            );
        }
    }

    #[test]
    fn a_commit_is_visible_before_it_is_durable_and_conflicts_still_refuse() {
        let db = RedbStore::in_memory().unwrap();
        let mut reader = Txn::new("user".into());
        assert_eq!(ready(reader.get(&db, "b", "k")).unwrap(), None);
        let mut writer = Txn::new("user".into());
        set(&mut writer, "k", b"1");
        db.apply_blocking(&writer).unwrap();
        let mut later = Txn::new("user".into());
        assert_eq!(
            ready(later.get(&db, "b", "k")).unwrap(),
            Some(b"1".to_vec())
        );
        // `reader` saw the key absent; writing on that basis must conflict.
        set(&mut reader, "k", b"2");
        assert!(matches!(
            db.apply_blocking(&reader),
            Err(CommitError::Conflict)
        ));
        db.wait_durable().unwrap();
    }
}
