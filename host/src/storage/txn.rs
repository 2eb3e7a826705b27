//! One invocation's optimistic transaction: reads recorded for validation, writes buffered.

use super::{scan_keys, Db, KvKey};
use crate::types::budget::ENTRY_OVERHEAD;
use crate::types::{Budget, Message, Overrun};
use anyhow::Result;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// What one invocation has read and written so far.
#[derive(Default)]
pub struct Txn {
    pub(super) service: Arc<str>,
    reads: Vec<(String, String, Option<Vec<u8>>)>,
    lists: Vec<(String, String, Vec<String>)>,
    writes: BTreeMap<(String, String), Option<Vec<u8>>>,
    /// Highest id taken per sequence.
    pub(super) sequences: BTreeMap<(String, String), u64>,
    pub(super) outbox: Vec<Message>,
    /// What all of the above may cost the host.
    pub budget: Budget,
    /// The store whose sequences this transaction took ids from, to release them when done.
    pub(super) lease: Option<Db>,
    /// Set once its writes are in the store.
    pub(super) committed: AtomicBool,
}

impl Txn {
    pub fn new(service: Arc<str>) -> Txn {
        let mut txn = Txn::default();
        txn.service = service;
        txn
    }

    /// A transaction that may make the host hold at most `limit` bytes.
    pub fn limited(service: Arc<str>, limit: usize) -> Txn {
        let mut txn = Txn::new(service);
        txn.budget = Budget::new(limit);
        txn
    }

    /// Nothing to commit: read-only invocations skip the write lock entirely.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.sequences.is_empty() && self.outbox.is_empty()
    }

    /// Whether committing this transaction puts messages in the outbox.
    pub fn sends(&self) -> bool {
        !self.outbox.is_empty()
    }

    /// Stages `message`: it reaches the outbox with the commit, or never.
    pub fn send(&mut self, message: Message) -> Result<(), Overrun> {
        self.budget.charge(message.size() + ENTRY_OVERHEAD)?;
        self.outbox.push(message);
        Ok(())
    }

    /// The value at `bucket/key` as this invocation sees it: its own write, else the store's
    /// (remembered, so that the commit can check it is still current).
    pub fn get(&mut self, db: &Db, bucket: &str, key: &str) -> Result<Option<Vec<u8>>> {
        if let Some(v) = self.writes.get(&(bucket.to_string(), key.to_string())) {
            return Ok(v.clone());
        }
        let value = db.read_value(&self.service, bucket, key)?;
        let held = bucket.len() + key.len() + value.as_ref().map_or(0, Vec::len);
        self.budget.charge(held + ENTRY_OVERHEAD)?;
        self.reads
            .push((bucket.to_string(), key.to_string(), value.clone()));
        Ok(value)
    }

    /// Buffers a write (`None` deletes).
    pub fn put(
        &mut self,
        bucket: String,
        key: String,
        value: Option<Vec<u8>>,
    ) -> Result<(), Overrun> {
        let entry = bucket.len() + key.len() + ENTRY_OVERHEAD;
        self.budget
            .charge(entry + value.as_ref().map_or(0, Vec::len))?;
        if let Some(old) = self.writes.insert((bucket, key), value) {
            // Overwriting a staged value frees the old one: a loop over one key stays cheap.
            self.budget.refund(entry + old.map_or(0, |v| v.len()));
        }
        Ok(())
    }

    /// Keys of `bucket` starting with `prefix` as this invocation sees them, in byte order.
    pub fn list_keys(&mut self, db: &Db, bucket: &str, prefix: &str) -> Result<Vec<String>> {
        let committed = db.read_keys(&self.service, bucket, prefix)?;
        let held: usize = committed.iter().map(|k| k.len() + ENTRY_OVERHEAD).sum();
        self.budget.charge(bucket.len() + prefix.len() + 2 * held)?;
        self.lists
            .push((bucket.to_string(), prefix.to_string(), committed.clone()));
        let mut keys: BTreeSet<String> = committed.into_iter().collect();
        for ((b, k), v) in &self.writes {
            if b == bucket && k.starts_with(prefix) {
                match v {
                    Some(_) => keys.insert(k.clone()),
                    None => keys.remove(k),
                };
            }
        }
        Ok(keys.into_iter().collect())
    }
}

/// Whether nothing `txn` read has changed since.
pub(super) fn is_current(table: &redb::Table<KvKey, &[u8]>, txn: &Txn) -> Result<bool> {
    use redb::ReadableTable;
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
pub(super) fn write(table: &mut redb::Table<KvKey, &[u8]>, txn: &Txn) -> Result<()> {
    for ((bucket, key), value) in &txn.writes {
        let k = (&*txn.service, bucket.as_str(), key.as_str());
        match value {
            Some(v) => table.insert(k, v.as_slice())?,
            None => table.remove(k)?,
        };
    }
    super::sequences::write(table, txn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::CommitError;

    #[test]
    fn writes_are_invisible_until_commit_and_visible_after() {
        let db = Db::in_memory().unwrap();
        let mut t1 = Txn::new("user".into());
        t1.put("b".into(), "k".into(), Some(b"v".to_vec())).unwrap();
        assert_eq!(t1.get(&db, "b", "k").unwrap(), Some(b"v".to_vec()));
        let mut t2 = Txn::new("user".into());
        assert_eq!(t2.get(&db, "b", "k").unwrap(), None);
        db.commit_blocking(&t1).unwrap();
        let mut t3 = Txn::new("user".into());
        assert_eq!(t3.get(&db, "b", "k").unwrap(), Some(b"v".to_vec()));
    }

    #[test]
    fn racing_read_modify_writes_conflict_instead_of_both_landing() {
        let db = Db::in_memory().unwrap();
        let bump = |t: &mut Txn| {
            let n = t.get(&db, "m", "id").unwrap().map_or(0, |v| v[0]);
            t.put("m".into(), "id".into(), Some(vec![n + 1])).unwrap();
            n + 1
        };
        let (mut a, mut b) = (Txn::new("user".into()), Txn::new("user".into()));
        assert_eq!((bump(&mut a), bump(&mut b)), (1, 1));
        db.commit_blocking(&a).unwrap();
        assert!(matches!(db.commit_blocking(&b), Err(CommitError::Conflict)));
        let mut c = Txn::new("user".into());
        assert_eq!(bump(&mut c), 2);
    }

    #[test]
    fn list_keys_merges_own_writes_and_detects_phantoms() {
        let db = Db::in_memory().unwrap();
        let mut seed = Txn::new("s".into());
        seed.put("b".into(), "a1".into(), Some(vec![1])).unwrap();
        seed.put("b".into(), "a2".into(), Some(vec![2])).unwrap();
        db.commit_blocking(&seed).unwrap();

        let mut t = Txn::new("s".into());
        t.put("b".into(), "a1".into(), None).unwrap();
        t.put("b".into(), "a3".into(), Some(vec![3])).unwrap();
        assert_eq!(t.list_keys(&db, "b", "a").unwrap(), vec!["a2", "a3"]);

        let mut other = Txn::new("s".into());
        other.put("b".into(), "a9".into(), Some(vec![9])).unwrap();
        db.commit_blocking(&other).unwrap();
        assert!(matches!(db.commit_blocking(&t), Err(CommitError::Conflict)));
    }
}
