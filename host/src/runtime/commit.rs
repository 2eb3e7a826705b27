//! Committing invocations: the state store's commit, the outbox's cap, and the drainer's bell.

use super::Runtime;
use crate::storage::{CommitError, Txn};
use crate::types::Message;
use anyhow::Result;

/// Re-runs after a conflict hold this until their commit is done.
type Serialized = Option<tokio::sync::OwnedMutexGuard<()>>;

impl Runtime {
    /// Commits an invocation (on disk when this returns) and wakes the outbox drainer if it
    /// sent messages.
    pub(super) async fn commit(&self, txn: Txn, serialized: Serialized) -> Result<(), CommitError> {
        self.land(txn, serialized, true).await
    }

    /// Applies a message handler's writes (visible at once, durable with a later durable
    /// commit): the consumer waits for the disk once per batch of records, before it commits
    /// their offsets (see `ingress::consumer`).
    pub(super) async fn commit_handled(
        &self,
        txn: Txn,
        serialized: Serialized,
    ) -> Result<(), CommitError> {
        self.land(txn, serialized, false).await
    }

    /// Commits (`durable`) or applies `txn` if the outbox has room for what it sends; then
    /// releases `serialized` and rings the drainer's bell.
    async fn land(
        &self,
        txn: Txn,
        serialized: Serialized,
        durable: bool,
    ) -> Result<(), CommitError> {
        let sent = txn.sends();
        if sent {
            self.outbox_has_room()?;
        }
        match durable {
            true => self.state.commit(txn).await?,
            false => self.state.apply(txn).await?,
        }
        drop(serialized);
        if sent {
            self.drainer.poke();
        }
        Ok(())
    }

    /// Refuses new messages while the outbox holds `OUTBOX_MAX` bytes: an unreachable broker
    /// must not fill the disk.
    fn outbox_has_room(&self) -> Result<(), CommitError> {
        let held = self.state.outbox().bytes();
        if held >= self.settings.outbox_max {
            return Err(CommitError::Full(format!(
                "the outbox holds {held} bytes of events the messaging backend has not taken \
                 (OUTBOX_MAX is {}); retry later",
                self.settings.outbox_max
            )));
        }
        Ok(())
    }

    /// Puts `messages` in the outbox on their own (durably) in `service`'s name, for the
    /// drainer to publish, in as few commits as a transaction's budget allows: a dead-lettered
    /// record waits there while the broker is away, and is set aside like any other if the
    /// broker refuses it for good. Returns how many were committed, and what stopped the
    /// rest.
    pub async fn send_later(
        &self,
        service: &str,
        messages: impl IntoIterator<Item = Message>,
    ) -> (usize, Result<()>) {
        let (mut sent, mut staged) = (0, 0);
        let mut txn = Txn::new(service.into());
        for message in messages {
            if staged > 0 && !txn.has_room_for(&message) {
                let full = std::mem::replace(&mut txn, Txn::new(service.into()));
                if let Err(e) = self.commit(full, None).await {
                    return (sent, Err(anyhow::anyhow!("{e}")));
                }
                sent += std::mem::take(&mut staged);
            }
            if let Err(e) = txn.send(message) {
                return (sent, Err(e.into()));
            }
            staged += 1;
        }
        if staged > 0 {
            if let Err(e) = self.commit(txn, None).await {
                return (sent, Err(anyhow::anyhow!("{e}")));
            }
        }
        (sent + staged, Ok(()))
    }
}
