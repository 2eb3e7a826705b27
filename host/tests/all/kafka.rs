//! Kafka mode end to end, against a real Kafka-protocol broker (tansu) started per test.
//! These tests fail, never skip, when no broker can be started.

use crate::broker::Broker;
use crate::harness::{components_with_counter, with_fixture_as, Host, COUNTER};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn broker() -> Broker {
    Broker::start()
        .expect("the Kafka tests need tansu: cargo install tansu --locked --features dynostore")
}

async fn kafka_host(broker: &Broker, data: Option<&std::path::Path>) -> Host {
    Host::start_with(data, &["--kafka-brokers", &broker.addr]).await
}

/// Reads `n` records of `topic` from the beginning, with their headers.
pub(crate) async fn read_topic(
    broker: &Broker,
    topic: &str,
    n: usize,
) -> Vec<(Option<String>, String, HashMap<String, String>)> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.addr)
        .set("group.id", format!("test-reader-{}", std::process::id()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} records on {topic}", out.len()))
            .unwrap();
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push((
            m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
            headers,
        ));
    }
    out
}

async fn wait_cached(host: &Host, user_id: u64, within: Duration) {
    let r = host.order_when_cached(user_id, 1, within).await;
    assert_eq!(r.status, 201, "{:?}", r.json);
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_flow_over_kafka_with_keys_and_headers() {
    let broker = broker();
    let host = kafka_host(&broker, None).await;
    let ready = host.admin_get("/readyz").await.json;
    assert!(
        ready["messaging"].as_str().unwrap().starts_with("kafka"),
        "{ready}"
    );

    let r = host
        .send(
            "POST",
            "gateway",
            "/api/users",
            Some(r#"{"name":"Alice","email":"alice@mail.com"}"#),
        )
        .await;
    assert_eq!(r.status, 201);
    let order = host
        .eventually("/api/v1/orders/101", Duration::from_secs(10), |r| {
            !r.json["user"].is_null()
        })
        .await;
    assert_eq!(order.json["user"]["name"], "Alice");

    let records = read_topic(&broker, "user-created", 1).await;
    let (key, value, headers) = &records[0];
    assert_eq!(key.as_deref(), Some("1"));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(value).unwrap(),
        json!({"id":1,"name":"Alice","email":"alice@mail.com"})
    );
    assert_eq!(headers["event-id"], "user-created-1");
    assert_eq!(
        headers["x-request-id"],
        r.headers["x-request-id"].to_str().unwrap()
    );
    assert!(host.log().contains("created Kafka topic"));
    let metrics = host.metrics().await;
    assert!(
        metrics.contains(r#"host_consumer_lag{group="order-service",topic="user-created"} 0"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_outage_delays_events_but_loses_none() {
    let broker = broker();
    let host = kafka_host(&broker, None).await;
    let r = host
        .post(
            "/api/users",
            &json!({"name": "Before", "email": "before@ex.com"}),
        )
        .await;
    assert_eq!(r.status, 201);
    wait_cached(&host, 1, Duration::from_secs(20)).await;

    broker.freeze();
    for i in 2..=6 {
        let start = Instant::now();
        let r = host
            .post(
                "/api/users",
                &json!({"name": format!("During{i}"), "email": format!("d{i}@ex.com")}),
            )
            .await;
        assert_eq!(r.status, 201, "users are stored while the broker is down");
        // The broker stays frozen far longer than this: a POST that waited for it would not
        // be answered before the thaw.
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "POST waited for the broker"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while host.admin_get("/readyz").await.json["messaging_reachable"] != false {
        assert!(
            Instant::now() < deadline,
            "readiness never reported the broker down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        host.admin_get("/readyz").await.json["outbox_depth"]
            .as_u64()
            .unwrap()
            >= 5
    );
    assert!(host.log().contains("events wait in the outbox"));
    broker.thaw();

    for id in 2..=6 {
        wait_cached(&host, id, Duration::from_secs(60)).await;
    }
    // Every event reached the topic, in order per key (each key once or more, never missing).
    let records = read_topic(&broker, "user-created", 6).await;
    let mut keys: Vec<String> = records.iter().filter_map(|r| r.0.clone()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys, ["1", "2", "3", "4", "5", "6"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_poison_record_goes_to_the_dead_letter_topic_and_consumption_moves_on() {
    let broker = broker();
    let host = kafka_host(&broker, None).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker.addr)
        .create()
        .unwrap();
    producer
        .send(
            FutureRecord::to("user-created")
                .key("9")
                .payload("this is not json"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let r = host
        .post(
            "/api/users",
            &json!({"name": "After", "email": "after@ex.com"}),
        )
        .await;
    assert_eq!(r.status, 201);
    wait_cached(&host, 1, Duration::from_secs(30)).await;

    let dlq = read_topic(&broker, "user-created.dlq", 1).await;
    let (key, value, headers) = &dlq[0];
    assert_eq!(key.as_deref(), Some("9"));
    assert_eq!(value, "this is not json");
    assert!(!headers["dlq-error"].is_empty());
    assert_eq!(headers["dlq-topic"], "user-created");
    assert_eq!(headers["dlq-service"], "order");
    // Rejected (not JSON): dead-lettered at its first attempt, not after retries.
    assert_eq!(headers["dlq-attempts"], "1");
    assert!(headers.contains_key("dlq-partition") && headers.contains_key("dlq-offset"));
}

/// A client that reads `topic`'s high watermarks: [`published`].
fn watermarks(broker: &Broker) -> Arc<BaseConsumer> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.addr)
        .create()
        .unwrap();
    Arc::new(consumer)
}

/// Records on `topic` (its 3 partitions) as the broker's high watermarks say.
async fn published(client: &Arc<BaseConsumer>, topic: &str) -> i64 {
    let (client, topic) = (client.clone(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        (0..3)
            .filter_map(|p| {
                client
                    .fetch_watermarks(&topic, p, Duration::from_secs(5))
                    .ok()
            })
            .map(|(_, high)| high)
            .sum()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_resumes_from_committed_offsets_without_loss_or_replay_effects() {
    let broker = broker();
    let comps = components_with_counter();
    // One partition: a record handled after the restart comes after every replayed one.
    let flags = ["--kafka-brokers", &broker.addr, "--kafka-partitions", "1"];
    let host = Host::start_edited(comps.path(), None, &COUNTER, &flags).await;
    for i in 1..=5 {
        let r = host
            .post(
                "/api/users",
                &json!({"name": format!("R{i}"), "email": format!("r{i}@ex.com")}),
            )
            .await;
        assert_eq!(r.status, 201);
    }
    for id in 1..=5 {
        wait_cached(&host, id, Duration::from_secs(30)).await;
        let n = host
            .counted(&format!("user-created-{id}"), Duration::from_secs(30))
            .await;
        assert_eq!(n, 1, "user {id} before the restart");
    }
    let orders_before = host.get("/api/orders").await.json;
    let (status, data) = host.terminate();
    assert!(status.success(), "{status}");
    let data = data.unwrap();

    let host = Host::start_edited(comps.path(), Some(data.path()), &COUNTER, &flags).await;
    assert_eq!(host.get("/api/orders").await.json, orders_before);
    let r = host
        .post("/api/users", &json!({"name": "R6", "email": "r6@ex.com"}))
        .await;
    assert_eq!(r.json["id"], 6);
    wait_cached(&host, 6, Duration::from_secs(30)).await;
    assert_eq!(
        host.counted("user-created-6", Duration::from_secs(30))
            .await,
        1
    );
    // Resumed after the committed offsets: nothing before them was handled again.
    for id in 1..=5 {
        let n = host.deliveries(&format!("user-created-{id}")).await;
        assert_eq!(n, 1, "user {id} was delivered again after the restart");
    }
    let orders = host.get("/api/orders").await.json;
    let orders = orders.as_array().unwrap();
    assert_eq!(orders.len(), 7);
    for o in &orders[1..] {
        assert_eq!(o["user"]["id"], o["userId"]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_of_the_largest_size_a_service_may_send_does_not_block_the_ones_after_it() {
    let broker = broker();
    // The misbehave fixture stands in for user-service, so it may publish `user-created`.
    let (host, _comps) = with_fixture_as(
        "user",
        "misbehave.wasm",
        &[],
        &["--kafka-brokers", &broker.addr],
    )
    .await;
    // Just under the host's 1 MiB, over librdkafka's default limit of 1,000,000 bytes.
    let r = host
        .send("POST", "user", "/publish?id=500&pad=1040000", None)
        .await;
    assert_eq!(r.status, 202, "{:?}", r.json);
    // Over the host's limit: refused when staged, with a clear error.
    let r = host
        .send("POST", "user", "/publish?id=501&pad=1100000", None)
        .await;
    assert_eq!(r.status, 400, "{:?}", r.json);
    assert!(
        r.json["error"]
            .as_str()
            .unwrap()
            .contains("PayloadTooLarge"),
        "{:?}",
        r.json
    );
    for id in 1..=10 {
        let path = format!("/publish?id={id}&pad=5");
        assert_eq!(host.send("POST", "user", &path, None).await.status, 202);
    }
    for id in 1..=10 {
        wait_cached(&host, id, Duration::from_secs(30)).await;
    }
    let ready = host.admin_get("/readyz").await;
    assert_eq!(ready.json["outbox_depth"], 0, "{:?}", ready.json);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_outbox_refuses_new_events_with_503_and_takes_them_again_once_drained() {
    let broker = broker();
    let host = Host::start_with(
        None,
        &["--kafka-brokers", &broker.addr, "--outbox-max", "1KiB"],
    )
    .await;
    let create = |i: usize| {
        let body = json!({"name": format!("U{i}"), "email": format!("u{i}@ex.com")});
        let host = &host;
        async move { host.post("/api/users", &body).await }
    };
    let id = |r: &crate::harness::Reply| r.json["id"].as_u64().unwrap();
    let mut ids = vec![id(&create(0).await)];
    broker.freeze();
    let refused = loop {
        let r = create(ids.len()).await;
        if r.status != 201 {
            break r;
        }
        ids.push(id(&r));
        assert!(ids.len() < 100, "the outbox never filled up");
    };
    assert_eq!(refused.status, 503, "{:?}", refused.json);
    let error = refused.json["error"].as_str().unwrap();
    assert!(error.contains("OUTBOX_MAX"), "{error}");
    assert!(ids.len() > 2, "1 KiB holds a few events");
    // Nothing refused was stored; reading still works.
    let users = host.get("/api/users").await;
    assert_eq!(users.status, 200);
    assert_eq!(users.json.as_array().unwrap().len(), ids.len());
    broker.thaw();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = create(ids.len()).await;
        if r.status == 201 {
            ids.push(id(&r));
            break;
        }
        assert!(Instant::now() < deadline, "the outbox never drained");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for id in ids {
        wait_cached(&host, id, Duration::from_secs(60)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_mid_drain_some_events_may_repeat_and_nothing_changes_twice() {
    let broker = broker();
    let comps = components_with_counter();
    let flags = ["--kafka-brokers", broker.addr.as_str()];
    let host = Host::start_edited(comps.path(), None, &COUNTER, &flags).await;
    // Both groups hold their partitions before the broker freezes. A member killed in the
    // middle of a rebalance can keep tansu 0.6's group from forming again for minutes (seen:
    // over 150 s), which is the broker's weakness, not what this test is about.
    for group in ["order-service", "counter"] {
        let assigned = ["partitions assigned", &format!("group=\"{group}\"")];
        host.logged(&assigned, Duration::from_secs(60)).await;
    }
    // Forty events wait in the outbox while the broker is frozen; once it thaws, the host is
    // killed as soon as some of them are on the topic: the drainer is publishing the batch,
    // which it removes from the outbox only once all of it is confirmed.
    broker.freeze();
    let mut users = Vec::new();
    for i in 0..40 {
        let email = format!("k{i}@ex.com");
        let r = host
            .post(
                "/api/users",
                &json!({"name": format!("K{i}"), "email": email}),
            )
            .await;
        assert_eq!(r.status, 201);
        users.push((r.json["id"].as_u64().unwrap(), email));
    }
    assert_eq!(host.admin_get("/readyz").await.json["outbox_depth"], 40);
    let client = watermarks(&broker);
    broker.thaw();
    let started = Instant::now();
    while published(&client, "user-created").await == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "nothing published"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let data = host.data.clone();
    let keep = host.kill();

    let host = Host::start_edited(comps.path(), Some(&data), &COUNTER, &flags).await;
    let seeded = host.get("/api/orders").await.json;
    let seeded = seeded.as_array().unwrap().clone();
    let mut handled = 0;
    for (id, _) in &users {
        wait_cached(&host, *id, Duration::from_secs(60)).await;
        handled += host
            .counted(&format!("user-created-{id}"), Duration::from_secs(60))
            .await;
    }
    // What was on the topic but still in the outbox at the kill was published again, and
    // handled again: the counter sees the repeats (none when the kill lands after the batch
    // left the outbox durably, which a loaded machine makes possible). The idempotent services
    // do not: one user per creation, one order per placement, each with the user as created.
    assert!(
        handled >= users.len() as u64,
        "{handled} deliveries of {} events",
        users.len()
    );
    eprintln!("{} repeated deliveries", handled - users.len() as u64);
    let listed = host.get("/api/users?limit=1000").await.json;
    assert_eq!(listed.as_array().unwrap().len(), users.len());
    let orders = host.get("/api/orders?limit=1000").await.json;
    let placed: Vec<_> = orders
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| !seeded.iter().any(|s| s["id"] == o["id"]))
        .collect();
    assert_eq!(placed.len(), users.len());
    for o in placed {
        let (_, email) = users.iter().find(|(id, _)| o["userId"] == *id).unwrap();
        assert_eq!(o["user"]["email"], email.as_str());
    }
    drop(keep);
}
