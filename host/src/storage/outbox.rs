//! The outbox table: messages of committed invocations, in commit order, until published.

use super::Db;
use crate::types::Message;
use anyhow::Result;
use redb::{ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};

/// sequence number -> postcard-encoded [`Message`], in commit order.
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");

/// Called inside the state commit, so messages exist if and only if their writes do.
pub(super) fn append(wtx: &WriteTransaction, messages: &[Message]) -> Result<()> {
    if messages.is_empty() {
        return Ok(());
    }
    let mut table = wtx.open_table(OUTBOX)?;
    let first = table.last()?.map(|(k, _)| k.value() + 1).unwrap_or(0);
    for (seq, m) in (first..).zip(messages) {
        table.insert(seq, postcard::to_allocvec(m)?.as_slice())?;
    }
    Ok(())
}

/// Messages waiting.
pub fn depth(db: &Db) -> Result<u64> {
    let rtx = db.redb().begin_read()?;
    match rtx.open_table(OUTBOX) {
        Ok(t) => Ok(t.len()?),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
        Err(e) => Err(e.into()),
    }
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
    db.write_lazily(|wtx| {
        wtx.open_table(OUTBOX)?.retain_in(..=last, |_, _| false)?;
        Ok(())
    })
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
                txn.send(msg(p));
            }
            db.commit_blocking(&txn).unwrap();
        }
        let pending = oldest(&db, 256).unwrap();
        let payloads: Vec<_> = pending.iter().map(|(_, m)| m.payload.clone()).collect();
        assert_eq!(payloads, [b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        remove_through(&db, pending[1].0).unwrap();
        assert_eq!(depth(&db).unwrap(), 1);
        assert_eq!(oldest(&db, 256).unwrap()[0].1.payload, b"c");
    }

    #[test]
    fn a_conflicting_commit_sends_nothing() {
        let db = Db::in_memory().unwrap();
        let mut reader = Txn::new("user".into());
        reader.get(&db, "b", "k").unwrap();
        reader.send(msg("lost"));
        let mut writer = Txn::new("user".into());
        writer.put("b".into(), "k".into(), Some(vec![1]));
        db.commit_blocking(&writer).unwrap();
        assert!(db.commit_blocking(&reader).is_err());
        assert_eq!(depth(&db).unwrap(), 0);
    }
}
