//! The outbox in redb: a table appended by the committer in commit order.

use super::RedbStore;
use crate::storage::outbox::{decode_rows, parked_record, Outbox};
use crate::types::Message;
use anyhow::Result;
use async_trait::async_trait;
use redb::{ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use std::sync::atomic::Ordering;

/// sequence number -> postcard-encoded [`Message`], in commit order.
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");

/// Called inside the state commit, so messages exist if and only if their writes do. Returns
/// the bytes added.
pub(super) fn append(wtx: &WriteTransaction, messages: &[Message]) -> Result<u64> {
    if messages.is_empty() {
        return Ok(0);
    }
    let mut table = wtx.open_table(OUTBOX)?;
    let first = table.last()?.map(|(k, _)| k.value() + 1).unwrap_or(0);
    let mut bytes = 0;
    for (seq, m) in (first..).zip(messages) {
        let encoded = postcard::to_allocvec(m)?;
        bytes += encoded.len() as u64;
        table.insert(seq, encoded.as_slice())?;
    }
    Ok(bytes)
}

/// Bytes of the messages in the outbox, counted once when the store is opened.
pub(super) fn bytes_stored(db: &redb::Database) -> Result<u64> {
    let rtx = db.begin_read()?;
    let table = match rtx.open_table(OUTBOX) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let mut bytes = 0;
    for entry in table.iter()? {
        bytes += entry?.1.value().len() as u64;
    }
    Ok(bytes)
}

/// Takes `removed` bytes off the outbox's count.
fn forget(db: &RedbStore, removed: u64) {
    let _ =
        db.0.outbox_bytes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| {
                Some(b.saturating_sub(removed))
            });
}

/// Messages the backend refused for good (too large for the broker, say), set aside with the
/// reason so that the ones after them flow: sequence number -> postcard-encoded
/// `(reason, Message)`. An operator reads them here; nothing is dropped.
const PARKED: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox_parked");

fn count(db: &RedbStore, table: TableDefinition<u64, &[u8]>) -> Result<u64> {
    let rtx = db.redb().begin_read()?;
    match rtx.open_table(table) {
        Ok(t) => Ok(t.len()?),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

#[async_trait]
impl Outbox for RedbStore {
    fn bytes(&self) -> u64 {
        self.0.outbox_bytes.load(Ordering::SeqCst)
    }

    fn depth(&self) -> Result<u64> {
        count(self, OUTBOX)
    }

    fn parked(&self) -> Result<u64> {
        count(self, PARKED)
    }

    async fn oldest(&self, max: usize) -> Result<Vec<(u64, Message)>> {
        let db = self.clone();
        tokio::task::spawn_blocking(move || oldest_local(&db, max)).await?
    }

    async fn remove(&self, seqs: &[u64]) -> Result<()> {
        // The outbox is appended in commit order under the writer lock: a batch is a prefix,
        // and removing through its last one removes exactly it.
        let Some(&last) = seqs.iter().max() else {
            return Ok(());
        };
        let db = self.clone();
        tokio::task::spawn_blocking(move || remove_through(&db, last)).await?
    }

    async fn park(&self, _published: &[u64], seq: u64, reason: &str) -> Result<()> {
        let (db, reason) = (self.clone(), reason.to_string());
        tokio::task::spawn_blocking(move || park_local(&db, seq, &reason)).await?
    }
}

/// [`Outbox::park`] here, where the batch is everything before `seq`. Blocking.
fn park_local(db: &RedbStore, seq: u64, reason: &str) -> Result<()> {
    let mut removed = 0;
    db.write_lazily(|wtx| {
        let mut outbox = wtx.open_table(OUTBOX)?;
        outbox.retain_in(..seq, |_, v| {
            removed += v.len() as u64;
            false
        })?;
        let Some(message) = outbox.remove(seq)? else {
            return Ok(());
        };
        removed += message.value().len() as u64;
        let record = parked_record(reason, message.value())?;
        let mut parked = wtx.open_table(PARKED)?;
        let next = parked.last()?.map(|(k, _)| k.value() + 1).unwrap_or(0);
        parked.insert(next, record.as_slice())?;
        Ok(())
    })?;
    forget(db, removed);
    Ok(())
}

/// [`Outbox::oldest`] here. Blocking.
pub fn oldest_local(db: &RedbStore, max: usize) -> Result<Vec<(u64, Message)>> {
    let rtx = db.redb().begin_read()?;
    let table = match rtx.open_table(OUTBOX) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let entries: Vec<_> = table.iter()?.take(max).collect::<Result<_, _>>()?;
    let out = decode_rows(entries.iter().map(|(k, v)| Ok((k.value(), v.value()))))?;
    if !out.is_empty() {
        // Commits are visible before they are durable (group commit): never publish a
        // message whose invocation a crash could still undo.
        db.wait_durable()?;
    }
    Ok(out)
}

/// Removes every message up to sequence `last`. Blocking.
pub fn remove_through(db: &RedbStore, last: u64) -> Result<()> {
    let mut removed = 0;
    db.write_lazily(|wtx| {
        wtx.open_table(OUTBOX)?.retain_in(..=last, |_, v| {
            removed += v.len() as u64;
            false
        })?;
        Ok(())
    })?;
    forget(db, removed);
    Ok(())
}

/// Appends `bytes` to the outbox as they are, as another version of the host might have.
#[cfg(test)]
pub fn append_raw(db: &RedbStore, bytes: &[u8]) {
    db.write_lazily(|wtx| {
        let mut outbox = wtx.open_table(OUTBOX)?;
        let next = outbox.last()?.map_or(0, |(k, _)| k.value() + 1);
        outbox.insert(next, bytes)?;
        Ok(())
    })
    .unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::ready;
    use crate::storage::Txn;

    fn msg(payload: &str) -> Message {
        Message {
            topic: "t".into(),
            key: Some("1".into()),
            payload: payload.as_bytes().to_vec(),
            headers: vec![],
        }
    }

    #[test]
    fn messages_land_with_their_commit_in_order_and_leave_when_removed() {
        let db = RedbStore::in_memory().unwrap();
        for batch in [vec!["a", "b"], vec!["c"]] {
            let mut txn = Txn::new("user".into());
            for p in batch {
                txn.send(msg(p)).unwrap();
            }
            db.commit_blocking(&txn).unwrap();
        }
        let pending = oldest_local(&db, 256).unwrap();
        let payloads: Vec<_> = pending.iter().map(|(_, m)| m.payload.clone()).collect();
        assert_eq!(payloads, [b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        let all = db.bytes();
        assert!(all > 0);
        remove_through(&db, pending[1].0).unwrap();
        assert_eq!(db.depth().unwrap(), 1);
        assert!(db.bytes() > 0 && db.bytes() < all);
        assert_eq!(db.bytes(), bytes_stored(db.redb()).unwrap());
        assert_eq!(oldest_local(&db, 256).unwrap()[0].1.payload, b"c");
    }

    #[test]
    fn a_parked_message_leaves_the_queue_with_those_before_it_and_is_kept() {
        let db = RedbStore::in_memory().unwrap();
        let mut txn = Txn::new("user".into());
        for p in ["a", "huge", "c"] {
            txn.send(msg(p)).unwrap();
        }
        db.commit_blocking(&txn).unwrap();
        let pending = oldest_local(&db, 256).unwrap();
        park_local(&db, pending[1].0, "too large").unwrap();
        assert_eq!((db.depth().unwrap(), db.parked().unwrap()), (1, 1));
        assert_eq!(db.bytes(), bytes_stored(db.redb()).unwrap());
        assert_eq!(oldest_local(&db, 256).unwrap()[0].1.payload, b"c");
        let rtx = db.redb().begin_read().unwrap();
        let table = rtx.open_table(PARKED).unwrap();
        let (_, kept) = table.first().unwrap().unwrap();
        let (reason, message): (String, Message) = postcard::from_bytes(kept.value()).unwrap();
        assert_eq!(
            (reason.as_str(), message.payload.as_slice()),
            ("too large", &b"huge"[..])
        );
    }

    #[test]
    fn a_conflicting_commit_sends_nothing() {
        let db = RedbStore::in_memory().unwrap();
        let mut reader = Txn::new("user".into());
        ready(reader.get(&db, "b", "k")).unwrap();
        reader.send(msg("lost")).unwrap();
        let mut writer = Txn::new("user".into());
        writer.put("b".into(), "k".into(), Some(vec![1])).unwrap();
        db.commit_blocking(&writer).unwrap();
        assert!(db.commit_blocking(&reader).is_err());
        assert_eq!(db.depth().unwrap(), 0);
    }
}
