//! Limits: a misbehaving component fails its own request and nothing else.
//! The `misbehave` fixture stands in for product-service.

use crate::harness::{assert_error, stalled, with_product, Host};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `limits`: the product service's `limits` in the manifest, an inline table.
async fn host_with_misbehaving_product(limits: &str) -> (Arc<Host>, tempfile::TempDir) {
    let limits = format!("limits = {limits}");
    let (host, comps) = with_product("misbehave.wasm", &[("product", &limits)], &[]).await;
    (Arc::new(host), comps)
}

/// Waits until `service` created an instance: the request sent to it is being run.
async fn instance_created(host: &Host, service: &str) {
    let series = format!(r#"host_instances_created_total{{service="{service}"}}"#);
    let deadline = Instant::now() + Duration::from_secs(10);
    while host.metric(&series).await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "{service} never started the request"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every service port still answers below 500.
async fn every_port_answers(host: &Host) {
    for service in ["gateway", "user", "product", "order"] {
        let path = if service == "gateway" {
            "/api/users"
        } else {
            "/"
        };
        let status = host.send("GET", service, path, None).await.status;
        assert!(status < 500, "{service} answered {status}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_runaway_loop_gets_504_while_everything_else_answers() {
    let (host, _comps) = host_with_misbehaving_product(r#"{ cpu = "8s" }"#).await;
    let looping = {
        let host = host.clone();
        tokio::spawn(async move {
            let began = Instant::now();
            (
                host.send("GET", "product", "/loop", None).await,
                began.elapsed(),
            )
        })
    };
    // Its instance exists: the loop runs (or is about to).
    instance_created(&host, "product").await;
    // While it spins: other services, and the same service, still answer at once.
    for _ in 0..5 {
        let began = Instant::now();
        assert_eq!(host.send("GET", "user", "/users", None).await.status, 200);
        assert_eq!(host.send("GET", "product", "/ok", None).await.status, 200);
        // Well under the 8 s the loop runs: a stalled worker would wait for all of it.
        assert!(
            began.elapsed() < Duration::from_secs(4),
            "stalled for {:?}",
            began.elapsed()
        );
    }
    let (r, took) = looping.await.unwrap();
    assert_error(&r, 504);
    assert!(
        took >= Duration::from_secs(8),
        "stopped before its deadline: {took:?}"
    );
    assert!(host.log().contains("CPU deadline"));
    assert_eq!(host.send("GET", "product", "/ok", None).await.status, 200);
}

#[tokio::test]
async fn memory_hogs_traps_and_panics_fail_only_their_request() {
    let (host, _comps) = host_with_misbehaving_product(r#"{ memory = "16MiB" }"#).await;
    for path in ["/alloc", "/trap", "/panic"] {
        let r = host
            .http
            .get(host.url("product", path))
            .header(
                "x-request-id",
                format!("req{}", path.trim_start_matches('/')),
            )
            .send()
            .await
            .unwrap();
        let r = crate::harness::reply(r).await;
        assert_error(&r, 500);
        assert!(
            r.json["error"]
                .as_str()
                .unwrap()
                .contains("product-service"),
            "{:?}",
            r.json
        );
        assert_eq!(
            host.send("GET", "product", "/ok", None).await.status,
            200,
            "after {path}"
        );
        assert_eq!(host.send("GET", "user", "/users", None).await.status, 200);
    }
    let log = host.log();
    for id in ["reqalloc", "reqtrap", "reqpanic"] {
        assert!(
            log.lines()
                .any(|l| l.contains(id) && l.contains("product") && l.contains("component failed")),
            "no log line for {id}"
        );
    }
}

#[tokio::test]
async fn calling_a_service_outside_the_allowlist_is_refused() {
    let (host, _comps) = host_with_misbehaving_product(r#"{ cpu = "5s" }"#).await;
    let r = host.send("GET", "product", "/forbidden", None).await;
    assert_error(&r, 502);
    assert!(
        r.json["error"].as_str().unwrap().contains("user-service"),
        "{:?}",
        r.json
    );
    assert!(host.log().contains("allowlist refused"));
}

#[tokio::test(flavor = "multi_thread")]
async fn past_the_concurrency_limit_a_request_waits_for_a_permit() {
    let (host, _comps) = host_with_misbehaving_product(r#"{ concurrency = 1 }"#).await;
    let busy = {
        let host = host.clone();
        tokio::spawn(async move { host.send("GET", "product", "/sleep?ms=700", None).await })
    };
    // Its instance exists: it holds the one permit.
    instance_created(&host, "product").await;
    let began = Instant::now();
    let r = host.send("GET", "product", "/ok", None).await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert!(
        began.elapsed() >= Duration::from_millis(300),
        "it did not wait for the permit: {:?}",
        began.elapsed()
    );
    assert_eq!(busy.await.unwrap().status, 200);
    let waits = r#"host_queue_wait_seconds_count{service="product"}"#;
    assert_eq!(host.metric(waits).await, 1.0);
    assert!(!host.metrics().await.contains("host_requests_shed_total"));
}

#[tokio::test(flavor = "multi_thread")]
async fn past_the_queue_wait_or_length_requests_get_503_and_one_log_line() {
    let limits = [("product", r#"limits = { concurrency = 1, cpu = "4s" }"#)];
    let flags = ["--queue-wait", "300ms", "--queue-length", "2"];
    let (host, _comps) = with_product("misbehave.wasm", &limits, &flags).await;
    let host = Arc::new(host);
    let busy = {
        let host = host.clone();
        tokio::spawn(async move { host.send("GET", "product", "/loop", None).await.status })
    };
    instance_created(&host, "product").await;
    let send_many = |n: usize| {
        let requests = (0..n).map(|_| {
            let host = host.clone();
            async move {
                let began = Instant::now();
                (
                    host.send("GET", "product", "/ok", None).await,
                    began.elapsed(),
                )
            }
        });
        futures_util::future::join_all(requests)
    };
    // Two fit in the queue and wait out its 300 ms.
    for (r, took) in send_many(2).await {
        assert_error(&r, 503);
        assert_eq!(r.headers["retry-after"], "1");
        assert!(
            r.json["error"].as_str().unwrap().contains("in time"),
            "{:?}",
            r.json
        );
        assert!(took >= Duration::from_millis(250), "{took:?}");
    }
    // Of twelve at once, two wait and ten are refused at once: the queue is full.
    let answers = send_many(12).await;
    assert!(answers.iter().all(|(r, _)| r.status == 503));
    let full = answers
        .iter()
        .filter(|(r, _)| r.json["error"].as_str().unwrap().contains("queue is full"))
        .count();
    assert_eq!(full, 10);
    let shed = |reason: &str| {
        format!(r#"host_requests_shed_total{{service="product",reason="{reason}"}}"#)
    };
    assert_eq!(host.metric(&shed("queue_full")).await, 10.0);
    assert_eq!(host.metric(&shed("waited_out")).await, 4.0);
    // Fourteen refusals, one line in the log.
    let reports = host
        .log()
        .lines()
        .filter(|l| l.contains("overloaded") && l.contains("product"))
        .count();
    assert_eq!(reports, 1, "{}", host.log());
    // Other services are not held up; the service answers again once the loop is stopped.
    assert_eq!(host.send("GET", "user", "/users", None).await.status, 200);
    assert_eq!(busy.await.unwrap(), 504);
    assert_eq!(host.send("GET", "product", "/ok", None).await.status, 200);
}

#[tokio::test]
async fn slow_header_senders_and_idle_connections_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = Host::start_with(None, &["--header-timeout", "500ms"]).await;
    let addr = format!("127.0.0.1:{}", host.ports["gateway"]);

    // Headers that never finish: the host closes the connection after the timeout.
    let mut slow = stalled(
        host.ports["gateway"],
        b"GET /api/users HTTP/1.1\r\nHost: x\r\n",
    )
    .await;
    let began = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "slow client was never cut off");
    assert!(began.elapsed() >= Duration::from_millis(400));

    // A keep-alive connection that goes quiet after one request is closed too.
    let mut idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    idle.write_all(b"GET /api/products HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "idle keep-alive connection was never closed");

    // Too many headers, or a 64 KiB one: refused with 431, and the host keeps serving.
    let mut many = String::from("GET /api/users HTTP/1.1\r\nHost: x\r\n");
    for i in 0..200 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let huge = format!(
        "GET /api/users HTTP/1.1\r\nHost: x\r\nx-big: {}\r\n\r\n",
        "v".repeat(64 << 10)
    );
    for head in [many, huge] {
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        conn.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer))
            .await
            .expect("the connection was never closed")
            .expect("the connection was reset instead of answered");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    }
    assert_eq!(host.get("/api/users").await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_response_with_thirty_thousand_headers_is_a_500_not_a_crash() {
    let (host, _comps) = host_with_misbehaving_product(r#"{ cpu = "5s" }"#).await;
    let r = host.send("GET", "product", "/headers?n=30000", None).await;
    assert_error(&r, 500);
    assert!(
        r.json["error"].as_str().unwrap().contains("30000 headers"),
        "{:?}",
        r.json
    );
    // A reasonable number is passed on.
    let r = host.send("GET", "product", "/headers?n=20", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-h19"], "v");
    every_port_answers(&host).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_bodies_are_cut_off_and_do_not_starve_their_service() {
    use tokio::io::AsyncReadExt;
    let host = Host::edited(
        &[("user", "limits = { concurrency = 2 }")],
        &["--body-timeout", "1s"],
    )
    .await;
    // More stalled uploads than user-service may serve requests at once: headers and part of a
    // body, then nothing.
    let mut slow = Vec::new();
    for _ in 0..4 {
        slow.push(
            stalled(
                host.ports["user"],
                b"POST /users HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                  content-length: 1000\r\n\r\n{\"name\":",
            )
            .await,
        );
    }
    // The host holds the first 8 bytes of each body.
    wait_body_bytes(&host, |held| held == 32.0).await;
    // They hold no permit while they stall: the service still answers.
    assert_eq!(host.send("GET", "user", "/users", None).await.status, 200);
    let body = r#"{"name":"A","email":"a@ex.com"}"#;
    assert_eq!(
        host.send("POST", "user", "/users", Some(body)).await.status,
        201
    );
    // Within the body timeout each gets 408 and its connection is closed.
    let began = Instant::now();
    for mut s in slow {
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
            .await
            .expect("a slow body's connection stayed open")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
    assert!(began.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_waiting_past_the_request_timeout_gets_504_and_frees_its_permit() {
    let (host, _comps) = with_product(
        "misbehave.wasm",
        &[("product", "limits = { concurrency = 1 }")],
        &["--request-timeout", "1s"],
    )
    .await;
    let began = Instant::now();
    let r = host.send("GET", "product", "/sleep?ms=20000", None).await;
    assert_error(&r, 504);
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "504 after {:?}",
        began.elapsed()
    );
    // Its one permit is free again, and waits shorter than the limit are fine.
    let r = host.send("GET", "product", "/sleep?ms=100", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(host.send("GET", "user", "/users", None).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_port_holds_at_most_max_connections_and_takes_the_next_when_one_closes() {
    let host = Host::start_with(None, &["--max-connections", "3"]).await;
    let addr = format!("127.0.0.1:{}", host.ports["user"]);
    let before = host.metric("host_open_connections ").await;
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    wait_open_connections(&host, before + 3.0).await;
    // A fourth client waits: the port does not take it while three are open.
    let fourth = tokio::spawn({
        let (http, url) = (host.http.clone(), host.url("user", "/users"));
        async move { http.get(url).send().await.map(|r| r.status().as_u16()) }
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!fourth.is_finished(), "a fourth connection was served");
    // Other ports are not affected.
    assert_eq!(
        host.send("GET", "product", "/products", None).await.status,
        200
    );
    drop(idle.pop());
    let status = tokio::time::timeout(Duration::from_secs(5), fourth)
        .await
        .expect("the fourth client was never served")
        .unwrap()
        .unwrap();
    assert_eq!(status, 200);
}

/// Waits (at most 10 s) until the host has accepted `n` connections on its service ports.
async fn wait_open_connections(host: &Host, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let open = host.metric("host_open_connections ").await;
        if open >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the host accepted {open} connections of {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (at most 10 s) until the request body bytes the host holds satisfy `done`.
async fn wait_body_bytes(host: &Host, done: impl Fn(f64) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let held = host.metric("host_request_body_bytes ").await;
        if done(held) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the host holds {held} body bytes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn request_bodies_held_by_the_host_stay_within_the_body_buffer() {
    let host = Host::start_with(None, &["--body-buffer", "1MiB"]).await;
    // A client that announces 900,010 bytes, sends 900,000 of them, and stalls: the host
    // holds 900,000 bytes for it.
    let mut upload = b"POST /users HTTP/1.1\r\nhost: x\r\ncontent-length: 900010\r\n\r\n".to_vec();
    upload.extend(std::iter::repeat_n(b' ', 900_000));
    let slow = stalled(host.ports["user"], &upload).await;
    wait_body_bytes(&host, |held| held == 900_000.0).await;
    // On another port too: the budget is the host's, not a port's.
    let big = format!(r#"{{"name":"{}","price":1}}"#, "x".repeat(200_000));
    assert_error(
        &host.send("POST", "product", "/products", Some(&big)).await,
        503,
    );
    // Small bodies still fit.
    let small = r#"{"name":"A","email":"a@ex.com"}"#;
    let r = host.send("POST", "user", "/users", Some(small)).await;
    assert_eq!(r.status, 201, "{:?}", r.json);
    // Once the slow client is gone its reservation is released: the same body is read and
    // judged by the service (its name is too long: 400) instead of refused by the host.
    drop(slow);
    wait_body_bytes(&host, |held| held == 0.0).await;
    assert_error(
        &host.send("POST", "product", "/products", Some(&big)).await,
        400,
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_staging_gigabytes_fails_alone_and_the_host_stays_small() {
    let (host, _comps) = host_with_misbehaving_product(r#"{ cpu = "20s" }"#).await;
    assert_eq!(host.send("GET", "product", "/", None).await.status, 200);
    let baseline = host.rss();
    let mut peak = baseline;
    // Each asks the host to hold 20,000 MiB of staged writes, and ignores every refusal.
    let hoards: Vec<_> = (0..3)
        .map(|_| host.send("GET", "product", "/hoard-host", None))
        .collect();
    let hoards = futures_util::future::join_all(hoards);
    tokio::pin!(hoards);
    let replies = loop {
        tokio::select! {
            replies = &mut hoards => break replies,
            _ = tokio::time::sleep(Duration::from_millis(20)) => peak = peak.max(host.rss()),
        }
    };
    for r in &replies {
        assert_error(r, 500);
        let error = r.json["error"].as_str().unwrap();
        assert!(error.contains("INVOCATION_HOST_BYTES"), "{error}");
    }
    assert!(
        peak < baseline + (100 << 20),
        "RSS went from {} MB to {} MB",
        baseline >> 20,
        peak >> 20
    );
    every_port_answers(&host).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn guest_stderr_is_tagged_with_its_request_and_capped_per_invocation() {
    let (host, _comps) = host_with_misbehaving_product(r#"{ cpu = "5s" }"#).await;
    let before = host.log().len();
    let url = host.url("product", "/stderr?kb=10240");
    let r = host
        .http
        .get(url)
        .header("x-request-id", "loud-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let log = host.log();
    let added = &log[before..];
    // 10 MiB written; the log keeps 64 KiB of it, each line tagged.
    assert!(
        added.len() < 512 << 10,
        "the log grew by {} bytes",
        added.len()
    );
    let lines: Vec<&str> = added.lines().filter(|l| l.contains("eeeeeeee")).collect();
    assert!(lines.len() >= 1000, "{} guest lines logged", lines.len());
    assert!(lines
        .iter()
        .all(|l| l.contains("loud-1") && l.contains("product")));
    assert!(added.contains("the rest was dropped"), "{added}");
    every_port_answers(&host).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn components_cannot_open_sockets() {
    let (host, _comps) = host_with_misbehaving_product(r#"{ cpu = "5s" }"#).await;
    let r = host.send("GET", "product", "/sockets", None).await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    for kind in ["tcp", "udp"] {
        let outcome = r.json[kind].as_str().unwrap();
        assert!(outcome.contains("access-denied"), "{kind}: {:?}", r.json);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_its_response_is_cut_off_after_the_write_timeout() {
    use tokio::io::AsyncReadExt;
    let (host, _comps) = with_product("misbehave.wasm", &[], &["--write-timeout", "1s"]).await;
    // Asks for 12 MiB, far more than the socket buffers hold, and reads nothing for 3 s.
    let mut conn = stalled(
        host.ports["product"],
        b"GET /big?mb=12 HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut received = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut received)).await;
    assert!(read.is_ok(), "the host kept the connection open");
    assert!(
        received.len() < 12 << 20,
        "the whole response arrived ({} bytes): nothing was cut off",
        received.len()
    );
    every_port_answers(&host).await;
}

/// Clients that declare a 1 MiB body and send none of it hold no buffer: 2000 of them do not
/// keep another client's POST from its answer (the body budget is 64 MiB, 64 such
/// reservations).
#[tokio::test(flavor = "multi_thread")]
async fn connections_that_declare_bodies_and_send_nothing_hold_no_buffer() {
    let host = Host::start().await;
    let before = host.metric("host_open_connections ").await;
    let mut idle = Vec::new();
    for i in 0..2000 {
        let service = ["user", "product", "order", "gateway"][i % 4];
        idle.push(
            stalled(
                host.ports[service],
                b"POST /users HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                  content-length: 1048576\r\n\r\n",
            )
            .await,
        );
    }
    wait_open_connections(&host, before + 2000.0).await;
    for i in 0..5 {
        let body = format!(r#"{{"name":"A{i}","email":"a{i}@ex.com"}}"#);
        let r = host.send("POST", "user", "/users", Some(&body)).await;
        assert_eq!(r.status, 201, "{:?}", r.json);
    }
    let big = format!(r#"{{"name":"{}","price":1}}"#, "x".repeat(200_000));
    assert_error(
        &host.send("POST", "product", "/products", Some(&big)).await,
        400,
    );
    drop(idle);
}
