//! Id sequences: ids that never repeat and never make concurrent invocations conflict.

use super::{Db, KvKey, Txn};
use anyhow::Result;
use redb::ReadableTable;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Last id handed out per (service, bucket, key) sequence, ahead of what is committed.
pub(super) type Sequences = Mutex<HashMap<(Arc<str>, String, String), u64>>;

/// Why no id was handed out.
#[derive(Debug)]
pub enum NextIdError {
    /// The key holds something that is not a sequence, or the sequence is exhausted.
    NotASequence(String),
    Storage(anyhow::Error),
}

/// A sequence is stored as 8 little-endian bytes, like a counter.
fn sequence_value(bytes: &[u8]) -> Result<u64, NextIdError> {
    let arr: [u8; 8] = bytes.try_into().map_err(|_| {
        NextIdError::NotASequence(format!("a sequence holds {} bytes", bytes.len()))
    })?;
    Ok(u64::from_le_bytes(arr))
}

impl Db {
    /// The next id of `bucket/key` for `txn`'s service. Taken at once under a lock, not
    /// validated at commit: an id taken by an invocation that then fails is skipped.
    pub fn next_id(&self, txn: &mut Txn, bucket: String, key: String) -> Result<u64, NextIdError> {
        let mut sequences = self.0.sequences.lock().unwrap();
        let slot = (txn.service.clone(), bucket, key);
        let last = match sequences.get(&slot) {
            Some(&last) => last,
            None => match self
                .read_value(&slot.0, &slot.1, &slot.2)
                .map_err(NextIdError::Storage)?
            {
                None => 0,
                Some(bytes) => sequence_value(&bytes)?,
            },
        };
        let id = last
            .checked_add(1)
            .ok_or_else(|| NextIdError::NotASequence("sequence exhausted".into()))?;
        sequences.insert(slot.clone(), id);
        let taken = txn.sequences.entry((slot.1, slot.2)).or_insert(0);
        *taken = (*taken).max(id);
        Ok(id)
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

    #[test]
    fn ids_never_repeat_never_conflict_and_skip_only_after_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let take = |db: &Db, txn: &mut Txn| db.next_id(txn, "m".into(), "seq".into()).unwrap();
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
    fn a_key_that_is_not_a_sequence_is_an_error() {
        let db = Db::in_memory().unwrap();
        let mut t = Txn::new("s".into());
        t.put("m".into(), "seq".into(), Some(b"text".to_vec()));
        db.commit_blocking(&t).unwrap();
        let mut t = Txn::new("s".into());
        assert!(matches!(
            db.next_id(&mut t, "m".into(), "seq".into()),
            Err(NextIdError::NotASequence(_))
        ));
    }
}
