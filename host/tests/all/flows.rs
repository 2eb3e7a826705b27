//! The seed's flows end to end: gateway -> services, user-created -> order cache, restarts.

use crate::harness::Host;
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn seed_readme_flow() {
    let host = Host::start().await;
    let r = host
        .post(
            "/api/users",
            &json!({"name": "Alice", "email": "alice@mail.com"}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.json);
    assert_eq!(
        r.json,
        json!({"id": 1, "name": "Alice", "email": "alice@mail.com"})
    );
    assert_eq!(r.headers["content-type"], "application/json");

    // The order's user comes from order-service's cache, filled by the user-created event.
    let order = host
        .eventually("/api/v1/orders/101", Duration::from_secs(10), |r| {
            !r.json["user"].is_null()
        })
        .await;
    assert!(
        !order.json["user"].is_null(),
        "cache never filled: {:?}",
        order.json
    );
    assert_eq!(
        order.json,
        json!({"id": 101, "userId": 1, "productId": 1, "quantity": 1,
               "user": {"id": 1, "name": "Alice", "email": "alice@mail.com"}})
    );

    let dash = host.get("/api/v1/dashboard").await;
    assert_eq!(dash.status, 200);
    assert_eq!(
        dash.json["users"],
        json!([{"id": 1, "name": "Alice", "email": "alice@mail.com"}])
    );
    let products = dash.json["products"].as_array().unwrap();
    assert!(products.iter().any(|p| p["id"] == 1) && products.iter().any(|p| p["id"] == 2));
    assert_eq!(host.get("/api/dashboard").await.json, dash.json);
}

#[tokio::test]
async fn order_before_the_event_shows_null_user_then_orders_flow() {
    let host = Host::start().await;
    let r = host.get("/api/orders/101").await;
    assert_eq!(r.status, 200);
    assert!(r.json["user"].is_null());

    let u = host
        .post(
            "/api/v1/users",
            &json!({"name": "Bob", "email": "bob@x.io"}),
        )
        .await;
    assert_eq!(u.status, 201);
    host.eventually("/api/orders/101", Duration::from_secs(5), |r| {
        !r.json["user"].is_null()
    })
    .await;
    let o = host
        .post(
            "/api/orders",
            &json!({"userId": 1, "productId": 2, "quantity": 3}),
        )
        .await;
    assert_eq!(o.status, 201, "{:?}", o.json);
    assert_eq!(
        o.json,
        json!({"id": 102, "userId": 1, "productId": 2, "quantity": 3})
    );
    let all = host.get("/api/orders").await;
    let ids: Vec<_> = all
        .json
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].clone())
        .collect();
    assert_eq!(ids, [json!(101), json!(102)]);
    assert_eq!(all.json[1]["user"]["name"], "Bob");
}

#[tokio::test]
async fn services_answer_on_their_own_ports() {
    let host = Host::start().await;
    let r = host.send("GET", "user", "/users", None).await;
    assert_eq!((r.status, r.json.clone()), (200, json!([])));
    let p = host
        .send(
            "POST",
            "product",
            "/products",
            Some(r#"{"name":"Desk","price":99.5}"#),
        )
        .await;
    assert_eq!(p.status, 201, "{:?}", p.json);
    assert_eq!(p.json, json!({"id": 3, "name": "Desk", "price": 99.5}));
    let via_gateway = host.get("/api/products/3").await;
    assert_eq!(via_gateway.json, p.json);
    let order = host.send("GET", "order", "/orders/101", None).await;
    assert_eq!(order.json["id"], 101);
}

#[tokio::test]
async fn everything_survives_a_crash_and_restart() {
    let host = Host::start().await;
    for i in 0..5 {
        let r = host
            .post(
                "/api/users",
                &json!({"name": format!("U{i}"), "email": format!("u{i}@ex.com")}),
            )
            .await;
        assert_eq!(r.status, 201);
    }
    let p = host
        .post("/api/products", &json!({"name": "Mug", "price": 7}))
        .await;
    assert_eq!(p.status, 201);
    host.eventually("/api/orders/101", Duration::from_secs(5), |r| {
        !r.json["user"].is_null()
    })
    .await;
    // User 5's event may still be in flight: the order service answers 422 until it arrives.
    let o = host.order_when_cached(5, 3, Duration::from_secs(10)).await;
    assert_eq!(o.status, 201, "{:?}", o.json);
    let users_before = host.get("/api/users").await.json;
    let data = host.data.clone();
    let keep = host.kill();

    let host = Host::start_with(Some(&data), &[]).await;
    assert_eq!(host.get("/api/users").await.json, users_before);
    assert_eq!(host.get("/api/products/3").await.json["name"], "Mug");
    assert_eq!(
        host.get("/api/orders/102").await.json["user"]["email"],
        "u4@ex.com"
    );
    // Ids continue after the restart instead of starting over.
    let next = host
        .post("/api/users", &json!({"name": "N", "email": "n@ex.com"}))
        .await;
    assert_eq!(next.json["id"], 6);
    drop(keep);
}

#[tokio::test]
async fn users_created_right_before_a_crash_still_reach_the_order_cache() {
    // order-service does not consume yet: every event is still pending for its group when the
    // host is killed, whatever the timing.
    let pending = [("order", "subscribe = []")];
    let host = Host::edited(&pending, &[]).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let r = host
            .post(
                "/api/users",
                &json!({"name": "X", "email": format!("x{i}@ex.com")}),
            )
            .await;
        ids.push(r.json["id"].as_u64().unwrap());
    }
    assert_eq!(ids, (1..=20).collect::<Vec<_>>());
    let unknown = host
        .post(
            "/api/orders",
            &json!({"userId": 20, "productId": 1, "quantity": 1}),
        )
        .await;
    assert_eq!(
        unknown.status, 422,
        "user 20 reached the cache before the kill"
    );
    let data = host.data.clone();
    let keep = host.kill();
    let host = Host::start_with(Some(&data), &[]).await;
    // Every stored user's event is delivered after the restart.
    for id in ids {
        let o = host.order_when_cached(id, 1, Duration::from_secs(20)).await;
        assert_eq!(o.status, 201, "user {id}: {:?}", o.json);
    }
    drop(keep);
}
