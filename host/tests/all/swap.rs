//! Hot swap: replacing a component file while the host serves.

use crate::harness::{
    assert_error, components_copy, components_with_counter, fixture, stop_clients, Host, COUNTER,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn sha(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

async fn component(host: &Host, name: &str) -> Value {
    host.services()
        .await
        .iter()
        .find(|c| c["name"] == name)
        .cloned()
        .unwrap()
}

pub(crate) async fn build_tag(host: &Host, service: &str, path: &str) -> Option<String> {
    let r = host.send("GET", service, path, None).await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    r.headers
        .get("x-build")
        .map(|v| v.to_str().unwrap().to_string())
}

/// Waits until `service` answers with build `tag`: within a minute, which covers compiling a
/// Python component (tens of MB) on two busy cores with a cold compile cache.
pub(crate) async fn wait_for_tag(host: &Host, service: &str, path: &str, tag: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while build_tag(host, service, path).await.as_deref() != Some(tag) {
        assert!(
            Instant::now() < deadline,
            "{service} never switched to build {tag}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn twenty_swaps_under_load_fail_no_request() {
    let comps = components_copy();
    let user_file = comps.path().join("user.wasm");
    std::fs::copy(fixture("user-a.wasm"), &user_file).unwrap();
    let host = Arc::new(Host::start_in(comps.path(), None, &[]).await);
    assert_eq!(
        build_tag(&host, "user", "/users").await.as_deref(),
        Some("a")
    );

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let tags = Arc::new(Mutex::new(
        std::collections::HashSet::<Option<String>>::new(),
    ));
    let mut clients = Vec::new();
    for n in 0..6 {
        let (host, stop, failures, tags) =
            (host.clone(), stop.clone(), failures.clone(), tags.clone());
        clients.push(tokio::spawn(async move {
            let targets = [
                ("gateway", "/api/users"),
                ("user", "/users"),
                ("product", "/products"),
                ("order", "/orders/101"),
                ("gateway", "/api/v1/dashboard"),
            ];
            let mut i = n;
            let mut sent = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let (service, path) = targets[i % targets.len()];
                i += 1;
                sent += 1;
                match host.http.get(host.url(service, path)).send().await {
                    Ok(r) if r.status() == 200 => {
                        if service == "user" {
                            let tag = r
                                .headers()
                                .get("x-build")
                                .map(|v| v.to_str().unwrap().to_string());
                            tags.lock().unwrap().insert(tag);
                        }
                        let _ = r.bytes().await;
                    }
                    Ok(r) => failures
                        .lock()
                        .unwrap()
                        .push(format!("{service}{path}: {}", r.status())),
                    Err(e) => failures
                        .lock()
                        .unwrap()
                        .push(format!("{service}{path}: {e}")),
                }
            }
            sent
        }));
    }

    let mut tag = "a";
    for _ in 0..20 {
        tag = if tag == "a" { "b" } else { "a" };
        // Overwrite in place, as `cp` does: the watcher must not load a half-written file.
        std::fs::copy(fixture(&format!("user-{tag}.wasm")), &user_file).unwrap();
        wait_for_tag(&host, "user", "/users", tag).await;
    }
    let sent = stop_clients(&stop, clients, &failures).await;
    assert!(sent > 100, "load too light to mean anything: {sent}");
    let tags = tags.lock().unwrap().clone();
    let allowed = [Some("a".to_string()), Some("b".to_string())];
    assert!(
        tags.iter().all(|t| allowed.contains(t)),
        "unexpected builds {tags:?}"
    );
    assert_eq!(tags.len(), 2, "both builds should have served: {tags:?}");
    for _ in 0..20 {
        assert_eq!(
            build_tag(&host, "user", "/users").await.as_deref(),
            Some("a")
        );
    }
    let c = component(&host, "user").await;
    assert_eq!(c["generation"], 21);
    assert_eq!(c["sha256"], sha(&fixture("user-a.wasm")).as_str());
}

#[tokio::test]
async fn bad_files_are_rejected_and_the_old_version_keeps_serving() {
    let comps = components_copy();
    let user_file = comps.path().join("user.wasm");
    let host = Host::start_in(comps.path(), None, &[]).await;
    let good = component(&host, "user").await["sha256"].clone();
    let created = host
        .post(
            "/api/users",
            &json!({"name": "Keep", "email": "keep@ex.com"}),
        )
        .await;
    assert_eq!(created.status, 201);

    let original = std::fs::read(&user_file).unwrap();
    let bad: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated",
            original[..original.len() / 2].to_vec(),
            "not a valid component",
        ),
        (
            "not wasm",
            b"definitely not a component".to_vec(),
            "not a valid component",
        ),
        (
            "core module",
            b"\0asm\x01\0\0\0".to_vec(),
            "not a valid component",
        ),
        (
            "no http export",
            std::fs::read(fixture("no-http.wasm")).unwrap(),
            "incoming-handler",
        ),
        (
            "unknown import",
            std::fs::read(fixture("bad-import.wasm")).unwrap(),
            "imports something the host does not provide",
        ),
    ];
    for (what, bytes, expected) in bad {
        std::fs::write(&user_file, &bytes).unwrap();
        let digest = hex::encode(Sha256::digest(&bytes));
        let deadline = Instant::now() + Duration::from_secs(20);
        let rejected = loop {
            let c = component(&host, "user").await;
            if c["last_rejected"]["sha256"] == digest.as_str() {
                break c;
            }
            assert!(Instant::now() < deadline, "{what}: never rejected; {c}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let error = rejected["last_rejected"]["error"].as_str().unwrap();
        assert!(error.contains(expected), "{what}: error {error:?}");
        assert_eq!(
            rejected["sha256"], good,
            "{what}: the running version changed"
        );
        assert_eq!(rejected["generation"], 1);
        let users = host.get("/api/users").await;
        assert_eq!(users.status, 200, "{what}: {:?}", users.json);
        assert_eq!(users.json[0]["email"], "keep@ex.com");
    }

    // order-service subscribes to user-created: a component without the handler is refused.
    let order_file = comps.path().join("order.wasm");
    std::fs::write(&order_file, &original).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let c = component(&host, "order").await;
        if let Some(e) = c["last_rejected"]["error"].as_str() {
            assert!(
                e.contains("exports no message handler: neither microsvc:platform/handler"),
                "{e}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "order never rejected a handler-less file"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(host.get("/api/orders/101").await.status, 200);
    assert!(host.log().contains("new component rejected"));
}

#[tokio::test]
async fn rollback_returns_to_the_previous_version() {
    let comps = components_copy();
    let host = Host::start_in(comps.path(), None, &[]).await;
    let first = component(&host, "user").await["sha256"].clone();
    let move_version = |host: &Host, how: &str| {
        let url = format!("http://{}/components/user/{how}", host.admin);
        let client = host.http.clone();
        async move {
            let post = client.post(url).header("content-type", "application/json");
            crate::harness::reply(post.send().await.unwrap()).await
        }
    };
    let rollback = |host: &Host| move_version(host, "rollback");
    assert_eq!(
        rollback(&host).await.status,
        409,
        "nothing to roll back to yet"
    );

    std::fs::copy(fixture("user-b.wasm"), comps.path().join("user.wasm")).unwrap();
    wait_for_tag(&host, "user", "/users", "b").await;
    let r = rollback(&host).await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(r.json["generation"], 3);
    assert_eq!(r.json["sha256"], first);
    assert_eq!(build_tag(&host, "user", "/users").await, None);
    assert_eq!(component(&host, "user").await["sha256"], first);
    // The version left is kept: rolling forward brings it back.
    let r = move_version(&host, "rollforward").await;
    assert_eq!(
        (r.status, r.json["generation"].as_u64()),
        (200, Some(4)),
        "{:?}",
        r.json
    );
    assert_eq!(
        build_tag(&host, "user", "/users").await.as_deref(),
        Some("b")
    );
    assert_eq!(move_version(&host, "rollforward").await.status, 409);
    let r = rollback(&host).await;
    assert_eq!((r.status, r.json["sha256"].clone()), (200, first));
    // A browser form (no JSON content type) cannot trigger it.
    let form = host
        .http
        .post(format!("http://{}/components/user/rollforward", host.admin))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("a=1")
        .send()
        .await
        .unwrap();
    assert_error(&crate::harness::reply(form).await, 415);
    assert_eq!(build_tag(&host, "user", "/users").await, None);
    let missing = crate::harness::reply(
        host.http
            .post(format!("http://{}/components/billing/rollback", host.admin))
            .header("content-type", "application/json")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(missing.status, 404);
}

#[tokio::test]
async fn swapping_order_service_while_events_flow_loses_and_repeats_nothing() {
    // order-service and `counter` (which counts each delivery) are both swapped back and forth.
    let comps = components_with_counter();
    let order_file = comps.path().join("order.wasm");
    let counter_file = comps.path().join("counter.wasm");
    std::fs::copy(fixture("order-a.wasm"), &order_file).unwrap();
    std::fs::copy(fixture("misbehave-a.wasm"), &counter_file).unwrap();
    let host = Arc::new(Host::start_edited(comps.path(), None, &COUNTER, &[]).await);

    let producer = {
        let host = host.clone();
        tokio::spawn(async move {
            for i in 1..=60 {
                let r = host
                    .post(
                        "/api/users",
                        &json!({"name": format!("E{i}"), "email": format!("e{i}@ex.com")}),
                    )
                    .await;
                assert_eq!(r.status, 201);
            }
        })
    };
    let mut tag = "a";
    for _ in 0..6 {
        tag = if tag == "a" { "b" } else { "a" };
        std::fs::copy(fixture(&format!("order-{tag}.wasm")), &order_file).unwrap();
        std::fs::copy(fixture(&format!("misbehave-{tag}.wasm")), &counter_file).unwrap();
        wait_for_tag(&host, "order", "/orders/101", tag).await;
        wait_for_tag(&host, "counter", "/", tag).await;
    }
    producer.await.unwrap();
    // Each event was handled once: a swap neither skips nor repeats a delivery.
    for id in 1..=60u64 {
        let event = format!("user-created-{id}");
        assert_eq!(
            host.counted(&event, Duration::from_secs(20)).await,
            1,
            "{event}"
        );
    }

    // Every user reaches the cache exactly once in effect: an order can be placed for each,
    // and order ids stay dense (no request was applied twice).
    for id in 1..=60u64 {
        let r = host.order_when_cached(id, 1, Duration::from_secs(20)).await;
        assert_eq!(r.status, 201, "{:?}", r.json);
    }
    let orders = host.get("/api/orders").await.json;
    let orders = orders.as_array().unwrap();
    assert_eq!(orders.len(), 61);
    for (i, o) in orders.iter().enumerate().skip(1) {
        assert_eq!(o["user"]["id"], o["userId"]);
        assert_eq!(o["user"]["email"], format!("e{i}@ex.com"));
    }
}
