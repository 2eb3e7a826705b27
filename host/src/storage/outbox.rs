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

/// Bytes of the messages waiting in the outbox (with `STATE_URL`: as last counted, at most a
/// second ago).
pub fn bytes(db: &Db) -> u64 {
    match db.shared() {
        Some(pg) => pg.bytes(),
        None => db.0.outbox_bytes.load(Ordering::SeqCst),
    }
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

/// Messages waiting (with `STATE_URL`: as last counted, at most a second ago).
pub fn depth(db: &Db) -> Result<u64> {
    match db.shared() {
        Some(pg) => Ok(pg.depth()),
        None => count(db, OUTBOX),
    }
}

/// Messages set aside as never publishable (with `STATE_URL`: as last counted).
pub fn parked(db: &Db) -> Result<u64> {
    match db.shared() {
        Some(pg) => Ok(pg.parked()),
        None => count(db, PARKED),
    }
}

/// The oldest entry of the outbox cannot be decoded (written by another version of the host,
/// say): [`park`] it so that the ones after it flow.
#[derive(Debug)]
pub struct Undecodable {
    pub seq: u64,
    pub reason: String,
}

impl std::fmt::Display for Undecodable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "outbox entry {} cannot be decoded: {}",
            self.seq, self.reason
        )
    }
}

impl std::error::Error for Undecodable {}

/// Decodes the outbox entries `rows` (sequence number, encoded message), oldest first: those
/// before the first one that does not decode, or [`Undecodable`] when it is the oldest.
pub(super) fn decode_rows<'a>(
    rows: impl IntoIterator<Item = Result<(u64, &'a [u8])>>,
) -> Result<Vec<(u64, Message)>> {
    let mut out = Vec::new();
    for row in rows {
        let (seq, bytes) = row?;
        match postcard::from_bytes(bytes) {
            Ok(message) => out.push((seq, message)),
            Err(e) if out.is_empty() => {
                return Err(Undecodable {
                    seq,
                    reason: e.to_string(),
                }
                .into())
            }
            Err(_) => break,
        }
    }
    Ok(out)
}

/// What a parked entry keeps: the message, or, when its bytes do not decode, a message whose
/// payload is those bytes, under no topic.
pub(super) fn parked_record(reason: &str, bytes: &[u8]) -> Result<Vec<u8>> {
    let message: Message = postcard::from_bytes(bytes).unwrap_or_else(|_| Message {
        topic: String::new(),
        key: None,
        payload: bytes.to_vec(),
        headers: vec![("outbox-undecodable".into(), "true".into())],
    });
    Ok(postcard::to_allocvec(&(reason, message))?)
}

/// Sets message `seq` of a batch aside with `reason`, and removes `published`, the ones of the
/// batch before it.
pub async fn park(db: &Db, published: &[u64], seq: u64, reason: &str) -> Result<()> {
    if let Some(pg) = db.shared() {
        return pg.park(published, seq, reason).await;
    }
    let (db, reason) = (db.clone(), reason.to_string());
    tokio::task::spawn_blocking(move || park_local(&db, seq, &reason)).await?
}

/// [`park`] in redb, where the batch is everything before `seq`. Blocking.
fn park_local(db: &Db, seq: u64, reason: &str) -> Result<()> {
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

/// Up to `max` of the oldest messages this host publishes, with their sequence numbers, all of
/// them on disk. With `STATE_URL`, those of the partitions this host drains.
pub async fn oldest(db: &Db, max: usize) -> Result<Vec<(u64, Message)>> {
    if let Some(pg) = db.shared() {
        return pg.oldest(max).await;
    }
    let db = db.clone();
    tokio::task::spawn_blocking(move || oldest_local(&db, max)).await?
}

/// [`oldest`] in redb. Blocking.
pub fn oldest_local(db: &Db, max: usize) -> Result<Vec<(u64, Message)>> {
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

/// Returns when another host may have committed messages this host publishes (with
/// `STATE_URL`); never otherwise, where every commit is this host's own.
pub async fn committed_elsewhere(db: &Db) {
    match db.shared() {
        Some(pg) => pg.outbox_committed().await,
        None => std::future::pending().await,
    }
}

/// Gives the partitions this host drains to the other hosts for `away` (with `STATE_URL`;
/// a no-op otherwise, where nobody else could drain them): it could not publish for a while.
pub async fn step_back(db: &Db, away: std::time::Duration) {
    if let Some(pg) = db.shared() {
        pg.step_back(away).await;
    }
}

/// Removes the published messages `seqs` (a batch [`oldest`] returned). Lazily durable: after
/// a crash, a batch whose removal was lost is published again.
pub async fn remove(db: &Db, seqs: &[u64]) -> Result<()> {
    if let Some(pg) = db.shared() {
        return pg.remove(seqs).await;
    }
    // In redb the outbox is appended in commit order under the writer lock: a batch is a
    // prefix, and removing through its last one removes exactly it.
    let Some(&last) = seqs.iter().max() else {
        return Ok(());
    };
    let db = db.clone();
    tokio::task::spawn_blocking(move || remove_through(&db, last)).await?
}

/// Removes every message up to sequence `last`. Blocking.
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

/// Appends `bytes` to the outbox as they are, as another version of the host might have.
#[cfg(test)]
pub fn append_raw(db: &Db, bytes: &[u8]) {
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
        let db = Db::in_memory().unwrap();
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
        let all = bytes(&db);
        assert!(all > 0);
        remove_through(&db, pending[1].0).unwrap();
        assert_eq!(depth(&db).unwrap(), 1);
        assert!(bytes(&db) > 0 && bytes(&db) < all);
        assert_eq!(bytes(&db), bytes_stored(db.redb()).unwrap());
        assert_eq!(oldest_local(&db, 256).unwrap()[0].1.payload, b"c");
    }

    #[test]
    fn a_parked_message_leaves_the_queue_with_those_before_it_and_is_kept() {
        let db = Db::in_memory().unwrap();
        let mut txn = Txn::new("user".into());
        for p in ["a", "huge", "c"] {
            txn.send(msg(p)).unwrap();
        }
        db.commit_blocking(&txn).unwrap();
        let pending = oldest_local(&db, 256).unwrap();
        park_local(&db, pending[1].0, "too large").unwrap();
        assert_eq!((depth(&db).unwrap(), parked(&db).unwrap()), (1, 1));
        assert_eq!(bytes(&db), bytes_stored(db.redb()).unwrap());
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
        let db = Db::in_memory().unwrap();
        let mut reader = Txn::new("user".into());
        ready(reader.get(&db, "b", "k")).unwrap();
        reader.send(msg("lost")).unwrap();
        let mut writer = Txn::new("user".into());
        writer.put("b".into(), "k".into(), Some(vec![1])).unwrap();
        db.commit_blocking(&writer).unwrap();
        assert!(db.commit_blocking(&reader).is_err());
        assert_eq!(depth(&db).unwrap(), 0);
    }
}
