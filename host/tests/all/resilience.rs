//! Upstream failures, the outbound allowlist, and the dashboard's parallel calls.

use crate::harness::{assert_error, Host};
use std::time::{Duration, Instant};

#[tokio::test]
async fn calls_outside_the_allowlist_are_refused_with_a_clear_error() {
    let host = Host::edited(&[("gateway", r#"calls = ["user", "product"]"#)], &[]).await;
    let r = host.get("/api/orders/101").await;
    assert_error(&r, 502);
    assert!(
        r.json["error"].as_str().unwrap().contains("order-service"),
        "{:?}",
        r.json
    );
    assert_eq!(host.get("/api/users").await.status, 200);
    assert!(host.log().contains("allowlist refused"));
}

#[tokio::test]
async fn dashboard_calls_run_in_parallel() {
    // Each upstream takes at least 1 s; in sequence the dashboard would take 2 s or more.
    let host = Host::edited(
        &[
            ("user", r#"latency = "3s""#),
            ("product", r#"latency = "3s""#),
        ],
        &[],
    )
    .await;
    let start = Instant::now();
    let r = host.get("/api/v1/dashboard").await;
    let took = start.elapsed();
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert!(
        took >= Duration::from_secs(3),
        "latency not injected? {took:?}"
    );
    // One after the other they take 6 s.
    assert!(
        took < Duration::from_millis(5500),
        "upstream calls did not overlap: {took:?}"
    );
}

#[tokio::test]
async fn slow_upstream_gives_504_not_a_hang() {
    let host = Host::edited(
        &[("user", r#"latency = "20s""#)],
        &["--outbound-timeout", "300ms"],
    )
    .await;
    let start = Instant::now();
    assert_error(&host.get("/api/users").await, 504);
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    assert_error(&host.get("/api/v1/dashboard").await, 504);
    assert_eq!(host.get("/api/products").await.status, 200);
}
