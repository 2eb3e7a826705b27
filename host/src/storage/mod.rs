//! Durable storage: state, id sequences and the outbox behind one [`StateStore`] trait, in
//! redb on this host's disk ([`RedbStore`], the default) or in PostgreSQL shared by several
//! hosts ([`PostgresStore`], with `STATE_URL`). The composition root picks one at start-up.
//!
//! An invocation (one HTTP request or one delivered message) reads through to the store and
//! buffers its writes and outgoing messages in a [`Txn`]. When it succeeds the host commits
//! everything at once with optimistic validation: if anything the invocation read changed in
//! the meantime, the commit is refused with [`CommitError::Conflict`] and the invocation is run
//! again. Components are stateless and request bodies are buffered, so re-running is safe and
//! gives serializable behaviour (no duplicate ids, no duplicate emails) without holding a lock
//! while guest code runs.

#[cfg(test)]
mod contract;
pub mod outbox;
pub mod postgres;
pub mod redb_store;
mod txn;

use anyhow::Result;
use async_trait::async_trait;

pub use outbox::Outbox;
pub use postgres::PostgresStore;
pub use redb_store::RedbStore;
pub use txn::MAX_PAGE;
pub use txn::{PageRead, Txn};

/// Where services' state, id sequences and outbox live. Every read and write is scoped to
/// one service (the transaction's), set by the host, never by the guest.
#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// The committed value of `service`'s `bucket/key`.
    async fn read_value(&self, service: &str, bucket: &str, key: &str) -> Result<Option<Vec<u8>>>;

    /// Up to `limit` committed keys of `range` in `service`, in byte order.
    async fn read_keys(&self, service: &str, range: &KeyRange, limit: usize)
        -> Result<Vec<String>>;

    /// The next id of `bucket/key` for `txn`'s service. Taken at once, not validated at
    /// commit: ids never repeat, and an id taken by an invocation that then fails is skipped.
    async fn next_id(&self, txn: &mut Txn, bucket: String, key: String)
        -> Result<u64, NextIdError>;

    /// Applies `txn`'s writes, ids and messages at once if nothing it read has changed
    /// (else [`CommitError::Conflict`]): visible to later invocations when this returns,
    /// durable once [`StateStore::durable`] returns. A store that is durable at once (the
    /// default) just commits.
    async fn apply(&self, txn: Txn) -> Result<(), CommitError> {
        self.commit(txn).await
    }

    /// [`StateStore::apply`], and on disk when this returns.
    async fn commit(&self, txn: Txn) -> Result<(), CommitError>;

    /// Returns once everything applied before the call is durable.
    async fn durable(&self) -> Result<()> {
        Ok(())
    }

    /// The messages of committed invocations, waiting to be published.
    fn outbox(&self) -> &dyn Outbox;
}

/// Why a commit did not happen.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// Something this invocation read was changed by another one: run it again.
    #[error("conflicting concurrent update")]
    Conflict,
    /// The outbox holds as much as it may (`OUTBOX_MAX`): nothing that sends is taken until
    /// the messaging backend drains it.
    #[error("{0}")]
    Full(String),
    #[error("storage error: {0:#}")]
    Storage(#[from] anyhow::Error),
}

/// Why no id was handed out.
#[derive(Debug, thiserror::Error)]
pub enum NextIdError {
    /// The key holds something that is not a sequence, or the sequence is exhausted.
    #[error("{0}")]
    NotASequence(String),
    #[error("storage error: {0:#}")]
    Storage(anyhow::Error),
}

/// Keys of one bucket that start with `prefix`, after `after` (exclusive) and up to `upto`
/// (inclusive) when given.
#[derive(Clone, Debug, Default)]
pub struct KeyRange {
    pub bucket: String,
    pub prefix: String,
    pub after: Option<String>,
    pub upto: Option<String>,
    /// Keys the invocation found in it: re-checking it reads at most one more.
    pub found: usize,
}

impl KeyRange {
    fn holds(&self, key: &str) -> bool {
        key.starts_with(&self.prefix)
            && self.after.as_deref().is_none_or(|a| key > a)
            && self.upto.as_deref().is_none_or(|u| key <= u)
    }
}

/// The output of `f`, which must be ready at once: a redb read or id, in a sync test.
#[cfg(test)]
pub(crate) fn ready<F: std::future::Future>(f: F) -> F::Output {
    futures_util::FutureExt::now_or_never(f).expect("ready at once")
}
