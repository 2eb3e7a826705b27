//! The outbox: messages of committed invocations, in commit order per key, until published.

use crate::types::Message;
use anyhow::Result;
use async_trait::async_trait;
use std::time::Duration;

/// The outbox of a [`super::StateStore`]: its messages land with their invocation's commit;
/// the drainer (`messaging::drain`) publishes them and then removes them.
#[async_trait]
pub trait Outbox: Send + Sync {
    /// Bytes of the messages waiting (a store shared with other hosts: as last counted, at
    /// most a second ago).
    fn bytes(&self) -> u64;

    /// Messages waiting (as [`Outbox::bytes`] counts them).
    fn depth(&self) -> Result<u64>;

    /// Messages set aside as never publishable.
    fn parked(&self) -> Result<u64>;

    /// Up to `max` of the oldest messages this host publishes, with their sequence numbers,
    /// all of them durable; [`Undecodable`] when the oldest does not decode.
    async fn oldest(&self, max: usize) -> Result<Vec<(u64, Message)>>;

    /// Removes the published messages `seqs` (a batch [`Outbox::oldest`] returned). Lazily
    /// durable: after a crash, a batch whose removal was lost is published again.
    async fn remove(&self, seqs: &[u64]) -> Result<()>;

    /// Sets message `seq` of a batch aside with `reason`, and removes `published`, the ones
    /// of the batch before it. An operator reads parked messages in the store; nothing is
    /// dropped.
    async fn park(&self, published: &[u64], seq: u64, reason: &str) -> Result<()>;

    /// Returns when another host may have committed messages this host publishes; never, in
    /// a store no other host writes.
    async fn committed_elsewhere(&self) {
        std::future::pending().await
    }

    /// Gives what this host publishes to the other hosts for `away`: it could not publish for
    /// a while. Nothing to do in a store no other host drains.
    async fn step_back(&self, _away: Duration) {}
}

/// The oldest entry of the outbox cannot be decoded (written by another version of the host,
/// say): [`Outbox::park`] it so that the ones after it flow.
#[derive(Debug, thiserror::Error)]
#[error("outbox entry {seq} cannot be decoded: {reason}")]
pub struct Undecodable {
    pub seq: u64,
    pub reason: String,
}

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
