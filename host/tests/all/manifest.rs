//! The manifest: the services come from `services.toml`, and a bad one stops the start with
//! one message and exit status 2.

use crate::harness::{components_dir, manifest, Host};

/// The host's stderr when started with the manifest `text`, which it must refuse with status 2.
async fn refused_at_start(text: &str) -> (std::path::PathBuf, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("services.toml");
    std::fs::write(&file, text).unwrap();
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(60),
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
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    (file, stderr, dir)
}

#[tokio::test]
async fn a_bad_manifest_stops_the_start_with_one_message_naming_where() {
    let bad = manifest(&[("gateway", r#"calls = ["user", "billing"]"#)]);
    let (file, stderr, _dir) = refused_at_start(&bad).await;
    let expected = format!("{}:", file.display());
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(
        stderr.contains("service.gateway.calls") && stderr.contains("billing"),
        "{stderr}"
    );
}

/// A config value taken from an environment variable the host does not have stops the start,
/// naming where; the secret itself never sits in the file.
#[tokio::test]
async fn a_config_value_from_a_missing_environment_variable_is_a_manifest_error() {
    let config = r#"config = { api_key = { env = "MICROSVC_TEST_UNSET_KEY" } }"#;
    let (file, stderr, _dir) = refused_at_start(&manifest(&[("product", config)])).await;
    assert!(stderr.contains(&format!("{}:", file.display())), "{stderr}");
    assert!(
        stderr.contains("service.product.config.api_key")
            && stderr.contains("MICROSVC_TEST_UNSET_KEY"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_subscriber_whose_component_has_no_handler_is_a_manifest_error() {
    let subscribe = r#"subscribe = [{ topic = "user-created" }]"#;
    let (file, stderr, _dir) = refused_at_start(&manifest(&[("product", subscribe)])).await;
    // Line and column of product's `component`.
    let text = std::fs::read_to_string(&file).unwrap();
    let line = text
        .lines()
        .position(|l| l.starts_with("component = \"product.wasm\""))
        .unwrap();
    let at = format!(
        "{}:{}:13: service.product.component:",
        file.display(),
        line + 1
    );
    assert!(stderr.contains(&at), "{stderr}");
    assert!(
        stderr.contains("exports no message handler: neither microsvc:platform/handler"),
        "{stderr}"
    );
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
    let listed = host.services().await;
    let product = listed.iter().find(|c| c["name"] == "product").unwrap();
    assert!(product["port"].is_null());
}

async fn create(host: &Host, i: u32) {
    let body = serde_json::json!({"name": format!("N{i}"), "email": format!("n{i}@ex.com")});
    assert_eq!(host.post("/api/users", &body).await.status, 201);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fifth_service_joins_by_its_manifest_entry_and_gets_every_event_too() {
    // Its own consumer group starts at the oldest record: every user gets one welcome.
    fifth_service_after_two_users("earliest", &[1, 2, 3]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fifth_service_starting_at_the_latest_record_sees_only_new_users() {
    fifth_service_after_two_users("latest", &[3]).await;
}

/// Two users under the seed manifest; then a restart with notification-service subscribed
/// from `start`, and a third user: `welcomed` are the users it has a notification for.
async fn fifth_service_after_two_users(start: &str, welcomed: &[u64]) {
    let data = tempfile::tempdir().unwrap();
    let host = Host::start_with(Some(data.path()), &[]).await;
    // Two users before notification-service exists.
    create(&host, 1).await;
    create(&host, 2).await;
    let (status, _) = host.terminate();
    assert!(status.success());

    // The same data, and a manifest with a fifth entry: nothing else changes.
    let text = manifest(&[])
        + &format!(
            "\n\n[service.notification]\ncomponent = \"notification.wasm\"\nport = 0\n\
             subscribe = [{{ topic = \"user-created\", group = \"notification-service\", start = \"{start}\" }}]\n"
        );
    let file = data.path().join("five.toml");
    std::fs::write(&file, text).unwrap();
    let host = Host::start_in(
        &components_dir(),
        Some(data.path()),
        &["--manifest", file.to_str().unwrap()],
    )
    .await;
    // "latest" means from when the group first subscribed: wait for that before user 3.
    let subscribed = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !host
        .log()
        .lines()
        .any(|l| l.contains("consuming") && l.contains("notification-service"))
    {
        assert!(
            std::time::Instant::now() < subscribed,
            "notification-service never subscribed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    create(&host, 3).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let listed = loop {
        let r = host
            .send("GET", "notification", "/notifications", None)
            .await;
        let got = r.json.as_array().map_or(0, Vec::len);
        if got >= welcomed.len() || std::time::Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let ids: Vec<u64> = listed
        .json
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["userId"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, welcomed, "{:?}", listed.json);
    let one = host
        .send("GET", "notification", "/notifications/3", None)
        .await;
    assert_eq!(
        (one.json["to"].as_str(), one.json["message"].as_str()),
        (Some("n3@ex.com"), Some("Welcome, N3!"))
    );
    assert_eq!(
        host.send("GET", "notification", "/notifications/9", None)
            .await
            .status,
        404
    );
    // Fan-out: order-service got the same event in its own group.
    let r = host
        .order_when_cached(3, 1, std::time::Duration::from_secs(20))
        .await;
    assert_eq!(r.status, 201, "{:?}", r.json);
}

#[tokio::test(flavor = "multi_thread")]
async fn just_new_then_build_component_brings_a_service_up_in_a_running_host() {
    use std::process::Command;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // A copy of the repository as a user has it: the tracked files and the built components.
    let copy = tempfile::tempdir().unwrap();
    let files = Command::new("git")
        .arg("ls-files")
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(files.status.success());
    for file in String::from_utf8(files.stdout).unwrap().lines() {
        let to = copy.path().join(file);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(root.join(file), to).unwrap();
    }
    let built = copy.path().join("build/components");
    std::fs::create_dir_all(&built).unwrap();
    for entry in std::fs::read_dir(components_dir()).unwrap() {
        let file = entry.unwrap().path();
        std::fs::copy(&file, built.join(file.file_name().unwrap())).unwrap();
    }
    let just = |args: &[&str]| {
        // Its own target dir, kept between runs: this test's build never waits on the suite's;
        // the toolchains `just build` installed for Python and JavaScript.
        let target = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("scaffold-target");
        let toolchains = root.join("build/toolchains");
        let out = Command::new("just")
            .args(args)
            .current_dir(copy.path())
            .env("CARGO_TARGET_DIR", target)
            .env("PYTHON_TOOLCHAIN", toolchains.join("python"))
            .env("JS_TOOLCHAIN", toolchains.join("js"))
            .output()
            .expect("just is installed (cargo install just --locked)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "just {args:?}: {text}");
        text
    };
    // A running host: the new service joins it with no restart.
    let file = copy.path().join("services.toml");
    let mut host = Host::start_in(
        &built,
        None,
        &[
            "--manifest",
            file.to_str().unwrap(),
            "--port",
            "gateway=0,user=0,product=0,order=0,reviews=0,ratings=0",
        ],
    )
    .await;
    // One service per language, each on the next free port after the manifest's six.
    let services = [
        ("hello2", "rust", 3006),
        ("hello-py", "python", 3007),
        ("hello-js", "js", 3008),
    ];
    for (name, lang, port) in services {
        let said = just(&["new", name, "--lang", lang]);
        assert!(said.contains(&format!("port {port}")), "{said}");
        let manifest = std::fs::read_to_string(&file).unwrap();
        let entry = format!("[service.{name}]\ncomponent = \"{name}.wasm\"\nport = {port}");
        assert!(manifest.contains(&entry), "{manifest}");
    }
    // This test's own free ports instead, which no other program holds.
    let mut manifest = std::fs::read_to_string(&file).unwrap();
    let free: Vec<u16> = services
        .iter()
        .map(|_| crate::broker::free_port())
        .collect();
    for ((_, _, port), free) in services.iter().zip(&free) {
        manifest = manifest.replace(&format!("port = {port}"), &format!("port = {free}"));
    }
    std::fs::write(&file, manifest).unwrap();
    // The manifest applies once every component it names exists.
    for (name, _, _) in services {
        just(&["build-component", name]);
        assert!(built.join(format!("{name}.wasm")).is_file());
    }
    for ((name, _, _), free) in services.iter().zip(free) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !host.services().await.iter().any(|s| s["name"] == *name) {
            assert!(
                std::time::Instant::now() < deadline,
                "{name} never started; log:\n{}",
                host.log()
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        host.refresh_ports().await;
        assert_eq!(host.ports[*name], free);
        let r = host.send("GET", name, "/", None).await;
        assert_eq!(
            (r.status, r.json["service"].as_str()),
            (200, Some(*name)),
            "{:?}",
            r.json
        );
    }
    // Refused a second time: the scaffold never overwrites.
    let again = Command::new("just")
        .args(["new", "hello2"])
        .current_dir(copy.path())
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2));
}
