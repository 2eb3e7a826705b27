//! What spin-sdk 7 components import beside WASI (`spin:key-value@3.0.0`,
//! `spin:variables@3.0.0`): the `spin-kv` fixture, a visit counter written the way a Spin 4 user
//! writes one, stands in for product-service.

use crate::harness::{components_copy, fixture, with_product, Host};
use crate::postgres_server::Postgres;
use futures_util::future::join_all;

const STORES: (&str, &str) = ("product", r#"key_value_stores = ["default"]"#);
const GREETING: (&str, &str) = ("product", r#"config = { greeting = "hej" }"#);

/// Spin's store has no increment: the SDK's counter reads and writes back. On Spin two such
/// requests at once can both read the same count; here the second's commit conflicts and it
/// runs again, so 50 at once count to exactly 50.
#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_read_modify_writes_through_spin_key_value_count_exactly() {
    let (host, _comps) = with_product("spin-kv.wasm", &[STORES, GREETING], &[]).await;
    fifty_count_exactly(&host).await;
}

/// On PostgreSQL a read waits for the server, and the instance's other requests run meanwhile:
/// each read still lands in its own request's transaction.
#[tokio::test(flavor = "multi_thread")]
async fn on_postgresql_reads_that_wait_land_in_their_own_request() {
    let pg = Postgres::start().expect("this test needs PostgreSQL (pg_config on PATH)");
    let url = pg.create_database("spin").unwrap();
    let flags = ["--state-url", url.as_str()];
    let (host, _comps) = with_product("spin-kv.wasm", &[STORES, GREETING], &flags).await;
    fifty_count_exactly(&host).await;
}

/// 50 `/count` at once: each answers a distinct count, 1 to 50, and one key was written.
async fn fifty_count_exactly(host: &Host) {
    let replies = join_all((0..50).map(|_| host.send("GET", "product", "/count", None))).await;
    let mut seen: Vec<i64> = replies
        .iter()
        .map(|r| {
            assert_eq!(r.status, 200, "{:?}", r.json);
            assert_eq!(r.json["greeting"], "hej", "{:?}", r.json);
            r.json["visits"].as_i64().unwrap()
        })
        .collect();
    seen.sort();
    assert_eq!(seen, (1..=50).collect::<Vec<_>>());
    // Its keys, through the SDK's stream: the one it wrote.
    let keys = host.send("GET", "product", "/keys", None).await;
    assert_eq!(keys.json["keys"], 1, "{:?}", keys.json);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_label_the_manifest_does_not_list_is_access_denied_and_a_missing_variable_undefined(
) {
    let (host, _comps) = with_product("spin-kv.wasm", &[STORES], &[]).await;
    let denied = host
        .send("GET", "product", "/open?label=payments", None)
        .await;
    assert_eq!(denied.status, 403);
    assert!(
        denied.json["open"]
            .as_str()
            .unwrap()
            .contains("AccessDenied"),
        "{:?}",
        denied.json
    );
    let r = host.send("GET", "product", "/count", None).await;
    assert_eq!(r.status, 500);
    let error = r.json["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{:?}", r.json));
    assert!(error.contains("Undefined"), "{error}");
}

/// A Spin component and a wasmCloud one (`wasi:keyvalue@0.2.0-draft`, `wasi:config@0.2.0-rc.1`)
/// that share nothing else run side by side in one host, each on its own state.
#[tokio::test(flavor = "multi_thread")]
async fn a_spin_and_a_wasmcloud_component_run_side_by_side() {
    let comps = components_copy();
    std::fs::copy(
        fixture("kv-counter-draft.wasm"),
        comps.path().join("product.wasm"),
    )
    .unwrap();
    std::fs::copy(fixture("spin-kv.wasm"), comps.path().join("spinny.wasm")).unwrap();
    let edits = [
        STORES,
        GREETING,
        ("spinny", "component = \"spinny.wasm\""),
        ("spinny", "port = 0"),
        ("spinny", r#"key_value_stores = ["default"]"#),
        ("spinny", r#"config = { greeting = "hallo" }"#),
    ];
    let host = Host::start_edited(comps.path(), None, &edits, &[]).await;
    for n in 1..=3 {
        let wasmcloud = host.send("GET", "product", "/count", None).await;
        assert_eq!(wasmcloud.json["visits"], n, "{:?}", wasmcloud.json);
        assert_eq!(wasmcloud.json["greeting"], "hej");
        let spin = host.send("GET", "spinny", "/count", None).await;
        assert_eq!(spin.json["visits"], n, "{:?}", spin.json);
        assert_eq!(spin.json["greeting"], "hallo");
    }
}
