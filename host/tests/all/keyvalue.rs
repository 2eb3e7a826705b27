//! `wasi:keyvalue` and `wasi:config`: the `kv-counter` fixture, written against the standard
//! interfaces alone and built on Spin's versions (`kv-counter.wasm`: keyvalue `0.2.0-draft2`,
//! config `0.2.0-draft-2024-09-27`) and on wasmCloud's (`kv-counter-draft.wasm`: `0.2.0-draft`,
//! `0.2.0-rc.1`), stands in for product-service.

use crate::harness::{manifest, with_product, Host};
use crate::live::{manifest_when, write_manifest};
use futures_util::future::join_all;

const BUILDS: [&str; 2] = ["kv-counter.wasm", "kv-counter-draft.wasm"];
const STORES: (&str, &str) = ("product", r#"key_value_stores = ["default"]"#);

/// `n` concurrent `GET path` on product-service: their JSON answers, each a 200.
async fn concurrently(host: &Host, path: &str, n: usize) -> Vec<serde_json::Value> {
    let requests = (0..n).map(|_| host.send("GET", "product", path, None));
    let replies = join_all(requests).await;
    for r in &replies {
        assert_eq!(r.status, 200, "{:?}", r.json);
    }
    replies.into_iter().map(|r| r.json).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_increments_count_exactly_on_both_drafts() {
    for build in BUILDS {
        let config = ("product", r#"config = { greeting = "hej" }"#);
        let (host, _comps) = with_product(build, &[STORES, config], &[]).await;
        let answers = concurrently(&host, "/count", 50).await;
        let mut seen: Vec<i64> = answers
            .iter()
            .map(|a| a["visits"].as_i64().unwrap())
            .collect();
        seen.sort();
        assert_eq!(seen, (1..=50).collect::<Vec<_>>(), "{build}");
        assert!(answers.iter().all(|a| a["greeting"] == "hej"), "{build}");
        let after = host.send("GET", "product", "/count", None).await;
        assert_eq!(after.json["visits"], 51, "{build}: {:?}", after.json);
    }
}

/// Compare-and-swap (draft2): a swap whose key another request changed since the handle was
/// made is `cas-failed` (the fixture then tries again), one that changed it later makes the
/// commit conflict and the invocation run again; 50 concurrent swaps lose no update. A swap
/// through a handle whose key its own invocation changed is `cas-failed` too.
#[tokio::test(flavor = "multi_thread")]
async fn compare_and_swap_loses_no_update_and_reports_a_changed_key() {
    let (host, _comps) = with_product(BUILDS[0], &[STORES], &[]).await;
    concurrently(&host, "/cas", 50).await;
    let after = host.send("GET", "product", "/cas", None).await;
    assert_eq!(after.json["visits"], 51, "{:?}", after.json);
    let conflict = host.send("GET", "product", "/cas-conflict", None).await;
    assert_eq!(conflict.json["swap"], "cas-failed", "{:?}", conflict.json);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bucket_the_manifest_does_not_list_is_access_denied() {
    for build in BUILDS {
        let (host, _comps) = with_product(build, &[STORES], &[]).await;
        let denied = host
            .send("GET", "product", "/open?name=payments", None)
            .await;
        assert_eq!(denied.status, 403, "{build}");
        let why = denied.json["open"].as_str().unwrap();
        assert!(why.ends_with("AccessDenied"), "{build}: {why}");
        let allowed = host
            .send("GET", "product", "/open?name=default", None)
            .await;
        assert_eq!(allowed.json["open"], "ok", "{build}");
        // Without `key_value_stores`, no bucket opens.
        let (host, _comps) = with_product(build, &[], &[]).await;
        let r = host.send("GET", "product", "/count", None).await;
        assert_eq!(r.status, 500, "{build}");
        assert!(
            r.json["error"].as_str().unwrap().contains("AccessDenied"),
            "{build}"
        );
    }
}

/// 2500 keys written with `set-many` list through the cursor in pages of 1000, whichever shape
/// the cursor has (draft2: the last key; draft: a count).
#[tokio::test(flavor = "multi_thread")]
async fn listings_page_through_the_cursor_on_both_drafts() {
    for build in BUILDS {
        let (host, _comps) = with_product(build, &[STORES], &[]).await;
        let r = host.send("GET", "product", "/keys?n=2500", None).await;
        assert_eq!(r.status, 200, "{build}: {:?}", r.json);
        assert_eq!(r.json["listed"], 2500, "{build}: {:?}", r.json);
        assert_eq!(r.json["pages"], 3, "{build}: {:?}", r.json);
        assert_eq!(r.json["got"], 2, "{build}: {:?}", r.json);
    }
}

/// Values from the manifest and from the host's environment (the harness sets `RUST_LOG`); a
/// changed value is seen by the next request, without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn config_values_come_from_the_manifest_and_the_environment_and_follow_changes() {
    for build in BUILDS {
        let config = (
            "product",
            r#"config = { greeting = "hej", level = { env = "RUST_LOG" } }"#,
        );
        let (host, _comps) = with_product(build, &[STORES, config], &[]).await;
        let r = host.send("GET", "product", "/config", None).await;
        assert_eq!(
            r.json,
            serde_json::json!({"greeting": "hej", "level": "info"}),
            "{build}"
        );
        let changed = ("product", r#"config = { greeting = "hallo" }"#);
        write_manifest(&host, &manifest(&[STORES, changed]));
        manifest_when(&host, |m| m["generation"] == 2).await;
        let r = host.send("GET", "product", "/count", None).await;
        assert_eq!(r.json["greeting"], "hallo", "{build}: {:?}", r.json);
    }
}
