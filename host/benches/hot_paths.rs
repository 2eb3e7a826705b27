//! Criterion micro-benchmarks of the host's hot paths, in process (no sockets):
//! - a trivial request (the `hello` fixture, answering through `http-handler`, and `hello-wasi`,
//!   through wasi:http): fresh instance per request, and reused instance;
//! - an in-process service call: gateway `/api/users` (gateway -> user) next to user `/users`;
//! - a state read, and a state write committed to disk (redb, fsync), alone and with 16
//!   concurrent writers sharing fsyncs (group commit);
//! - an event publish: committing a write with one outbox message, and the embedded log append.
//!
//! Run with `cargo bench -p host --bench hot_paths` after `just build build-fixtures`.

use bytes::Bytes;
use clap::Parser;
use criterion::{criterion_group, criterion_main, Criterion};
use host::config::Args;
use host::messaging::{embedded::Embedded, Backend};
use host::runtime::admission::Caller;
use host::runtime::{invoke, Runtime};
use host::storage::{RedbStore, StateStore as _, Txn};
use host::types::{HttpRequest, Message};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::runtime::Runtime as Tokio;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The four services from `build/components`, except that product-service runs `product` (the
/// `hello` fixture, or `hello-wasi`): the trivial component.
fn runtime(rt: &Tokio, reuse: u32, data: &Path, product: &str) -> Arc<Runtime> {
    let args = Args::parse_from([
        "host".into(),
        "--components-dir".into(),
        root().join("build/components").into_os_string(),
        "--manifest".into(),
        root().join("services.toml").into_os_string(),
        "--compile-cache".into(),
        root().join("build/compile-cache").into_os_string(),
        "--data-dir".into(),
        data.as_os_str().to_owned(),
        "--instance-reuse".into(),
        reuse.to_string().into(),
    ]);
    let mut specs = args.services().unwrap();
    for spec in &mut specs {
        if &*spec.name == "product" {
            spec.file = root().join(format!("build/fixtures/{product}.wasm"));
        }
    }
    rt.block_on(async {
        let runtime = host::app::build(&args, &specs).await.unwrap();
        let services = runtime.prepare(specs).await.unwrap();
        runtime.install(services);
        runtime
    })
}

fn get(path: &str, host: &str) -> HttpRequest {
    let mut headers = hyper::HeaderMap::new();
    headers.insert(hyper::header::HOST, host.parse().unwrap());
    HttpRequest {
        method: hyper::Method::GET,
        uri: path.parse().unwrap(),
        headers,
        body: Bytes::new(),
    }
}

fn call(rt: &Tokio, runtime: &Runtime, service: &str, req: &HttpRequest) -> u16 {
    let service = runtime.service(service).unwrap();
    rt.block_on(invoke::http(
        runtime,
        &service,
        req.clone(),
        "bench",
        Caller::Client,
        &opentelemetry::Context::new(),
    ))
    .status()
    .as_u16()
}

fn requests(c: &mut Criterion) {
    let rt = Tokio::new().unwrap();
    let data = tempfile::tempdir().unwrap();
    let fresh = runtime(&rt, 1, &data.path().join("fresh"), "hello");
    let reused = runtime(&rt, 1_000_000, &data.path().join("reused"), "hello");
    let wasi_fresh = runtime(&rt, 1, &data.path().join("wasi-fresh"), "hello-wasi");
    let wasi_reused = runtime(
        &rt,
        1_000_000,
        &data.path().join("wasi-reused"),
        "hello-wasi",
    );
    let hello = get("/", "product-service");
    let users = get("/users", "user-service");
    let via_gateway = get("/api/users", "gateway-service");
    for (p, req, service) in [
        (&fresh, &hello, "product"),
        (&wasi_fresh, &hello, "product"),
        (&fresh, &users, "user"),
        (&fresh, &via_gateway, "gateway"),
    ] {
        assert_eq!(call(&rt, p, service, req), 200, "{service} must answer");
    }

    let mut g = c.benchmark_group("request");
    g.bench_function("trivial, fresh instance", |b| {
        b.iter(|| call(&rt, &fresh, "product", &hello))
    });
    g.bench_function("trivial, reused instance", |b| {
        b.iter(|| call(&rt, &reused, "product", &hello))
    });
    g.bench_function("trivial through wasi:http only, fresh instance", |b| {
        b.iter(|| call(&rt, &wasi_fresh, "product", &hello))
    });
    g.bench_function("trivial through wasi:http only, reused instance", |b| {
        b.iter(|| call(&rt, &wasi_reused, "product", &hello))
    });
    g.bench_function("user /users, fresh", |b| {
        b.iter(|| call(&rt, &fresh, "user", &users))
    });
    g.bench_function("gateway /api/users (in-process call to user), fresh", |b| {
        b.iter(|| call(&rt, &fresh, "gateway", &via_gateway))
    });
    g.bench_function(
        "gateway /api/users (in-process call to user), reused",
        |b| b.iter(|| call(&rt, &reused, "gateway", &via_gateway)),
    );
    g.finish();
}

fn message(n: u64) -> Message {
    Message {
        topic: "user.created".into(),
        key: Some(n.to_string()),
        payload: format!(r#"{{"id":{n},"name":"Bench","email":"b{n}@ex.com"}}"#).into_bytes(),
        headers: vec![("x-request-id".into(), format!("bench-{n}"))],
    }
}

/// A transaction of user-service that writes 64 bytes under `bucket/key`.
fn write(bucket: &str, key: String) -> Txn {
    let mut txn = Txn::new("user".into());
    txn.put(bucket.into(), key, Some(vec![7; 64])).unwrap();
    txn
}

fn state(c: &mut Criterion) {
    let rt = Tokio::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = RedbStore::open(dir.path()).unwrap();
    db.commit_blocking(&write("users", "1".into())).unwrap();

    let mut g = c.benchmark_group("state");
    g.bench_function("read one key", |b| {
        b.iter(|| {
            let mut txn = Txn::new("user".into());
            // A redb read is ready at once: no executor round trip in the measurement.
            let v = futures_util::FutureExt::now_or_never(txn.get(&db, "users", "1"))
                .unwrap()
                .unwrap();
            assert!(v.is_some());
        })
    });
    let mut n = 0u64;
    g.bench_function("write one key and commit (fsync)", |b| {
        b.iter(|| {
            n += 1;
            rt.block_on(db.commit(write("bench", n.to_string())))
                .unwrap();
        })
    });
    // Group commit: writers that arrive while a commit runs share the next one.
    g.bench_function(
        "write one key and commit, 16 concurrent writers (time per write)",
        |b| {
            b.iter_custom(|iters| {
                let began = std::time::Instant::now();
                rt.block_on(async {
                    let writers = (0..16u64).map(|w| {
                        let db = db.clone();
                        async move {
                            for i in (w..iters).step_by(16) {
                                let txn = write("concurrent", i.to_string());
                                db.commit(txn).await.unwrap();
                            }
                        }
                    });
                    futures_util::future::join_all(writers).await;
                });
                began.elapsed()
            })
        },
    );
    g.finish();

    let mut g = c.benchmark_group("event");
    g.bench_function("publish: commit a write with one outbox message", |b| {
        b.iter(|| {
            n += 1;
            let mut txn = write("bench", n.to_string());
            txn.send(message(n)).unwrap();
            rt.block_on(db.commit(txn)).unwrap();
        })
    });
    let log = Embedded::new(db.clone());
    g.bench_function("embedded log: append one message", |b| {
        b.iter(|| {
            n += 1;
            rt.block_on(log.publish(&[message(n)])).unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, requests, state);
criterion_main!(benches);
