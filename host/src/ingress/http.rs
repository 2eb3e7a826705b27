//! One request on a service's port: body limits, request ids, route metrics, the invocation.

use crate::metrics;
use crate::runtime::admission::Caller;
use crate::runtime::{invoke, Runtime, Service};
use crate::types::http::busy;
use crate::types::http::route_class;
use crate::types::{json_error, request_id, trace, HttpRequest, HttpResponse, REQUEST_ID};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, HOST};
use hyper::{Request, StatusCode};
use platform_contract::{MAX_BODY, SERVICE_SUFFIX};
use std::sync::Arc;
use tokio::sync::{Semaphore, SemaphorePermit};
use tracing::Instrument;

pub(super) async fn handle(
    runtime: &Runtime,
    service: &Arc<Service>,
    budget: &Semaphore,
    req: Request<Incoming>,
) -> HttpResponse {
    let started = std::time::Instant::now();
    let route = bounded(service, route_class(req.method(), req.uri().path()));
    let resp = handle_inner(runtime, service, budget, req).await;
    let status = resp.status().as_u16();
    metrics::get()
        .requests
        .get_or_create(&metrics::labels([
            ("service", &service.name),
            ("route", &route),
            ("status", metrics::status_class(status)),
        ]))
        .inc();
    if status >= 500 {
        metrics::count_server_error(&service.name);
    }
    service.latency.observe(started.elapsed().as_secs_f64());
    resp
}

/// Largest request head (request line and headers) a service port takes.
pub(super) const MAX_HEAD: usize = 64 << 10;

/// Bytes of the request head as it was sent (about: the request line and `name: value` lines).
fn head_bytes(parts: &hyper::http::request::Parts) -> usize {
    let target = parts.uri.path_and_query().map_or(1, |p| p.as_str().len())
        + parts.uri.authority().map_or(0, |a| a.as_str().len() + 7);
    let line = parts.method.as_str().len() + target + 12;
    let headers: usize = parts
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    line + headers
}

/// Distinct route labels counted per service; routes first seen after that are `other`.
const MAX_ROUTES: usize = 32;

/// `route` if it is one of the first [`MAX_ROUTES`] labels of `service`, else `other`: clients
/// decide which paths they send, not how many metric series the host keeps.
fn bounded(service: &Service, route: String) -> String {
    let mut routes = service.routes.lock().unwrap_or_else(|e| e.into_inner());
    if routes.contains(&route) {
        return route;
    }
    if routes.len() < MAX_ROUTES {
        routes.insert(route.clone());
        return route;
    }
    "other".into()
}

async fn handle_inner(
    runtime: &Runtime,
    service: &Arc<Service>,
    budget: &Semaphore,
    req: Request<Incoming>,
) -> HttpResponse {
    let rid = request_id(req.headers());
    // Debug level: at the default `info` filter the span costs nothing (its fields are not
    // formatted); events that matter carry service and request id.
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
) -> HttpResponse {
    let (mut parts, body) = req.into_parts();
    if head_bytes(&parts) > MAX_HEAD {
        // The parser refuses a longer head only when it arrives in pieces; this holds the line
        // however it arrives.
        let mut resp = json_error(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request head is larger than 64 KiB",
        );
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        return with_request_id(resp, &rid);
    }
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let timeout = runtime.settings().body_timeout;
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
            let parent = trace::from_headers(&req.headers);
            invoke::http(runtime, service, req, &rid, Caller::Client, &parent).await
        }
    };
    with_request_id(resp, &rid)
}

fn with_request_id(mut resp: HttpResponse, rid: &str) -> HttpResponse {
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
/// Every byte kept counts against `budget`, the bytes all listeners may hold at once, as it
/// arrives (a declared length reserves nothing: a client that declares a megabyte and sends
/// nothing holds nothing); when the budget is spent the request gets 503 instead of the host
/// holding more. The bytes are kept as the frames that brought them and joined once at the
/// end, so what is held is what was counted. The returned reservation is released when the
/// caller drops it.
async fn read_body(
    mut body: Incoming,
    declared: Option<u64>,
    budget: &Semaphore,
) -> (Body, Option<Reserved<'_>>) {
    if declared.is_some_and(|n| n > DRAIN_MAX) {
        return (Body::TooLarge, None);
    }
    let mut too_large = declared.is_some_and(|n| n > MAX_BODY as u64);
    let mut reserved = None;
    let mut frames: Vec<Bytes> = Vec::new();
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
            frames = Vec::new();
            reserved = None;
        } else if !data.is_empty() {
            if !reserve(budget, &mut reserved, data.len() as u64) {
                return (Body::Busy, None);
            }
            frames.push(data);
        }
    }
    if too_large {
        return (Body::TooLarge, None);
    }
    let body = match frames.len() {
        0 => Bytes::new(),
        1 => frames.pop().expect("one frame"),
        _ => {
            let mut joined = BytesMut::with_capacity(seen as usize);
            for f in &frames {
                joined.extend_from_slice(f);
            }
            joined.freeze()
        }
    };
    (Body::Read(body), reserved)
}

/// Body bytes held against the budget, counted in `host_request_body_bytes` until dropped.
struct Reserved<'a>(SemaphorePermit<'a>);

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        metrics::get()
            .body_bytes
            .dec_by(self.0.num_permits() as i64);
    }
}

/// Adds `bytes` to `reserved` from `budget`; false if the budget does not have them.
fn reserve<'a>(budget: &'a Semaphore, reserved: &mut Option<Reserved<'a>>, bytes: u64) -> bool {
    let Ok(more) = budget.try_acquire_many(u32::try_from(bytes).unwrap_or(u32::MAX)) else {
        return false;
    };
    metrics::get().body_bytes.inc_by(more.num_permits() as i64);
    match reserved {
        None => *reserved = Some(Reserved(more)),
        Some(held) => held.0.merge(more),
    }
    true
}
