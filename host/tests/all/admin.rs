//! The admin listener: health, readiness and what is loaded.

use crate::harness::{components_dir, Host};
use sha2::{Digest, Sha256};

#[tokio::test]
async fn admin_reports_health_readiness_and_components() {
    let host = Host::start().await;
    let h = host.admin_get("/healthz").await;
    assert_eq!(h.status, 200);
    let r = host.admin_get("/readyz").await;
    assert_eq!((r.status, r.json["ready"].as_bool()), (200, Some(true)));

    let comps = host.services().await;
    let names: Vec<_> = comps.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["gateway", "user", "product", "order", "reviews", "ratings"]
    );
    for c in comps {
        let file = components_dir().join(format!("{}.wasm", c["name"].as_str().unwrap()));
        let digest = hex::encode(Sha256::digest(std::fs::read(&file).unwrap()));
        assert_eq!(c["sha256"], digest.as_str());
        assert!(c["port"].as_u64().unwrap() > 0);
        assert!(c["path"].as_str().unwrap().ends_with(".wasm"));
        assert!(humantime::parse_rfc3339(c["loaded_at"].as_str().unwrap()).is_ok());
    }
    // The manifest the services came from.
    let manifest = host.admin_get("/components").await.json["manifest"].clone();
    let text = std::fs::read(host.data.join("services.toml")).unwrap();
    assert_eq!(
        manifest["sha256"],
        hex::encode(Sha256::digest(text)).as_str()
    );
    assert_eq!(manifest["generation"], 1);
    assert!(manifest["last_rejected"].is_null());
    assert!(manifest["path"]
        .as_str()
        .unwrap()
        .ends_with("services.toml"));
    assert_eq!(host.admin_get("/nope").await.status, 404);
    // Admin routes are not reachable on service ports.
    assert_eq!(host.get("/components").await.status, 404);
    assert_eq!(host.get("/healthz").await.status, 404);
}

#[tokio::test]
async fn metrics_count_requests_instances_and_messages() {
    // Fresh instances, so that each invocation counts one.
    let host = Host::start_with(None, &["--instance-reuse", "1"]).await;
    assert_eq!(host.get("/api/users").await.status, 200);
    assert_eq!(host.get("/api/users/abc").await.status, 400);
    let r = host
        .post(
            "/api/users",
            &serde_json::json!({"name": "M", "email": "m@ex.com"}),
        )
        .await;
    assert_eq!(r.status, 201);
    host.eventually("/api/orders/101", std::time::Duration::from_secs(5), |r| {
        !r.json["user"].is_null()
    })
    .await;
    let text = host.metrics().await;
    let value = |needle: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(needle))
            .unwrap_or_else(|| panic!("no {needle} in\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert_eq!(
        value(r#"host_http_requests_total{service="gateway",route="GET /api/users",status="2xx"}"#),
        1.0
    );
    assert_eq!(
        value(
            r#"host_http_requests_total{service="gateway",route="GET /api/users/abc",status="4xx"}"#
        ),
        1.0
    );
    assert!(value(r#"host_instances_created_total{service="user"}"#) >= 3.0);
    assert_eq!(
        value(r#"host_messages_produced_total{topic="user-created"}"#),
        1.0
    );
    assert_eq!(
        value(r#"host_messages_consumed_total{service="order",topic="user-created"}"#),
        1.0
    );
    assert_eq!(value("host_outbox_depth"), 0.0);
    assert!(text.contains("host_http_request_duration_seconds_bucket"));
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_requests_cannot_grow_the_metric_series_without_bound() {
    use futures_util::stream::{self, StreamExt};
    let host = Host::start().await;
    const WORDS: [&str; 8] = [
        "api",
        "v1",
        "users",
        "products",
        "orders",
        "x",
        "7",
        "dashboard",
    ];
    const METHODS: [&str; 7] = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "BREW"];
    const SERVICES: [&str; 4] = ["gateway", "user", "product", "order"];
    // 20,000 requests of 700-odd path shapes, every method, on every port: far past the cap.
    // (200,000 pass too, in 10 s, but starve the tests running beside this one.)
    let requests = (0..20_000u32).map(|i| {
        let mut path = String::new();
        let mut n = i / 28;
        for _ in 0..=(i % 4) {
            path.push('/');
            path.push_str(WORDS[(n % 8) as usize]);
            n /= 8;
        }
        let method = METHODS[(i / 4 % 7) as usize];
        let url = host.url(SERVICES[(i % 4) as usize], &format!("{path}?q={i}"));
        host.http
            .request(method.parse().unwrap(), url)
            .header("content-type", "application/json")
            .body("{")
            .send()
    });
    let answered = stream::iter(requests)
        .buffer_unordered(16)
        .filter(|r| std::future::ready(r.is_ok()))
        .count()
        .await;
    assert_eq!(answered, 20_000);
    let text = host.metrics().await;
    let series = text
        .lines()
        .filter(|l| l.starts_with("host_http_requests_total{"))
        .count();
    assert!(series <= 400, "{series} request series");
    assert!(
        text.contains(r#"route="other""#),
        "the cap was never reached"
    );
}

#[tokio::test]
async fn an_admin_listener_off_loopback_needs_a_token_and_then_every_call_carries_it() {
    // Without a token the host refuses to start rather than expose rollback to the network.
    let data = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_host"))
            .args(["--admin-addr", "0.0.0.0:0", "--in-memory"])
            .arg("--data-dir")
            .arg(data.path())
            .output(),
    )
    .await
    .expect("the host exits instead of starting")
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ADMIN_TOKEN"), "{stderr}");

    // With one, it listens on every interface, and only the probes are open.
    let addr = format!("0.0.0.0:{}", crate::broker::free_port());
    let host = Host::start_with(None, &["--admin-addr", &addr, "--admin-token", "s3cret"]).await;
    let anyone = reqwest::Client::new();
    let url = |path: &str| format!("http://{}{path}", host.admin);
    let r = anyone.get(url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200, "probes stay open");
    let refused = crate::harness::reply(anyone.get(url("/components")).send().await.unwrap()).await;
    assert_eq!(refused.status, 401);
    assert!(refused.json["error"].as_str().unwrap().contains("Bearer"));
    let r = anyone
        .get(url("/components"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rollback = url("/components/user/rollback");
    let r = anyone.post(&rollback).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = anyone
        .post(&rollback)
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409, "authorized; nothing to roll back to");
}

/// One HTTP/1.1 request to `addr` with `host` as its `Host` header, as a browser sends it after
/// a DNS rebind: the status line's code.
async fn status_with_host(addr: &str, request_line: &str, host: &str, body: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{request_line} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response[9..12].parse().unwrap()
}

#[tokio::test]
async fn without_a_token_a_page_rebound_to_loopback_is_refused() {
    let host = Host::start().await;
    let addr = host.admin.as_str();
    let rebound = "rebind.attacker.example";
    for line in ["GET /components", "GET /metrics"] {
        assert_eq!(
            status_with_host(addr, line, rebound, "").await,
            403,
            "{line}"
        );
    }
    let rollback = "POST /components/user/rollback";
    assert_eq!(status_with_host(addr, rollback, rebound, "{}").await, 403);
    // The operator's own tools name the listener.
    assert_eq!(
        status_with_host(addr, "GET /components", addr, "").await,
        200
    );
    assert_eq!(
        status_with_host(addr, "GET /components", "localhost", "").await,
        200
    );
    assert_eq!(
        status_with_host(addr, rollback, addr, "{}").await,
        409,
        "processed: nothing to roll back to"
    );
}

/// `/stats` counts each service's requests and its 5xx answers, apart from other services'.
#[tokio::test]
async fn stats_count_requests_and_server_errors_per_service() {
    let (host, _comps) = crate::harness::with_product("misbehave.wasm", &[], &[]).await;
    for path in ["/trap", "/panic", "/"] {
        host.send("GET", "product", path, None).await;
    }
    assert_eq!(host.get("/api/users").await.status, 200);
    let stats = host.admin_get("/stats").await.json;
    let service = |name: &str| {
        let all = stats["services"].as_array().unwrap();
        (all.iter().find(|s| s["name"] == name))
            .unwrap_or_else(|| panic!("no {name} in {stats}"))
            .clone()
    };
    let product = service("product");
    assert_eq!(
        (product["requests"].as_u64(), product["errors"].as_u64()),
        (Some(3), Some(2)),
        "{product}"
    );
    // The gateway's call to user-service is in process: counted on the gateway's port only.
    let gateway = service("gateway");
    let counts = (gateway["requests"].as_u64(), gateway["errors"].as_u64());
    assert_eq!(counts, (Some(1), Some(0)), "{gateway}");
}
