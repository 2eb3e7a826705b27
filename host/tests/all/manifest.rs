//! The manifest: the services come from `services.toml`, and a bad one stops the start with
//! one message and exit status 2.

use crate::harness::{components_dir, manifest, Host};

#[tokio::test]
async fn a_bad_manifest_stops_the_start_with_one_message_naming_where() {
    let dir = tempfile::tempdir().unwrap();
    let bad = manifest(&[("gateway", r#"calls = ["user", "billing"]"#)]);
    let file = dir.path().join("services.toml");
    std::fs::write(&file, bad).unwrap();
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_host"))
            .arg("--manifest")
            .arg(&file)
            .arg("--components-dir")
            .arg(components_dir())
            .args(["--in-memory", "--admin-addr", "127.0.0.1:0"])
            .output(),
    )
    .await
    .expect("the host exits instead of starting")
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = format!("{}:", file.display());
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(
        stderr.contains("service.gateway.calls") && stderr.contains("billing"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn a_service_without_a_port_is_reached_only_through_the_services_that_call_it() {
    // product-service keeps serving the gateway and order-service, but has no port of its own.
    let text = manifest(&[]).replace("port = 0\n\n[service.order]", "\n[service.order]");
    let comps = components_dir();
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("custom.toml"), &text).unwrap();
    let file = data.path().join("custom.toml");
    let host = Host::start_in(
        &comps,
        Some(data.path()),
        &["--manifest", file.to_str().unwrap()],
    )
    .await;
    assert!(!host.ports.contains_key("product"), "{:?}", host.ports);
    let products = host.get("/api/products").await;
    assert_eq!(products.status, 200);
    assert!(!products.json.as_array().unwrap().is_empty());
    let listed = host.admin_get("/components").await.json;
    let product = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "product")
        .unwrap();
    assert!(product["port"].is_null());
}
