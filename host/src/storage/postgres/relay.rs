//! The outbox relay: which partitions this host drains (advisory locks on its own connection),
//! and the oldest messages, removal and parking of the partitions it holds.

use super::{sql_limit, Pg, LOCK_BASE, PARTITIONS};
use crate::storage::outbox::{decode_rows, parked_record};
use crate::types::Message;
use anyhow::{Context as _, Result};
use futures_util::StreamExt as _;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio_postgres::{AsyncMessage, NoTls};

/// The relay's own connection, which holds the advisory locks of the partitions it drains.
#[derive(Default)]
pub(super) struct Relay {
    client: Option<tokio_postgres::Client>,
    held: Vec<i32>,
    claimed_at: Option<Instant>,
    counted_at: Option<Instant>,
}

/// How often a relay tries to take partitions nobody holds (a host that stopped).
const CLAIM_EVERY: Duration = Duration::from_secs(1);

impl Pg {
    /// Messages waiting, as last counted.
    pub fn depth(&self) -> u64 {
        self.depth.load(Ordering::Relaxed)
    }

    /// Bytes of messages waiting, as last counted.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Messages set aside, as last counted.
    pub fn parked(&self) -> u64 {
        self.parked.load(Ordering::Relaxed)
    }

    /// Up to `max` of the oldest messages of the partitions this host drains, with their
    /// sequence numbers, in commit order per key.
    pub async fn oldest(&self, max: usize) -> Result<Vec<(u64, Message)>> {
        let held = self.claim().await?;
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT seq, message FROM outbox WHERE part = ANY($1) ORDER BY seq LIMIT $2",
            )
            .await?;
        let rows = client.query(&stmt, &[&held, &sql_limit(max)]).await?;
        decode_rows(
            rows.iter()
                .map(|r| Ok((r.get::<_, i64>(0) as u64, r.get::<_, &[u8]>(1)))),
        )
    }

    /// Removes the published messages `seqs`.
    pub async fn remove(&self, seqs: &[u64]) -> Result<()> {
        let seqs: Vec<i64> = seqs.iter().map(|&s| s as i64).collect();
        let client = self.client().await?;
        client
            .execute("DELETE FROM outbox WHERE seq = ANY($1)", &[&seqs])
            .await?;
        Ok(())
    }

    /// Sets message `seq` aside with `reason`, and removes `published`.
    pub async fn park(&self, published: &[u64], seq: u64, reason: &str) -> Result<()> {
        let published: Vec<i64> = published.iter().map(|&s| s as i64).collect();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute("DELETE FROM outbox WHERE seq = ANY($1)", &[&published])
            .await?;
        let row = tx
            .query_opt(
                "DELETE FROM outbox WHERE seq = $1 RETURNING message",
                &[&(seq as i64)],
            )
            .await?;
        if let Some(row) = row {
            let record = parked_record(reason, row.get::<_, &[u8]>(0))?;
            tx.execute(
                "INSERT INTO outbox_parked (reason, message) VALUES ($1, $2)",
                &[&reason, &record],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The partitions this host drains: those whose advisory locks its relay connection holds,
    /// trying for the others at most every [`CLAIM_EVERY`]. Also recounts the outbox.
    async fn claim(&self) -> Result<Vec<i32>> {
        let mut relay = self.relay.lock().await;
        let relay = &mut *relay;
        if relay.client.as_ref().is_none_or(|c| c.is_closed()) {
            // A lost connection lost its locks with it.
            relay.held.clear();
            relay.client = None;
            let (client, mut connection) = super::connection_config(&self.url, self.wait)?
                .connect(NoTls)
                .await
                .context("connecting the outbox relay to PostgreSQL")?;
            // Commits with outbox rows NOTIFY, on whichever host: wake this one's drainer.
            let committed = self.committed.clone();
            tokio::spawn(async move {
                let mut messages = futures_util::stream::poll_fn(|cx| connection.poll_message(cx));
                while let Some(message) = messages.next().await {
                    match message {
                        Ok(AsyncMessage::Notification(_)) => committed.notify_one(),
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "outbox relay connection ended");
                            return;
                        }
                    }
                }
            });
            client.batch_execute("LISTEN outbox").await?;
            relay.client = Some(client);
            relay.claimed_at = None;
        }
        let client = relay.client.as_ref().expect("connected above");
        let due = |at: Option<Instant>| at.is_none_or(|t| t.elapsed() >= CLAIM_EVERY);
        if due(relay.claimed_at) && relay.held.len() < PARTITIONS as usize {
            relay.claimed_at = Some(Instant::now());
            let free: Vec<i32> = (0..PARTITIONS)
                .filter(|p| !relay.held.contains(p))
                .collect();
            // One round trip for all of them.
            let rows = client
                .query(
                    "SELECT p FROM unnest($1::int[]) AS p WHERE pg_try_advisory_lock($2::bigint + p)",
                    &[&free, &(LOCK_BASE + 1)],
                )
                .await?;
            relay.held.extend(rows.iter().map(|r| r.get::<_, i32>(0)));
            relay.held.sort_unstable();
        }
        if due(relay.counted_at) {
            relay.counted_at = Some(Instant::now());
            let row = client
                .query_one(
                    "SELECT count(*), COALESCE(sum(length(message)), 0)::bigint, \
                     (SELECT count(*) FROM outbox_parked) FROM outbox",
                    &[],
                )
                .await?;
            self.depth
                .store(row.get::<_, i64>(0) as u64, Ordering::Relaxed);
            self.bytes
                .store(row.get::<_, i64>(1) as u64, Ordering::Relaxed);
            self.parked
                .store(row.get::<_, i64>(2) as u64, Ordering::Relaxed);
        }
        Ok(relay.held.clone())
    }
}
