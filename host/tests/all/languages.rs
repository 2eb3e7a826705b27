//! Services in other languages, from the repository's manifest: `reviews` (Python,
//! componentize-py) checks products and users in process and publishes `review-created`;
//! `ratings` (JavaScript, componentize-js) consumes it and keeps each product's average; and a
//! Python component that only handles messages.

use crate::harness::{
    assert_error, components_copy, components_with_counter, fixture, manifest, stop_clients, Host,
    COUNTER,
};
use crate::live::{manifest_when, write_manifest};
use crate::swap::{build_tag, wait_for_tag};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(30);

/// A new user and product: their ids.
async fn user_and_product(host: &Host, n: u32) -> (u64, u64) {
    let email = format!("reviewer{n}@ex.com");
    let user = host
        .post("/api/users", &json!({"name": "Reviewer", "email": email}))
        .await;
    assert_eq!(user.status, 201, "{:?}", user.json);
    let product = host
        .post(
            "/api/products",
            &json!({"name": format!("Lamp {n}"), "price": 30}),
        )
        .await;
    assert_eq!(product.status, 201, "{:?}", product.json);
    (
        user.json["id"].as_u64().unwrap(),
        product.json["id"].as_u64().unwrap(),
    )
}

async fn review(host: &Host, product: u64, user: u64, rating: Value) -> crate::harness::Reply {
    let body = json!({"productId": product, "userId": user, "rating": rating, "text": "fine"});
    host.post("/api/reviews", &body).await
}

/// What ratings-service says of `product` once it counted `count` reviews.
async fn rating_when(host: &Host, product: u64, count: u64) -> Value {
    let path = format!("/api/ratings/{product}");
    let r = host
        .eventually(&path, WITHIN, |r| r.json["count"] == count)
        .await;
    assert_eq!(
        r.json["count"],
        count,
        "{:?}\n{}",
        r.json,
        host.log_tail(20)
    );
    r.json
}

#[tokio::test(flavor = "multi_thread")]
async fn reviews_in_python_reach_ratings_in_javascript_through_the_gateway() {
    let host = Host::start().await;
    let (user, product) = user_and_product(&host, 1).await;

    let malformed = host
        .send("POST", "gateway", "/api/reviews", Some("{not json"))
        .await;
    assert_error(&malformed, 400);
    for rating in [json!(0), json!(6), json!("5"), json!(4.5), json!(true)] {
        assert_error(&review(&host, product, user, rating).await, 400);
    }
    let no_text = json!({"productId": product, "userId": user, "rating": 3});
    assert_error(&host.post("/api/reviews", &no_text).await, 400);
    let unknown_product = review(&host, 999_999, user, json!(3)).await;
    assert_error(&unknown_product, 422);
    assert!(unknown_product.json["error"]
        .as_str()
        .unwrap()
        .contains("product 999999"));
    assert_error(&review(&host, product, 999_999, json!(3)).await, 422);
    assert_eq!(
        host.get(&format!("/api/ratings/{product}")).await.json,
        json!({"productId": product, "count": 0, "average": null}),
        "refused reviews are not counted"
    );

    for rating in [5, 4, 2] {
        let r = review(&host, product, user, json!(rating)).await;
        assert_eq!(r.status, 201, "{:?}", r.json);
        assert_eq!(r.json["rating"], rating);
        assert_eq!(r.json["productId"], product);
    }
    let rating = rating_when(&host, product, 3).await;
    assert_eq!(rating["average"], 3.67, "{rating}");
    assert_error(&host.get("/api/ratings/lamp").await, 400);
}

/// A `review-created` record delivered again (same `event-id`, as a redelivery brings it) does
/// not count twice; a new one does.
#[tokio::test(flavor = "multi_thread")]
async fn a_redelivered_review_is_counted_once() {
    let comps = components_copy();
    std::fs::copy(fixture("misbehave.wasm"), comps.path().join("replay.wasm")).unwrap();
    let edits = [
        ("replay", r#"component = "replay.wasm""#),
        ("replay", "port = 0"),
        ("replay", r#"produces = ["review-created"]"#),
    ];
    let host = Host::start_edited(comps.path(), None, &edits, &[]).await;
    let (user, product) = user_and_product(&host, 2).await;
    let first = review(&host, product, user, json!(5)).await;
    assert_eq!(first.status, 201, "{:?}", first.json);
    rating_when(&host, product, 1).await;

    let record = first.json.to_string();
    let send = |event: String| {
        let path = format!("/send?topic=review-created&key={product}&event={event}");
        let (host, record) = (&host, record.clone());
        async move {
            let r = host.send("POST", "replay", &path, Some(&record)).await;
            assert_eq!(r.status, 202, "{:?}", r.json);
        }
    };
    let id = first.json["id"].as_u64().unwrap();
    send(format!("review-created-{id}")).await;
    // Same key, so the same partition: once the next one counts, the repeat was handled.
    send("review-created-replayed".into()).await;
    let rating = rating_when(&host, product, 2).await;
    assert_eq!(rating["average"], 5.0, "{rating}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        host.get(&format!("/api/ratings/{product}")).await.json["count"],
        2
    );
}

/// Pages of a product's reviews, through the gateway's rewritten `Link`, hold every review
/// once, in order; another product's reviews are not among them.
#[tokio::test(flavor = "multi_thread")]
async fn pages_of_reviews_walk_every_review_once() {
    let host = Host::start().await;
    let (user, product) = user_and_product(&host, 3).await;
    let (_, other) = user_and_product(&host, 4).await;
    let mut posted = Vec::new();
    for n in 0..7 {
        let target = if n == 3 { other } else { product };
        let r = review(&host, target, user, json!(1 + n % 5)).await;
        assert_eq!(r.status, 201, "{:?}", r.json);
        if target == product {
            posted.push(r.json["id"].as_u64().unwrap());
        }
    }
    let mut path = format!("/api/reviews?productId={product}&limit=4");
    let (mut seen, mut pages) = (Vec::new(), 0);
    loop {
        let r = host.get(&path).await;
        assert_eq!(r.status, 200, "{:?}", r.json);
        pages += 1;
        for item in r.json.as_array().unwrap() {
            assert_eq!(item["productId"], product);
            seen.push(item["id"].as_u64().unwrap());
        }
        let Some(link) = r.headers.get("link") else {
            break;
        };
        let link = link.to_str().unwrap();
        path = link[1..link.find('>').unwrap()].to_string();
        assert!(path.starts_with("/api/reviews?"), "{link}");
    }
    assert_eq!(seen, posted);
    assert_eq!(pages, 2);
    let all = host.get("/api/reviews?limit=1000").await;
    let ids: Vec<u64> = (all.json.as_array().unwrap().iter())
        .filter(|r| r["userId"] == user)
        .map(|r| r["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids.len(), 7, "{:?}", all.json);
    let bad = host.get("/api/reviews?productId=1&cursor=nope").await;
    assert_error(&bad, 400);
}

/// Swapping the Python component's file back and forth while clients read and write reviews:
/// no request fails, and both builds answer.
#[tokio::test(flavor = "multi_thread")]
async fn the_python_component_swaps_under_load_with_zero_failures() {
    let comps = components_copy();
    let file = comps.path().join("reviews.wasm");
    std::fs::copy(fixture("reviews-a.wasm"), &file).unwrap();
    let host = Arc::new(Host::start_in(comps.path(), None, &[]).await);
    let (user, product) = user_and_product(&host, 5).await;
    assert_eq!(
        build_tag(&host, "reviews", "/reviews").await.as_deref(),
        Some("a")
    );

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut clients = Vec::new();
    for n in 0..4 {
        let (host, stop, failures) = (host.clone(), stop.clone(), failures.clone());
        clients.push(tokio::spawn(async move {
            let mut sent = 0u32;
            while !stop.load(Ordering::Relaxed) {
                sent += 1;
                let r = if (n + sent).is_multiple_of(2) {
                    review(&host, product, user, json!(4)).await
                } else {
                    host.send(
                        "GET",
                        "reviews",
                        &format!("/reviews?productId={product}&limit=5"),
                        None,
                    )
                    .await
                };
                if r.status != 200 && r.status != 201 {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("{}: {:?}", r.status, r.json));
                }
            }
            sent
        }));
    }
    for tag in ["b", "a", "b", "a"] {
        std::fs::copy(fixture(&format!("reviews-{tag}.wasm")), &file).unwrap();
        wait_for_tag(&host, "reviews", "/reviews", tag).await;
    }
    let sent = stop_clients(&stop, clients, &failures).await;
    assert!(sent > 40, "load too light to mean anything: {sent}");
}

/// A Python service without a port that only handles messages (componentize-py's `subscriber`
/// world: no HTTP export) loads and relays what it takes; a call to it is a JSON 404; given a
/// port, it is refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_service_that_only_handles_messages_needs_no_http_export() {
    let comps = components_with_counter();
    std::fs::copy(fixture("misbehave.wasm"), comps.path().join("user.wasm")).unwrap();
    std::fs::copy(fixture("py-consumer.wasm"), comps.path().join("relay.wasm")).unwrap();
    let mut edits = COUNTER[..2].to_vec();
    edits.extend([
        (
            "counter",
            r#"subscribe = [{ topic = "relayed", group = "counter" }]"#,
        ),
        ("user", r#"calls = ["relay"]"#),
        ("relay", r#"component = "relay.wasm""#),
        (
            "relay",
            r#"subscribe = [{ topic = "user-created", group = "relay" }]"#,
        ),
        ("relay", r#"produces = ["relayed"]"#),
    ]);
    let host = Host::start_edited(comps.path(), None, &edits, &[]).await;
    let relay = host.services().await;
    let relay = relay.iter().find(|s| s["name"] == "relay").unwrap();
    assert_eq!(relay["http"], Value::Null, "{relay}");
    assert_eq!(relay["port"], Value::Null, "{relay}");

    let r = host.send("POST", "user", "/publish?id=5", None).await;
    assert_eq!(r.status, 202, "{:?}", r.json);
    assert_eq!(host.counted("relayed-user-created-5", WITHIN).await, 1);
    let called = host
        .send("GET", "user", "/call?to=relay-service", None)
        .await;
    // The fixture relays the status and body (not the headers) of what it got.
    assert_eq!(called.status, 404, "{:?}", called.json);
    assert!(
        called.json["error"]
            .as_str()
            .unwrap()
            .contains("only handles messages"),
        "{:?}",
        called.json
    );

    // With a port it would have to answer HTTP: the manifest is refused, the service kept.
    edits.push(("relay", "port = 0"));
    write_manifest(&host, &manifest(&edits));
    let status = manifest_when(&host, |m| !m["last_rejected"].is_null()).await;
    let error = status["last_rejected"]["error"].as_str().unwrap();
    assert!(error.contains("exports no HTTP handler"), "{error}");
    assert_eq!(host.counted("relayed-user-created-5", WITHIN).await, 1);
}
