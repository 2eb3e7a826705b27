//! `microsvc:platform/producer` and `handler`: the outbox, the backend trait and the consumer loop.
//!
//! Messages a component sends are staged in its invocation's transaction and land in the
//! outbox table together with its state writes (see `state`). The drainer moves them from
//! the outbox to the backend; a consumer loop per subscription feeds the backend's records to
//! the subscribing component's `handler` export, with retries and a dead-letter topic.

pub mod consumer;
pub mod embedded;
pub mod kafka;
pub mod outbox;

use crate::bindings::producer::{self as wit, SendError};
use crate::state::{Txn, MAX_VALUE};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::time::Duration;

pub use outbox::Outbox;

/// A record as the host stores and moves it: the WIT `message`, owned by the host.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Message {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One record handed to a subscriber, with where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub message: Message,
    pub partition: u32,
    pub offset: u64,
}

/// A durable, ordered log of topics with consumer-group offsets. Implemented by the embedded
/// store and by Kafka; `tests::contract` runs the same checks against each.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Human-readable name and location, for the start-up log and readiness.
    fn describe(&self) -> String;
    /// Appends `messages` in order. `Ok` means every one of them is durably stored.
    async fn publish(&self, messages: &[Message]) -> Result<()>;
    /// Starts reading `topic` for consumer group `group`, after its last committed record.
    async fn subscribe(&self, group: &str, topic: &str) -> Result<Box<dyn Subscription>>;
    /// Whether the backend keeps its log and offsets in the state store. Then a handler's writes
    /// need not reach the disk before its offset is committed: both go in order, so a crash
    /// loses the offset with the writes and the record is delivered again.
    fn in_state_store(&self) -> bool {
        false
    }
    /// Whether the backend is reachable now (for readiness and logs).
    async fn health(&self) -> Result<()> {
        Ok(())
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

pub fn dlq_topic(topic: &str) -> String {
    format!("{topic}.dlq")
}

/// What `producer::send` works on: the invocation's transaction and the service's permissions.
pub struct ProducerView<'a> {
    pub txn: &'a mut Txn,
    pub allowed_topics: &'a [String],
    pub request_id: &'a str,
}

pub struct ProducerData;
impl wasmtime::component::HasData for ProducerData {
    type Data<'a> = ProducerView<'a>;
}

fn valid_topic(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= 249
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl wit::Host for ProducerView<'_> {
    fn send(&mut self, message: wit::Message) -> Result<(), SendError> {
        if !valid_topic(&message.topic) {
            return Err(SendError::InvalidTopic(message.topic));
        }
        if !self.allowed_topics.contains(&message.topic) {
            return Err(SendError::TopicNotAllowed(message.topic));
        }
        if message.payload.len() > MAX_VALUE {
            return Err(SendError::PayloadTooLarge(message.payload.len() as u64));
        }
        let mut msg = Message {
            topic: message.topic,
            key: message.key,
            payload: message.payload,
            headers: message.headers,
        };
        if msg.header("x-request-id").is_none() {
            msg.headers
                .push(("x-request-id".into(), self.request_id.to_string()));
        }
        self.txn.outbox.push(msg);
        Ok(())
    }
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
        let mut sub = backend.subscribe("g1", topic).await.unwrap();
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
        let mut sub = backend.subscribe("g1", topic).await.unwrap();
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
        let mut other = backend.subscribe("g2", topic).await.unwrap();
        let mut all = Vec::new();
        for _ in 0..4 {
            all.push(String::from_utf8(next(&mut other).await.message.payload).unwrap());
        }
        all.sort();
        assert_eq!(all, ["a", "b", "c", "d"]);
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

    #[test]
    fn send_checks_topic_and_stamps_request_id() {
        use crate::bindings::producer::Host;
        let mut txn = Txn::new("user".into());
        let allowed = vec!["user-created".to_string()];
        let mut view = ProducerView {
            txn: &mut txn,
            allowed_topics: &allowed,
            request_id: "req-1",
        };
        let m = |topic: &str| wit::Message {
            topic: topic.into(),
            key: None,
            payload: b"{}".to_vec(),
            headers: vec![],
        };
        assert!(matches!(
            view.send(m("orders")),
            Err(SendError::TopicNotAllowed(_))
        ));
        assert!(matches!(
            view.send(m("bad topic")),
            Err(SendError::InvalidTopic(_))
        ));
        view.send(m("user-created")).unwrap();
        assert_eq!(txn.outbox.len(), 1);
        assert_eq!(txn.outbox[0].header("x-request-id"), Some("req-1"));
    }
}
