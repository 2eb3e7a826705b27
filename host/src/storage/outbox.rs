//! The outbox table: messages of committed invocations, in commit order, until published.

use super::Db;
use crate::types::Message;
use anyhow::Result;
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

/// Bytes of the messages waiting in the outbox.
pub fn bytes(db: &Db) -> u64 {
    db.0.outbox_bytes.load(Ordering::SeqCst)
}

/// Takes `removed` bytes off the outbox's count.
fn forget(db: &Db, removed: u64) {
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

fn count(db: &Db, table: TableDefinition<u64, &[u8]>) -> Result<u64> {
    let rtx = db.redb().begin_read()?;
    match rtx.open_table(table) {
        Ok(t) => Ok(t.len()?),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// Messages waiting.
pub fn depth(db: &Db) -> Result<u64> {
    count(db, OUTBOX)
}

/// Messages set aside as never publishable.
pub fn parked(db: &Db) -> Result<u64> {
    count(db, PARKED)
}

/// Sets message `seq` aside with `reason`, and removes the ones before it (published). Blocking.
pub fn park(db: &Db, seq: u64, reason: &str) -> Result<()> {
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
        let message: Message = postcard::from_bytes(message.value())?;
        let mut parked = wtx.open_table(PARKED)?;
        let next = parked.last()?.map(|(k, _)| k.value() + 1).unwrap_or(0);
        parked.insert(next, postcard::to_allocvec(&(reason, message))?.as_slice())?;
        Ok(())
    })?;
    forget(db, removed);
    Ok(())
}

/// Up to `max` of the oldest messages with their sequence numbers, all of them on disk.
/// Blocking.
pub fn oldest(db: &Db, max: usize) -> Result<Vec<(u64, Message)>> {
    let rtx = db.redb().begin_read()?;
    let table = match rtx.open_table(OUTBOX) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for entry in table.iter()?.take(max) {
        let (k, v) = entry?;
        out.push((k.value(), postcard::from_bytes(v.value())?));
    }
    if !out.is_empty() {
        // Commits are visible before they are durable (group commit): never publish a
        // message whose invocation a crash could still undo.
        db.wait_durable()?;
    }
    Ok(out)
}

/// Removes every message up to sequence `last`. Lazily durable: after a crash, a batch whose
/// removal was lost is published again. Blocking.
pub fn remove_through(db: &Db, last: u64) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;
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
        let db = Db::in_memory().unwrap();
        for batch in [vec!["a", "b"], vec!["c"]] {
            let mut txn = Txn::new("user".into());
            for p in batch {
                txn.send(msg(p)).unwrap();
            }
            db.commit_blocking(&txn).unwrap();
        }
        let pending = oldest(&db, 256).unwrap();
        let payloads: Vec<_> = pending.iter().map(|(_, m)| m.payload.clone()).collect();
        assert_eq!(payloads, [b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        let all = bytes(&db);
        assert!(all > 0);
        remove_through(&db, pending[1].0).unwrap();
        assert_eq!(depth(&db).unwrap(), 1);
        assert!(bytes(&db) > 0 && bytes(&db) < all);
        assert_eq!(bytes(&db), bytes_stored(db.redb()).unwrap());
        assert_eq!(oldest(&db, 256).unwrap()[0].1.payload, b"c");
    }

    #[test]
    fn a_parked_message_leaves_the_queue_with_those_before_it_and_is_kept() {
        let db = Db::in_memory().unwrap();
        let mut txn = Txn::new("user".into());
        for p in ["a", "huge", "c"] {
            txn.send(msg(p)).unwrap();
        }
        db.commit_blocking(&txn).unwrap();
        let pending = oldest(&db, 256).unwrap();
        park(&db, pending[1].0, "too large").unwrap();
        assert_eq!((depth(&db).unwrap(), parked(&db).unwrap()), (1, 1));
        assert_eq!(bytes(&db), bytes_stored(db.redb()).unwrap());
        assert_eq!(oldest(&db, 256).unwrap()[0].1.payload, b"c");
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
        let db = Db::in_memory().unwrap();
        let mut reader = Txn::new("user".into());
        reader.get(&db, "b", "k").unwrap();
        reader.send(msg("lost")).unwrap();
        let mut writer = Txn::new("user".into());
        writer.put("b".into(), "k".into(), Some(vec![1])).unwrap();
        db.commit_blocking(&writer).unwrap();
        assert!(db.commit_blocking(&reader).is_err());
        assert_eq!(depth(&db).unwrap(), 0);
    }
}
