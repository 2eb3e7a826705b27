//! Live manifest changes: services added, changed and removed while clients load the others,
//! and a bad manifest refused while everything keeps serving.

use crate::harness::{manifest, with_fixture_as, Host};
use serde_json::Value;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The seed manifest (ports 0) with notification-service added, subscribing from `start`.
fn with_notification(start: &str) -> String {
    manifest(&[])
        + &format!(
            "\n\n[service.notification]\ncomponent = \"notification.wasm\"\nport = 0\n\
             subscribe = [{{ topic = \"user-created\", group = \"notification-service\", start = \"{start}\" }}]\n"
        )
}

/// Replaces the manifest as editors do: a new file renamed over the old one.
pub(crate) fn write_manifest(host: &Host, text: &str) {
    let file = host.data.join("services.toml");
    let tmp = host.data.join(".services.toml.new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, file).unwrap();
}

/// `GET /components`'s `manifest` once `done` holds; panics after 20 s.
pub(crate) async fn manifest_when(host: &Host, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = host.admin_get("/components").await.json["manifest"].clone();
        if done(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "manifest never got there: {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Clients that each GET one service's port in a loop until stopped, counting answers and
/// keeping every failure.
struct Load {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(host: &Host, targets: &[(&str, &str)]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let clients = targets
            .iter()
            .map(|(service, path)| {
                let url = host.url(service, path);
                let (stop, served, failures) = (stop.clone(), served.clone(), failures.clone());
                let http = host.http.clone();
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match http.get(&url).send().await {
                            Ok(r) if r.status() == 200 => {
                                let _ = r.bytes().await;
                                served.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(r) => failures
                                .lock()
                                .unwrap()
                                .push(format!("{url}: {}", r.status())),
                            Err(e) => failures.lock().unwrap().push(format!("{url}: {e}")),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            served,
            failures,
            clients,
        }
    }

    /// Stops the clients; every request they sent and its count.
    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients {
            client.await.unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.served.load(Ordering::Relaxed), failures)
    }
}

async fn create(host: &Host, i: u32) {
    let body = serde_json::json!({"name": format!("L{i}"), "email": format!("l{i}@ex.com")});
    assert_eq!(host.post("/api/users", &body).await.status, 201);
}

/// The user ids notification-service has welcomed once it has `n`; panics after 20 s.
async fn welcomed(host: &Host, n: usize) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = host
            .send("GET", "notification", "/notifications", None)
            .await;
        let ids: Vec<u64> = r.json.as_array().map_or(vec![], |a| {
            a.iter().filter_map(|n| n["userId"].as_u64()).collect()
        });
        if ids.len() >= n || Instant::now() > deadline {
            return ids;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn refused(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port))
        .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
}

#[tokio::test(flavor = "multi_thread")]
async fn services_come_and_go_with_the_manifest_while_the_others_serve_without_a_failure() {
    let mut host = Host::start().await;
    create(&host, 1).await;
    let load = Load::start(
        &host,
        &[
            ("gateway", "/api/products"),
            ("user", "/users/1"),
            ("product", "/products"),
            ("order", "/orders/101"),
        ],
    );

    // Added: its port answers, and its own consumer group starts at the oldest record.
    write_manifest(&host, &with_notification("earliest"));
    let written = Instant::now();
    manifest_when(&host, |m| m["generation"] == 2).await;
    host.refresh_ports().await;
    let port = host.ports["notification"];
    let first = host
        .send("GET", "notification", "/notifications", None)
        .await;
    let answered = written.elapsed();
    assert_eq!(first.status, 200, "{:?}", first.json);
    eprintln!("notification answered {answered:?} after the manifest was written");
    assert!(answered < Duration::from_secs(10), "{answered:?}");
    create(&host, 2).await;
    assert_eq!(welcomed(&host, 2).await, [1, 2]);

    // A changed setting applies to the next request: the gateway may no longer call order.
    write_manifest(
        &host,
        &with_notification("earliest").replace(
            r#"calls = ["user", "product", "order", "reviews", "ratings"]"#,
            r#"calls = ["user", "product", "reviews", "ratings"]"#,
        ),
    );
    manifest_when(&host, |m| m["generation"] == 3).await;
    let denied = host.get("/api/orders").await;
    assert!(denied.status >= 500, "{:?}", denied.json);
    assert!(host.log().contains("not in the caller's allowlist refused"));
    assert_eq!(host.get("/api/products").await.status, 200);

    // Removed: a request already under way finishes, then the port refuses connections.
    let mut slow = crate::harness::stalled(
        port,
        b"GET /notifications HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    write_manifest(&host, &manifest(&[]));
    manifest_when(&host, |m| m["generation"] == 4).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !refused(port) {
        assert!(Instant::now() < deadline, "port {port} still accepts");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        slow.write_all(b"}").await.unwrap();
        let mut answer = String::new();
        let read = tokio::time::timeout(Duration::from_secs(10), slow.read_to_string(&mut answer));
        read.await
            .expect("the in-flight request is answered")
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("\"userId\":2"), "{answer}");
    }
    assert!(!host
        .services()
        .await
        .iter()
        .any(|s| s["name"] == "notification"));
    assert_eq!(
        host.get("/api/orders").await.status,
        200,
        "calls back to the seed's"
    );

    // Refused: the running services keep serving, and the admin API says why.
    let bad = manifest(&[]) + "\n\n[service.mail]\ncomponent = \"mail.wasm\"\nport = 0\n";
    write_manifest(&host, &bad);
    let status = manifest_when(&host, |m| !m["last_rejected"].is_null()).await;
    let error = status["last_rejected"]["error"].as_str().unwrap();
    assert!(
        error.contains("service.mail.component") && error.contains("mail.wasm"),
        "{error}"
    );
    assert_eq!(status["generation"], 4);
    assert_eq!(host.services().await.len(), 6);
    assert!(host.log().contains("manifest change refused"));

    let (served, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        served > 100,
        "the clients were loading the host ({served} answers)"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_added_from_the_latest_record_sees_only_later_events() {
    let mut host = Host::start().await;
    create(&host, 1).await;
    write_manifest(&host, &with_notification("latest"));
    manifest_when(&host, |m| m["generation"] == 2).await;
    host.refresh_ports().await;
    // "latest" is where the group first subscribed: wait for that before user 2.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !host
        .log()
        .lines()
        .any(|l| l.contains("consuming") && l.contains("notification-service"))
    {
        assert!(
            Instant::now() < deadline,
            "notification-service never subscribed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    create(&host, 2).await;
    assert_eq!(welcomed(&host, 1).await, [2]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_port_change_binds_the_new_port_before_the_old_one_closes() {
    let mut host = Host::start().await;
    let old = host.ports["product"];
    let new = crate::broker::free_port();
    let text = manifest(&[]).replacen(
        "port = 0\n\n[service.order]",
        &format!("port = {new}\n\n[service.order]"),
        1,
    );
    assert!(text.contains(&format!("port = {new}")), "{text}");
    let load = Load::start(&host, &[("gateway", "/api/products"), ("user", "/users")]);
    // A client of the moving service itself, a new connection per request: the old port, or
    // the new one when the old refuses. Both refusing at once would be a gap.
    let stop = Arc::new(AtomicBool::new(false));
    let on_new = Arc::new(AtomicU64::new(0));
    let mover = {
        let (stop, on_new) = (stop.clone(), on_new.clone());
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        tokio::spawn(async move {
            let (mut on_old, mut gaps) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let get = |port: u16| http.get(format!("http://127.0.0.1:{port}/products")).send();
                match get(old).await {
                    Ok(r) if r.status() == 200 => on_old += 1,
                    Ok(r) => gaps.push(format!("old port: {}", r.status())),
                    Err(_) => match get(new).await {
                        Ok(r) if r.status() == 200 => {
                            on_new.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => gaps.push(format!("new port: {}", r.status())),
                        Err(e) => gaps.push(format!("both ports refused: {e}")),
                    },
                }
            }
            (on_old, gaps)
        })
    };
    // It is served on the old port before the change.
    let deadline = Instant::now() + Duration::from_secs(10);
    while host
        .metric(r#"host_http_requests_total{service="product""#)
        .await
        < 5.0
    {
        assert!(Instant::now() < deadline, "no request reached the old port");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    write_manifest(&host, &text);
    manifest_when(&host, |m| m["generation"] == 2).await;
    host.refresh_ports().await;
    assert_eq!(host.ports["product"], new);
    assert_eq!(
        host.send("GET", "product", "/products", None).await.status,
        200
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !refused(old) {
        assert!(Instant::now() < deadline, "old port {old} still accepts");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And on the new one after it; never on neither.
    while on_new.load(Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "the client never reached the new port"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (on_old, gaps) = mover.await.unwrap();
    let first: Vec<_> = gaps.iter().take(3).collect();
    assert!(gaps.is_empty(), "{} gaps, the first: {first:?}", gaps.len());
    assert!(on_old > 0, "the client never reached the old port");
    // A port another process holds: refused, the service stays where it is.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().port();
    write_manifest(
        &host,
        &text.replace(&format!("port = {new}"), &format!("port = {busy}")),
    );
    let status = manifest_when(&host, |m| !m["last_rejected"].is_null()).await;
    let error = status["last_rejected"]["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("binding product port {busy}")),
        "{error}"
    );
    assert_eq!(
        host.send("GET", "product", "/products", None).await.status,
        200
    );
    let (served, failures) = load.finish().await;
    assert!(failures.is_empty(), "{failures:?}");
    assert!(served > 0);
}

/// Every instance slot is held by requests that sleep (the `misbehave` fixture as
/// product-service) when notification-service joins: its handler cannot get an instance for
/// seconds, which is the host's shortage, not the handler's failure. The record waits and is
/// handled once a slot frees; it spends no attempt and never reaches the dead-letter topic.
#[tokio::test(flavor = "multi_thread")]
async fn a_handler_waiting_for_an_instance_slot_is_not_dead_lettered() {
    let flags = ["--max-instances", "4", "--retry-max-attempts", "2"];
    let (mut host, comps) = with_fixture_as("product", "misbehave.wasm", &[], &flags).await;
    let notification = crate::harness::components_dir().join("notification.wasm");
    std::fs::copy(notification, comps.path().join("notification.wasm")).unwrap();
    create(&host, 1).await;
    // order-service's handler is done with user 1: it holds no slot when the sleepers come.
    let cached = host.order_when_cached(1, 1, Duration::from_secs(20)).await;
    assert_eq!(cached.status, 201, "{:?}", cached.json);
    let url = host.url("product", "/sleep?ms=6000");
    let sleepers: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { reqwest::get(url).await.map(|r| r.status().as_u16()) })
        })
        .collect();
    // Four sleep, four are refused: every slot is taken.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sleepers.iter().filter(|s| s.is_finished()).count() < 4 {
        assert!(
            Instant::now() < deadline,
            "the sleepers never filled the slots"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    write_manifest(&host, &with_notification("earliest"));
    manifest_when(&host, |m| m["generation"] == 2).await;
    host.refresh_ports().await;
    let mut statuses = Vec::new();
    for s in sleepers {
        statuses.push(s.await.unwrap().unwrap());
    }
    // Those that got a slot slept; the others were refused: the slots were full.
    let slept = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 503).count();
    assert!(
        slept >= 1 && refused >= 4 && slept + refused == 8,
        "{statuses:?}"
    );
    assert_eq!(welcomed(&host, 1).await, [1]);
    let deferred = host
        .metric("host_messages_deferred_total{service=\"notification\"")
        .await;
    assert!(deferred >= 1.0, "the handler never waited for a slot");
    assert_eq!(
        host.metric("host_messages_dead_lettered_total").await,
        0.0,
        "{}",
        host.log()
    );
}

/// Kubernetes updates a mounted ConfigMap by swapping a symlink: `services.toml` ->
/// `..data/services.toml`, and `..data` renamed over to point at a new directory. The file the
/// host was given never changes itself.
#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_updated_by_a_symlink_swap_is_applied() {
    use std::os::unix::fs::symlink;
    let config = tempfile::tempdir().unwrap();
    let version = |name: &str, text: &str| {
        let dir = config.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("services.toml"), text).unwrap();
    };
    version("..2026_12_01_1", &manifest(&[]));
    symlink("..2026_12_01_1", config.path().join("..data")).unwrap();
    let file = config.path().join("services.toml");
    symlink("..data/services.toml", &file).unwrap();
    let components = crate::harness::components_dir();
    let host = Host::start_edited(
        &components,
        None,
        &[],
        &["--manifest", file.to_str().unwrap()],
    )
    .await;
    version("..2026_12_01_2", &with_notification("earliest"));
    symlink("..2026_12_01_2", config.path().join("..data_tmp")).unwrap();
    std::fs::rename(
        config.path().join("..data_tmp"),
        config.path().join("..data"),
    )
    .unwrap();
    std::fs::remove_dir_all(config.path().join("..2026_12_01_1")).unwrap();
    manifest_when(&host, |m| m["generation"] == 2).await;
    assert!(host
        .services()
        .await
        .iter()
        .any(|s| s["name"] == "notification"));
}

/// A manifest written in place in two steps, half a second apart: its first half alone is a
/// valid manifest without order-service, which must never be applied.
#[tokio::test(flavor = "multi_thread")]
async fn a_manifest_written_in_two_steps_is_applied_whole() {
    use std::io::Write;
    let host = Host::start().await;
    let whole = with_notification("earliest");
    let cut = whole.find("[service.order]").unwrap();
    let file = host.data.join("services.toml");
    let mut out = std::fs::File::create(&file).unwrap();
    out.write_all(&whole.as_bytes()[..cut]).unwrap();
    out.sync_all().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    out.write_all(&whole.as_bytes()[cut..]).unwrap();
    drop(out);
    manifest_when(&host, |m| m["generation"] == 2).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = host.admin_get("/components").await.json["manifest"].clone();
    assert_eq!(status["generation"], 2, "{status}");
    let names: Vec<String> = host
        .services()
        .await
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert!(names.contains(&"order".to_string()) && names.contains(&"notification".to_string()));
    assert!(
        !host.log().contains("stopping consumer"),
        "order-service was removed for a while"
    );
}

/// Ports move between services: two services swap theirs, and a renamed service keeps its
/// name's port (a new service, with no state).
#[tokio::test(flavor = "multi_thread")]
async fn services_swap_ports_and_a_renamed_service_keeps_the_port() {
    let mut host = Host::start().await;
    let (user, product) = (host.ports["user"], host.ports["product"]);
    let swapped = manifest(&[
        ("user", &format!("port = {product}")),
        ("product", &format!("port = {user}")),
    ]);
    write_manifest(&host, &swapped);
    manifest_when(&host, |m| m["generation"] == 2).await;
    host.refresh_ports().await;
    assert_eq!((host.ports["user"], host.ports["product"]), (product, user));
    let users = host.send("GET", "user", "/users", None).await;
    assert_eq!(users.status, 200);
    assert!(users.json.is_array());
    let products = host.send("GET", "product", "/products", None).await;
    assert_eq!(products.status, 200);
    assert!(products.json[0]["price"].is_number(), "{:?}", products.json);
    // product-service renamed catalog, keeping its port.
    let renamed = swapped
        .replace("[service.product]", "[service.catalog]")
        .replace("\"product\"", "\"catalog\"");
    write_manifest(&host, &renamed);
    manifest_when(&host, |m| m["generation"] == 3).await;
    host.refresh_ports().await;
    assert_eq!(host.ports["catalog"], user);
    assert_eq!(
        host.send("GET", "catalog", "/products", None).await.status,
        200
    );
    assert!(host.log().contains("renamed service starts with none"));
}
