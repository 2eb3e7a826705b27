//! Messaging backends: the `Backend` trait, the embedded log, Kafka, and the outbox drainer.
//!
//! Messages a component sends are staged in its invocation's transaction and land in the
//! outbox table together with its state writes (see `storage`). The drainer moves them from
//! the outbox to the backend; consumers (`ingress::consumer`) read the backend's records.

pub mod drain;
pub mod embedded;
pub mod kafka;

use crate::config::{ServiceSpec, Start};
use crate::types::{Delivery, Message};
use anyhow::Result;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use crate::config::manifest::dlq_topic;
pub use drain::Drainer;

/// A message the backend will never take, whatever the retries (too large for the broker, a
/// topic it refuses): the `index`-th of the batch. The ones before it were stored.
#[derive(Debug, thiserror::Error)]
#[error("message {index} of the batch refused for good: {reason}")]
pub struct Unpublishable {
    pub index: usize,
    pub reason: String,
}

/// A durable, ordered log of topics with consumer-group offsets. Implemented by the embedded
/// store and by Kafka; `tests::contract` runs the same checks against each.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Human-readable name and location, for the start-up log and readiness.
    fn describe(&self) -> String;
    /// Its `messaging.system` in spans: the embedded log is this host's own.
    fn system(&self) -> &'static str {
        if self.in_state_store() {
            "microsvc-log"
        } else {
            "kafka"
        }
    }
    /// Appends `messages` in order. `Ok` means every one of them is durably stored. An error
    /// that retrying cannot fix is a [`Unpublishable`] (in the `anyhow` chain); any other is worth
    /// retrying.
    async fn publish(&self, messages: &[Message]) -> Result<()>;
    /// Starts reading `topic` for consumer group `group`, after its last committed record.
    /// A group with nothing committed yet starts at `start`.
    async fn subscribe(
        &self,
        group: &str,
        topic: &str,
        start: Start,
    ) -> Result<Box<dyn Subscription>>;
    /// The last `max` records of each partition of `topic`, in partition and offset order,
    /// read without a consumer group (for the dead-letter view); none for a topic that does
    /// not exist.
    async fn read_tail(&self, topic: &str, max: usize) -> Result<Vec<Delivery>>;
    /// Whether the backend keeps its log and offsets in the state store. Then a handler's writes
    /// need not reach the disk before its offset is committed: both go in order, so a crash
    /// loses the offset with the writes and the record is delivered again.
    fn in_state_store(&self) -> bool {
        false
    }
    /// Creates the topics that do not exist yet (a broker may not create them on first use).
    async fn create_topics(&self, _topics: &[String]) -> Result<()> {
        Ok(())
    }
    /// Whether the backend is reachable now (for readiness and logs).
    async fn health(&self) -> Result<()> {
        Ok(())
    }
    /// Bytes the backend keeps on this host's disk (the embedded log), if it keeps any.
    fn stored_bytes(&self) -> Option<u64> {
        None
    }
}

/// Keeps `up` set to whether `backend` answers its health check (every second, forever) and
/// says in the log when it goes away or comes back, with the events `waiting` in the outbox.
pub async fn watch_health(
    backend: Arc<dyn Backend>,
    up: Arc<AtomicBool>,
    waiting: impl Fn() -> u64,
) {
    loop {
        let now = match backend.health().await {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), "messaging backend health check failed");
                false
            }
        };
        if up.swap(now, Ordering::AcqRel) != now {
            let waiting = waiting();
            if now {
                tracing::info!(backend = %backend.describe(), waiting, "messaging backend reachable again");
            } else {
                tracing::warn!(backend = %backend.describe(), waiting, "messaging backend unreachable; events wait in the outbox");
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[async_trait::async_trait]
pub trait Subscription: Send {
    /// Waits for the next record.
    async fn next(&mut self) -> Result<Delivery>;
    /// Marks `delivery` (and everything before it on its partition) as handled by the group.
    async fn commit(&mut self, delivery: &Delivery) -> Result<()>;
    /// Records after the last delivered one, if the backend can tell cheaply.
    fn lag(&self) -> Option<u64> {
        None
    }
}

/// How a failing handler is retried before its record goes to `<topic>.dlq`.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base: Duration,
    pub max: Duration,
}

impl RetryPolicy {
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(16);
        self.base.saturating_mul(factor).min(self.max)
    }
}

/// Every topic the services use, with the dead-letter topics of subscribed ones.
pub fn topics(specs: &[ServiceSpec]) -> Vec<String> {
    let mut topics: Vec<String> = specs
        .iter()
        .flat_map(|s| {
            s.produces
                .iter()
                .cloned()
                .chain(s.subscribes.iter().flat_map(|t| [t.clone(), dlq_topic(t)]))
        })
        .collect();
    topics.sort();
    topics.dedup();
    topics
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use std::sync::Arc;

    pub fn msg(topic: &str, key: &str, payload: &str) -> Message {
        Message {
            topic: topic.into(),
            key: Some(key.into()),
            payload: payload.as_bytes().to_vec(),
            headers: vec![("event-id".into(), payload.into())],
        }
    }

    async fn next(sub: &mut Box<dyn Subscription>) -> Delivery {
        let started = std::time::Instant::now();
        let d = tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await
            .expect("no record within 30 s")
            .unwrap();
        eprintln!(
            "record at {}/{} after {:?}",
            d.partition,
            d.offset,
            started.elapsed()
        );
        d
    }

    /// The behaviour every backend must have. `topic` must be fresh for each run.
    pub async fn contract(backend: Arc<dyn Backend>, topic: &str) {
        backend
            .publish(&[
                msg(topic, "1", "a"),
                msg(topic, "1", "b"),
                msg(topic, "2", "c"),
            ])
            .await
            .unwrap();

        // Records come in publish order per key (keys may sit on different partitions, so
        // records of different keys may interleave either way), headers intact.
        let mut sub = backend
            .subscribe("g1", topic, Start::Earliest)
            .await
            .unwrap();
        let first = [
            next(&mut sub).await,
            next(&mut sub).await,
            next(&mut sub).await,
        ];
        let find = |p: &str| {
            first
                .iter()
                .position(|d| d.message.payload == p.as_bytes())
                .unwrap_or_else(|| panic!("record {p} missing"))
        };
        let (a, b, c) = (&first[find("a")], &first[find("b")], &first[find("c")]);
        assert!(find("a") < find("b"), "same key, publish order");
        assert_eq!(a.message, msg(topic, "1", "a"));
        assert_eq!(b.message, msg(topic, "1", "b"));
        assert_eq!(c.message, msg(topic, "2", "c"));
        assert_eq!(a.partition, b.partition, "one key, one partition");
        assert!(b.offset > a.offset);
        sub.commit(a).await.unwrap();
        drop(sub);

        // A new subscription of the same group resumes after the last commit: `b` again.
        let mut sub = backend
            .subscribe("g1", topic, Start::Earliest)
            .await
            .unwrap();
        let mut seen = vec![next(&mut sub).await, next(&mut sub).await];
        seen.sort_by_key(|d| d.message.payload.clone());
        assert_eq!(seen[0].message, msg(topic, "1", "b"));
        assert_eq!(seen[1].message, msg(topic, "2", "c"));
        for d in &seen {
            sub.commit(d).await.unwrap();
        }

        // Records published while a subscriber waits reach it.
        let waiter = tokio::spawn(async move {
            let d = next(&mut sub).await;
            sub.commit(&d).await.unwrap();
            d
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        backend.publish(&[msg(topic, "3", "d")]).await.unwrap();
        assert_eq!(waiter.await.unwrap().message, msg(topic, "3", "d"));

        // Another group is independent and sees everything from the start.
        let mut other = backend
            .subscribe("g2", topic, Start::Earliest)
            .await
            .unwrap();
        let mut all = Vec::new();
        for _ in 0..4 {
            all.push(String::from_utf8(next(&mut other).await.message.payload).unwrap());
        }
        all.sort();
        assert_eq!(all, ["a", "b", "c", "d"]);

        // Reading the tail takes no group's place and shows the newest records per partition.
        let tail = backend.read_tail(topic, 10).await.unwrap();
        let mut payloads: Vec<_> = tail.iter().map(|d| d.message.payload.clone()).collect();
        payloads.sort();
        assert_eq!(payloads, [b"a", b"b", b"c", b"d"]);
        let d = tail.iter().find(|d| d.message.payload == b"d").unwrap();
        assert_eq!(d.message, msg(topic, "3", "d"));
        let newest = backend.read_tail(topic, 1).await.unwrap();
        assert!(newest.iter().any(|n| n.message.payload == b"d"));
        assert!(newest.len() < 4, "one per partition");
        assert!(backend
            .read_tail(&format!("{topic}-none"), 10)
            .await
            .unwrap()
            .is_empty());
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            max_attempts: 5,
            base: Duration::from_millis(100),
            max: Duration::from_millis(350),
        };
        assert_eq!(p.backoff(1), Duration::from_millis(100));
        assert_eq!(p.backoff(2), Duration::from_millis(200));
        assert_eq!(p.backoff(3), Duration::from_millis(350));
        assert_eq!(p.backoff(40), Duration::from_millis(350));
    }
}
