//! Embedded messaging backend: a durable topic log with consumer-group offsets in the host's store.
//!
//! One partition per topic (partition 0), so order is total. Used when no Kafka is configured.

use super::{Backend, Subscription};
use crate::storage::Db;
use crate::types::{Delivery, Message};
use anyhow::Result;
use redb::{ReadableTable, TableDefinition};
use tokio::sync::watch;

/// (topic, offset) -> postcard-encoded [`Message`].
const LOG: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("log");
/// (group, topic) -> next offset to deliver.
const OFFSETS: TableDefinition<(&str, &str), u64> = TableDefinition::new("offsets");

pub struct Embedded {
    db: Db,
    /// Bumped after every append so waiting subscriptions look again.
    appended: watch::Sender<u64>,
}

impl Embedded {
    pub fn new(db: Db) -> Embedded {
        Embedded {
            db,
            appended: watch::Sender::new(0),
        }
    }
}

/// Lazily durable: the outbox entries it replaces are removed after it, in order, so a crash
/// can at worst publish them again.
fn append_blocking(db: &Db, messages: &[Message]) -> Result<()> {
    db.write_lazily(|wtx| {
        let mut log = wtx.open_table(LOG)?;
        for m in messages {
            let next = log
                .range((m.topic.as_str(), 0)..=(m.topic.as_str(), u64::MAX))?
                .next_back()
                .transpose()?
                .map(|(k, _)| k.value().1 + 1)
                .unwrap_or(0);
            log.insert(
                (m.topic.as_str(), next),
                postcard::to_allocvec(m)?.as_slice(),
            )?;
        }
        Ok(())
    })
}

#[async_trait::async_trait]
impl Backend for Embedded {
    fn describe(&self) -> String {
        "embedded (durable log in the data dir)".into()
    }

    fn in_state_store(&self) -> bool {
        true
    }

    async fn publish(&self, messages: &[Message]) -> Result<()> {
        let db = self.db.clone();
        let messages = messages.to_vec();
        tokio::task::spawn_blocking(move || append_blocking(&db, &messages)).await??;
        self.appended.send_modify(|n| *n += 1);
        Ok(())
    }

    async fn subscribe(&self, group: &str, topic: &str) -> Result<Box<dyn Subscription>> {
        let rtx = self.db.redb().begin_read()?;
        let cursor = match rtx.open_table(OFFSETS) {
            Ok(t) => t.get((group, topic))?.map(|v| v.value()).unwrap_or(0),
            Err(redb::TableError::TableDoesNotExist(_)) => 0,
            Err(e) => return Err(e.into()),
        };
        Ok(Box::new(EmbeddedSubscription {
            db: self.db.clone(),
            group: group.to_string(),
            topic: topic.to_string(),
            cursor,
            appended: self.appended.subscribe(),
        }))
    }
}

struct EmbeddedSubscription {
    db: Db,
    group: String,
    topic: String,
    cursor: u64,
    appended: watch::Receiver<u64>,
}

impl EmbeddedSubscription {
    fn read(&self, offset: u64) -> Result<Option<Message>> {
        let rtx = self.db.redb().begin_read()?;
        let log = match rtx.open_table(LOG) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let value = log.get((self.topic.as_str(), offset))?;
        Ok(value.map(|v| postcard::from_bytes(v.value())).transpose()?)
    }
}

#[async_trait::async_trait]
impl Subscription for EmbeddedSubscription {
    async fn next(&mut self) -> Result<Delivery> {
        loop {
            // Mark the current generation seen *before* reading, so an append between the
            // read and the wait still wakes us.
            self.appended.borrow_and_update();
            if let Some(message) = self.read(self.cursor)? {
                let offset = self.cursor;
                self.cursor += 1;
                return Ok(Delivery {
                    message,
                    partition: 0,
                    offset,
                });
            }
            self.appended.changed().await?;
        }
    }

    fn lag(&self) -> Option<u64> {
        let rtx = self.db.redb().begin_read().ok()?;
        let log = rtx.open_table(LOG).ok()?;
        let topic = self.topic.as_str();
        let end = log
            .range((topic, 0)..=(topic, u64::MAX))
            .ok()?
            .next_back()?
            .ok()
            .map(|(k, _)| k.value().1 + 1)?;
        Some(end.saturating_sub(self.cursor))
    }

    async fn commit(&mut self, delivery: &Delivery) -> Result<()> {
        let db = self.db.clone();
        let (group, topic, next) = (self.group.clone(), self.topic.clone(), delivery.offset + 1);
        // Lazily durable: losing it in a crash only redelivers records the handler already
        // committed, which handlers must tolerate anyway (at-least-once).
        tokio::task::spawn_blocking(move || -> Result<()> {
            db.write_lazily(|wtx| {
                wtx.open_table(OFFSETS)?
                    .insert((group.as_str(), topic.as_str()), next)?;
                Ok(())
            })
        })
        .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn contract_in_memory() {
        let backend: Arc<dyn Backend> = Arc::new(Embedded::new(Db::in_memory().unwrap()));
        crate::messaging::tests::contract(backend, "contract").await;
    }

    #[tokio::test]
    async fn contract_on_disk_and_offsets_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let backend: Arc<dyn Backend> = Arc::new(Embedded::new(Db::open(dir.path()).unwrap()));
            crate::messaging::tests::contract(backend, "contract").await;
        }
        let backend = Embedded::new(Db::open(dir.path()).unwrap());
        backend
            .publish(&[crate::messaging::tests::msg("contract", "9", "e")])
            .await
            .unwrap();
        // g1 committed everything up to "d" before the reopen: only "e" is left.
        let mut sub = backend.subscribe("g1", "contract").await.unwrap();
        assert_eq!(sub.next().await.unwrap().message.payload, b"e");
    }
}
