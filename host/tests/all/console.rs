//! The operator console in a real browser: Debian's Chromium driven by playwright-core
//! (`tests/console/drive.mjs`, installed by `just test`) against a real host, then checked
//! from here through the admin API.

use crate::harness::{components_copy, fixture, Host};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where `just test` installs playwright-core (`_browser`), and Debian's Chromium.
fn browser_toolchain() -> (PathBuf, PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let toolchain = std::env::var_os("BROWSER_TOOLCHAIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("build/toolchains/browser"));
    let playwright = toolchain.join("node_modules/playwright-core");
    assert!(
        playwright.join("index.mjs").exists(),
        "no playwright-core in {}: run `just test` (its _browser recipe installs it)",
        toolchain.display()
    );
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        chromium.exists(),
        "no {}: run `just test` (it installs Debian's chromium)",
        chromium.display()
    );
    (playwright, chromium)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_shows_swaps_rolls_back_and_replays_a_dead_letter() {
    let (playwright, chromium) = browser_toolchain();
    // user-service is the misbehave fixture, which sends any payload to any topic it may.
    let comps = components_copy();
    std::fs::copy(fixture("misbehave.wasm"), comps.path().join("user.wasm")).unwrap();
    let host = Host::start_in(comps.path(), None, &[]).await;
    let shots = tempfile::tempdir().unwrap();
    let screenshot = std::env::var_os("CONSOLE_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| shots.path().join("console.png"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console/drive.mjs");
    let driven = tokio::task::spawn_blocking({
        let (admin, user, order) = (
            host.admin.clone(),
            host.url("user", ""),
            host.url("order", ""),
        );
        let (comps, screenshot) = (comps.path().to_path_buf(), screenshot.clone());
        move || {
            Command::new("node")
                .arg(script)
                .env("PLAYWRIGHT_CORE", playwright)
                .env("CHROMIUM", chromium)
                .env("CONSOLE_URL", format!("http://{admin}/"))
                .env("COMPONENTS", comps)
                .env("SWAP_IN", fixture("hello.wasm"))
                .env("FIXED_HANDLER", fixture("misbehave.wasm"))
                .env("USER_URL", user)
                .env("ORDER_URL", order)
                .env("SCREENSHOT", screenshot)
                .output()
                .expect("node runs")
        }
    })
    .await
    .unwrap();
    assert!(
        driven.status.success(),
        "the browser run failed:\n{}\n{}\nthe host's log ends:\n{}",
        String::from_utf8_lossy(&driven.stdout),
        String::from_utf8_lossy(&driven.stderr),
        host.log_tail(30)
    );
    let png = std::fs::read(&screenshot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");

    // What the page did, as the admin API sees it: product rolled back after one swap (three
    // generations), order-service on the fixed handler, the dead letter handled once.
    let services = host.services().await;
    let generation = |name: &str| {
        let s = services.iter().find(|s| s["name"] == name).unwrap();
        s["generation"].as_u64().unwrap()
    };
    assert_eq!(generation("product"), 3);
    assert_eq!(generation("order"), 2);
    assert_eq!(host.deliveries_at("order", "poison-1").await, 1);
    let dead = host
        .metric(r#"host_messages_dead_lettered_total{service="order",topic="user-created"}"#)
        .await;
    assert_eq!(
        dead, 1.0,
        "dead-lettered once, replayed, not dead-lettered again"
    );
}
