//! Instance reuse (`--instance-reuse N`): one instance serves many requests, is thrown away
//! when it traps, and is never handed a request after its component was swapped.

use crate::harness::{assert_error, components_copy, fixture, with_product, Host};
use crate::swap::{build_tag, wait_for_tag};

const PRODUCT_INSTANCES: &str = r#"host_instances_created_total{service="product"}"#;

#[tokio::test]
async fn by_default_instances_are_reused_and_one_flag_gives_each_request_a_fresh_one() {
    for (flags, instances) in [(&[][..], 1.0), (&["--instance-reuse", "1"][..], 10.0)] {
        let (host, _comps) = with_product("misbehave.wasm", &[], flags).await;
        for _ in 0..10 {
            assert_eq!(host.send("GET", "product", "/ok", None).await.status, 200);
        }
        assert_eq!(host.metric(PRODUCT_INSTANCES).await, instances, "{flags:?}");
    }
}

#[tokio::test]
async fn a_reused_instance_serves_until_its_quota_and_a_trap_discards_it() {
    let (host, _comps) = with_product("misbehave.wasm", &[], &["--instance-reuse", "25"]).await;
    for _ in 0..20 {
        assert_eq!(host.send("GET", "product", "/ok", None).await.status, 200);
    }
    assert_eq!(
        host.metric(PRODUCT_INSTANCES).await,
        1.0,
        "one instance, reused"
    );
    for _ in 0..10 {
        assert_eq!(host.send("GET", "product", "/ok", None).await.status, 200);
    }
    assert_eq!(
        host.metric(PRODUCT_INSTANCES).await,
        2.0,
        "the first instance retired after 25 requests"
    );
    assert_error(&host.send("GET", "product", "/trap", None).await, 500);
    assert_eq!(host.send("GET", "product", "/ok", None).await.status, 200);
    assert_eq!(
        host.metric(PRODUCT_INSTANCES).await,
        3.0,
        "the trapped instance was not reused"
    );
}

#[tokio::test]
async fn after_a_swap_no_request_reaches_an_instance_of_the_old_version() {
    let comps = components_copy();
    let user_file = comps.path().join("user.wasm");
    std::fs::copy(fixture("user-a.wasm"), &user_file).unwrap();
    let host = Host::start_in(comps.path(), None, &["--instance-reuse", "1000000"]).await;
    // Requests in parallel leave several idle instances of version a behind.
    let get = || host.send("GET", "gateway", "/api/users", None);
    let (r1, r2, r3, r4) = tokio::join!(get(), get(), get(), get());
    assert!([r1, r2, r3, r4].iter().all(|r| r.status == 200));
    assert_eq!(
        build_tag(&host, "user", "/users").await.as_deref(),
        Some("a")
    );
    let tmp = comps.path().join(".user.wasm.tmp");
    std::fs::copy(fixture("user-b.wasm"), &tmp).unwrap();
    std::fs::rename(&tmp, &user_file).unwrap();
    wait_for_tag(&host, "user", "/users", "b").await;
    for _ in 0..50 {
        assert_eq!(
            build_tag(&host, "user", "/users").await.as_deref(),
            Some("b"),
            "an instance of the old version answered"
        );
    }
}

#[tokio::test]
async fn message_handlers_reuse_instances_too() {
    let host = Host::start().await;
    for i in 1..=8 {
        let user = serde_json::json!({"name": format!("U{i}"), "email": format!("u{i}@ex.com")});
        assert_eq!(host.post("/api/users", &user).await.status, 201);
    }
    // The order handler ran eight times (once per user-created event), one at a time.
    let r = host
        .eventually("/api/orders/101", std::time::Duration::from_secs(10), |r| {
            !r.json["user"].is_null()
        })
        .await;
    assert!(!r.json["user"].is_null(), "{:?}", r.json);
    let consumed = r#"host_messages_consumed_total{service="order",topic="user-created"}"#;
    for _ in 0..100 {
        if host.metric(consumed).await >= 8.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(host.metric(consumed).await, 8.0);
    let orders = host
        .metric(r#"host_instances_created_total{service="order"}"#)
        .await;
    assert!(
        orders <= 2.0,
        "{orders} order instances for 8 messages and the GETs"
    );
}

/// With 12 instance slots for 6 services, each service keeps at most one idle instance (half
/// the slots stay free for fresh ones): after four requests at once, three instances go.
#[tokio::test(flavor = "multi_thread")]
async fn idle_instances_are_capped_so_that_fresh_ones_find_slots() {
    let (host, _comps) = with_product("misbehave.wasm", &[], &["--max-instances", "12"]).await;
    let burst = || async {
        let requests = (0..4).map(|_| host.send("GET", "product", "/sleep?ms=1000", None));
        for r in futures_util::future::join_all(requests).await {
            assert_eq!(r.status, 200, "{:?}", r.json);
        }
    };
    burst().await;
    assert_eq!(host.metric(PRODUCT_INSTANCES).await, 4.0);
    // One of the four was kept; the others were dropped and are created again.
    burst().await;
    assert_eq!(host.metric(PRODUCT_INSTANCES).await, 7.0);
}
