//! `microsvc:platform/state`: key-value buckets owned by the host, one transaction per invocation.

use super::bindings::microsvc::platform::state::{self as wit, Error as WitError};
use crate::storage::{NextIdError, StateStore, Txn, MAX_PAGE};
use crate::types::Overrun;
use anyhow::Result;
use platform_contract::{MAX_BODY, MAX_NAME};
use wasmtime::component::{HasData, Linker};

/// What a component's `state` imports work on: the store and the invocation's transaction.
pub struct StateView<'a> {
    pub store: &'a dyn StateStore,
    pub txn: &'a mut Txn,
}

struct HasState;
impl HasData for HasState {
    type Data<'a> = StateView<'a>;
}

pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    f: fn(&mut T) -> StateView<'_>,
) -> wasmtime::Result<()> {
    wit::add_to_linker::<T, HasState>(linker, f)
}

pub(super) fn check_name(what: &str, name: &str) -> Result<(), WitError> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(WitError::InvalidName(format!(
            "{what} must be 1..={MAX_NAME} bytes, got {}",
            name.len()
        )));
    }
    Ok(())
}

/// The guest's error for a failed read; a failure of the store (not the guest's own overrun)
/// is noted in `txn`, so that the invocation's failure is counted as the host's.
pub(super) fn storage(txn: &mut Txn, e: anyhow::Error) -> WitError {
    // An overrun is the guest's doing; the invocation fails and is logged as a whole.
    if !e.is::<Overrun>() {
        tracing::error!(error = %format!("{e:#}"), "state read failed");
        txn.unavailable.get_or_insert_with(|| format!("{e:#}"));
    }
    WitError::Storage(format!("{e:#}"))
}

impl StateView<'_> {
    async fn get_value(&mut self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, WitError> {
        check_name("bucket", bucket)?;
        check_name("key", key)?;
        let read = self.txn.get(self.store, bucket, key).await;
        read.map_err(|e| storage(self.txn, e))
    }

    pub(super) fn put(
        &mut self,
        bucket: String,
        key: String,
        value: Option<Vec<u8>>,
    ) -> Result<(), WitError> {
        check_name("bucket", &bucket)?;
        check_name("key", &key)?;
        if let Some(v) = &value {
            if v.len() > MAX_BODY {
                return Err(WitError::ValueTooLarge(v.len() as u64));
            }
        }
        self.txn
            .put(bucket, key, value)
            .map_err(|e| WitError::Storage(e.to_string()))
    }
}

impl wit::Host for StateView<'_> {
    async fn next_id(&mut self, bucket: String, key: String) -> Result<u64, WitError> {
        check_name("bucket", &bucket)?;
        check_name("key", &key)?;
        let taken = self.store.next_id(self.txn, bucket, key).await;
        taken.map_err(|e| match e {
            NextIdError::NotASequence(m) => WitError::NotACounter(m),
            NextIdError::Storage(e) => storage(self.txn, e),
        })
    }

    async fn get(&mut self, bucket: String, key: String) -> Result<Option<Vec<u8>>, WitError> {
        self.get_value(&bucket, &key).await
    }

    async fn set(&mut self, bucket: String, key: String, value: Vec<u8>) -> Result<(), WitError> {
        self.put(bucket, key, Some(value))
    }

    async fn delete(&mut self, bucket: String, key: String) -> Result<(), WitError> {
        self.put(bucket, key, None)
    }

    async fn list_keys(&mut self, bucket: String, prefix: String) -> Result<Vec<String>, WitError> {
        check_name("bucket", &bucket)?;
        let listed = self.txn.list_keys(self.store, &bucket, &prefix).await;
        listed.map_err(|e| storage(self.txn, e))
    }

    async fn list_keys_after(
        &mut self,
        bucket: String,
        prefix: String,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<String>, WitError> {
        check_name("bucket", &bucket)?;
        if let Some(after) = &after {
            check_name("after", after)?;
        }
        if limit == 0 {
            // A page of nothing would cover the whole range and conflict with every insert.
            return Err(WitError::InvalidName(format!(
                "limit must be 1..={MAX_PAGE}, got 0"
            )));
        }
        let limit = (limit as usize).min(MAX_PAGE);
        let listed = (self.txn)
            .list_page(self.store, &bucket, &prefix, after.as_deref(), limit)
            .await;
        listed.map_err(|e| storage(self.txn, e))
    }

    async fn increment(
        &mut self,
        bucket: String,
        key: String,
        delta: i64,
    ) -> Result<i64, WitError> {
        let current = match self.get_value(&bucket, &key).await? {
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
    use super::wit::Host;
    use super::*;
    use crate::storage::ready;
    use crate::storage::{CommitError, RedbStore};

    fn view<'a>(store: &'a RedbStore, txn: &'a mut Txn) -> StateView<'a> {
        StateView { store, txn }
    }

    #[test]
    fn bad_names_big_values_and_non_counters_are_errors_not_traps() {
        let db = RedbStore::in_memory().unwrap();
        let mut t = Txn::new("s".into());
        let mut v = view(&db, &mut t);
        assert!(matches!(
            ready(v.get("".into(), "k".into())),
            Err(WitError::InvalidName(_))
        ));
        assert!(matches!(
            ready(v.set("b".into(), "k".repeat(MAX_NAME + 1), vec![])),
            Err(WitError::InvalidName(_))
        ));
        assert!(matches!(
            ready(v.set("b".into(), "k".into(), vec![0; MAX_BODY + 1])),
            Err(WitError::ValueTooLarge(_))
        ));
        ready(v.set("b".into(), "k".into(), b"text".to_vec())).unwrap();
        assert!(matches!(
            ready(v.increment("b".into(), "k".into(), 1)),
            Err(WitError::NotACounter(_))
        ));
        ready(v.set("b".into(), "n".into(), i64::MAX.to_le_bytes().to_vec())).unwrap();
        assert!(matches!(
            ready(v.increment("b".into(), "n".into(), 1)),
            Err(WitError::NotACounter(_))
        ));
    }

    #[test]
    fn an_invocation_past_its_host_budget_gets_errors_and_stays_failed() {
        let db = RedbStore::in_memory().unwrap();
        let mut t = Txn::limited("s".into(), 4 << 20);
        let mut v = view(&db, &mut t);
        // Overwriting one key costs one value, not one per write.
        for _ in 0..100 {
            ready(v.set("b".into(), "same".into(), vec![0; 1 << 20])).unwrap();
        }
        let mut failed = None;
        for i in 0..20_000 {
            if let Err(e) = ready(v.set("b".into(), format!("k{i}"), vec![0; 1 << 20])) {
                failed = Some((i, e));
                break;
            }
        }
        let (i, e) = failed.expect("the budget stops a hoarding guest");
        assert!(i <= 4, "stopped after {i} MiB");
        assert!(matches!(e, WitError::Storage(m) if m.contains("INVOCATION_HOST_BYTES")));
        assert!(matches!(
            ready(v.get("b".into(), "x".into())),
            Err(WitError::Storage(_))
        ));
        assert!(matches!(
            ready(v.next_id("b".into(), "n".into())),
            Err(WitError::Storage(_))
        ));
        assert!(t.budget.overrun().is_some());
    }

    #[test]
    fn racing_increments_conflict_instead_of_sharing_an_id() {
        let db = RedbStore::in_memory().unwrap();
        let mut a = Txn::new("user".into());
        let mut b = Txn::new("user".into());
        let inc = |t: &mut Txn| ready(view(&db, t).increment("m".into(), "id".into(), 1)).unwrap();
        assert_eq!((inc(&mut a), inc(&mut b)), (1, 1));
        db.commit_blocking(&a).unwrap();
        assert!(matches!(db.commit_blocking(&b), Err(CommitError::Conflict)));
        let mut c = Txn::new("user".into());
        assert_eq!(inc(&mut c), 2);
    }

    #[test]
    fn a_page_of_zero_keys_is_refused_and_records_no_range() {
        let db = RedbStore::in_memory().unwrap();
        let mut t = Txn::new("s".into());
        let mut v = view(&db, &mut t);
        assert!(matches!(
            ready(v.list_keys_after("b".into(), "".into(), None, 0)),
            Err(WitError::InvalidName(m)) if m.contains("limit")
        ));
        ready(v.set("b".into(), "mine".into(), vec![1])).unwrap();
        // Another invocation inserts into the bucket: this one read nothing, so it commits.
        let mut other = Txn::new("s".into());
        ready(view(&db, &mut other).set("b".into(), "theirs".into(), vec![2])).unwrap();
        db.commit_blocking(&other).unwrap();
        db.commit_blocking(&t).unwrap();
    }

    #[test]
    fn list_keys_sees_own_writes_and_deletes() {
        let db = RedbStore::in_memory().unwrap();
        let mut t = Txn::new("s".into());
        let mut v = view(&db, &mut t);
        ready(v.set("b".into(), "a1".into(), vec![1])).unwrap();
        ready(v.set("b".into(), "a2".into(), vec![2])).unwrap();
        ready(v.delete("b".into(), "a1".into())).unwrap();
        assert_eq!(
            ready(v.list_keys("b".into(), "a".into())).unwrap(),
            vec!["a2"]
        );
    }
}
