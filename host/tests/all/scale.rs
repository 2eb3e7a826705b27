//! Scale-out: two hosts sharing one PostgreSQL (`--state-url`: state, ids, outbox) and one
//! Kafka-protocol broker (tansu), each on its own ephemeral ports. These tests start both
//! servers themselves and fail, never skip, without them.

use crate::broker::Broker;
use crate::harness::Host;
use crate::postgres_server::Postgres;
use serde_json::json;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

struct Pair {
    a: Option<Host>,
    b: Host,
    _broker: Broker,
    _pg: Postgres,
    url: String,
}

impl Pair {
    async fn start(database: &str) -> Pair {
        Pair::start_in(&crate::harness::components_dir(), database).await
    }

    /// Two hosts loading their components from `components`.
    async fn start_in(components: &std::path::Path, database: &str) -> Pair {
        let pg =
            Postgres::start().expect("the scale-out tests need PostgreSQL (pg_config on PATH)");
        let url = pg.create_database(database).unwrap();
        let broker = Broker::start().expect(
            "the scale-out tests need tansu: cargo install tansu --locked --features dynostore",
        );
        let flags = ["--state-url", &url, "--kafka-brokers", &broker.addr];
        let a = Host::start_in(components, None, &flags).await;
        let b = Host::start_in(components, None, &flags).await;
        Pair {
            a: Some(a),
            b,
            _broker: broker,
            _pg: pg,
            url,
        }
    }

    /// Waits until both hosts' outbox relays hold partitions (their session advisory locks).
    async fn wait_partitions_shared(&self) {
        let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let row = client
                .query_one(
                    "SELECT count(DISTINCT l.pid) FROM pg_locks l JOIN pg_stat_activity a \
                     USING (pid) WHERE l.locktype = 'advisory' \
                     AND a.application_name = 'microsvc-outbox-relay' \
                     AND a.datname = current_database()",
                    &[],
                )
                .await
                .unwrap();
            if row.get::<_, i64>(0) == 2 {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the two hosts never shared the outbox partitions"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn a(&self) -> &Host {
        self.a.as_ref().unwrap()
    }
}

/// POSTs a user through `host`'s gateway; the status and the id if created.
async fn create(
    http: &reqwest::Client,
    gateway: &str,
    name: &str,
    email: &str,
) -> (u16, Option<u64>) {
    let body = json!({"name": name, "email": email});
    match http
        .post(format!("{gateway}/api/users"))
        .json(&body)
        .send()
        .await
    {
        Ok(r) => {
            let status = r.status().as_u16();
            let json: serde_json::Value = r.json().await.unwrap_or_default();
            (status, json["id"].as_u64())
        }
        Err(_) => (0, None),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hosts_on_one_postgresql_share_users_ids_and_uniqueness() {
    let pair = Pair::start("pair").await;
    let (a, b) = (pair.a(), &pair.b);

    // Created through A, read through B at once, and cached by order-service (wherever its
    // consumer runs) where B's gateway finds it.
    let alice = a
        .post(
            "/api/users",
            &json!({"name": "Alice", "email": "alice@x.io"}),
        )
        .await;
    assert_eq!(alice.status, 201, "{:?}", alice.json);
    let read = b.get("/api/users/1").await;
    assert_eq!((read.status, &read.json), (200, &alice.json));
    let started = Instant::now();
    let order = b
        .eventually("/api/v1/orders/101", Duration::from_secs(20), |r| {
            !r.json["user"].is_null()
        })
        .await;
    assert_eq!(order.json["user"], alice.json, "{:?}", order.json);
    eprintln!(
        "user created on A was in order-service's cache through B after {:?}",
        started.elapsed()
    );

    // 50 creations spread over both hosts at once: 50 ids, none repeated.
    let gateways = [a.url("gateway", ""), b.url("gateway", "")];
    let creations = (0..50).map(|i| {
        let (http, gateway) = (a.http.clone(), gateways[i % 2].clone());
        async move { create(&http, &gateway, &format!("U{i}"), &format!("u{i}@x.io")).await }
    });
    let created = futures_util::future::join_all(creations).await;
    assert!(created.iter().all(|(s, _)| *s == 201), "{created:?}");
    let ids: BTreeSet<u64> = created.iter().filter_map(|(_, id)| *id).collect();
    assert_eq!(ids.len(), 50);
    assert!(!ids.contains(&1), "Alice's id was given again");

    // Ten racing creations with one email, spread over both: exactly one is created.
    let racing = (0..10).map(|i| {
        let (http, gateway) = (a.http.clone(), gateways[i % 2].clone());
        async move {
            create(&http, &gateway, &format!("R{i}"), "same@x.io")
                .await
                .0
        }
    });
    let statuses = futures_util::future::join_all(racing).await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| matches!(s, 201 | 409)),
        "{statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_killed_under_load_loses_nothing_it_acknowledged() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let mut pair = Pair::start("kill").await;
    let gateways = Arc::new([pair.a().url("gateway", ""), pair.b.url("gateway", "")]);
    let answered = Arc::new(AtomicUsize::new(0));
    // Four clients, each alternating between the hosts, 400 creations in all.
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (http, gateways, answered) =
                (pair.b.http.clone(), gateways.clone(), answered.clone());
            tokio::spawn(async move {
                let (mut acknowledged, mut refused_by_a) = (Vec::new(), 0);
                for n in 0..100 {
                    let i = c * 100 + n;
                    let (status, id) = create(
                        &http,
                        &gateways[i % 2],
                        &format!("K{i}"),
                        &format!("k{i}@x.io"),
                    )
                    .await;
                    answered.fetch_add(1, Ordering::Relaxed);
                    match status {
                        201 => acknowledged.push((i, id.unwrap())),
                        _ if i % 2 == 0 => refused_by_a += 1,
                        other => panic!("B answered {other} to creation {i}"),
                    }
                }
                (acknowledged, refused_by_a)
            })
        })
        .collect();
    // A dies in the middle of it, without a chance to drain its outbox or commit offsets.
    while answered.load(Ordering::Relaxed) < 100 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    pair.a.take().unwrap().kill();
    let (mut acknowledged, mut refused_by_a) = (Vec::new(), 0);
    for client in clients {
        let (a, r) = client.await.unwrap();
        acknowledged.extend(a);
        refused_by_a += r;
    }
    let from_a = acknowledged.iter().filter(|(i, _)| i % 2 == 0).count();
    eprintln!(
        "acknowledged: {} ({from_a} by A before it was killed, {refused_by_a} refused by A after)",
        acknowledged.len()
    );
    assert!(from_a > 0 && refused_by_a > 0, "A was killed under load");
    assert_eq!(
        acknowledged.len() - from_a,
        200,
        "B answered every one of its creations"
    );

    let b = &pair.b;
    for (_, id) in &acknowledged {
        let r = b.get(&format!("/api/users/{id}")).await;
        assert_eq!(r.status, 200, "user {id}: {:?}", r.json);
    }
    // Every acknowledged creation's event reaches the topic: B drains what A left in the
    // outbox. (Which consumer then handles it is the broker's group coordinator's business:
    // tansu 0.6 keeps a killed member of a formed group in its assignments, so B's consumer
    // may never get A's partitions there, where a Kafka broker would hand them over.)
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut missing: BTreeSet<String> = acknowledged.iter().map(|(_, id)| id.to_string()).collect();
    while !missing.is_empty() {
        assert!(
            Instant::now() < deadline,
            "never published: users {missing:?}"
        );
        for key in topic_keys(&pair._broker.addr, "user-created").await {
            missing.remove(&key);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The keys of every record on `topic` now, read from the start of each of its partitions.
async fn topic_keys(brokers: &str, topic: &str) -> Vec<String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    let (brokers, topic) = (brokers.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let reader: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", "scale-test-reader")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .create()
            .unwrap();
        let mut assignment = rdkafka::TopicPartitionList::new();
        for partition in 0..3 {
            assignment
                .add_partition_offset(&topic, partition, rdkafka::Offset::Beginning)
                .unwrap();
        }
        reader.assign(&assignment).unwrap();
        let (mut keys, mut ended) = (Vec::new(), 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        while ended < 3 && Instant::now() < deadline {
            match reader.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => keys.extend(m.key().map(|k| String::from_utf8_lossy(k).into())),
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => ended += 1,
                _ => {}
            }
        }
        keys
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn postgresql_down_means_clean_503s_and_back_up_means_nothing_was_lost() {
    let mut pg =
        Postgres::start().expect("the scale-out tests need PostgreSQL (pg_config on PATH)");
    let url = pg.create_database("restart").unwrap();
    let host = Host::start_with(None, &["--state-url", &url]).await;
    let gateway = host.url("gateway", "");
    let mut acknowledged = Vec::new();
    for i in 0..10 {
        let (status, id) = create(
            &host.http,
            &gateway,
            &format!("P{i}"),
            &format!("p{i}@x.io"),
        )
        .await;
        assert_eq!(status, 201);
        acknowledged.push(id.unwrap());
    }

    pg.stop().unwrap();
    for i in 10..15 {
        let r = host
            .post(
                "/api/users",
                &json!({"name": format!("P{i}"), "email": format!("p{i}@x.io")}),
            )
            .await;
        crate::harness::assert_error(&r, 503);
    }
    crate::harness::assert_error(&host.get("/api/users/1").await, 503);

    // Back: the same host serves again, without a restart, and every acknowledged user is
    // there and reaches order-service.
    pg.resume().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, id) = create(&host.http, &gateway, "Back", "back@x.io").await;
        if status == 201 {
            acknowledged.push(id.unwrap());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {status} after PostgreSQL came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for id in &acknowledged {
        assert_eq!(
            host.get(&format!("/api/users/{id}")).await.status,
            200,
            "user {id}"
        );
        let r = host
            .order_when_cached(*id, 1, Duration::from_secs(30))
            .await;
        assert_eq!(r.status, 201, "user {id}: {:?}", r.json);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn events_of_one_key_keep_their_order_though_both_hosts_drain_the_outbox() {
    // user-service is the fixture that publishes `user-created` for `id` with a name `pad`
    // bytes long: the length says which event of its key a record is.
    let comps = crate::harness::components_copy();
    std::fs::copy(
        crate::harness::fixture("misbehave.wasm"),
        comps.path().join("user.wasm"),
    )
    .unwrap();
    let pair = Pair::start_in(comps.path(), "order").await;
    pair.wait_partitions_shared().await;
    let users = [pair.a().url("user", ""), pair.b.url("user", "")];
    // Five keys at once; each key's 40 events one after the other, alternating hosts.
    let keys = (1..=5).map(|key| {
        let (http, users) = (pair.b.http.clone(), users.clone());
        async move {
            for n in 1..=40 {
                let url = format!("{}/publish?id={key}&pad={n}", users[n % 2]);
                let r = http.post(url).send().await.unwrap();
                assert_eq!(r.status(), 202, "key {key} event {n}");
            }
        }
    });
    futures_util::future::join_all(keys).await;
    let records = crate::kafka::read_topic(&pair._broker, "user-created", 200).await;
    let mut seen: std::collections::BTreeMap<String, Vec<usize>> = Default::default();
    for (key, payload, _) in &records {
        let user: serde_json::Value = serde_json::from_str(payload).unwrap();
        let n = user["name"].as_str().unwrap().len();
        seen.entry(key.clone().unwrap()).or_default().push(n);
    }
    assert_eq!(seen.len(), 5, "{seen:?}");
    for (key, ns) in &seen {
        // No host stopped: every event once, in the order it was committed.
        assert_eq!(*ns, (1..=40).collect::<Vec<_>>(), "key {key}");
    }
    // Each host published some of them: the partitions of the outbox were shared.
    let series = r#"host_messages_produced_total{topic="user-created"}"#;
    let published = [pair.a().metric(series).await, pair.b.metric(series).await];
    assert!(published.iter().all(|&n| n > 0.0), "{published:?}");
    assert_eq!(published.iter().sum::<f64>(), 200.0, "{published:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_modify_write_that_raced_another_is_run_again_on_postgresql_too() {
    let pg = Postgres::start().expect("this test needs PostgreSQL (pg_config on PATH)");
    let url = pg.create_database("bump").unwrap();
    let (host, _comps) =
        crate::harness::with_product("misbehave.wasm", &[], &["--state-url", &url]).await;
    crate::api::racing_read_modify_writes_conflict_and_run_again(&host).await;
}

/// Host A cannot reach the broker (a wrong address, a partition); B can. Whatever outbox
/// partitions A holds, it gives them up once it has failed to publish for a while, and B
/// publishes every event, those committed through A included.
#[tokio::test(flavor = "multi_thread")]
async fn a_host_that_cannot_publish_leaves_its_outbox_partitions_to_one_that_can() {
    let pg = Postgres::start().expect("the scale-out tests need PostgreSQL (pg_config on PATH)");
    let url = pg.create_database("unreachable").unwrap();
    let broker = Broker::start().expect(
        "the scale-out tests need tansu: cargo install tansu --locked --features dynostore",
    );
    let nowhere = format!("127.0.0.1:{}", crate::broker::free_port());
    let components = crate::harness::components_dir();
    // A first: it is the only relay for a while, and holds every partition.
    let a = Host::start_in(
        &components,
        None,
        &["--state-url", &url, "--kafka-brokers", &nowhere],
    )
    .await;
    let email = |i: u32| format!("u{i}@ex.com");
    for i in 0..10 {
        let (status, _) = create(&a.http, &a.url("gateway", ""), &format!("U{i}"), &email(i)).await;
        assert_eq!(status, 201);
    }
    let b = Host::start_in(
        &components,
        None,
        &["--state-url", &url, "--kafka-brokers", &broker.addr],
    )
    .await;
    for i in 10..20 {
        let (status, _) = create(&b.http, &b.url("gateway", ""), &format!("U{i}"), &email(i)).await;
        assert_eq!(status, 201);
    }
    let records = crate::kafka::read_topic(&broker, "user-created", 20).await;
    let keys: BTreeSet<String> = records.iter().filter_map(|(k, _, _)| k.clone()).collect();
    assert_eq!(keys.len(), 20, "{keys:?}");
    assert!(a
        .log()
        .contains("giving its outbox partitions to the other hosts"));
}

/// A session that locked user-service's id sequence and never finished (a host that died
/// mid-statement, say) holds up only what needs that row: `POST /users` gets a clean 503
/// within the request's deadline, and every other request is served meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn a_lock_nobody_releases_costs_a_503_within_the_deadline_not_the_host() {
    let pg = Postgres::start().expect("the scale-out tests need PostgreSQL (pg_config on PATH)");
    let url = pg.create_database("stuck").unwrap();
    let host = Host::start_with(None, &["--state-url", &url, "--request-timeout", "2s"]).await;
    let alice = json!({"name": "Alice", "email": "alice@ex.com"});
    assert_eq!(host.post("/api/users", &alice).await.status, 201);
    let (stuck, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    stuck.batch_execute("BEGIN").await.unwrap();
    let locked = stuck
        .execute(
            "SELECT 1 FROM sequences WHERE service = 'user' FOR UPDATE",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(locked, 1);
    let bob = json!({"name": "Bob", "email": "bob@ex.com"});
    let began = Instant::now();
    let r = host.post("/api/users", &bob).await;
    assert_eq!(r.status, 503, "{:?}", r.json);
    assert!(r.json["error"].is_string(), "{:?}", r.json);
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "{:?}",
        began.elapsed()
    );
    // Everything else is served while the lock is held.
    assert_eq!(host.get("/api/users").await.status, 200);
    let desk = json!({"name": "Desk", "price": 99});
    assert_eq!(host.post("/api/products", &desk).await.status, 201);
    // Once the session ends, users are created again.
    drop(stuck);
    let carol = json!({"name": "Carol", "email": "carol@ex.com"});
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = host.post("/api/users", &carol).await;
        if r.status == 201 {
            break;
        }
        assert!(Instant::now() < deadline, "{} {:?}", r.status, r.json);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Both hosts run order-service in the consumer group `order-service`: the broker splits the
/// topic's partitions between them, and each host handles some of the events.
#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_group_splits_its_partitions_across_the_two_hosts() {
    let pair = Pair::start("split").await;
    let series = r#"host_messages_consumed_total{service="order",topic="user-created"}"#;
    let gateway = pair.a().url("gateway", "");
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut created = 0.0;
    loop {
        let email = format!("split{created}@ex.com");
        let (status, _) = create(&pair.b.http, &gateway, "S", &email).await;
        assert_eq!(status, 201);
        created += 1.0;
        let handled = [pair.a().metric(series).await, pair.b.metric(series).await];
        if handled.iter().all(|&n| n > 0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after {created} users one host handled them all: {handled:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Split, not copied: each record went to one host of the group. Once all are handled,
    // the count stays there (a host that also consumed them all would go on to twice as many).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut settled = None;
    loop {
        let handled = [pair.a().metric(series).await, pair.b.metric(series).await];
        let total: f64 = handled.iter().sum();
        assert!(total <= created, "{handled:?} for {created} users");
        if total == created {
            let since = *settled.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(2) {
                break;
            }
        }
        assert!(Instant::now() < deadline, "{handled:?} of {created}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An outbox row that no host can decode (as another version might write) is set aside in
/// `outbox_parked`, counted, and shown by `/readyz`; the events behind it, on every partition,
/// still reach Kafka and their consumers.
#[tokio::test(flavor = "multi_thread")]
async fn an_undecodable_outbox_row_is_parked_and_the_events_behind_it_flow() {
    let pg = Postgres::start().expect("this test needs PostgreSQL (pg_config on PATH)");
    let url = pg.create_database("parking").unwrap();
    let broker = Broker::start()
        .expect("this test needs tansu: cargo install tansu --locked --features dynostore");
    let host = Host::start_with(
        None,
        &["--state-url", &url, "--kafka-brokers", &broker.addr],
    )
    .await;
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    // One undecodable row at the head of each of the outbox's 16 partitions.
    client
        .execute(
            "INSERT INTO outbox (part, message) \
             SELECT p, '\\xdeadbeef'::bytea FROM generate_series(0, 15) p",
            &[],
        )
        .await
        .unwrap();
    let created = host
        .post(
            "/api/users",
            &json!({"name": "Behind", "email": "behind@x.io"}),
        )
        .await;
    assert_eq!(created.status, 201, "{:?}", created.json);
    let id = created.json["id"].as_u64().unwrap();
    let order = host.order_when_cached(id, 1, Duration::from_secs(30)).await;
    assert_eq!(order.status, 201, "{:?}", order.json);
    let records = crate::kafka::read_topic(&broker, "user-created", 1).await;
    assert!(
        records
            .iter()
            .any(|(_, payload, _)| payload.contains("behind@x.io")),
        "{records:?}"
    );
    let parked: i64 = client
        .query_one(
            "SELECT count(*) FROM outbox_parked WHERE reason LIKE '%decode%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(parked, 16);
    // Readiness counts the parked table about once a second.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ready = host.admin_get("/readyz").await;
        if ready.json["outbox_parked"] == 16 {
            break;
        }
        assert!(Instant::now() < deadline, "{:?}", ready.json);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        host.metric(r#"host_messages_parked_total{topic=""}"#).await,
        16.0
    );
    assert_eq!(host.metric("host_outbox_parked ").await, 16.0);
}
