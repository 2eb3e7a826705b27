//! `wasi:http`: the service listeners, in-process calls between services, request limits.

use crate::invocation::{self, HttpRequest};
use crate::platform::Platform;
use crate::registry::Service;
use crate::services::{Caller, Refused, HOST_SUFFIX};
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tracing::Instrument;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

pub type Resp = hyper::Response<Full<Bytes>>;

/// Largest request body a service accepts; larger ones get 413 before they are read.
pub const MAX_BODY: usize = 1 << 20;
pub const REQUEST_ID: &str = "x-request-id";

pub fn json_error(status: StatusCode, message: &str) -> Resp {
    let body = serde_json::json!({ "error": message }).to_string();
    let mut resp = hyper::Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// The caller's `x-request-id` if it is sane, else a new one unique to this process.
pub fn request_id(headers: &hyper::HeaderMap) -> String {
    static PREFIX: LazyLock<String> = LazyLock::new(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        format!(
            "{:08x}",
            (nanos as u64 ^ (std::process::id() as u64) << 32) as u32
        )
    });
    static NEXT: AtomicU64 = AtomicU64::new(1);
    if let Some(id) = headers.get(REQUEST_ID).and_then(|v| v.to_str().ok()) {
        if !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()) {
            return id.to_string();
        }
    }
    format!("{}-{:x}", *PREFIX, NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Accepts connections on a service's port forever.
/// Accepts connections on a service's port until aborted; `connections` lets shutdown finish
/// their in-flight requests and close them.
pub async fn serve(
    listener: TcpListener,
    platform: Arc<Platform>,
    service: Arc<Service>,
    connections: Arc<GracefulShutdown>,
) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(service = %service.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (platform, service) = (platform.clone(), service.clone());
        let watcher = connections.watcher();
        let header_timeout = platform.header_timeout;
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let (platform, service) = (platform.clone(), service.clone());
                async move { Ok::<_, Infallible>(handle(&platform, &service, req).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                // Also bounds how long an idle keep-alive connection waits for its next request.
                .header_read_timeout(header_timeout)
                .max_headers(100)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
}

async fn handle(platform: &Arc<Platform>, service: &Arc<Service>, req: Request<Incoming>) -> Resp {
    let started = std::time::Instant::now();
    let route = route_class(req.method(), req.uri().path());
    let resp = handle_inner(platform, service, req).await;
    crate::metrics::get()
        .requests
        .get_or_create(&crate::metrics::labels([
            ("service", &service.name),
            ("route", &route),
            ("status", resp.status().as_str()),
        ]))
        .inc();
    service.latency.observe(started.elapsed().as_secs_f64());
    resp
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
    platform: &Arc<Platform>,
    service: &Arc<Service>,
    req: Request<Incoming>,
) -> Resp {
    let rid = request_id(req.headers());
    // Debug level: at the default `info` filter the span costs nothing (formatting its fields
    // for every request was 3% of the CPU); events that matter carry service and request id.
    let span = tracing::debug_span!("request", service = %service.name, request_id = %rid);
    handle_with_id(platform, service, req, rid)
        .instrument(span)
        .await
}

async fn handle_with_id(
    platform: &Arc<Platform>,
    service: &Arc<Service>,
    req: Request<Incoming>,
    rid: String,
) -> Resp {
    let (mut parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut resp = match read_body(body, declared).await {
        Body::TooLarge => json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body is larger than 1 MiB",
        ),
        Body::Unreadable => json_error(StatusCode::BAD_REQUEST, "could not read the request body"),
        Body::Read(bytes) => {
            // wasi:http needs an authority; HTTP/1.0 clients may send none.
            if !parts.headers.contains_key(HOST) && parts.uri.authority().is_none() {
                let host = format!("{}{HOST_SUFFIX}", service.name);
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
            invocation::http(platform, service, req, &rid).await
        }
    };
    if let Ok(v) = HeaderValue::from_str(&rid) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

enum Body {
    Read(Bytes),
    TooLarge,
    Unreadable,
}

/// Past this, an oversized body is not even drained: the connection is closed instead.
const DRAIN_MAX: u64 = 8 << 20;

/// Buffers a body of at most [`MAX_BODY`] bytes. An oversized body is never held in memory;
/// it is read and dropped (up to [`DRAIN_MAX`]) so that the client gets its 413 instead of a
/// connection reset in the middle of its upload.
async fn read_body(mut body: Incoming, declared: Option<u64>) -> Body {
    if declared.is_some_and(|n| n > DRAIN_MAX) {
        return Body::TooLarge;
    }
    let mut too_large = declared.is_some_and(|n| n > MAX_BODY as u64);
    let mut buf = BytesMut::new();
    let mut seen = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Body::Unreadable;
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len() as u64;
        if seen > DRAIN_MAX {
            return Body::TooLarge;
        }
        too_large |= seen > MAX_BODY as u64;
        if too_large {
            buf = BytesMut::new();
        } else {
            buf.extend_from_slice(&data);
        }
    }
    if too_large {
        Body::TooLarge
    } else {
        Body::Read(buf.freeze())
    }
}

type Sent = Box<dyn Future<Output = Result<(), HttpError>> + Send>;

/// `wasi:http/outgoing-handler` for a component: calls to `http://<name>-service/` run the
/// named service in this process, if the caller may call it. Nothing else is reachable.
/// (`services` is the cheaper way to the same place.)
impl WasiHttpHooks for Caller {
    fn send_request(
        &mut self,
        request: hyper::Request<WasiBody>,
        _options: Option<RequestOptions>,
        _fut: Sent,
    ) -> Box<dyn Future<Output = Result<(hyper::Response<WasiBody>, Sent), HttpError>> + Send> {
        let target = self
            .resolve(request.uri().host().unwrap_or_default())
            .map_err(|r| match r {
                Refused::NotFound(_) => HttpError::DestinationNotFound,
                Refused::Denied(_) => HttpError::HttpRequestDenied,
            });
        let caller = self.clone();
        Box::new(async move {
            let target = target?;
            let (parts, body) = request.into_parts();
            let body = Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(|_| HttpError::HttpRequestBodySize(None))?
                .to_bytes();
            let req = HttpRequest {
                method: parts.method,
                uri: parts.uri,
                headers: parts.headers,
                body,
            };
            let resp = caller
                .call(&target, req)
                .await
                .ok_or(HttpError::ConnectionReadTimeout)?;
            let resp = resp.map(|b| b.map_err(HttpError::from).boxed_unsync());
            Ok((resp, Box::new(async { Ok(()) }) as Sent))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_when_sane_and_generated_otherwise() {
        let mut h = hyper::HeaderMap::new();
        let a = request_id(&h);
        let b = request_id(&h);
        assert_ne!(a, b);
        h.insert(REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert(REQUEST_ID, HeaderValue::from_static("has space"));
        assert_ne!(request_id(&h), "has space");
    }

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
    }

    #[tokio::test]
    async fn json_errors_are_json() {
        let resp = json_error(StatusCode::NOT_FOUND, "no \"such\" thing");
        assert_eq!(resp.status(), 404);
        assert_eq!(resp.headers()[CONTENT_TYPE], "application/json");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "no \"such\" thing");
    }
}
