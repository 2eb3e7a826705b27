//! Flags whose effect only shows from outside: where state lives, where ports bind, what the
//! compile cache saves.

use crate::harness::Host;
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn in_memory_state_is_gone_after_a_restart_and_never_touches_the_data_dir() {
    let host = Host::start_with(None, &["--in-memory"]).await;
    let r = host
        .post("/api/users", &json!({"name": "M", "email": "m@ex.com"}))
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(host.get("/api/users/1").await.status, 200);
    let data = host.data.clone();
    assert!(!data.join("state.redb").exists());
    let keep = host.kill();
    let host = Host::start_with(Some(&data), &["--in-memory"]).await;
    assert_eq!(host.get("/api/users/1").await.status, 404);
    // On disk (the default) the same user survives the same restart.
    let disk = Host::start().await;
    let r = disk
        .post("/api/users", &json!({"name": "D", "email": "d@ex.com"}))
        .await;
    assert_eq!(r.status, 201);
    let data = disk.data.clone();
    let kept = disk.kill();
    let disk = Host::start_with(Some(&data), &[]).await;
    assert_eq!(disk.get("/api/users/1").await.status, 200);
    drop((keep, kept, host));
}

#[tokio::test(flavor = "multi_thread")]
async fn bind_addr_is_where_the_service_ports_listen() {
    let host = Host::start_with(None, &["--bind-addr", "127.0.0.2"]).await;
    let port = host.ports["gateway"];
    let on = |ip: &str| format!("http://{ip}:{port}/api/users");
    let r = host.http.get(on("127.0.0.2")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let elsewhere = host.http.get(on("127.0.0.1")).send().await;
    assert!(
        elsewhere.is_err_and(|e| e.is_connect()),
        "answered on 127.0.0.1"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_loads_compiled_components_from_the_cache_instead_of_compiling() {
    let cache = tempfile::tempdir().unwrap();
    let flags = ["--compile-cache", cache.path().to_str().unwrap()];
    let hits = "host_compile_cache_hits_total";
    let misses = "host_compile_cache_misses_total";
    let first = Host::start_with(None, &flags).await;
    assert_eq!(
        (first.metric(hits).await, first.metric(misses).await),
        (0.0, 6.0)
    );
    let (status, _) = first.terminate();
    assert!(status.success());
    let second = Host::start_with(None, &flags).await;
    assert_eq!(
        (second.metric(hits).await, second.metric(misses).await),
        (6.0, 0.0)
    );
    assert_eq!(second.get("/api/users").await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_watch_false_neither_a_new_component_file_nor_a_new_manifest_is_applied() {
    let comps = crate::harness::components_copy();
    let user_file = comps.path().join("user.wasm");
    std::fs::copy(crate::harness::fixture("user-a.wasm"), &user_file).unwrap();
    let host = Host::start_in(comps.path(), None, &["--watch", "false"]).await;
    let tag = || crate::swap::build_tag(&host, "user", "/users");
    assert_eq!(tag().await.as_deref(), Some("a"));
    std::fs::copy(crate::harness::fixture("user-b.wasm"), &user_file).unwrap();
    let manifest = host.data.join("services.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        text.replace("[service.product]", "[service.catalog]"),
    )
    .unwrap();
    // A watching host swaps within a fraction of this (the swap tests wait for it).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(tag().await.as_deref(), Some("a"), "the file was swapped in");
    let status = host.admin_get("/components").await.json;
    assert_eq!(status["manifest"]["generation"], 1, "{status}");
    assert_eq!(host.get("/api/products").await.status, 200);
}
