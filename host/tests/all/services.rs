//! Calls between services: the `services` interface and `wasi:http`'s outgoing-handler reach the
//! same in-process services under the same allowlist. The `misbehave` fixture stands in for
//! product-service and relays `GET /users` of the service it is told to call. And the two ways
//! a component answers: `http-handler` (sdk components) or `wasi:http` alone.

use crate::harness::{assert_error, with_product, Host};

/// `(service, calls)`: whom `service` may call, in place of the seed manifest's `calls`.
async fn host_with_relaying_product(allow: (&str, &str)) -> (Host, tempfile::TempDir) {
    let calls = format!("calls = {}", allow.1);
    with_product("misbehave.wasm", &[(allow.0, &calls)], &[]).await
}

#[tokio::test]
async fn both_interfaces_reach_an_allowed_service_and_get_its_answer() {
    let (host, _comps) = host_with_relaying_product(("product", r#"["user"]"#)).await;
    let created = host
        .send(
            "POST",
            "user",
            "/users",
            Some(r#"{"name":"Ada","email":"ada@example.com"}"#),
        )
        .await;
    assert_eq!(created.status, 201, "{:?}", created.json);
    let direct = host.send("GET", "user", "/users", None).await;
    assert_eq!(direct.status, 200);
    assert!(direct.json.as_array().is_some_and(|a| !a.is_empty()));
    for via in ["services", "wasi-http"] {
        let path = format!("/call?to=user-service&via={via}");
        let r = host.send("GET", "product", &path, None).await;
        assert_eq!(r.status, 200, "{path}: {:?}", r.json);
        assert_eq!(r.json, direct.json, "{path}");
    }
}

#[tokio::test]
async fn refused_and_unknown_destinations_are_errors_naming_them() {
    let (host, _comps) = host_with_relaying_product(("gateway", r#"["user"]"#)).await;
    let cases = [
        ("user-service", "user-service: request denied"),
        ("nobody-service", "destination not found"),
    ];
    for via in ["services", "wasi-http"] {
        for (to, expected) in cases {
            let path = format!("/call?to={to}&via={via}");
            let r = host.send("GET", "product", &path, None).await;
            assert_error(&r, 502);
            let error = r.json["error"].as_str().unwrap();
            assert!(error.contains(expected), "{path}: {error}");
        }
    }
    assert!(host.log().contains("allowlist refused"));
    assert!(host.log().contains("unknown destination refused"));
    assert_eq!(host.get("/api/users").await.status, 200);
}

#[tokio::test]
async fn a_component_with_only_wasi_http_is_served_through_it() {
    let (host, _comps) = with_product("hello-wasi.wasm", &[], &[]).await;
    let r = host.send("GET", "product", "/", None).await;
    assert_eq!((r.status, r.json.as_str()), (200, Some("hello")));
    let body = "x".repeat(100_000);
    let r = host.send("POST", "product", "/echo", Some(&body)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json.as_str().map(str::len), Some(body.len()));
    // Called in process by an sdk component (the gateway) through `services`.
    let r = host.get("/api/products").await;
    assert_eq!((r.status, r.json.as_str()), (200, Some("hello")));
}
