//! `wasi:messaging@0.2.0-draft`: the `kv-counter` fixture (standard interfaces alone, both
//! builds) as product-service sends `visited` through `producer.send` and takes messages through
//! its `incoming-handler` export; the misbehave fixture, on `microsvc:platform`, publishes
//! `user-created` as user-service and counts deliveries as `counter`.

use crate::harness::{components_with_counter, fixture, manifest, Host, COUNTER};
use crate::live::{manifest_when, write_manifest};
use serde_json::Value;
use std::time::{Duration, Instant};

const BUILDS: [&str; 2] = ["kv-counter.wasm", "kv-counter-draft.wasm"];
const WITHIN: Duration = Duration::from_secs(30);

/// Manifest edits that let product-service send `visited` and subscribe to `visited` and
/// `user-created`, with `product` settings on top.
fn edits<'a>(product: &[&'a str]) -> Vec<(&'a str, &'a str)> {
    let mut edits = COUNTER[..2].to_vec();
    edits.extend([
        (
            "counter",
            r#"subscribe = [{ topic = "user-created", group = "counter" }, { topic = "visited", group = "counter" }]"#,
        ),
        ("product", r#"key_value_stores = ["default"]"#),
        ("product", r#"messaging_clients = ["events"]"#),
        ("product", r#"produces = ["visited"]"#),
        (
            "product",
            r#"config = { greeting = "hej", topic = "visited", client = "events" }"#,
        ),
        (
            "product",
            r#"subscribe = [{ topic = "visited", group = "product" }, { topic = "user-created", group = "product" }]"#,
        ),
    ]);
    edits.extend(product.iter().map(|setting| ("product", *setting)));
    edits
}

/// A host where product-service is `build` and user-service the misbehave fixture, with
/// [`edits`].
async fn messaging_host(build: &str, product: &[&str]) -> (Host, tempfile::TempDir) {
    let comps = components_with_counter();
    std::fs::copy(fixture("misbehave.wasm"), comps.path().join("user.wasm")).unwrap();
    std::fs::copy(fixture(build), comps.path().join("product.wasm")).unwrap();
    let flags = ["--retry-max-attempts", "3"];
    let host = Host::start_edited(comps.path(), None, &edits(product), &flags).await;
    (host, comps)
}

/// What product-service's handler saw of `topic`, once it took `n` messages of it.
async fn seen(host: &Host, topic: &str, n: u64) -> Value {
    let path = format!("/seen?topic={topic}");
    let r = host
        .eventually_at("product", &path, WITHIN, |r| r.json["seen"] == n)
        .await;
    assert_eq!(
        r.json["seen"],
        n,
        "{topic}: {:?}\n{}",
        r.json,
        host.log_tail(30)
    );
    r.json["last"].clone()
}

/// Events go both ways between a component on `wasi:messaging` and one on
/// `microsvc:platform`; a handler's error is retried, then dead-lettered; every delivered
/// message says where it came from and at which attempt.
#[tokio::test(flavor = "multi_thread")]
async fn events_flow_between_wasi_messaging_and_platform_components() {
    for build in BUILDS {
        let (host, _comps) = messaging_host(build, &[]).await;
        let r = host.send("GET", "product", "/count", None).await;
        assert_eq!(r.status, 200, "{build}: {:?}", r.json);
        assert_eq!(r.json["visits"], 1, "{build}");

        // Sent through wasi:messaging: a microsvc:platform subscriber and its own handler get it.
        assert_eq!(host.counted("visit-1", WITHIN).await, 1, "{build}");
        let last = seen(&host, "visited", 1).await;
        assert_eq!(last["content-type"], "application/json", "{build}: {last}");
        assert_eq!(last["event-id"], "visit-1", "{build}: {last}");
        assert_eq!(last["key"], "1", "{build}: {last}");
        assert_eq!(last["topic"], "visited", "{build}: {last}");
        assert_eq!(last["attempt"], "1", "{build}: {last}");
        assert_eq!(last["partition"], "0", "{build}: {last}");
        assert!(
            last["offset"].as_str().unwrap().parse::<u64>().is_ok(),
            "{last}"
        );
        assert!(!last["x-request-id"].as_str().unwrap().is_empty(), "{last}");

        // Sent through microsvc:platform, failed once by the wasi:messaging handler, then taken.
        let r = host
            .send("POST", "user", "/publish?id=7&fail=1", None)
            .await;
        assert_eq!(r.status, 202, "{build}");
        let last = seen(&host, "user-created", 1).await;
        assert_eq!(last["attempt"], "2", "{build}: {last}");
        assert_eq!(last["key"], "7", "{build}: {last}");
        assert_eq!(last["event-id"], "user-created-7", "{build}: {last}");
        let labels = r#"{service="product",topic="user-created"}"#;
        let retried = format!("host_messages_retried_total{labels}");
        assert_eq!(host.metric(&retried).await, 1.0, "{build}");

        // Failing every attempt: dead-lettered after the third, and consumption moves on.
        let r = host
            .send("POST", "user", "/publish?id=8&fail=9", None)
            .await;
        assert_eq!(r.status, 202, "{build}");
        let dead = format!("host_messages_dead_lettered_total{labels}");
        let deadline = Instant::now() + WITHIN;
        while host.metric(&dead).await < 1.0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(host.metric(&dead).await, 1.0, "{build}");
        assert_eq!(host.metric(&retried).await, 3.0, "{build}");
        host.send("POST", "user", "/publish?id=9", None).await;
        let last = seen(&host, "user-created", 2).await;
        assert_eq!(last["event-id"], "user-created-9", "{build}: {last}");
    }
}

/// A client the manifest does not list, and a topic it does not let the service produce, are
/// `permission-denied`; the request fails and its count is rolled back.
#[tokio::test(flavor = "multi_thread")]
async fn an_unlisted_client_or_topic_is_permission_denied() {
    let settings = [
        r#"config = { topic = "visited", client = "elsewhere" }"#,
        r#"config = { topic = "user-created", client = "events" }"#,
    ];
    for setting in settings {
        let (host, _comps) = messaging_host(BUILDS[0], &[setting]).await;
        let r = host.send("GET", "product", "/count", None).await;
        assert_eq!(r.status, 500, "{setting}: {:?}", r.json);
        let error = r.json["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{:?}", r.json));
        assert!(error.contains("PermissionDenied"), "{setting}: {error}");
        // Allowed again: the failed visit was not counted, and this one is sent.
        write_manifest(&host, &manifest(&edits(&[])));
        manifest_when(&host, |m| m["generation"] == 2).await;
        let r = host.send("GET", "product", "/count", None).await;
        assert_eq!(r.json["visits"], 1, "{setting}: {:?}", r.json);
        assert_eq!(host.counted("visit-1", WITHIN).await, 1, "{setting}");
    }
}
