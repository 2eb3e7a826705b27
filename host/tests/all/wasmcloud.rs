//! What wasmCloud 2's WASI 0.3 components import for key-value (`wasmcloud:keyvalue@0.2.0`,
//! async): the `wasmcloud-kv` fixture, bound with wit-bindgen against wasmCloud's published WIT,
//! stands in for product-service.

use crate::harness::with_product;
use futures_util::future::join_all;

const STORES: (&str, &str) = ("product", r#"key_value_stores = ["default"]"#);

#[tokio::test(flavor = "multi_thread")]
async fn increments_and_compare_and_swap_lose_no_update_under_fifty_at_once() {
    let config = ("product", r#"config = { greeting = "moin" }"#);
    let (host, _comps) = with_product("wasmcloud-kv.wasm", &[STORES, config], &[]).await;
    for path in ["/count", "/cas"] {
        let replies = join_all((0..50).map(|_| host.send("GET", "product", path, None))).await;
        let mut seen: Vec<i64> = replies
            .iter()
            .map(|r| {
                assert_eq!(r.status, 200, "{path}: {:?}", r.json);
                r.json["visits"].as_i64().unwrap()
            })
            .collect();
        seen.sort();
        assert_eq!(seen, (1..=50).collect::<Vec<_>>(), "{path}");
    }
    let r = host.send("GET", "product", "/count", None).await;
    assert_eq!(r.json["greeting"], "moin", "{:?}", r.json);
    // A swap that requires a version the key no longer has is stale, with what it holds now.
    let stale = host.send("GET", "product", "/cas-stale", None).await;
    assert_eq!(stale.json["swap"], "stale", "{:?}", stale.json);
    assert_eq!(stale.json["now"], "changed", "{:?}", stale.json);
}

#[tokio::test(flavor = "multi_thread")]
async fn if_not_exists_refuses_a_second_set_and_listings_take_a_prefix() {
    let (host, _comps) = with_product("wasmcloud-kv.wasm", &[STORES], &[]).await;
    let first = host.send("GET", "product", "/once?key=k1", None).await;
    assert_eq!(first.json["set"], "ok", "{:?}", first.json);
    let again = host.send("GET", "product", "/once?key=k1", None).await;
    assert_eq!(again.status, 409);
    assert!(
        again.json["set"]
            .as_str()
            .unwrap()
            .contains("PreconditionFailed"),
        "{:?}",
        again.json
    );
    host.send("GET", "product", "/once?key=k2", None).await;
    host.send("GET", "product", "/count", None).await;
    let listed = host.send("GET", "product", "/keys?prefix=k", None).await;
    assert_eq!(listed.json["listed"], 2, "{:?}", listed.json);
    assert_eq!(listed.json["pages"], 1, "{:?}", listed.json);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bucket_the_manifest_does_not_list_is_access_denied() {
    let (host, _comps) = with_product("wasmcloud-kv.wasm", &[], &[]).await;
    let r = host.send("GET", "product", "/count", None).await;
    assert_eq!(r.status, 500);
    assert!(
        r.json["error"].as_str().unwrap().contains("AccessDenied"),
        "{:?}",
        r.json
    );
}
