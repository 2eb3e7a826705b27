//! Kafka messaging backend (rdkafka with its bundled librdkafka): the `Backend` contract on a
//! real broker. Idempotent producer with `acks=all`; one consumer group per subscribing
//! service with manual offset commits.

use super::Unpublishable;
use super::{Backend, Subscription};
use crate::config::Start;
use crate::types::{Delivery, Message};
use anyhow::{anyhow, bail, Context as _, Result};
use arc_swap::ArcSwap;
use platform_contract::MAX_BODY;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Largest record the producer sends: the host's 1 MiB message plus topic and framing.
const MAX_RECORD: usize = MAX_BODY + (64 << 10);

/// Produce errors no retry fixes: the record itself is unacceptable to this broker.
fn permanent(e: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        e.rdkafka_error_code(),
        Some(
            MessageSizeTooLarge
                | InvalidMessageSize
                | InvalidMessage
                | InvalidTopic
                | TopicAuthorizationFailed
                | InvalidRecord
                | InvalidRequest
        )
    )
}

/// The error for message `index` of a batch: [`Unpublishable`] when retrying cannot help.
fn produce_error(index: usize, topic: &str, e: KafkaError) -> anyhow::Error {
    if permanent(&e) {
        Unpublishable {
            index,
            reason: format!("Kafka refuses the record for {topic}: {e}"),
        }
        .into()
    } else {
        anyhow!("Kafka did not take the record for {topic}: {e}")
    }
}

/// An idempotent producer with `acks=all` for `config`'s brokers.
fn producer(config: &KafkaConfig) -> Result<FutureProducer> {
    ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        // Some Kafka-protocol brokers (tansu 0.6) cannot resume a consumer from an offset
        // inside a multi-record batch; one record per batch keeps every offset resumable.
        .set("batch.num.messages", config.batch_messages.to_string())
        .set("socket.nagle.disable", "true")
        // A batch that cannot be delivered fails after this; the outbox keeps it and the
        // drainer tries again, so an outage delays events but never drops them.
        .set("message.timeout.ms", "5000")
        // librdkafka refuses records over 1,000,000 bytes by default, below what the host
        // lets a service send (1 MiB of key, payload and headers): room for both plus the
        // record's framing.
        .set("message.max.bytes", MAX_RECORD.to_string())
        .create()
        .context("creating the Kafka producer")
}

#[derive(Clone, Debug)]
pub struct KafkaConfig {
    pub brokers: String,
    pub partitions: i32,
    pub replication: i32,
    /// How long the broker may hold a fetch open; low, because some brokers answer a fetch
    /// only when it expires.
    pub fetch_wait: Duration,
    /// Records per produce batch (librdkafka `batch.num.messages`).
    pub batch_messages: u32,
}

pub struct Kafka {
    config: KafkaConfig,
    producer: ArcSwap<FutureProducer>,
}

impl Kafka {
    pub fn new(config: KafkaConfig) -> Result<Kafka> {
        let producer = producer(&config)?;
        Ok(Kafka {
            config,
            producer: ArcSwap::from_pointee(producer),
        })
    }

    /// After a fatal producer error (librdkafka's idempotent producer fenced or out of
    /// sequence, as after a long broker stall) the producer refuses everything for good: a
    /// new one takes its place, and the outbox sends the batch again.
    fn replace_if_fatal(&self, failed: &FutureProducer) {
        let Some((code, reason)) = failed.client().fatal_error() else {
            return;
        };
        tracing::error!(%code, reason, "the Kafka producer failed for good; creating a new one");
        match producer(&self.config) {
            Ok(fresh) => self.producer.store(Arc::new(fresh)),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "creating a new Kafka producer failed")
            }
        }
    }

    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    /// Creates the topics that do not exist yet.
    pub async fn ensure_topics(&self, topics: &[String]) -> Result<()> {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.config.brokers)
            .create()
            .context("creating the Kafka admin client")?;
        let new: Vec<NewTopic> = topics
            .iter()
            .map(|t| {
                NewTopic::new(
                    t,
                    self.config.partitions,
                    TopicReplication::Fixed(self.config.replication),
                )
            })
            .collect();
        let opts = AdminOptions::new()
            .operation_timeout(Some(Duration::from_secs(10)))
            .request_timeout(Some(Duration::from_secs(10)));
        for result in admin.create_topics(&new, &opts).await? {
            match result {
                Ok(topic) => tracing::info!(
                    topic,
                    partitions = self.config.partitions,
                    "created Kafka topic"
                ),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => bail!("creating topic {topic}: {code}"),
            }
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Backend for Kafka {
    fn describe(&self) -> String {
        format!("kafka ({})", self.config.brokers)
    }

    async fn create_topics(&self, topics: &[String]) -> Result<()> {
        self.ensure_topics(topics).await
    }

    async fn publish(&self, messages: &[Message]) -> Result<()> {
        let producer = self.producer.load_full();
        let published = publish(&producer, messages).await;
        if published.is_err() {
            self.replace_if_fatal(&producer);
        }
        published
    }

    async fn subscribe(
        &self,
        group: &str,
        topic: &str,
        start: Start,
    ) -> Result<Box<dyn Subscription>> {
        let reset = match start {
            Start::Earliest => "earliest",
            Start::Latest => "latest",
        };
        let assignments = Assignments {
            group: group.to_string(),
            topic: topic.to_string(),
        };
        let consumer: StreamConsumer<Assignments> = ClientConfig::new()
            .set("bootstrap.servers", &self.config.brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", reset)
            .set(
                "fetch.wait.max.ms",
                self.config.fetch_wait.as_millis().to_string(),
            )
            .set("socket.nagle.disable", "true")
            .set("session.timeout.ms", "10000")
            .create_with_context(assignments)
            .context("creating the Kafka consumer")?;
        consumer.subscribe(&[topic])?;
        Ok(Box::new(KafkaSubscription {
            consumer: Arc::new(consumer),
            lag: Arc::new(Mutex::new(Lag::default())),
        }))
    }

    async fn read_tail(&self, topic: &str, max: usize) -> Result<Vec<Delivery>> {
        let (brokers, topic) = (self.config.brokers.clone(), topic.to_string());
        tokio::task::spawn_blocking(move || read_tail(&brokers, &topic, max)).await?
    }

    async fn health(&self) -> Result<()> {
        let producer = self.producer.load_full();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, Duration::from_secs(2))
                .map(|_| ())
        })
        .await??;
        Ok(())
    }
}

struct KafkaSubscription {
    consumer: Arc<StreamConsumer<Assignments>>,
    lag: Arc<Mutex<Lag>>,
}

/// Logs which partitions the group gave this consumer, and when it took them back: where a
/// record waits when a group is slow to rebalance.
struct Assignments {
    group: String,
    topic: String,
}

impl ClientContext for Assignments {}

impl ConsumerContext for Assignments {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let (group, topic) = (&self.group, &self.topic);
        let partitions = |list: &TopicPartitionList| -> Vec<i32> {
            list.elements().iter().map(|p| p.partition()).collect()
        };
        match rebalance {
            Rebalance::Assign(list) => {
                tracing::info!(group, topic, partitions = ?partitions(list), "partitions assigned")
            }
            Rebalance::Revoke(list) => {
                tracing::info!(group, topic, partitions = ?partitions(list), "partitions revoked")
            }
            Rebalance::Error(e) => tracing::warn!(group, topic, error = %e, "rebalance failed"),
        }
    }
}

/// Records behind the high watermark, per partition, refreshed at most once a second (asking
/// the broker costs a round trip).
#[derive(Default)]
struct Lag {
    per_partition: HashMap<i32, u64>,
    checked: Option<Instant>,
}

#[async_trait::async_trait]
impl Subscription for KafkaSubscription {
    async fn next(&mut self) -> Result<Delivery> {
        Ok(delivery(&self.consumer.recv().await?))
    }

    async fn commit(&mut self, delivery: &Delivery) -> Result<()> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(
            &delivery.message.topic,
            delivery.partition as i32,
            Offset::Offset(delivery.offset as i64 + 1),
        )?;
        // Synchronous, so that "committed" means the broker has it; off the async workers
        // because it waits for the broker's answer.
        let consumer = self.consumer.clone();
        let lag = self.lag.clone();
        let (topic, partition, next) = (
            delivery.message.topic.clone(),
            delivery.partition as i32,
            delivery.offset as i64 + 1,
        );
        tokio::task::spawn_blocking(move || -> Result<()> {
            consumer.commit(&tpl, CommitMode::Sync)?;
            let mut lag = lag.lock().unwrap();
            if lag
                .checked
                .is_none_or(|t| t.elapsed() > Duration::from_secs(1))
            {
                lag.checked = Some(Instant::now());
                if let Ok((_, high)) =
                    consumer.fetch_watermarks(&topic, partition, Duration::from_millis(500))
                {
                    lag.per_partition
                        .insert(partition, high.saturating_sub(next).max(0) as u64);
                }
            }
            Ok(())
        })
        .await??;
        Ok(())
    }

    fn lag(&self) -> Option<u64> {
        let lag = self.lag.lock().unwrap();
        lag.checked.map(|_| lag.per_partition.values().sum())
    }
}

/// A record as the host's [`Delivery`].
fn delivery(msg: &impl rdkafka::Message) -> Delivery {
    let headers = msg
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| {
                    let value = h.value.map(String::from_utf8_lossy).unwrap_or_default();
                    (h.key.to_string(), value.into_owned())
                })
                .collect()
        })
        .unwrap_or_default();
    Delivery {
        message: Message {
            topic: msg.topic().to_string(),
            key: msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            payload: msg.payload().unwrap_or_default().to_vec(),
            headers,
        },
        partition: msg.partition() as u32,
        offset: msg.offset() as u64,
    }
}

/// [`Backend::read_tail`] on a consumer of its own, assigned (no group joined) to each
/// partition's last `max` records; blocking, for at most a few seconds.
fn read_tail(brokers: &str, topic: &str, max: usize) -> Result<Vec<Delivery>> {
    let wait = Duration::from_secs(5);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "microsvc-admin-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .context("creating a Kafka reader")?;
    let metadata = consumer.fetch_metadata(Some(topic), wait)?;
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(Vec::new());
    };
    if found.error().is_some() {
        return Ok(Vec::new()); // unknown topic: nothing dead-lettered to it yet
    }
    let mut assignment = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for partition in found.partitions() {
        let (low, high) = consumer.fetch_watermarks(topic, partition.id(), wait)?;
        if high > low {
            let from = low.max(high - max as i64);
            assignment.add_partition_offset(topic, partition.id(), Offset::Offset(from))?;
            ends.insert(partition.id(), high);
        }
    }
    if ends.is_empty() {
        return Ok(Vec::new());
    }
    consumer.assign(&assignment)?;
    let mut tail = Vec::new();
    let deadline = Instant::now() + wait;
    while !ends.is_empty() {
        if Instant::now() > deadline {
            bail!("reading {topic} took longer than {wait:?}");
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(msg)) => {
                if ends
                    .get(&msg.partition())
                    .is_some_and(|end| msg.offset() + 1 >= *end)
                {
                    ends.remove(&msg.partition());
                }
                tail.push(delivery(&msg));
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                ends.remove(&partition);
            }
            Some(Err(e)) => return Err(e).context(format!("reading {topic}")),
            None => {}
        }
    }
    tail.sort_by_key(|d| (d.partition, d.offset));
    Ok(tail)
}

/// Sends `messages` in order on `producer` and waits until the broker acknowledged each.
async fn publish(producer: &FutureProducer, messages: &[Message]) -> Result<()> {
    // Enqueue everything first so the batch goes out together, then wait for each ack.
    let mut acks = Vec::with_capacity(messages.len());
    let mut refused = None;
    for (i, m) in messages.iter().enumerate() {
        let mut headers = OwnedHeaders::new_with_capacity(m.headers.len());
        for (key, value) in &m.headers {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        let mut record = FutureRecord::to(&m.topic)
            .payload(m.payload.as_slice())
            .headers(headers);
        if let Some(key) = &m.key {
            record = record.key(key.as_str());
        }
        match producer.send_result(record) {
            Ok(ack) => acks.push(ack),
            Err((e, _)) => {
                // The ones enqueued before it still go out; their acks decide the result.
                refused = Some(produce_error(i, &m.topic, e));
                break;
            }
        }
    }
    for (i, ack) in acks.into_iter().enumerate() {
        match ack.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(produce_error(i, &messages[i].topic, e)),
            Err(_) => bail!("the Kafka producer went away"),
        }
    }
    refused.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::Broker;

    fn on(broker: &Broker, partitions: i32) -> Kafka {
        Kafka::new(KafkaConfig {
            brokers: broker.addr.clone(),
            partitions,
            replication: 1,
            fetch_wait: Duration::from_millis(10),
            batch_messages: 1,
        })
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn contract_on_a_real_broker() {
        let broker = Broker::start().expect("a Kafka-protocol broker is required for this test");
        let kafka = on(&broker, 3);
        kafka
            .ensure_topics(&["contract".to_string()])
            .await
            .unwrap();
        // Creating it again is not an error.
        kafka
            .ensure_topics(&["contract".to_string()])
            .await
            .unwrap();
        crate::messaging::tests::contract(Arc::new(kafka), "contract").await;
    }

    /// A producer that failed for good (fenced, as librdkafka's idempotent producer can be
    /// after a broker stall) is replaced: the batch it refused goes out on the next try.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_producer_that_failed_for_good_is_replaced() {
        let broker = Broker::start().expect("a Kafka-protocol broker is required for this test");
        let kafka = on(&broker, 1);
        kafka.ensure_topics(&["fenced".to_string()]).await.unwrap();
        let first = [crate::messaging::tests::msg("fenced", "k", "first")];
        kafka.publish(&first).await.unwrap();
        let reason = std::ffi::CString::new("fenced by the test").unwrap();
        let producer = kafka.producer.load_full();
        // SAFETY: librdkafka's own hook for raising a fatal error on a live client handle.
        unsafe {
            rdkafka::bindings::rd_kafka_test_fatal_error(
                producer.client().native_ptr(),
                rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_PRODUCER_FENCED,
                reason.as_ptr(),
            );
        }
        let second = [crate::messaging::tests::msg("fenced", "k", "second")];
        assert!(kafka.publish(&second).await.is_err());
        kafka.publish(&second).await.unwrap();
        let mut sub = kafka
            .subscribe("g", "fenced", Start::Earliest)
            .await
            .unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            let d = tokio::time::timeout(Duration::from_secs(30), sub.next())
                .await
                .expect("the records within 30 s")
                .unwrap();
            got.push(String::from_utf8(d.message.payload).unwrap());
        }
        assert_eq!(got, ["first", "second"]);
    }
}
