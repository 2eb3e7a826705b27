//! Embedded messaging backend: a durable topic log with consumer-group offsets in the host's store.
//!
//! One partition per topic (partition 0), so order is total. Used when no Kafka is configured.

mod log;

pub use log::{log_bytes, trim, Retention};
use log::{millis, APPENDED_AT, GROUP_SEEN, LOG, LOG_BYTES, LOG_END, OFFSETS};

use super::{Backend, Subscription};
use crate::config::Start;
use crate::storage::RedbStore;
use crate::types::{Delivery, Message};
use anyhow::Result;
use redb::{ReadableTable, WriteTransaction};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

pub struct Embedded {
    db: RedbStore,
    /// Bumped after every append so waiting subscriptions look again.
    appended: watch::Sender<u64>,
    retention: Retention,
    /// Subscriptions open now, per (group, topic).
    live: Live,
    /// Groups retention no longer waits for, as last trimmed (for logs and metrics).
    stale: Mutex<BTreeSet<(String, String)>>,
}

type Live = Arc<Mutex<BTreeMap<(String, String), usize>>>;

/// Counts a subscription as live until dropped.
struct LiveGuard {
    live: Live,
    key: (String, String),
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = live.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                live.remove(&self.key);
            }
        }
    }
}

impl Embedded {
    pub fn new(db: RedbStore) -> Embedded {
        Embedded::with_retention(
            db,
            Retention {
                age: Duration::from_secs(7 * 24 * 3600),
                bytes: 1 << 30,
            },
        )
    }

    pub fn with_retention(db: RedbStore, retention: Retention) -> Embedded {
        Embedded {
            db,
            appended: watch::Sender::new(0),
            retention,
            live: Live::default(),
            stale: Mutex::default(),
        }
    }

    /// Trims the log every `every`, forever.
    pub async fn retain(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            let log = self.clone();
            match tokio::task::spawn_blocking(move || log.trim_at(SystemTime::now())).await {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => tracing::info!(records = n, "trimmed the embedded message log"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %format!("{e:#}"), "trimming the message log failed")
                }
                Err(e) => tracing::warn!(error = %e, "log trim panicked"),
            }
        }
    }

    /// [`trim`] as of `now`, with the groups subscribed now counted as seen now; logs the
    /// groups that stopped (or started again) holding records back. Blocking.
    pub fn trim_at(&self, now: SystemTime) -> Result<u64> {
        let live: Vec<(String, String)> = {
            let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            live.keys().cloned().collect()
        };
        let (removed, stale) = trim(&self.db, self.retention, now, &live)?;
        let mut known = self.stale.lock().unwrap_or_else(|e| e.into_inner());
        for (group, topic) in stale.difference(&known) {
            tracing::warn!(
                group,
                topic,
                retention = ?self.retention.age,
                "consumer group has had no subscriber for longer than LOG_RETENTION: retention no longer keeps records for it"
            );
        }
        for (group, topic) in known.difference(&stale) {
            tracing::info!(group, topic, "consumer group is subscribed again");
        }
        crate::metrics::get()
            .log_stale_groups
            .set(stale.len() as i64);
        *known = stale;
        Ok(removed)
    }

    /// Consumer groups retention no longer waits for, as of the last trim: (group, topic).
    pub fn stale_groups(&self) -> Vec<(String, String)> {
        let stale = self.stale.lock().unwrap_or_else(|e| e.into_inner());
        stale.iter().cloned().collect()
    }
}

/// The offset the next record of `topic` gets. Blocking.
fn end_offset(wtx: &WriteTransaction, topic: &str) -> Result<u64> {
    if let Some(end) = wtx.open_table(LOG_END)?.get(topic)? {
        return Ok(end.value());
    }
    // A log from before the end was kept: past its last record and every group's offset.
    let last = wtx
        .open_table(LOG)?
        .range((topic, 0)..=(topic, u64::MAX))?
        .next_back()
        .transpose()?
        .map_or(0, |(k, _)| k.value().1 + 1);
    let mut end = last;
    for entry in wtx.open_table(OFFSETS)?.iter()? {
        let (key, next) = entry?;
        if key.value().1 == topic {
            end = end.max(next.value());
        }
    }
    Ok(end)
}

/// Lazily durable: the outbox entries it replaces are removed after it, in order, so a crash
/// can at worst publish them again.
fn append_blocking(db: &RedbStore, messages: &[Message]) -> Result<()> {
    let now = millis(SystemTime::now());
    db.write_lazily(|wtx| {
        let mut ends = BTreeMap::new();
        for m in messages {
            if !ends.contains_key(m.topic.as_str()) {
                ends.insert(m.topic.as_str(), end_offset(wtx, &m.topic)?);
            }
        }
        let mut log = wtx.open_table(LOG)?;
        let mut times = wtx.open_table(APPENDED_AT)?;
        let mut sizes = wtx.open_table(LOG_BYTES)?;
        for m in messages {
            let end = ends
                .get_mut(m.topic.as_str())
                .expect("every topic has its end");
            let next = *end;
            *end += 1;
            let encoded = postcard::to_allocvec(m)?;
            log.insert((m.topic.as_str(), next), encoded.as_slice())?;
            times.insert((m.topic.as_str(), next), now)?;
            let bytes = sizes.get(m.topic.as_str())?.map_or(0, |b| b.value());
            sizes.insert(m.topic.as_str(), bytes + encoded.len() as u64)?;
        }
        let mut end_table = wtx.open_table(LOG_END)?;
        for (topic, end) in ends {
            end_table.insert(topic, end)?;
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

    fn stored_bytes(&self) -> Option<u64> {
        log_bytes(&self.db).ok()
    }

    async fn publish(&self, messages: &[Message]) -> Result<()> {
        let db = self.db.clone();
        let messages = messages.to_vec();
        tokio::task::spawn_blocking(move || append_blocking(&db, &messages)).await??;
        self.appended.send_modify(|n| *n += 1);
        Ok(())
    }

    async fn read_tail(&self, topic: &str, max: usize) -> Result<Vec<Delivery>> {
        let (db, topic) = (self.db.clone(), topic.to_string());
        tokio::task::spawn_blocking(move || read_log(&db, &topic, 0, max, true)).await?
    }

    async fn subscribe(
        &self,
        group: &str,
        topic: &str,
        start: Start,
    ) -> Result<Box<dyn Subscription>> {
        // A new group is registered at once (at offset 0), so that trimming keeps what it has
        // not read yet.
        let cursor = self.db.write_lazily(|wtx| {
            wtx.open_table(GROUP_SEEN)?
                .insert((group, topic), millis(SystemTime::now()))?;
            if let Some(cursor) = wtx.open_table(OFFSETS)?.get((group, topic))? {
                return Ok(cursor.value());
            }
            let cursor = match start {
                Start::Earliest => 0,
                Start::Latest => end_offset(wtx, topic)?,
            };
            wtx.open_table(OFFSETS)?.insert((group, topic), cursor)?;
            Ok(cursor)
        })?;
        let key = (group.to_string(), topic.to_string());
        *self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default() += 1;
        Ok(Box::new(EmbeddedSubscription {
            db: self.db.clone(),
            group: group.to_string(),
            topic: topic.to_string(),
            cursor,
            appended: self.appended.subscribe(),
            _live: LiveGuard {
                live: self.live.clone(),
                key,
            },
        }))
    }
}

struct EmbeddedSubscription {
    db: RedbStore,
    group: String,
    topic: String,
    cursor: u64,
    appended: watch::Receiver<u64>,
    _live: LiveGuard,
}

/// Up to `max` records of `topic` at offset `from` or after it (records below the retained
/// ones are gone), oldest first; with `newest`, the last `max` of them.
fn read_log(
    db: &RedbStore,
    topic: &str,
    from: u64,
    max: usize,
    newest: bool,
) -> Result<Vec<Delivery>> {
    let rtx = db.redb().begin_read()?;
    let log = match rtx.open_table(LOG) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let range = log.range((topic, from)..=(topic, u64::MAX))?;
    let entries: Box<dyn Iterator<Item = _>> = match newest {
        true => Box::new(range.rev().take(max)),
        false => Box::new(range.take(max)),
    };
    let mut records = entries
        .map(|entry| {
            let (k, v) = entry?;
            let message = postcard::from_bytes(v.value())?;
            Ok(Delivery {
                message,
                partition: 0,
                offset: k.value().1,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if newest {
        records.reverse();
    }
    Ok(records)
}

#[async_trait::async_trait]
impl Subscription for EmbeddedSubscription {
    async fn next(&mut self) -> Result<Delivery> {
        loop {
            // Mark the current generation seen *before* reading, so an append between the
            // read and the wait still wakes us.
            self.appended.borrow_and_update();
            if let Some(delivery) = read_log(&self.db, &self.topic, self.cursor, 1, false)?.pop() {
                self.cursor = delivery.offset + 1;
                return Ok(delivery);
            }
            self.appended.changed().await?;
        }
    }

    fn lag(&self) -> Option<u64> {
        let rtx = self.db.redb().begin_read().ok()?;
        let end = rtx
            .open_table(LOG_END)
            .ok()?
            .get(self.topic.as_str())
            .ok()??;
        Some(end.value().saturating_sub(self.cursor))
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
    use crate::messaging::tests::msg;

    fn retention(age_secs: u64) -> Retention {
        Retention {
            age: Duration::from_secs(age_secs),
            bytes: 1 << 30,
        }
    }

    #[tokio::test]
    async fn a_topic_trimmed_empty_never_gives_an_offset_twice() {
        let db = RedbStore::in_memory().unwrap();
        let log = Embedded::with_retention(db.clone(), retention(3600));
        log.publish(&[msg("t", "k", "a"), msg("t", "k", "b")])
            .await
            .unwrap();
        let mut sub = log.subscribe("g", "t", Start::Earliest).await.unwrap();
        for _ in 0..2 {
            let d = sub.next().await.unwrap();
            sub.commit(&d).await.unwrap();
        }
        let later = SystemTime::now() + Duration::from_secs(86_400);
        assert_eq!(log.trim_at(later).unwrap(), 2, "the topic is trimmed empty");
        log.publish(&[msg("t", "k", "c")]).await.unwrap();
        let next = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("the record after the trim reaches the group")
            .unwrap();
        assert_eq!(
            (next.offset, next.message.payload.as_slice()),
            (2, &b"c"[..])
        );
        assert_eq!(sub.lag(), Some(0));
        // And after a restart of the subscription, from the committed offset.
        drop(sub);
        let mut again = log.subscribe("g", "t", Start::Earliest).await.unwrap();
        assert_eq!(again.next().await.unwrap().message.payload, b"c");
        // A group that starts at the latest record starts past it, not at 0.
        let mut late = log.subscribe("l", "t", Start::Latest).await.unwrap();
        log.publish(&[msg("t", "k", "d")]).await.unwrap();
        assert_eq!(late.next().await.unwrap().offset, 3);
    }

    #[tokio::test]
    async fn a_group_nobody_subscribed_for_longer_than_retention_stops_holding_records() {
        let db = RedbStore::in_memory().unwrap();
        let log = Embedded::with_retention(db.clone(), retention(3600));
        log.publish(&[msg("t", "k", "a"), msg("t", "k", "b")])
            .await
            .unwrap();
        let gone = log.subscribe("gone", "t", Start::Earliest).await.unwrap();
        let mut sub = log.subscribe("g", "t", Start::Earliest).await.unwrap();
        for _ in 0..2 {
            let d = sub.next().await.unwrap();
            sub.commit(&d).await.unwrap();
        }
        let later = SystemTime::now() + Duration::from_secs(2 * 3600);
        // Subscribed, however long ago it read: it holds its records.
        assert_eq!(log.trim_at(later).unwrap(), 0);
        assert!(log.stale_groups().is_empty());
        drop(gone);
        // Unsubscribed, but seen within the retention age: it still holds them.
        assert_eq!(log.trim_at(SystemTime::now()).unwrap(), 0);
        // Unsubscribed for longer than the retention age: it no longer counts.
        assert_eq!(
            log.trim_at(later + Duration::from_secs(3 * 3600)).unwrap(),
            2
        );
        assert_eq!(log.stale_groups(), [("gone".to_string(), "t".to_string())]);
        // Back, it goes on from the oldest record kept.
        log.publish(&[msg("t", "k", "c")]).await.unwrap();
        let mut back = log.subscribe("gone", "t", Start::Earliest).await.unwrap();
        assert_eq!(back.next().await.unwrap().message.payload, b"c");
        log.trim_at(SystemTime::now()).unwrap();
        assert!(log.stale_groups().is_empty());
    }

    #[tokio::test]
    async fn trimming_keeps_what_a_group_has_not_handled_and_new_groups_start_at_the_oldest() {
        let db = RedbStore::in_memory().unwrap();
        let log = Embedded::new(db.clone());
        let batch: Vec<Message> = (0..10).map(|i| msg("t", "k", &format!("m{i}"))).collect();
        log.publish(&batch).await.unwrap();
        log.publish(&[msg("t.dlq", "k", "dead")]).await.unwrap();
        let mut sub = log.subscribe("g", "t", Start::Earliest).await.unwrap();
        for _ in 0..4 {
            let d = sub.next().await.unwrap();
            sub.commit(&d).await.unwrap();
        }
        let total = log_bytes(&db).unwrap();
        // Nothing is old and nothing is over the size: nothing goes.
        let keep_all = Embedded::with_retention(db.clone(), retention(3600));
        let trim = |log: &Embedded, at| log.trim_at(at).unwrap();
        // The groups subscribed through `log` are live for the trims through it.
        let keep_all = Embedded {
            live: log.live.clone(),
            ..keep_all
        };
        assert_eq!(trim(&keep_all, SystemTime::now()), 0);
        // A day later everything old goes, but only below what `g` handled (4 records), and
        // all of the dead-letter topic, which no group reads.
        let later = SystemTime::now() + Duration::from_secs(86_400);
        assert_eq!(trim(&keep_all, later), 5);
        assert!(log_bytes(&db).unwrap() < total);
        // `g` goes on where it was; a new group starts at the oldest record kept.
        let d = sub.next().await.unwrap();
        assert_eq!(d.message.payload, b"m4");
        sub.commit(&d).await.unwrap();
        let mut fresh = log.subscribe("h", "t", Start::Earliest).await.unwrap();
        let first = fresh.next().await.unwrap();
        assert_eq!(
            (first.offset, first.message.payload.as_slice()),
            (4, &b"m4"[..])
        );
        // Over the size cap (here: any byte), records go even when young, but still only
        // below what every group handled: nothing while `h` has handled nothing.
        let tiny = Retention {
            age: Duration::from_secs(3600),
            bytes: 0,
        };
        let tiny = Embedded {
            live: log.live.clone(),
            ..Embedded::with_retention(db.clone(), tiny)
        };
        assert_eq!(trim(&tiny, SystemTime::now()), 0);
        fresh.commit(&first).await.unwrap();
        assert_eq!(trim(&tiny, SystemTime::now()), 1);
        // A group that starts at the latest record sees only what comes after it.
        let mut late = log.subscribe("l", "t", Start::Latest).await.unwrap();
        log.publish(&[msg("t", "k", "m10")]).await.unwrap();
        assert_eq!(late.next().await.unwrap().message.payload, b"m10");
    }

    #[tokio::test]
    async fn contract_in_memory() {
        let backend: Arc<dyn Backend> = Arc::new(Embedded::new(RedbStore::in_memory().unwrap()));
        crate::messaging::tests::contract(backend, "contract").await;
    }

    #[tokio::test]
    async fn contract_on_disk_and_offsets_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let backend: Arc<dyn Backend> =
                Arc::new(Embedded::new(RedbStore::open(dir.path()).unwrap()));
            crate::messaging::tests::contract(backend, "contract").await;
        }
        let backend = Embedded::new(RedbStore::open(dir.path()).unwrap());
        backend
            .publish(&[crate::messaging::tests::msg("contract", "9", "e")])
            .await
            .unwrap();
        // g1 committed everything up to "d" before the reopen: only "e" is left.
        let mut sub = backend
            .subscribe("g1", "contract", Start::Earliest)
            .await
            .unwrap();
        assert_eq!(sub.next().await.unwrap().message.payload, b"e");
    }
}
