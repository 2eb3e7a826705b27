//! One invocation's optimistic transaction: reads recorded for validation, writes buffered.

use super::redb_store::RedbStore;
use super::{KeyRange, StateStore};
use crate::types::budget::ENTRY_OVERHEAD;
use crate::types::{Budget, Message, Overrun};
use anyhow::Result;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Most keys one `list-keys-after` call returns.
pub const MAX_PAGE: usize = 1000;

pub(super) type Seen = [u8; 32];

pub(super) fn digest_of(value: &[u8]) -> Seen {
    Sha256::digest(value).into()
}

/// A digest of a list of keys. Each key is prefixed by its length (big-endian u64, as
/// PostgreSQL's `int8send` writes it: its commit computes the same digest): keys may hold any
/// byte (`\0` too), and no two different lists may share a digest.
pub(super) fn digest_keys(keys: &[String]) -> Seen {
    let mut h = Sha256::new();
    for k in keys {
        h.update((k.len() as u64).to_be_bytes());
        h.update(k.as_bytes());
    }
    h.finalize().into()
}

/// What one invocation has read and written so far.
#[derive(Default)]
pub struct Txn {
    pub(super) service: Arc<str>,
    /// What each read saw: a digest of the value, not a copy, so that a read costs the host
    /// the same whatever its size.
    pub(super) reads: Vec<(String, String, Option<Seen>)>,
    /// Each key range listed, with a digest of the keys it held.
    pub(super) lists: Vec<(KeyRange, Seen)>,
    pub(super) writes: BTreeMap<(String, String), Option<Vec<u8>>>,
    /// Highest id taken per sequence.
    pub(super) sequences: BTreeMap<(String, String), u64>,
    pub(super) outbox: Vec<Message>,
    /// What all of the above may cost the host.
    pub budget: Budget,
    /// Set when the store failed one of this invocation's reads: whatever the guest answered,
    /// the failure was the host's.
    pub unavailable: Option<String>,
    /// The redb store whose in-memory sequences this transaction took ids from, to release
    /// them when it is dropped.
    pub(super) lease: Option<RedbStore>,
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

    /// Whether staging `message` stays within the budget.
    pub fn has_room_for(&self, message: &Message) -> bool {
        self.budget.fits(message.size() + ENTRY_OVERHEAD)
    }

    /// Stages `message`: it reaches the outbox with the commit, or never.
    pub fn send(&mut self, message: Message) -> Result<(), Overrun> {
        self.budget.charge(message.size() + ENTRY_OVERHEAD)?;
        self.outbox.push(message);
        Ok(())
    }

    /// The value at `bucket/key` as this invocation sees it: its own write, else the store's
    /// (remembered, so that the commit can check it is still current).
    pub async fn get(
        &mut self,
        store: &dyn StateStore,
        bucket: &str,
        key: &str,
    ) -> Result<Option<Vec<u8>>> {
        if let Some(v) = self.staged(bucket, key) {
            return Ok(v);
        }
        let value = store.read_value(&self.service, bucket, key).await?;
        self.seen(bucket, key, value)
    }

    /// The service whose state this transaction works on.
    pub fn service(&self) -> Arc<str> {
        self.service.clone()
    }

    /// What this invocation wrote at `bucket/key` itself, if it did (`Some(None)`: deleted).
    pub fn staged(&self, bucket: &str, key: &str) -> Option<Option<Vec<u8>>> {
        self.writes
            .get(&(bucket.to_string(), key.to_string()))
            .cloned()
    }

    /// Remembers that the store held `value` at `bucket/key` (read without this transaction at
    /// hand, as `get` does with it), so that the commit can check it is still current: the value
    /// as this invocation sees it.
    pub fn seen(
        &mut self,
        bucket: &str,
        key: &str,
        value: Option<Vec<u8>>,
    ) -> Result<Option<Vec<u8>>> {
        if let Some(v) = self.staged(bucket, key) {
            return Ok(v);
        }
        let held = bucket.len() + key.len() + std::mem::size_of::<Seen>();
        self.budget.charge(held + ENTRY_OVERHEAD)?;
        let seen = value.as_deref().map(digest_of);
        self.reads.push((bucket.to_string(), key.to_string(), seen));
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
    pub async fn list_keys(
        &mut self,
        store: &dyn StateStore,
        bucket: &str,
        prefix: &str,
    ) -> Result<Vec<String>> {
        self.list_page(store, bucket, prefix, None, usize::MAX)
            .await
    }

    /// Up to `limit` keys of `bucket` starting with `prefix` and after `after`, as this
    /// invocation sees them, in byte order. The commit checks only the range this page covered,
    /// so a page does not conflict with inserts beyond it.
    pub async fn list_page(
        &mut self,
        store: &dyn StateStore,
        bucket: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>> {
        let page = self.page_read(bucket, prefix, after, limit);
        let committed = page.read(store, &self.service).await?;
        self.page_seen(page, committed)
    }

    /// What [`Txn::list_page`] reads from the store for a page.
    pub fn page_read(
        &self,
        bucket: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> PageRead {
        let range = KeyRange {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            after: after.map(str::to_string),
            upto: None,
            found: 0,
        };
        // Own deletes may hide committed keys: read that many more.
        let deletes = self
            .writes
            .iter()
            .filter(|(bk, v)| bk.0 == bucket && range.holds(&bk.1) && v.is_none())
            .count();
        PageRead {
            want: limit.saturating_add(deletes),
            range,
            limit,
        }
    }

    /// The page `page` lists, given the keys the store held (`committed`, read as `page` says):
    /// merged with this invocation's own writes, and remembered for the commit's check.
    pub fn page_seen(&mut self, page: PageRead, committed: Vec<String>) -> Result<Vec<String>> {
        let PageRead {
            mut range,
            want,
            limit,
        } = page;
        let held: usize = committed.iter().map(|k| k.len() + ENTRY_OVERHEAD).sum();
        self.budget
            .charge(range.bucket.len() + range.prefix.len() + 2 * held + ENTRY_OVERHEAD)?;
        let mut keys: BTreeSet<String> = committed.iter().cloned().collect();
        for (bk, v) in &self.writes {
            if bk.0 == range.bucket && range.holds(&bk.1) {
                match v {
                    Some(_) => keys.insert(bk.1.clone()),
                    None => keys.remove(&bk.1),
                };
            }
        }
        if committed.len() == want {
            // Cut short: this page saw the keys up to the last one read, no further.
            range.upto = committed.last().cloned();
        }
        range.found = committed.len();
        self.lists.push((range, digest_keys(&committed)));
        Ok(keys.into_iter().take(limit).collect())
    }
}

/// A page of keys to read from the store ([`Txn::page_read`]).
pub struct PageRead {
    range: KeyRange,
    want: usize,
    limit: usize,
}

impl PageRead {
    /// The committed keys of the page, from `store`, for `service`.
    pub async fn read(&self, store: &dyn StateStore, service: &str) -> Result<Vec<String>> {
        store.read_keys(service, &self.range, self.want).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::ready;
    use crate::storage::CommitError;

    #[test]
    fn writes_are_invisible_until_commit_and_visible_after() {
        let db = RedbStore::in_memory().unwrap();
        let mut t1 = Txn::new("user".into());
        t1.put("b".into(), "k".into(), Some(b"v".to_vec())).unwrap();
        assert_eq!(ready(t1.get(&db, "b", "k")).unwrap(), Some(b"v".to_vec()));
        let mut t2 = Txn::new("user".into());
        assert_eq!(ready(t2.get(&db, "b", "k")).unwrap(), None);
        db.commit_blocking(&t1).unwrap();
        let mut t3 = Txn::new("user".into());
        assert_eq!(ready(t3.get(&db, "b", "k")).unwrap(), Some(b"v".to_vec()));
    }

    #[test]
    fn a_listed_range_whose_keys_changed_conflicts_even_when_nul_bytes_line_them_up() {
        let db = RedbStore::in_memory().unwrap();
        let mut seed = Txn::new("user".into());
        seed.put("b".into(), "p\0x".into(), Some(vec![1])).unwrap();
        db.commit_blocking(&seed).unwrap();
        let mut reader = Txn::new("user".into());
        assert_eq!(ready(reader.list_keys(&db, "b", "")).unwrap(), ["p\0x"]);
        reader
            .put("c".into(), "seen".into(), Some(vec![1]))
            .unwrap();
        // Another invocation replaces that key with two: "p" and "x", each followed by a NUL,
        // spell the same bytes as "p\0x" followed by one.
        let mut other = Txn::new("user".into());
        other.put("b".into(), "p\0x".into(), None).unwrap();
        other.put("b".into(), "p".into(), Some(vec![2])).unwrap();
        other.put("b".into(), "x".into(), Some(vec![2])).unwrap();
        db.commit_blocking(&other).unwrap();
        assert!(matches!(
            db.commit_blocking(&reader),
            Err(CommitError::Conflict)
        ));
    }

    #[test]
    fn racing_read_modify_writes_conflict_instead_of_both_landing() {
        let db = RedbStore::in_memory().unwrap();
        let bump = |t: &mut Txn| {
            let n = ready(t.get(&db, "m", "id")).unwrap().map_or(0, |v| v[0]);
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
    fn pages_walk_every_key_once_and_conflict_only_within_their_range() {
        let db = RedbStore::in_memory().unwrap();
        let mut seed = Txn::new("s".into());
        for i in 0..25 {
            seed.put("b".into(), format!("k{i:02}"), Some(vec![i]))
                .unwrap();
        }
        seed.put("other".into(), "k00".into(), Some(vec![0]))
            .unwrap();
        db.commit_blocking(&seed).unwrap();

        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut t = Txn::new("s".into());
            let page = ready(t.list_page(&db, "b", "k", after.as_deref(), 10)).unwrap();
            seen.extend(page.iter().cloned());
            if page.len() < 10 {
                break;
            }
            after = page.last().cloned();
        }
        let all: Vec<String> = (0..25).map(|i| format!("k{i:02}")).collect();
        assert_eq!(seen, all);

        // Own writes count: a delete inside the page is filled from beyond it.
        let mut t = Txn::new("s".into());
        t.put("b".into(), "k03".into(), None).unwrap();
        t.put("b".into(), "k035".into(), Some(vec![1])).unwrap();
        let page = ready(t.list_page(&db, "b", "k", Some("k01"), 3)).unwrap();
        assert_eq!(page, ["k02", "k035", "k04"]);

        // A page of k00..k09 conflicts with an insert inside it, not with one after it.
        let mut first = Txn::new("s".into());
        ready(first.list_page(&db, "b", "k", None, 10)).unwrap();
        first.put("b".into(), "x".into(), Some(vec![1])).unwrap();
        let mut beyond = Txn::new("s".into());
        beyond.put("b".into(), "k99".into(), Some(vec![1])).unwrap();
        db.commit_blocking(&beyond).unwrap();
        db.commit_blocking(&first).unwrap();
        let mut inside = Txn::new("s".into());
        ready(inside.list_page(&db, "b", "k", None, 10)).unwrap();
        inside.put("b".into(), "y".into(), Some(vec![1])).unwrap();
        let mut phantom = Txn::new("s".into());
        phantom
            .put("b".into(), "k055".into(), Some(vec![1]))
            .unwrap();
        db.commit_blocking(&phantom).unwrap();
        assert!(matches!(
            db.commit_blocking(&inside),
            Err(CommitError::Conflict)
        ));
    }

    #[test]
    fn list_keys_merges_own_writes_and_detects_phantoms() {
        let db = RedbStore::in_memory().unwrap();
        let mut seed = Txn::new("s".into());
        seed.put("b".into(), "a1".into(), Some(vec![1])).unwrap();
        seed.put("b".into(), "a2".into(), Some(vec![2])).unwrap();
        db.commit_blocking(&seed).unwrap();

        let mut t = Txn::new("s".into());
        t.put("b".into(), "a1".into(), None).unwrap();
        t.put("b".into(), "a3".into(), Some(vec![3])).unwrap();
        assert_eq!(ready(t.list_keys(&db, "b", "a")).unwrap(), vec!["a2", "a3"]);

        let mut other = Txn::new("s".into());
        other.put("b".into(), "a9".into(), Some(vec![9])).unwrap();
        db.commit_blocking(&other).unwrap();
        assert!(matches!(db.commit_blocking(&t), Err(CommitError::Conflict)));
    }
}
