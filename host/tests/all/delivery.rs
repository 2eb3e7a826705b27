//! Handler retries and dead letters on the embedded backend, through the misbehave fixture's
//! handler, which fails an event a given number of times: `counter` consumes `user-created`,
//! and `dead` (the same fixture) consumes its dead-letter topic.

use crate::harness::{components_with_counter, fixture, Host, COUNTER};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_handler_is_retried_with_backoff_then_dead_lettered_after_its_attempts() {
    let comps = components_with_counter();
    // user-service is the fixture too: it publishes `user-created` events that fail K times.
    for name in ["user", "dead"] {
        std::fs::copy(
            fixture("misbehave.wasm"),
            comps.path().join(format!("{name}.wasm")),
        )
        .unwrap();
    }
    let mut edits = COUNTER.to_vec();
    edits.extend([
        ("dead", r#"component = "dead.wasm""#),
        ("dead", "port = 0"),
        (
            "dead",
            r#"subscribe = [{ topic = "user-created.dlq", group = "dead" }]"#,
        ),
    ]);
    let flags = ["--retry-max-attempts", "3"];
    let host = Host::start_edited(comps.path(), None, &edits, &flags).await;
    let publish = |id: u32, fail: u32| {
        let (host, path) = (&host, format!("/publish?id={id}&fail={fail}"));
        async move { host.send("POST", "user", &path, None).await }
    };
    let labels = r#"{service="counter",topic="user-created"}"#;

    // Two failures, then handled at the third and last attempt: once, nothing dead-lettered.
    assert_eq!(publish(1, 2).await.status, 202);
    let within = Duration::from_secs(30);
    assert_eq!(host.counted("user-created-1", within).await, 1);
    assert_eq!(
        host.metric(&format!("host_messages_retried_total{labels}"))
            .await,
        2.0
    );
    assert_eq!(
        host.metric(&format!("host_messages_dead_lettered_total{labels}"))
            .await,
        0.0
    );
    // The backoff doubles from RETRY_BACKOFF (20 ms in the tests) per attempt.
    let log = host.log();
    for (attempt, wait) in [(1, "20ms"), (2, "40ms")] {
        assert!(
            log.lines().any(|l| l.contains("service=counter")
                && l.contains(&format!("attempt={attempt} "))
                && l.contains(&format!("retry_in={wait}"))),
            "no retry of attempt {attempt} after {wait}"
        );
    }

    // Failing every attempt: dead-lettered after the third, handled by nobody else.
    assert_eq!(publish(2, 9).await.status, 202);
    assert_eq!(host.counted_at("dead", "user-created-2", within).await, 1);
    assert_eq!(host.deliveries("user-created-2").await, 0);
    assert_eq!(
        host.metric(&format!("host_messages_retried_total{labels}"))
            .await,
        4.0
    );
    assert_eq!(
        host.metric(&format!("host_messages_dead_lettered_total{labels}"))
            .await,
        1.0
    );
    // And consumption moved on past it.
    assert_eq!(publish(3, 0).await.status, 202);
    assert_eq!(host.counted("user-created-3", within).await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handler_stopped_by_a_limit_is_retried_and_then_handles_its_event() {
    let comps = components_with_counter();
    std::fs::copy(fixture("misbehave.wasm"), comps.path().join("user.wasm")).unwrap();
    let flags = [
        "--cpu-deadline",
        "500ms",
        "--request-timeout",
        "2s",
        "--invocation-host-bytes",
        "8MiB",
    ];
    let host = Host::start_edited(comps.path(), None, &COUNTER, &flags).await;
    let within = Duration::from_secs(60);
    // At its first attempt the handler computes forever, waits ten minutes, or stages more
    // than the host holds for one invocation; each is stopped, and the second attempt counts.
    for (id, behave, why) in [
        (11, "loop", "computed past its deadline"),
        (12, "sleep", "did not finish within 2s"),
        (13, "hoard", "INVOCATION_HOST_BYTES"),
    ] {
        let path = format!("/publish?id={id}&behave={behave}");
        assert_eq!(host.send("POST", "user", &path, None).await.status, 202);
        let event = format!("user-created-{id}");
        assert_eq!(host.counted(&event, within).await, 1, "{behave}");
        let log = host.log();
        assert!(
            log.lines().any(|l| l.contains("service=counter")
                && l.contains("attempt=1")
                && l.contains(why)),
            "{behave}: no retry for {why:?}"
        );
    }
    let labels = r#"{service="counter",topic="user-created"}"#;
    assert_eq!(
        host.metric(&format!("host_messages_retried_total{labels}"))
            .await,
        3.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_embedded_log_trims_what_every_group_handled_once_it_is_older_than_the_retention() {
    let host = Host::start_with(None, &["--log-retention", "1s"]).await;
    let r = host
        .post(
            "/api/users",
            &serde_json::json!({"name": "T", "email": "t@ex.com"}),
        )
        .await;
    assert_eq!(r.status, 201);
    let cached = host
        .eventually("/api/orders/101", Duration::from_secs(20), |r| {
            !r.json["user"].is_null()
        })
        .await;
    assert!(!cached.json["user"].is_null(), "never handled");
    // Handled by order-service's group, and older than a second: trimmed.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while host.metric("host_log_records_trimmed_total").await < 1.0
        || host.metric("host_log_bytes").await > 0.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the record was never trimmed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // New records are still delivered after the topic was emptied.
    let r = host
        .post(
            "/api/users",
            &serde_json::json!({"name": "U", "email": "u@ex.com"}),
        )
        .await;
    assert_eq!(r.status, 201);
    let o = host.order_when_cached(2, 1, Duration::from_secs(20)).await;
    assert_eq!(o.status, 201, "{:?}", o.json);
}
