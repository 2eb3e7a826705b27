//! WASI 0.3: a component that exports `wasi:http/handler@0.3.0` (the `hello-p3` fixture, built
//! with wit-bindgen alone, standing in for product-service) is served like any other service.

use crate::harness::{assert_error, components_copy, fixture, with_product, Host};
use serde_json::json;

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
