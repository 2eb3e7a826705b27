//! The consumer loop: records of a subscribed topic into a service's `handler` export.
//!
//! At-least-once: a record's offset is committed only after the handler returned ok and its
//! writes are on disk, or after the record went to the dead-letter topic. Records that are
//! already waiting are handled as one batch (in order, one at a time), with one wait for the
//! disk and one offset commit per partition for the whole batch: a busy topic is not consumed
//! at the pace of fsyncs and broker round trips.

use crate::config::{ServiceSpec, Start};
use crate::messaging::{dlq_topic, Subscription};
use crate::metrics;
use crate::runtime::invoke::{self, Handled};
use crate::runtime::{Runtime, Service};
use crate::types::{Delivery, Message};
use anyhow::Result;
use futures_util::FutureExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Most records handled before their offsets are committed together.
const MAX_BATCH: usize = 64;

/// The consumers this host runs: one per subscribed topic of each service.
pub struct Consumers {
    runtime: Arc<Runtime>,
    running: HashMap<(Arc<str>, String), RunningConsumer>,
}

struct RunningConsumer {
    group: String,
    start: Start,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Consumers {
    pub fn new(runtime: Arc<Runtime>) -> Consumers {
        Consumers {
            runtime,
            running: HashMap::new(),
        }
    }

    /// Starts the consumers `specs` subscribe that are not running and stops the ones they no
    /// longer do (or with another group or start), each after it committed what it handled.
    /// A running consumer picks up its service's other changed settings by itself.
    pub fn apply(&mut self, specs: &[ServiceSpec]) {
        let wanted: HashMap<(Arc<str>, String), &ServiceSpec> = specs
            .iter()
            .flat_map(|s| {
                s.subscribes
                    .iter()
                    .map(move |t| ((s.name.clone(), t.clone()), s))
            })
            .collect();
        self.running.retain(|(name, topic), running| {
            let keep = wanted
                .get(&(name.clone(), topic.clone()))
                .is_some_and(|s| s.group == running.group && s.start == running.start);
            if !keep {
                tracing::info!(service = %name, topic, group = running.group, "stopping consumer");
                let _ = running.stop.send(true);
            }
            keep
        });
        for (key, spec) in wanted {
            if self.running.contains_key(&key) {
                continue;
            }
            let (stop, stopping) = watch::channel(false);
            let task = tokio::spawn(run(
                self.runtime.clone(),
                key.0.clone(),
                key.1.clone(),
                stopping,
            ));
            let running = RunningConsumer {
                group: spec.group.clone(),
                start: spec.start,
                stop,
                task,
            };
            self.running.insert(key, running);
        }
    }

    /// Asks every consumer to stop at once; the future waits until each committed what it
    /// handled.
    pub fn stop(self) -> impl std::future::Future<Output = ()> {
        let tasks: Vec<JoinHandle<()>> = self
            .running
            .into_values()
            .map(|r| {
                let _ = r.stop.send(true);
                r.task
            })
            .collect();
        futures_util::future::join_all(tasks).map(|_| ())
    }
}

/// Consumes `topic` for `service` until `stopping` turns true or the service is gone; a record
/// being handled is finished and committed first.
async fn run(
    runtime: Arc<Runtime>,
    service: Arc<str>,
    topic: String,
    mut stopping: watch::Receiver<bool>,
) {
    while !*stopping.borrow() {
        let Some(current) = runtime.service(&service) else {
            return;
        };
        let (group, start) = (current.spec.group.clone(), current.spec.start);
        drop(current);
        match runtime.backend().subscribe(&group, &topic, start).await {
            Ok(mut sub) => {
                tracing::info!(service = %service, topic, group, "consuming");
                // A bug that panics here must not end consumption for good: resubscribe.
                let consumed = std::panic::AssertUnwindSafe(consume(
                    &runtime,
                    &service,
                    &group,
                    sub.as_mut(),
                    &mut stopping,
                ))
                .catch_unwind()
                .await;
                match consumed {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(service = %service, topic, error = %format!("{e:#}"), "consumer stopped; resubscribing")
                    }
                    Err(_) => {
                        tracing::error!(service = %service, topic, "consumer panicked; resubscribing")
                    }
                }
            }
            Err(e) => {
                tracing::warn!(service = %service, topic, error = %format!("{e:#}"), "subscribe failed")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            // The sender gone (the host is exiting) is a stop too.
            changed = stopping.changed() => if changed.is_err() { return },
        }
    }
}

async fn consume(
    runtime: &Runtime,
    service: &str,
    group: &str,
    sub: &mut dyn Subscription,
    stopping: &mut watch::Receiver<bool>,
) -> Result<()> {
    loop {
        let first = tokio::select! {
            d = sub.next() => d?,
            _ = stopping.changed() => return Ok(()),
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match sub.next().now_or_never() {
                Some(d) => batch.push(d?),
                None => break,
            }
        }
        // The service as it is now: a manifest change of its limits or calls applies from the
        // next batch on.
        let Some(service) = runtime.service(service) else {
            // Removed: these records go to whoever subscribes next in the group.
            return Ok(());
        };
        for delivery in &batch {
            handle(runtime, &service, group, delivery, stopping).await?;
        }
        runtime.handled_writes_durable().await?;
        // Committing a record commits everything before it on its partition.
        let mut last = std::collections::BTreeMap::new();
        for d in &batch {
            last.insert(d.partition, d);
        }
        for delivery in last.values() {
            sub.commit(delivery).await?;
        }
        let delivery = batch.last().expect("a batch has a first record");
        if let Some(lag) = sub.lag() {
            let labels = metrics::labels([("group", group), ("topic", &delivery.message.topic)]);
            metrics::get()
                .consumer_lag
                .get_or_create(&labels)
                .set(lag as i64);
        }
    }
}

/// Runs the handler on `delivery` with retries, dead-lettering it if it keeps failing. Only the
/// handler's own failures spend attempts; while the host cannot run or commit it (no free
/// instance slot, the store failing, the outbox full) it waits, backing off, for as long as
/// that lasts. `stopping` ends any wait: the record is not committed, and comes again.
async fn handle(
    runtime: &Runtime,
    service: &Arc<Service>,
    group: &str,
    delivery: &Delivery,
    stopping: &mut watch::Receiver<bool>,
) -> Result<()> {
    let policy = &runtime.settings().retry;
    let mut attempt = 1;
    let mut deferred = 0;
    let failure = loop {
        let labels = metrics::labels([
            ("service", &service.name),
            ("topic", &delivery.message.topic),
        ]);
        let (why, spends_attempt) =
            match invoke::message(runtime, service, group, delivery, attempt).await {
                Handled::Done => {
                    metrics::get().consumed.get_or_create(&labels).inc();
                    break None;
                }
                Handled::Reject(why) => break Some(why),
                Handled::Retry(why) if attempt >= policy.max_attempts => break Some(why),
                Handled::Retry(why) => (why, true),
                Handled::Unavailable(why) => (why, false),
            };
        // A failure of the handler spends an attempt; one of the host does not.
        let (counter, wait, what) = if spends_attempt {
            let what = "handler failed; retrying";
            (&metrics::get().retried, policy.backoff(attempt), what)
        } else {
            deferred += 1;
            let what = "host could not run the handler; retrying without spending an attempt";
            (&metrics::get().deferred, policy.backoff(deferred), what)
        };
        counter.get_or_create(&labels).inc();
        tracing::warn!(
            service = %service.name,
            topic = %delivery.message.topic,
            offset = delivery.offset,
            attempt,
            retry_in = ?wait,
            error = %why,
            "{what}"
        );
        if *stopping.borrow() {
            anyhow::bail!("stopping while retrying: {why}");
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stopping.changed() => anyhow::bail!("stopping while retrying: {why}"),
        }
        if spends_attempt {
            attempt += 1;
        }
    };
    if let Some(why) = failure {
        dead_letter(runtime, service, delivery, &why, attempt).await?;
    }
    Ok(())
}

async fn dead_letter(
    runtime: &Runtime,
    service: &Service,
    delivery: &Delivery,
    why: &str,
    attempts: u32,
) -> Result<()> {
    let original = &delivery.message;
    let mut headers = original.headers.clone();
    headers.extend([
        ("dlq-error".to_string(), why.to_string()),
        ("dlq-attempts".to_string(), attempts.to_string()),
        ("dlq-topic".to_string(), original.topic.clone()),
        ("dlq-partition".to_string(), delivery.partition.to_string()),
        ("dlq-offset".to_string(), delivery.offset.to_string()),
        ("dlq-service".to_string(), service.name.to_string()),
    ]);
    let record = Message {
        topic: dlq_topic(&original.topic),
        key: original.key.clone(),
        payload: original.payload.clone(),
        headers,
    };
    // Through the outbox, not straight to the backend: a broker that is down or refuses the
    // record must not send the consumer back to this record forever.
    runtime.send_later(&service.name, [record]).await.1?;
    metrics::get()
        .dead_lettered
        .get_or_create(&metrics::labels([
            ("service", &service.name),
            ("topic", &original.topic),
        ]))
        .inc();
    tracing::error!(
        service = %service.name,
        topic = %original.topic,
        offset = delivery.offset,
        attempts,
        error = %why,
        "message dead-lettered to {} (through the outbox)", dlq_topic(&original.topic)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Args;
    use crate::messaging::embedded::Embedded;
    use crate::messaging::Backend;
    use crate::storage::RedbStore;
    use clap::Parser as _;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// The embedded log, except that the first subscription panics when asked for a record,
    /// as a host bug in the consumer loop would.
    struct PanicsOnce {
        log: Embedded,
        subscribed: AtomicUsize,
        committed: Arc<Mutex<Vec<u64>>>,
    }

    struct Watched {
        inner: Box<dyn Subscription>,
        panics: bool,
        committed: Arc<Mutex<Vec<u64>>>,
    }

    #[async_trait::async_trait]
    impl Subscription for Watched {
        async fn next(&mut self) -> Result<Delivery> {
            if self.panics {
                panic!("a bug in the consumer loop");
            }
            self.inner.next().await
        }
        async fn commit(&mut self, delivery: &Delivery) -> Result<()> {
            self.committed.lock().unwrap().push(delivery.offset);
            self.inner.commit(delivery).await
        }
    }

    #[async_trait::async_trait]
    impl Backend for PanicsOnce {
        fn describe(&self) -> String {
            "panics once".into()
        }
        async fn publish(&self, messages: &[Message]) -> Result<()> {
            self.log.publish(messages).await
        }
        async fn subscribe(
            &self,
            group: &str,
            topic: &str,
            start: Start,
        ) -> Result<Box<dyn Subscription>> {
            let first = self.subscribed.fetch_add(1, Ordering::SeqCst) == 0;
            Ok(Box::new(Watched {
                inner: self.log.subscribe(group, topic, start).await?,
                panics: first,
                committed: self.committed.clone(),
            }))
        }
        async fn read_tail(&self, topic: &str, max: usize) -> Result<Vec<Delivery>> {
            self.log.read_tail(topic, max).await
        }
    }

    /// A panic inside the consumer loop ends that subscription, not consumption: the consumer
    /// subscribes again and the record waiting is handled and committed.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_consumer_that_panics_subscribes_again() {
        let fixture =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../build/fixtures/misbehave.wasm");
        assert!(
            fixture.exists(),
            "no {}: run `just build-fixtures`",
            fixture.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let args = Args::parse_from(["host", "--compile-cache", cache.to_str().unwrap()]);
        let mut spec = ServiceSpec::named("misbehave");
        spec.file = fixture;
        spec.serves_http = false;
        spec.subscribes = vec!["events".into()];
        let db = RedbStore::in_memory().unwrap();
        let backend = Arc::new(PanicsOnce {
            log: Embedded::new(db.clone()),
            subscribed: AtomicUsize::new(0),
            committed: Arc::default(),
        });
        let message = crate::messaging::tests::msg("events", "k", "{}");
        backend.publish(&[message]).await.unwrap();
        let runtime = Runtime::new(&args, &[spec.clone()], Arc::new(db), backend.clone()).unwrap();
        runtime.install(runtime.prepare(vec![spec.clone()]).await.unwrap());
        let mut consumers = Consumers::new(runtime);
        consumers.apply(&[spec]);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while backend.committed.lock().unwrap().is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the record was never committed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(backend.subscribed.load(Ordering::SeqCst), 2);
        assert_eq!(*backend.committed.lock().unwrap(), vec![0]);
        consumers.stop().await;
    }
}
