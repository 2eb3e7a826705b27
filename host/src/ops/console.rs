//! The operator console on the admin listener: a page (compiled into the binary) that reads
//! the admin JSON, and `/stats`, the figures it turns into rates and percentiles.

use crate::metrics;
use crate::runtime::Runtime;
use crate::types::http::full;
use crate::types::HttpResponse;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use serde_json::{json, Value};

/// The page's files: path, content type, text.
const ASSETS: [(&str, &str, &str); 3] = [
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("console/index.html"),
    ),
    (
        "/console.js",
        "text/javascript; charset=utf-8",
        include_str!("console/console.js"),
    ),
    (
        "/console.css",
        "text/css; charset=utf-8",
        include_str!("console/console.css"),
    ),
];

/// Whether `path` is one of the page's files (they hold no data: served without the token,
/// which the page asks for and sends with its own requests).
pub fn is_asset(path: &str) -> bool {
    ASSETS.iter().any(|(p, _, _)| *p == path)
}

/// The page's file at `path`, if it is one.
pub fn asset(path: &str) -> Option<HttpResponse> {
    let (_, content_type, text) = ASSETS.iter().find(|(p, _, _)| *p == path)?;
    let mut resp = hyper::Response::new(full(*text));
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Its own scripts and styles only; it talks to this listener alone.
    headers.insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    );
    Some(resp)
}

/// `GET /stats`: per service, its requests, 5xx answers and latency buckets counted since
/// start-up (the page takes differences between two readings), its consumer group's lag per
/// topic and the dead letters it made; the outbox.
pub fn stats(runtime: &Runtime) -> Value {
    let m = metrics::get();
    let services: Vec<Value> = runtime
        .services()
        .iter()
        .map(|s| {
            let buckets = s.latency.buckets();
            let consumed: Vec<Value> = (s.spec.subscribes.iter())
                .map(|topic| {
                    let group = [("group", s.spec.group.as_str()), ("topic", topic)];
                    json!({
                        "topic": topic,
                        "group": s.spec.group,
                        "lag": m.consumer_lag.get(&metrics::labels(group)).map(|g| g.get()),
                        "dead_lettered": metrics::dead_lettered(&s.name, topic),
                    })
                })
                .collect();
            json!({
                "name": &*s.name,
                "requests": buckets.iter().sum::<u64>(),
                "errors": metrics::server_errors(&s.name),
                "latency_buckets": buckets,
                "consumes": consumed,
            })
        })
        .collect();
    let health = runtime.health();
    json!({
        "latency_bounds_seconds": (0..metrics::LATENCY_BOUNDS).map(metrics::latency_bound).collect::<Vec<_>>(),
        "services": services,
        "outbox": {
            "depth": health.outbox_depth,
            "parked": health.outbox_parked,
            "bytes": health.outbox_bytes,
        },
        "messaging": health.messaging,
        "messaging_reachable": health.messaging_reachable,
    })
}
