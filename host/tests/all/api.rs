//! Bad input gets a clear JSON error and changes nothing; concurrency keeps ids and emails unique.

use crate::harness::{assert_error, Host};
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;

#[tokio::test]
async fn bad_input_gets_the_right_status_and_changes_nothing() {
    let host = Host::start().await;
    let ok = host
        .post(
            "/api/users",
            &json!({"name": "Alice", "email": "alice@mail.com"}),
        )
        .await;
    assert_eq!(ok.status, 201);
    let cached = host
        .eventually("/api/orders/101", Duration::from_secs(10), |r| {
            !r.json["user"].is_null()
        })
        .await;
    assert_eq!(
        cached.json["user"]["id"], 1,
        "user 1 never reached the cache"
    );
    let users_before = host.get("/api/users").await.json;
    let products_before = host.get("/api/products").await.json;
    let orders_before = host.get("/api/orders").await.json;

    let cases: &[(&str, &str, Option<&str>, u16)] = &[
        ("POST", "/api/users", Some("{not json"), 400),
        ("POST", "/api/users", Some("[1,2]"), 400),
        (
            "POST",
            "/api/users",
            Some(r#"{"name": 5, "email": "a@b.co"}"#),
            400,
        ),
        ("POST", "/api/users", Some(r#"{"email": "a@b.co"}"#), 400),
        (
            "POST",
            "/api/users",
            Some(r#"{"name": "", "email": "a@b.co"}"#),
            400,
        ),
        (
            "POST",
            "/api/users",
            Some(r#"{"name": "A", "email": ""}"#),
            400,
        ),
        (
            "POST",
            "/api/users",
            Some(r#"{"name": "A", "email": "not-an-email"}"#),
            400,
        ),
        (
            "POST",
            "/api/users",
            Some(r#"{"name": "A", "email": "a@@b.co"}"#),
            400,
        ),
        (
            "POST",
            "/api/users",
            Some(r#"{"name": "A", "email": "ALICE@mail.com"}"#),
            409,
        ),
        ("POST", "/api/users", None, 400),
        ("GET", "/api/users/-1", None, 400),
        ("GET", "/api/users/abc", None, 400),
        ("GET", "/api/users/0", None, 400),
        ("GET", "/api/users/99999999999999999999999", None, 400),
        ("GET", "/api/users/42", None, 404),
        ("GET", "/api/nothing", None, 404),
        ("GET", "/api/usersX", None, 404),
        ("GET", "/", None, 404),
        ("DELETE", "/api/users", None, 405),
        ("PUT", "/api/users/1", None, 405),
        ("POST", "/api/v1/dashboard", None, 405),
        (
            "POST",
            "/api/products",
            Some(r#"{"name": "X", "price": -1}"#),
            400,
        ),
        (
            "POST",
            "/api/products",
            Some(r#"{"name": "X", "price": "10"}"#),
            400,
        ),
        ("POST", "/api/products", Some(r#"{"price": 10}"#), 400),
        ("GET", "/api/products/77", None, 404),
        ("GET", "/api/orders/5x", None, 400),
        ("GET", "/api/orders/555", None, 404),
        (
            "POST",
            "/api/orders",
            Some(r#"{"userId": "1", "productId": 1, "quantity": 1}"#),
            400,
        ),
        (
            "POST",
            "/api/orders",
            Some(r#"{"userId": 1, "productId": 1, "quantity": 0}"#),
            400,
        ),
        (
            "POST",
            "/api/orders",
            Some(r#"{"userId": 77, "productId": 1, "quantity": 1}"#),
            422,
        ),
    ];
    for &(method, path, body, status) in cases {
        let r = host.send(method, "gateway", path, body).await;
        assert_eq!(r.status, status, "{method} {path} {body:?} -> {:?}", r.json);
        assert_error(&r, status);
    }
    // Unknown product, with a user that is in the cache.
    let r = host
        .post(
            "/api/orders",
            &json!({"userId": 1, "productId": 999, "quantity": 1}),
        )
        .await;
    assert_error(&r, 422);
    let error = r.json["error"].as_str().unwrap();
    assert!(error.contains("product 999"), "{error}");

    // Over 1 MiB: refused before being read, on the gateway and on a service port.
    let big = format!(r#"{{"name":"{}","email":"big@x.io"}}"#, "a".repeat(1 << 20));
    for svc in ["gateway", "user"] {
        let path = if svc == "gateway" {
            "/api/users"
        } else {
            "/users"
        };
        let r = host.send("POST", svc, path, Some(&big)).await;
        assert_error(&r, 413);
    }

    assert_eq!(host.get("/api/users").await.json, users_before);
    assert_eq!(host.get("/api/products").await.json, products_before);
    assert_eq!(host.get("/api/orders").await.json, orders_before);
    // Rejected requests consumed no id.
    let next = host
        .post("/api/users", &json!({"name": "B", "email": "b@mail.com"}))
        .await;
    assert_eq!(next.json["id"], 2);
}

#[tokio::test]
async fn fifty_parallel_creations_get_fifty_distinct_ids() {
    let host = std::sync::Arc::new(Host::start().await);
    let mut tasks = Vec::new();
    for i in 0..50 {
        let host = host.clone();
        tasks.push(tokio::spawn(async move {
            host.post(
                "/api/users",
                &json!({"name": format!("P{i}"), "email": format!("p{i}@ex.com")}),
            )
            .await
        }));
    }
    let mut ids = HashSet::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 201, "{:?}", r.json);
        ids.insert(r.json["id"].as_u64().unwrap());
    }
    assert_eq!(ids, (1..=50).collect::<HashSet<_>>());
    assert_eq!(
        host.get("/api/users").await.json.as_array().unwrap().len(),
        50
    );
}

#[tokio::test]
async fn racing_requests_with_one_email_create_one_user() {
    let host = std::sync::Arc::new(Host::start().await);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let host = host.clone();
        tasks.push(tokio::spawn(async move {
            host.post(
                "/api/users",
                &json!({"name": format!("Twin{i}"), "email": "same@ex.com"}),
            )
            .await
            .status
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|&&s| s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 409).count(),
        19,
        "{statuses:?}"
    );
    assert_eq!(
        host.get("/api/users").await.json.as_array().unwrap().len(),
        1
    );
}

/// Two `/bump?ms=300` at once on `host`'s product-service (the `misbehave` fixture): each reads
/// the counter before the other wrote it, so one commit must be refused, counted, and run
/// again; the counter ends at 2, never 1.
pub(crate) async fn racing_read_modify_writes_conflict_and_run_again(host: &Host) {
    let series = r#"host_commit_conflicts_total{service="product"}"#;
    let before = host.metric(series).await;
    let bump = || host.send("POST", "product", "/bump?ms=300", None);
    let (a, b) = tokio::join!(bump(), bump());
    assert_eq!(
        (a.status, b.status),
        (200, 200),
        "{:?} {:?}",
        a.json,
        b.json
    );
    let mut ns = [a.json["n"].as_u64(), b.json["n"].as_u64()];
    ns.sort();
    assert_eq!(ns, [Some(1), Some(2)], "the second saw the first's write");
    let conflicts = host.metric(series).await - before;
    assert!(conflicts >= 1.0, "conflicts counted: {conflicts}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_modify_write_that_raced_another_is_run_again_and_counted() {
    let (host, _comps) = crate::harness::with_product("misbehave.wasm", &[], &[]).await;
    racing_read_modify_writes_conflict_and_run_again(&host).await;
}

/// The `rel="next"` URL of a `Link` header, if any.
fn next_link(r: &crate::harness::Reply) -> Option<String> {
    let link = r.headers.get("link")?.to_str().unwrap();
    let url = link.strip_prefix('<')?.split_once(">; rel=\"next\"")?.0;
    Some(url.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn lists_come_in_pages_and_walking_the_links_visits_every_record_once() {
    let host = Host::start().await;
    for chunk in 0..21 {
        let creations = (chunk * 50..chunk * 50 + 50).map(|i| {
            let body = json!({"name": format!("P{i}"), "email": format!("p{i}@ex.com")});
            let host = &host;
            async move { host.post("/api/users", &body).await.status }
        });
        for status in futures_util::future::join_all(creations).await {
            assert_eq!(status, 201);
        }
    }

    // The default page: 100 users, the body still a plain array, and a link to the next.
    let first = host.get("/api/users").await;
    assert_eq!(first.json.as_array().unwrap().len(), 100);
    assert!(next_link(&first)
        .unwrap()
        .starts_with("/api/users?limit=100&cursor="));
    let dashboard = host.get("/api/dashboard").await;
    assert_eq!(dashboard.json["users"].as_array().unwrap().len(), 100);

    let mut seen = HashSet::new();
    let mut pages = 0;
    let mut next = Some("/api/v1/users?limit=250".to_string());
    while let Some(path) = next {
        let page = host.get(&path).await;
        assert_eq!(page.status, 200, "{path}: {:?}", page.json);
        for user in page.json.as_array().unwrap() {
            assert!(seen.insert(user["id"].as_u64().unwrap()), "{user} twice");
        }
        pages += 1;
        next = next_link(&page);
        assert!(next
            .as_deref()
            .is_none_or(|n| n.starts_with("/api/v1/users?limit=250&")));
    }
    assert_eq!((seen.len(), pages), (1050, 5));

    // Fixed records (the seed products) come first and count towards the limit too.
    for i in 0..2 {
        let p = json!({"name": format!("Extra{i}"), "price": 1});
        assert_eq!(host.post("/api/products", &p).await.status, 201);
    }
    let all = host.get("/api/products?limit=1000").await;
    let mut walked = Vec::new();
    let mut next = Some("/api/products?limit=2".to_string());
    while let Some(path) = next {
        let page = host.get(&path).await;
        assert!(page.json.as_array().unwrap().len() <= 2);
        walked.extend(page.json.as_array().unwrap().iter().cloned());
        next = next_link(&page);
    }
    assert_eq!(&walked, all.json.as_array().unwrap());

    for bad in [
        "limit=0",
        "limit=1001",
        "limit=ten",
        "cursor=nonsense",
        "cursor=k7",
        "cursor=kff",
    ] {
        let r = host.get(&format!("/api/users?{bad}")).await;
        assert_error(&r, 400);
    }
}
