//! The outbox relay: which partitions this host drains (advisory locks on its own connection),
//! and the oldest messages, removal and parking of the partitions it holds.

use super::{sql_limit, PostgresStore, LOCK_BASE, PARTITIONS};
use crate::storage::outbox::{decode_rows, parked_record, Outbox};
use crate::types::Message;
use anyhow::{Context as _, Result};
use async_trait::async_trait;
use futures_util::StreamExt as _;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio_postgres::AsyncMessage;

/// The relay's own connection, which holds the advisory locks of the partitions it drains.
/// Rows are read, deleted and parked on this connection only, so a relay whose session ended
/// (and with it its locks, which another host may have taken since) never deletes a row.
#[derive(Default)]
pub(super) struct Relay {
    client: Option<tokio_postgres::Client>,
    /// Bumped at every new connection: a batch read on one session is removed on that session
    /// or not at all.
    session: u64,
    /// The session the last batch was read on.
    read_on: Option<u64>,
    held: Vec<i32>,
    /// The query of [`PostgresStore::oldest`], prepared on this session.
    oldest: Option<tokio_postgres::Statement>,
    claimed_at: Option<Instant>,
    counted_at: Option<Instant>,
    /// Set while this relay stays away (it could not publish): it holds no partition and
    /// does not count as a live relay.
    away_until: Option<Instant>,
}

/// How often a relay looks at its share: takes partitions nobody holds (a host that stopped),
/// gives back those beyond its fair share (a host that joined).
const CLAIM_EVERY: Duration = Duration::from_secs(1);

/// Outbox rows counted one by one; past this many, estimated.
const COUNT_EXACTLY: i64 = 10_000;

/// The relay connections' `application_name`: live relays are counted by it.
const RELAY_NAME: &str = "microsvc-outbox-relay";

#[async_trait]
impl Outbox for PostgresStore {
    /// Messages waiting, as last counted.
    fn depth(&self) -> Result<u64> {
        Ok(self.depth.load(Ordering::Relaxed))
    }

    /// Bytes of messages waiting, as last counted.
    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Messages set aside, as last counted.
    fn parked(&self) -> Result<u64> {
        Ok(self.parked.load(Ordering::Relaxed))
    }

    /// Up to `max` of the oldest messages of the partitions this host drains, with their
    /// sequence numbers, in commit order per key. Read on the relay's session, which holds
    /// those partitions as it reads them.
    async fn oldest(&self, max: usize) -> Result<Vec<(u64, Message)>> {
        let mut relay = self.relay.lock().await;
        let held = self.claim(&mut relay).await?;
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let relay = &mut *relay;
        let client = relay.client.as_ref().expect("claimed on a connection");
        if relay.oldest.is_none() {
            // The oldest `max` of each partition, then the oldest `max` of those: never a sort
            // of the whole backlog.
            let stmt = client
                .prepare(
                    "SELECT o.seq, o.message FROM unnest($1::int[]) AS p, \
                     LATERAL (SELECT seq, message FROM outbox WHERE part = p ORDER BY seq LIMIT $2) AS o \
                     ORDER BY o.seq LIMIT $2",
                )
                .await?;
            relay.oldest = Some(stmt);
        }
        let stmt = relay.oldest.as_ref().expect("prepared above");
        let rows = client.query(stmt, &[&held, &sql_limit(max)]).await?;
        relay.read_on = Some(relay.session);
        decode_rows(
            rows.iter()
                .map(|r| Ok((r.get::<_, i64>(0) as u64, r.get::<_, &[u8]>(1)))),
        )
    }

    /// Removes the published messages `seqs`, on the session that read them.
    async fn remove(&self, seqs: &[u64]) -> Result<()> {
        let seqs: Vec<i64> = seqs.iter().map(|&s| s as i64).collect();
        let relay = self.relay.lock().await;
        let client = Self::fenced(&relay)?;
        client
            .execute("DELETE FROM outbox WHERE seq = ANY($1)", &[&seqs])
            .await?;
        Ok(())
    }

    /// Sets message `seq` aside with `reason`, and removes `published`, on the session that
    /// read them.
    async fn park(&self, published: &[u64], seq: u64, reason: &str) -> Result<()> {
        let published: Vec<i64> = published.iter().map(|&s| s as i64).collect();
        let relay = self.relay.lock().await;
        let client = Self::fenced(&relay)?;
        client.batch_execute("BEGIN").await?;
        let parked = async {
            client
                .execute("DELETE FROM outbox WHERE seq = ANY($1)", &[&published])
                .await?;
            let row = client
                .query_opt(
                    "DELETE FROM outbox WHERE seq = $1 RETURNING message",
                    &[&(seq as i64)],
                )
                .await?;
            if let Some(row) = row {
                let record = parked_record(reason, row.get::<_, &[u8]>(0))?;
                client
                    .execute(
                        "INSERT INTO outbox_parked (reason, message) VALUES ($1, $2)",
                        &[&reason, &record],
                    )
                    .await?;
            }
            anyhow::Ok(())
        };
        match parked.await {
            Ok(()) => client.batch_execute("COMMIT").await?,
            Err(e) => {
                let _ = client.batch_execute("ROLLBACK").await;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Gives up every partition for `away` (the relay could not publish for a while): other
    /// hosts take them over, and this one claims again after that.
    async fn step_back(&self, away: Duration) {
        let mut relay = self.relay.lock().await;
        if !relay.held.is_empty() {
            tracing::warn!(
                partitions = relay.held.len(),
                ?away,
                "this host cannot publish: giving its outbox partitions to the other hosts"
            );
        }
        // Closing the session releases its locks, and it no longer counts as a live relay.
        relay.client = None;
        relay.held.clear();
        relay.away_until = Some(Instant::now() + away);
    }

    async fn committed_elsewhere(&self) {
        self.committed.notified().await
    }
}

impl PostgresStore {
    /// The relay's connection, if it is the session the last batch was read on: the one
    /// that held the batch's partitions. Otherwise the partitions may have moved to another
    /// host, which publishes the rows itself.
    fn fenced(relay: &Relay) -> Result<&tokio_postgres::Client> {
        match &relay.client {
            Some(client) if !client.is_closed() && relay.read_on == Some(relay.session) => {
                Ok(client)
            }
            _ => anyhow::bail!(
                "the outbox relay lost the session it read the batch on; its partitions may \
                 belong to another host now, which publishes them"
            ),
        }
    }

    /// The partitions this host drains: those whose advisory locks its relay connection holds.
    /// At most every [`CLAIM_EVERY`] it takes free ones up to its fair share of the live
    /// relays, and gives back those beyond it. Also recounts the outbox.
    async fn claim(&self, relay: &mut Relay) -> Result<Vec<i32>> {
        if relay.away_until.is_some_and(|t| Instant::now() < t) {
            return Ok(Vec::new());
        }
        relay.away_until = None;
        if relay.client.as_ref().is_none_or(|c| c.is_closed()) {
            // A lost connection lost its locks with it.
            relay.held.clear();
            relay.client = None;
            let mut config = super::connection_config(&self.url, self.wait)?;
            config.application_name(RELAY_NAME);
            let (client, mut connection) = config
                .connect(self.tls.clone())
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
            relay.session += 1;
            relay.oldest = None;
            relay.claimed_at = None;
        }
        let client = relay.client.as_ref().expect("connected above");
        let due = |at: Option<Instant>| at.is_none_or(|t| t.elapsed() >= CLAIM_EVERY);
        if due(relay.claimed_at) {
            relay.claimed_at = Some(Instant::now());
            let live: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE application_name = $1 AND datname = current_database()",
                    &[&RELAY_NAME],
                )
                .await?
                .get(0);
            let share = (PARTITIONS as usize).div_ceil(live.max(1) as usize);
            if relay.held.len() > share {
                let extra = relay.held.split_off(share);
                client
                    .query(
                        "SELECT pg_advisory_unlock($2::bigint + p) FROM unnest($1::int[]) AS p",
                        &[&extra, &(LOCK_BASE + 1)],
                    )
                    .await?;
                tracing::info!(
                    ?extra,
                    relays = live,
                    "gave outbox partitions to another host"
                );
            } else if relay.held.len() < share {
                let mut free: Vec<i32> = (0..PARTITIONS)
                    .filter(|p| !relay.held.contains(p))
                    .collect();
                // Hosts start looking at different partitions.
                let start = std::process::id() as usize % free.len();
                free.rotate_left(start);
                let want = sql_limit(share - relay.held.len());
                // One round trip; rows are tried in order until `want` are taken.
                let rows = client
                    .query(
                        "SELECT p FROM unnest($1::int[]) AS p \
                         WHERE pg_try_advisory_lock($2::bigint + p) LIMIT $3",
                        &[&free, &(LOCK_BASE + 1), &want],
                    )
                    .await?;
                relay.held.extend(rows.iter().map(|r| r.get::<_, i32>(0)));
                relay.held.sort_unstable();
            }
        }
        if due(relay.counted_at) {
            relay.counted_at = Some(Instant::now());
            // Counted exactly up to COUNT_EXACTLY rows; past that, the table's size and the
            // planner's row estimate stand in (a count of a large backlog each second would
            // read all of it).
            let row = client
                .query_one(
                    "SELECT count(*), COALESCE(sum(length(message)), 0)::bigint, \
                     (SELECT count(*) FROM outbox_parked), pg_table_size('outbox'), \
                     (SELECT GREATEST(reltuples, 0)::bigint FROM pg_class WHERE oid = 'outbox'::regclass) \
                     FROM (SELECT message FROM outbox LIMIT $1) AS waiting",
                    &[&(COUNT_EXACTLY + 1)],
                )
                .await?;
            let (mut depth, mut bytes) = (row.get::<_, i64>(0), row.get::<_, i64>(1));
            if depth > COUNT_EXACTLY {
                depth = depth.max(row.get::<_, i64>(4));
                bytes = bytes.max(row.get::<_, i64>(3));
            }
            self.depth.store(depth as u64, Ordering::Relaxed);
            self.bytes.store(bytes as u64, Ordering::Relaxed);
            self.parked
                .store(row.get::<_, i64>(2) as u64, Ordering::Relaxed);
        }
        Ok(relay.held.clone())
    }
}
