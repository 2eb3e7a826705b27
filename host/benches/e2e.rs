//! End-to-end figures for BENCHMARKS.md, measured on the real host binary:
//! - warm start: process start -> admin /readyz 200, with every component in the compile cache;
//! - event latency: POST /api/users -> the user is in order-service's cache (a POST /api/orders
//!   for it stops answering 422), embedded backend and Kafka (tansu on loopback).
//!
//! Run with `just bench` (or `cargo bench -p host --bench e2e`); prints a markdown table.
//! Not a test: nothing here asserts a speed.

#[path = "../tests/support/broker.rs"]
mod broker;

use broker::{free_port, Broker};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const STARTS: usize = 15;
const EVENTS: usize = 200;

fn components() -> PathBuf {
    std::env::var_os("COMPONENTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/components"))
}

struct Running {
    child: Child,
    admin: String,
    gateway: u16,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the host and returns it with the time until /readyz answered 200.
async fn start(
    client: &reqwest::Client,
    cache: &Path,
    data: &Path,
    extra: &[&str],
) -> (Running, Duration) {
    let admin = format!("127.0.0.1:{}", free_port());
    let gateway = free_port();
    let began = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_host"))
        .arg("--components-dir")
        .arg(components())
        .arg("--compile-cache")
        .arg(cache)
        .arg("--data-dir")
        .arg(data)
        .arg("--manifest")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../services.toml"))
        .args(["--admin-addr", &admin])
        .arg("--port")
        .arg(format!("gateway={gateway},user=0,product=0,order=0"))
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("host binary");
    let running = Running {
        child,
        admin,
        gateway,
    };
    loop {
        if let Ok(r) = client
            .get(format!("http://{}/readyz", running.admin))
            .send()
            .await
        {
            if r.status() == 200 {
                return (running, began.elapsed());
            }
        }
        assert!(
            began.elapsed() < Duration::from_secs(120),
            "host never became ready"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Creates a user; returns its id.
async fn create_user(client: &reqwest::Client, base: &str, email: &str) -> u64 {
    let r = client
        .post(format!("{base}/api/users"))
        .json(&json!({"name": "Bench", "email": email}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    r.json::<serde_json::Value>().await.unwrap()["id"]
        .as_u64()
        .unwrap()
}

/// Returns once order-service accepts an order for `id`, i.e. the user is in its cache.
async fn until_cached(client: &reqwest::Client, base: &str, id: u64) {
    let began = Instant::now();
    loop {
        let r = client
            .post(format!("{base}/api/orders"))
            .json(&json!({"userId": id, "productId": 1, "quantity": 1}))
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            201 => return,
            422 => assert!(
                began.elapsed() < Duration::from_secs(60),
                "event never arrived"
            ),
            s => panic!("unexpected {s}"),
        }
    }
}

async fn event_latencies(client: &reqwest::Client, host: &Running, tag: &str) -> Vec<Duration> {
    let base = format!("http://127.0.0.1:{}", host.gateway);
    // The first event also waits for the consumer group to settle: not steady state.
    let id = create_user(client, &base, &format!("warmup-{tag}@ex.com")).await;
    until_cached(client, &base, id).await;
    let mut out = Vec::with_capacity(EVENTS);
    for i in 0..EVENTS {
        let began = Instant::now();
        let id = create_user(client, &base, &format!("bench{i}-{tag}@ex.com")).await;
        until_cached(client, &base, id).await;
        out.push(began.elapsed());
    }
    out
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes --bench; there is nothing to filter.
    let client = reqwest::Client::new();
    let scratch = tempfile::tempdir().unwrap();
    let cache = scratch.path().join("cache");

    // Cold start fills the compile cache; then every start is warm.
    let (cold_host, cold) = start(&client, &cache, &scratch.path().join("cold"), &[]).await;
    drop(cold_host);
    let mut warm = Vec::new();
    for i in 0..STARTS {
        let (h, took) = start(
            &client,
            &cache,
            &scratch.path().join(format!("warm{i}")),
            &[],
        )
        .await;
        warm.push(took);
        drop(h);
    }

    let (h, _) = start(&client, &cache, &scratch.path().join("embedded"), &[]).await;
    let mut embedded = event_latencies(&client, &h, "embedded").await;
    drop(h);

    let broker = Broker::start().expect("tansu is needed for the Kafka figures");
    let (h, _) = start(
        &client,
        &cache,
        &scratch.path().join("kafka"),
        &["--kafka-brokers", &broker.addr],
    )
    .await;
    let mut kafka = event_latencies(&client, &h, "kafka").await;
    drop(h);

    println!("| measurement | samples | p50 | p99 / max |");
    println!("|---|---|---|---|");
    println!(
        "| cold start to /readyz 200 (compiles 4 components) | 1 | {} | |",
        ms(cold)
    );
    let max = *warm.iter().max().unwrap();
    println!(
        "| warm start to /readyz 200 (compile cache hit) | {STARTS} | {} | {} (max) |",
        ms(percentile(&mut warm, 0.5)),
        ms(max)
    );
    println!(
        "| event latency, embedded: POST /api/users -> in order cache | {EVENTS} | {} | {} |",
        ms(percentile(&mut embedded, 0.5)),
        ms(percentile(&mut embedded, 0.99))
    );
    println!("| event latency, Kafka (tansu, loopback): POST /api/users -> in order cache | {EVENTS} | {} | {} |", ms(percentile(&mut kafka, 0.5)), ms(percentile(&mut kafka, 0.99)));
}
