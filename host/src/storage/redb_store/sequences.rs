//! Id sequences: ids that never repeat and never make concurrent invocations conflict.

use super::{KvKey, RedbStore};
use crate::storage::{NextIdError, Txn};
use crate::types::budget::ENTRY_OVERHEAD;
use anyhow::Result;
use redb::ReadableTable;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// Sequences with ids handed out ahead of what is stored. An entry lives only while some
/// transaction holds ids of it, or until the last id handed out is stored: so the map stays as
/// small as the work in flight, however many names guests make up.
pub(super) type Sequences = Mutex<HashMap<Slot, Head>>;

type Slot = (Arc<str>, String, String);

#[derive(Debug, Clone, Copy)]
pub(super) struct Head {
    /// The last id handed out.
    last: u64,
    /// Transactions in flight that took ids of this sequence.
    holders: u32,
}

/// A sequence is stored as 8 little-endian bytes, like a counter.
fn sequence_value(bytes: &[u8]) -> Result<u64, NextIdError> {
    let arr: [u8; 8] = bytes.try_into().map_err(|_| {
        NextIdError::NotASequence(format!("a sequence holds {} bytes", bytes.len()))
    })?;
    Ok(u64::from_le_bytes(arr))
}

impl RedbStore {
    /// [`crate::storage::StateStore::next_id`] here: ids handed out under a lock, ahead of
    /// what is stored.
    pub(super) fn next_id_local(
        &self,
        txn: &mut Txn,
        bucket: String,
        key: String,
    ) -> Result<u64, NextIdError> {
        let held = !txn.sequences.contains_key(&(bucket.clone(), key.clone()));
        if held {
            txn.budget
                .charge(bucket.len() + key.len() + ENTRY_OVERHEAD)
                .map_err(|e| NextIdError::Storage(e.into()))?;
        }
        let mut sequences = self.0.sequences.lock().unwrap();
        let slot = (txn.service.clone(), bucket, key);
        let last = match sequences.get(&slot) {
            Some(head) => head.last,
            None => match self
                .read_value_local(&slot.0, &slot.1, &slot.2)
                .map_err(NextIdError::Storage)?
            {
                None => 0,
                Some(bytes) => sequence_value(&bytes)?,
            },
        };
        let id = last
            .checked_add(1)
            .ok_or_else(|| NextIdError::NotASequence("sequence exhausted".into()))?;
        let head = sequences.entry(slot.clone()).or_insert(Head {
            last: 0,
            holders: 0,
        });
        head.last = id;
        head.holders += u32::from(held);
        txn.lease.get_or_insert_with(|| self.clone());
        let taken = txn.sequences.entry((slot.1, slot.2)).or_insert(0);
        *taken = (*taken).max(id);
        Ok(id)
    }

    /// `txn` is done with its sequences (committed or not). The last holder of a sequence
    /// forgets it once its last id is stored, or has that id stored first: an id handed to an
    /// invocation that failed stays skipped.
    pub(super) fn release(&self, txn: &Txn) {
        let committed = txn.committed.load(Ordering::SeqCst);
        let mut unstored = Vec::new();
        {
            let mut sequences = self.0.sequences.lock().unwrap();
            for ((bucket, key), &id) in &txn.sequences {
                let slot = (txn.service.clone(), bucket.clone(), key.clone());
                let Some(head) = sequences.get_mut(&slot) else {
                    continue;
                };
                head.holders = head.holders.saturating_sub(1);
                if head.holders > 0 {
                    continue;
                }
                if committed && head.last == id {
                    sequences.remove(&slot);
                } else {
                    unstored.push((bucket.clone(), key.clone(), head.last));
                }
            }
        }
        if !unstored.is_empty() {
            // Stored by the committer, which then forgets the entries (see `settle`).
            let mut skip = Txn::new(txn.service.clone());
            for (bucket, key, last) in unstored {
                skip.sequences.insert((bucket, key), last);
            }
            self.queue_lazily(skip);
        }
    }

    /// After `txn`'s ids are stored: forgets sequences nobody holds whose last id is stored.
    pub(super) fn settle(&self, txn: &Txn) {
        if txn.lease.is_some() {
            return; // its holders release it when it is dropped
        }
        let mut sequences = self.0.sequences.lock().unwrap();
        for ((bucket, key), &id) in &txn.sequences {
            let slot = (txn.service.clone(), bucket.clone(), key.clone());
            if sequences
                .get(&slot)
                .is_some_and(|h| h.holders == 0 && h.last <= id)
            {
                sequences.remove(&slot);
            }
        }
    }

    /// Sequences in memory, for tests.
    #[cfg(test)]
    pub(super) fn sequences_held(&self) -> usize {
        self.0.sequences.lock().unwrap().len()
    }
}

impl Drop for Txn {
    fn drop(&mut self) {
        if let Some(db) = self.lease.take() {
            db.release(self);
        }
    }
}

/// Stores the ids `txn` took. Not validated: ids were handed out under the sequences lock, so
/// the stored value only has to move forward.
pub(super) fn write(table: &mut redb::Table<KvKey, &[u8]>, txn: &Txn) -> Result<()> {
    for ((bucket, key), id) in &txn.sequences {
        let k = (&*txn.service, bucket.as_str(), key.as_str());
        let stored = table.get(k)?.map(|v| sequence_value(v.value()));
        if stored.is_none_or(|s| s.is_ok_and(|s| s < *id)) {
            table.insert(k, id.to_le_bytes().as_slice())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::ready;
    use crate::storage::StateStore as _;

    #[test]
    fn ids_never_repeat_never_conflict_and_skip_only_after_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let db = RedbStore::open(dir.path()).unwrap();
        let take = |db: &RedbStore, txn: &mut Txn| {
            ready(db.next_id(txn, "m".into(), "seq".into())).unwrap()
        };
        // Two invocations in flight at once get different ids, and both commit.
        let (mut a, mut b) = (Txn::new("user".into()), Txn::new("user".into()));
        assert_eq!((take(&db, &mut a), take(&db, &mut b)), (1, 2));
        db.commit_blocking(&b).unwrap();
        db.commit_blocking(&a).unwrap();
        drop((a, b));
        assert_eq!(db.sequences_held(), 0, "stored ids are not kept in memory");
        // One that fails (never commits) leaves a gap; the next one moves on.
        let mut failed = Txn::new("user".into());
        assert_eq!(take(&db, &mut failed), 3);
        drop(failed);
        let mut c = Txn::new("user".into());
        assert_eq!(take(&db, &mut c), 4);
        db.commit_blocking(&c).unwrap();
        drop(c);
        // After a restart the sequence continues from what was committed.
        drop(db);
        // The committer thread may still hold the file for a moment after storing the skip.
        let started = std::time::Instant::now();
        let db = loop {
            match RedbStore::open(dir.path()) {
                Ok(db) => break db,
                Err(e) if started.elapsed().as_secs() > 5 => panic!("{e:#}"),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        };
        let mut d = Txn::new("user".into());
        assert_eq!(take(&db, &mut d), 5);
        // Sequences are per service, like everything else.
        let mut other = Txn::new("order".into());
        assert_eq!(take(&db, &mut other), 1);
    }

    #[test]
    fn made_up_names_of_failed_invocations_are_not_kept_in_memory() {
        let db = RedbStore::in_memory().unwrap();
        for i in 0..1000 {
            let mut t = Txn::new("s".into());
            assert_eq!(
                ready(db.next_id(&mut t, "m".into(), format!("n{i}"))).unwrap(),
                1
            );
        }
        // The skipped ids are stored by the committer; then nothing is left in memory.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while db.sequences_held() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(db.sequences_held(), 0);
        let mut t = Txn::new("s".into());
        assert_eq!(
            ready(db.next_id(&mut t, "m".into(), "n7".into())).unwrap(),
            2
        );
    }

    #[test]
    fn a_key_that_is_not_a_sequence_is_an_error() {
        let db = RedbStore::in_memory().unwrap();
        let mut t = Txn::new("s".into());
        t.put("m".into(), "seq".into(), Some(b"text".to_vec()))
            .unwrap();
        db.commit_blocking(&t).unwrap();
        let mut t = Txn::new("s".into());
        assert!(matches!(
            ready(db.next_id(&mut t, "m".into(), "seq".into())),
            Err(NextIdError::NotASequence(_))
        ));
    }
}
