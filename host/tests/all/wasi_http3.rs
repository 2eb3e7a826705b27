//! WASI 0.3: a component that exports `wasi:http/handler@0.3.0` (the `hello-p3` fixture, built
//! with wit-bindgen alone, standing in for product-service) is served like any other service.

use crate::harness::{assert_error, components_copy, fixture, manifest, with_product, Host};
use crate::live::{manifest_when, write_manifest};
use serde_json::json;
use std::time::{Duration, Instant};

const PEER: [(&str, &str); 1] = [("product", "calls = [\"user\"]")];

/// The body of a 200 answer to `GET path` on product-service, as bytes.
async fn product_body(host: &Host, path: &str) -> bytes::Bytes {
    let r = host
        .http
        .get(host.url("product", path))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wasi_http_0_3_component_is_served_on_its_port() {
    let (host, _comps) = with_product("hello-p3.wasm", &[], &[]).await;
    assert_eq!(product_body(&host, "/").await, b"hello p3".as_slice());
    let product = host
        .services()
        .await
        .into_iter()
        .find(|s| s["name"] == "product")
        .unwrap();
    assert_eq!(product["http"], "wasi:http/handler@0.3", "{product}");
    // The other services still answer through their own exports.
    assert_eq!(host.send("GET", "user", "/users", None).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn its_outgoing_requests_reach_allowed_peers_in_process() {
    let (host, _comps) = with_product("hello-p3.wasm", &PEER, &[]).await;
    let created = host
        .post("/api/users", &json!({"name": "Pia", "email": "pia@p3.io"}))
        .await;
    assert_eq!(created.status, 201, "{:?}", created.json);
    let r = host.send("GET", "product", "/peer", None).await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(r.json[0]["email"], "pia@p3.io", "{:?}", r.json);
    // Without the allowlist entry the call is refused, and the component says so.
    let (host, _comps) = with_product("hello-p3.wasm", &[], &[]).await;
    let r = host.send("GET", "product", "/peer", None).await;
    assert_eq!(r.status, 500, "{:?}", r.json);
}

#[tokio::test(flavor = "multi_thread")]
async fn its_state_writes_commit_with_the_invocation_and_survive_a_restart() {
    let comps = components_copy();
    std::fs::copy(fixture("hello-p3.wasm"), comps.path().join("product.wasm")).unwrap();
    let host = Host::start_edited(comps.path(), None, &[], &[]).await;
    for n in 1..=3 {
        let r = host.send("GET", "product", "/visits", None).await;
        assert_eq!(r.json["visits"], n, "{:?}", r.json);
    }
    let data = host.data.clone();
    let (status, keep) = host.terminate();
    assert!(status.success());
    let host = Host::start_edited(comps.path(), Some(&data), &[], &[]).await;
    let r = host.send("GET", "product", "/visits", None).await;
    assert_eq!(r.json["visits"], 4, "{:?}", r.json);
    drop(keep);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_of_several_mib_written_by_a_guest_task_arrives_whole() {
    let (host, _comps) = with_product("hello-p3.wasm", &[], &[]).await;
    let body = product_body(&host, "/big?mb=6").await;
    assert_eq!(body.len(), 6 << 20);
    assert!(body.iter().all(|&b| b == b'x'));
}

/// A body longer than what the host may hold for an invocation (`INVOCATION_HOST_BYTES`, here
/// 1 MiB) is passed on as the guest writes it; a short one is sent whole, with its length.
#[tokio::test(flavor = "multi_thread")]
async fn a_body_longer_than_the_host_may_hold_streams_through() {
    let bounded = ["--invocation-host-bytes", "1MiB"];
    let (host, _comps) = with_product("hello-p3.wasm", &[], &bounded).await;
    let r = host
        .http
        .get(host.url("product", "/big?mb=6"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers().get("content-length").is_none(),
        "{:?}",
        r.headers()
    );
    let body = r.bytes().await.unwrap();
    assert_eq!(body.len(), 6 << 20);
    assert!(body.iter().all(|&b| b == b'x'));
    let r = host
        .http
        .get(host.url("product", "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-length"], "8");
}

/// The invocation ends when `handle` returns its response: what its body task writes to the
/// state afterwards is refused, not committed unseen.
#[tokio::test(flavor = "multi_thread")]
async fn state_writes_after_the_response_was_returned_are_refused() {
    let (host, _comps) = with_product("hello-p3.wasm", &[], &[]).await;
    let body = product_body(&host, "/late").await;
    let body = String::from_utf8_lossy(&body);
    assert!(body.starts_with("late write: refused"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_waiting_past_the_request_timeout_gets_504_and_the_service_goes_on() {
    let (host, _comps) = with_product("hello-p3.wasm", &[], &["--request-timeout", "1s"]).await;
    let began = std::time::Instant::now();
    let r = host.send("GET", "product", "/sleep?ms=20000", None).await;
    assert_error(&r, 504);
    assert!(began.elapsed() < std::time::Duration::from_secs(5));
    let r = host.send("GET", "product", "/sleep?ms=10", None).await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn its_instances_are_reused_between_requests() {
    let (host, _comps) = with_product("hello-p3.wasm", &[], &[]).await;
    for _ in 0..20 {
        assert_eq!(host.send("GET", "product", "/", None).await.status, 200);
    }
    let created = host
        .metric(r#"host_instances_created_total{service="product"}"#)
        .await;
    assert_eq!(created, 1.0);
}

/// A component built with spin-sdk 7, as a Spin 4 user builds one, runs unchanged: its
/// imports link, it answers, and its outgoing request reaches user-service in process.
#[tokio::test(flavor = "multi_thread")]
async fn a_component_built_with_spin_sdk_7_runs_unchanged() {
    let (host, _comps) = with_product("spin-hello.wasm", &PEER, &[]).await;
    assert_eq!(
        product_body(&host, "/").await,
        b"hello from spin".as_slice()
    );
    host.post(
        "/api/users",
        &json!({"name": "Sol", "email": "sol@spin.io"}),
    )
    .await;
    let r = host.send("GET", "product", "/peer", None).await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(r.json[0]["email"], "sol@spin.io", "{:?}", r.json);
}

/// `host_instances_created_total` of product-service.
async fn product_instances(host: &Host) -> f64 {
    host.metric(r#"host_instances_created_total{service="product"}"#)
        .await
}

/// One instance takes a second request while the first waits on the clock: the second is
/// answered first, and no other instance was made.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_waiting_on_the_clock_does_not_hold_up_another_on_its_instance() {
    let (host, _comps) = with_product("hello-p3.wasm", &[], &[]).await;
    let host = std::sync::Arc::new(host);
    let sleeper = {
        let host = host.clone();
        tokio::spawn(async move { host.send("GET", "product", "/sleep?ms=4000", None).await })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while product_instances(&host).await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the sleeping request never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(product_body(&host, "/").await, b"hello p3".as_slice());
    assert!(
        !sleeper.is_finished(),
        "answered only after the sleeping request"
    );
    assert_eq!(product_instances(&host).await, 1.0);
    assert_eq!(sleeper.await.unwrap().status, 200);
}

/// Requests that run at once in one instance each commit their own writes: eight increments
/// that overlap on one instance count to eight, each request seeing its own number.
#[tokio::test(flavor = "multi_thread")]
async fn requests_sharing_an_instance_each_commit_their_own_writes() {
    for (concurrent, instances) in [(16, 1.0), (1, 8.0)] {
        // Reruns after conflicts wait for commits: no instance may end idle meanwhile.
        let setting = format!("instances = {{ concurrent = {concurrent}, idle = \"1h\" }}");
        let edits = [("product", setting.as_str())];
        let (host, _comps) = with_product("hello-p3.wasm", &edits, &[]).await;
        let host = std::sync::Arc::new(host);
        let requests = (0..8).map(|_| {
            let host = host.clone();
            tokio::spawn(async move { host.send("GET", "product", "/visits?ms=300", None).await })
        });
        let mut seen = Vec::new();
        for r in futures_util::future::join_all(requests).await {
            let r = r.unwrap();
            assert_eq!(r.status, 200, "{:?}", r.json);
            seen.push(r.json["visits"].as_i64().unwrap());
        }
        seen.sort();
        assert_eq!(
            seen,
            (1..=8).collect::<Vec<_>>(),
            "concurrent = {concurrent}"
        );
        let r = host.send("GET", "product", "/visits", None).await;
        assert_eq!(r.json["visits"], 9);
        // Shared: one instance; one at a time: one per request that overlapped.
        assert_eq!(
            product_instances(&host).await,
            instances,
            "concurrent = {concurrent}: {}",
            host.log_tail(30)
        );
    }
}

/// `instances = { reuse, concurrent, idle }` in the manifest: how many requests an instance
/// serves in all, at once, and how long it waits for one.
#[tokio::test(flavor = "multi_thread")]
async fn its_instances_follow_the_manifest_settings() {
    let edits = [(
        "product",
        "instances = { reuse = 3, concurrent = 2, idle = \"1h\" }",
    )];
    let (host, _comps) = with_product("hello-p3.wasm", &edits, &[]).await;
    for _ in 0..6 {
        assert_eq!(product_body(&host, "/").await, b"hello p3".as_slice());
    }
    assert_eq!(product_instances(&host).await, 2.0, "three requests each");
    let host = std::sync::Arc::new(host);
    let sleepers = (0..4).map(|_| {
        let host = host.clone();
        tokio::spawn(async move { host.send("GET", "product", "/sleep?ms=500", None).await })
    });
    for r in futures_util::future::join_all(sleepers).await {
        assert_eq!(r.unwrap().status, 200);
    }
    assert_eq!(product_instances(&host).await, 4.0, "two at once each");
    // Each of those has room for one more request.
    product_body(&host, "/").await;
    product_body(&host, "/").await;
    assert_eq!(product_instances(&host).await, 4.0, "three requests each");

    let edits = [("product", "instances = { idle = \"100ms\" }")];
    let (host, _comps) = with_product("hello-p3.wasm", &edits, &[]).await;
    product_body(&host, "/").await;
    // Far past the idle timeout: the next request needs a new instance.
    tokio::time::sleep(Duration::from_millis(800)).await;
    product_body(&host, "/").await;
    assert_eq!(product_instances(&host).await, 2.0, "ended when idle");
}

/// Swapping a WASI 0.3 component for another (hello-p3 and the spin-sdk one) while clients
/// keep its instances busy fails no request.
#[tokio::test(flavor = "multi_thread")]
async fn swapped_under_load_it_fails_no_request() {
    let (host, comps) = with_product("hello-p3.wasm", &[], &[]).await;
    let host = std::sync::Arc::new(host);
    let file = comps.path().join("product.wasm");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..6)
        .map(|n| {
            let (host, stop) = (host.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut failures, mut sent) = (Vec::new(), 0u32);
                let path = if n % 2 == 0 { "/" } else { "/sleep?ms=20" };
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    sent += 1;
                    match host.http.get(host.url("product", path)).send().await {
                        Ok(r) if r.status() == 200 => drop(r.bytes().await),
                        Ok(r) => failures.push(format!("{path}: {}", r.status())),
                        Err(e) => failures.push(format!("{path}: {e}")),
                    }
                }
                (sent, failures)
            })
        })
        .collect();
    let bodies = [
        ("spin-hello.wasm", b"hello from spin".as_slice()),
        ("hello-p3.wasm", b"hello p3".as_slice()),
    ];
    for round in 0..10 {
        let (fixture_file, body) = bodies[round % 2];
        std::fs::copy(fixture(fixture_file), &file).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while product_body(&host, "/").await != body {
            assert!(Instant::now() < deadline, "{fixture_file} never served");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut sent, mut failures) = (0, Vec::new());
    for c in clients {
        let (n, f) = c.await.unwrap();
        sent += n;
        failures.extend(f);
    }
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {failures:?}",
        failures.len()
    );
    assert!(sent > 100, "load too light to mean anything: {sent}");
}

/// A middleware (the `auth-p3` fixture imports and exports `wasi:http/handler@0.3.0`) in front
/// of product-service: the manifest's `next` links its import to product-service, in process.
#[tokio::test(flavor = "multi_thread")]
async fn a_middleware_hands_requests_to_the_next_hop_the_manifest_names() {
    let comps = components_copy();
    std::fs::copy(fixture("auth-p3.wasm"), comps.path().join("auth.wasm")).unwrap();
    let auth = [("auth", "component = \"auth.wasm\""), ("auth", "port = 0")];
    let edits = [auth[0], auth[1], ("auth", "next = \"product\"")];
    let host = Host::start_edited(comps.path(), None, &edits, &[]).await;
    assert_error(&host.send("GET", "auth", "/products", None).await, 401);
    let through = with_token(&host, "/products").await;
    assert_eq!(through.status(), 200);
    assert_eq!(through.headers()["x-checked-by"], "auth");
    let through: serde_json::Value = through.json().await.unwrap();
    let direct = host.send("GET", "product", "/products", None).await;
    assert_eq!(through, direct.json);
    assert!(direct.json.as_array().is_some_and(|a| !a.is_empty()));

    // With no `next`, a request goes where its authority says: this one names the
    // middleware's own address, which is no service it may call.
    let host = Host::start_edited(comps.path(), None, &auth, &[]).await;
    assert_eq!(with_token(&host, "/products").await.status(), 500);
}

/// A streamed body passes through a middleware and the in-process call behind it.
#[tokio::test(flavor = "multi_thread")]
async fn a_middleware_passes_a_streamed_body_on() {
    let comps = components_copy();
    std::fs::copy(fixture("auth-p3.wasm"), comps.path().join("auth.wasm")).unwrap();
    std::fs::copy(fixture("hello-p3.wasm"), comps.path().join("product.wasm")).unwrap();
    let edits = [
        ("auth", "component = \"auth.wasm\""),
        ("auth", "port = 0"),
        ("auth", "next = \"product\""),
    ];
    let bounded = ["--invocation-host-bytes", "1MiB"];
    let host = Host::start_edited(comps.path(), None, &edits, &bounded).await;
    let through = with_token(&host, "/big?mb=4").await;
    assert_eq!(through.status(), 200);
    assert_eq!(through.headers()["x-checked-by"], "auth");
    assert_eq!(through.bytes().await.unwrap().len(), 4 << 20);
}

/// `GET path` on the auth middleware with the token it lets through.
async fn with_token(host: &Host, path: &str) -> reqwest::Response {
    let req = host.http.get(host.url("auth", path));
    let req = req.header("authorization", "Bearer letmein");
    req.send().await.unwrap()
}

/// A WASI 0.3 component handles messages through `microsvc:platform/handler`: each delivery's
/// writes commit with it.
#[tokio::test(flavor = "multi_thread")]
async fn it_handles_messages_through_the_platform_handler() {
    let edits = [(
        "product",
        "subscribe = [{ topic = \"user-created\", group = \"p3\" }]",
    )];
    let (host, _comps) = with_product("hello-p3.wasm", &edits, &[]).await;
    for n in 0..3 {
        let user = json!({"name": format!("P{n}"), "email": format!("p{n}@p3.io")});
        assert_eq!(host.post("/api/users", &user).await.status, 201);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = host.send("GET", "product", "/events", None).await;
        if r.json["events"] == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "{:?}", r.json);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A manifest change of `instances` applies to the next requests, without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_change_of_its_instances_applies_to_new_requests() {
    let shared = [("product", "instances = { idle = \"1h\" }")];
    let (host, _comps) = with_product("hello-p3.wasm", &shared, &[]).await;
    for _ in 0..3 {
        product_body(&host, "/").await;
    }
    assert_eq!(product_instances(&host).await, 1.0);
    write_manifest(
        &host,
        &manifest(&[("product", "instances = { reuse = 1 }")]),
    );
    manifest_when(&host, |m| m["generation"] == 2).await;
    for _ in 0..3 {
        product_body(&host, "/").await;
    }
    assert_eq!(product_instances(&host).await, 4.0, "a fresh instance each");
}
