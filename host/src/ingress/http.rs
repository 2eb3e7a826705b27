//! The service listeners: one port per service, request limits, request ids, metrics.

use crate::config::ServiceSpec;
use crate::metrics;
use crate::runtime::{invoke, Runtime, Service};
use crate::types::contract::{MAX_BODY, SERVICE_SUFFIX};
use crate::types::http::{busy, write_limited};
use crate::types::{json_error, request_id, HttpRequest, Resp, REQUEST_ID};
use anyhow::{Context as _, Result};
use bytes::{Bytes, BytesMut};
use futures_util::FutureExt as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, HOST};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::task::JoinHandle;
use tracing::Instrument;

/// The service ports this host listens on, each with the connections it has open.
pub struct Ports {
    runtime: Arc<Runtime>,
    bind_addr: IpAddr,
    /// Request-body bytes all ports together may hold (`BODY_BUFFER`).
    budget: Arc<Semaphore>,
    open: HashMap<Arc<str>, Port>,
}

struct Port {
    port: u16,
    accepting: JoinHandle<()>,
    connections: Arc<GracefulShutdown>,
}

/// Ports bound for a change of services, not accepting yet.
pub struct Bound(Vec<(Arc<str>, TcpListener)>);

impl Ports {
    pub fn new(runtime: Arc<Runtime>, bind_addr: IpAddr, body_buffer: u64) -> Ports {
        let budget = usize::try_from(body_buffer)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Ports {
            runtime,
            bind_addr,
            budget: Arc::new(Semaphore::new(budget)),
            open: HashMap::new(),
        }
    }

    /// Binds the ports of `specs` that are not open yet (a new service, a changed port) and
    /// writes the bound port into each spec. A service that keeps its port, or asks for any
    /// port (`0`) and has one, keeps its listener.
    pub async fn bind(&self, specs: &mut [ServiceSpec]) -> Result<Bound> {
        let mut bound = Vec::new();
        for spec in specs.iter_mut().filter(|s| s.serves_http) {
            if let Some(open) = self.open.get(&spec.name) {
                if spec.port == 0 || spec.port == open.port {
                    spec.port = open.port;
                    continue;
                }
            }
            let listener = TcpListener::bind((self.bind_addr, spec.port))
                .await
                .with_context(|| format!("binding {} port {}", spec.name, spec.port))?;
            spec.port = listener.local_addr()?.port();
            bound.push((spec.name.clone(), listener));
        }
        Ok(Bound(bound))
    }

    /// Starts accepting on `bound`; then stops accepting on the ports no service of `specs`
    /// has any more (a removed service, a changed port), whose requests in flight finish in
    /// the background before their connections close.
    pub fn apply(&mut self, bound: Bound, specs: &[ServiceSpec]) {
        for (name, listener) in bound.0 {
            let port = listener.local_addr().map_or(0, |a| a.port());
            let connections = Arc::new(GracefulShutdown::new());
            let accepting = tokio::spawn(serve(
                listener,
                self.runtime.clone(),
                name.clone(),
                connections.clone(),
                self.budget.clone(),
            ));
            let new = Port {
                port,
                accepting,
                connections,
            };
            if let Some(old) = self.open.insert(name, new) {
                tokio::spawn(old.close());
            }
        }
        let keep = |name: &Arc<str>, port: &Port| {
            specs
                .iter()
                .any(|s| s.serves_http && s.name == *name && s.port == port.port)
        };
        let gone: Vec<Arc<str>> = self
            .open
            .iter()
            .filter(|(name, port)| !keep(name, port))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            if let Some(old) = self.open.remove(&name) {
                tracing::info!(service = %name, port = old.port, "port closed");
                tokio::spawn(old.close());
            }
        }
    }

    /// Stops accepting on every port at once; the returned future finishes the requests in
    /// flight and closes the connections.
    pub fn close(self) -> impl std::future::Future<Output = ()> {
        let closing: Vec<_> = self.open.into_values().map(Port::close).collect();
        futures_util::future::join_all(closing).map(|_| ())
    }
}

impl Port {
    /// Stops accepting now (the listener is closed, so new connections are refused); the
    /// future finishes the requests in flight and closes the connections.
    fn close(self) -> impl std::future::Future<Output = ()> {
        self.accepting.abort();
        async move {
            let _ = self.accepting.await;
            if let Some(connections) = Arc::into_inner(self.connections) {
                connections.shutdown().await;
            }
        }
    }
}

/// Accepts connections on `service`'s port until aborted; `connections` lets shutdown finish
/// their in-flight requests and close them. At most `MAX_CONNECTIONS` are open at once: beyond
/// that, new ones wait in the kernel's backlog until one closes. Each request goes to the
/// service's settings and component current when it arrives.
async fn serve(
    listener: TcpListener,
    runtime: Arc<Runtime>,
    service: Arc<str>,
    connections: Arc<GracefulShutdown>,
    budget: Arc<Semaphore>,
) {
    let open = Arc::new(tokio::sync::Semaphore::new(
        runtime.settings.max_connections,
    ));
    loop {
        let Ok(slot) = open.clone().acquire_owned().await else {
            return;
        };
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(service = %service, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (runtime, service, budget) = (runtime.clone(), service.clone(), budget.clone());
        let watcher = connections.watcher();
        let header_timeout = runtime.settings.header_timeout;
        let write_timeout = runtime.settings.write_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            let svc = service_fn(move |req| {
                let (runtime, service, budget) = (runtime.clone(), service.clone(), budget.clone());
                async move {
                    let resp = match runtime.service(&service) {
                        Some(service) => handle(&runtime, &service, &budget, req).await,
                        // Removed by a manifest change; its port is closing.
                        None => gone(&service),
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                // Also bounds how long an idle keep-alive connection waits for its next request.
                .header_read_timeout(header_timeout)
                .max_headers(100)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(write_limited(stream, write_timeout)), svc);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
}

fn gone(service: &str) -> Resp {
    let mut resp = json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("{service}{SERVICE_SUFFIX} is no longer in the manifest"),
    );
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    resp
}

async fn handle(
    runtime: &Runtime,
    service: &Arc<Service>,
    budget: &Semaphore,
    req: Request<Incoming>,
) -> Resp {
    let started = std::time::Instant::now();
    let route = bounded(service, route_class(req.method(), req.uri().path()));
    let resp = handle_inner(runtime, service, budget, req).await;
    metrics::get()
        .requests
        .get_or_create(&metrics::labels([
            ("service", &service.name),
            ("route", &route),
            ("status", status_class(resp.status())),
        ]))
        .inc();
    service.latency.observe(started.elapsed().as_secs_f64());
    resp
}

/// Distinct route labels counted per service; routes first seen after that are `other`.
const MAX_ROUTES: usize = 32;

/// `route` if it is one of the first [`MAX_ROUTES`] labels of `service`, else `other`: clients
/// decide which paths they send, not how many metric series the host keeps.
fn bounded(service: &Service, route: String) -> String {
    let mut routes = service.routes.lock().unwrap();
    if routes.contains(&route) {
        return route;
    }
    if routes.len() < MAX_ROUTES {
        routes.insert(route.clone());
        return route;
    }
    "other".into()
}

/// `2xx`, `4xx`...: a guest may answer with any of 900 codes.
fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}

/// `GET /users/:id`-style label: known words kept, numbers as `:id`, anything else `:other`,
/// so that clients cannot grow the metric's label set without bound.
fn route_class(method: &hyper::Method, path: &str) -> String {
    const KNOWN: [&str; 6] = ["api", "v1", "users", "products", "orders", "dashboard"];
    let method = match method.as_str() {
        m @ ("GET" | "POST" | "PUT" | "DELETE" | "PATCH" | "HEAD" | "OPTIONS") => m,
        _ => "OTHER",
    };
    let mut class = String::new();
    for seg in path.split('/').filter(|s| !s.is_empty()).take(4) {
        class.push('/');
        class.push_str(match seg {
            s if KNOWN.contains(&s) => s,
            s if s.bytes().all(|b| b.is_ascii_digit()) => ":id",
            _ => ":other",
        });
    }
    if class.is_empty() {
        class.push('/');
    }
    format!("{method} {class}")
}

async fn handle_inner(
    runtime: &Runtime,
    service: &Arc<Service>,
    budget: &Semaphore,
    req: Request<Incoming>,
) -> Resp {
    let rid = request_id(req.headers());
    // Debug level: at the default `info` filter the span costs nothing (formatting its fields
    // for every request was 3% of the CPU); events that matter carry service and request id.
    let span = tracing::debug_span!("request", service = %service.name, request_id = %rid);
    handle_with_id(runtime, service, budget, req, rid)
        .instrument(span)
        .await
}

async fn handle_with_id(
    runtime: &Runtime,
    service: &Arc<Service>,
    budget: &Semaphore,
    req: Request<Incoming>,
    rid: String,
) -> Resp {
    let (mut parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let timeout = runtime.settings.body_timeout;
    let (body, _reserved) = tokio::time::timeout(timeout, read_body(body, declared, budget))
        .await
        .unwrap_or((Body::Slow, None));
    let resp = match body {
        Body::Busy => {
            tracing::warn!(service = %service.name, request_id = %rid, "request body budget spent");
            busy("the host is holding as many request bodies as it may; retry")
        }
        Body::Slow => {
            tracing::warn!(service = %service.name, request_id = %rid, ?timeout, "request body too slow; closing");
            let mut resp = json_error(
                StatusCode::REQUEST_TIMEOUT,
                &format!("request body not received within {timeout:?}"),
            );
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            resp
        }
        Body::TooLarge => json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body is larger than 1 MiB",
        ),
        Body::Unreadable => json_error(StatusCode::BAD_REQUEST, "could not read the request body"),
        Body::Read(bytes) => {
            // wasi:http needs an authority; HTTP/1.0 clients may send none.
            if !parts.headers.contains_key(HOST) && parts.uri.authority().is_none() {
                let host = format!("{}{SERVICE_SUFFIX}", service.name);
                parts
                    .headers
                    .insert(HOST, HeaderValue::from_str(&host).expect("service name"));
            }
            parts.headers.insert(
                REQUEST_ID,
                HeaderValue::from_str(&rid).expect("sanitized id"),
            );
            let req = HttpRequest {
                method: parts.method,
                uri: parts.uri,
                headers: parts.headers,
                body: bytes,
            };
            invoke::http(runtime, service, req, &rid).await
        }
    };
    with_request_id(resp, &rid)
}

fn with_request_id(mut resp: Resp, rid: &str) -> Resp {
    if let Ok(v) = HeaderValue::from_str(rid) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

enum Body {
    Read(Bytes),
    TooLarge,
    Unreadable,
    /// Not all there within the body timeout.
    Slow,
    /// The host holds as many request bodies as it may.
    Busy,
}

/// Past this, an oversized body is not even drained: the connection is closed instead.
const DRAIN_MAX: u64 = 8 << 20;

/// Buffers a body of at most [`MAX_BODY`] bytes. An oversized body is never held in memory;
/// it is read and dropped (up to [`DRAIN_MAX`]) so that the client gets its 413 instead of a
/// connection reset in the middle of its upload.
///
/// Every byte kept counts against `budget`, the bytes all listeners may hold at once: a declared
/// length is reserved before anything is read, chunked bodies as they arrive; when the budget
/// is spent the request gets 503 instead of the host holding more. The returned reservation is
/// released when the caller drops it.
async fn read_body(
    mut body: Incoming,
    declared: Option<u64>,
    budget: &Semaphore,
) -> (Body, Option<SemaphorePermit<'_>>) {
    if declared.is_some_and(|n| n > DRAIN_MAX) {
        return (Body::TooLarge, None);
    }
    let mut too_large = declared.is_some_and(|n| n > MAX_BODY as u64);
    let mut reserved = None;
    let mut allowance = 0u64;
    if let Some(n) = declared.filter(|_| !too_large) {
        if !reserve(budget, &mut reserved, n) {
            return (Body::Busy, None);
        }
        allowance = n;
    }
    // Exactly the reserved size when the length is declared: growing by doubling would hold
    // up to twice what the budget counts.
    let mut buf = BytesMut::with_capacity(allowance as usize);
    let mut seen = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return (Body::Unreadable, None);
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len() as u64;
        if seen > DRAIN_MAX {
            return (Body::TooLarge, None);
        }
        too_large |= seen > MAX_BODY as u64;
        if too_large {
            buf = BytesMut::new();
            reserved = None;
        } else {
            if seen > allowance {
                if !reserve(budget, &mut reserved, seen - allowance) {
                    return (Body::Busy, None);
                }
                allowance = seen;
            }
            buf.extend_from_slice(&data);
        }
    }
    if too_large {
        (Body::TooLarge, None)
    } else {
        (Body::Read(buf.freeze()), reserved)
    }
}

/// Adds `bytes` to `reserved` from `budget`; false if the budget does not have them.
fn reserve<'a>(
    budget: &'a Semaphore,
    reserved: &mut Option<SemaphorePermit<'a>>,
    bytes: u64,
) -> bool {
    let Ok(more) = budget.try_acquire_many(u32::try_from(bytes).unwrap_or(u32::MAX)) else {
        return false;
    };
    match reserved {
        None => *reserved = Some(more),
        Some(held) => held.merge(more),
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_classes_are_bounded() {
        let get = hyper::Method::GET;
        assert_eq!(
            route_class(&get, "/api/v1/users/42"),
            "GET /api/v1/users/:id"
        );
        assert_eq!(route_class(&get, "/"), "GET /");
        assert_eq!(
            route_class(&get, "/random/x/y/z/w/v"),
            "GET /:other/:other/:other/:other"
        );
        let odd = hyper::Method::from_bytes(b"BREW").unwrap();
        assert_eq!(route_class(&odd, "/users"), "OTHER /users");
        assert_eq!(status_class(StatusCode::IM_A_TEAPOT), "4xx");
        assert_eq!(status_class(StatusCode::from_u16(999).unwrap()), "5xx");
    }
}
