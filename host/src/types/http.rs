//! HTTP requests and responses as the host passes them around, and their error shapes.

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use hyper::StatusCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

/// A response as the host passes it on: its body whole, or (a WASI 0.3 guest's) streamed as the
/// guest writes it. Either way it is released only after the invocation's writes committed.
pub type HttpResponse = hyper::Response<ResponseBody>;

/// The body of an [`HttpResponse`].
pub type ResponseBody = UnsyncBoxBody<Bytes, BodyError>;

/// Why a streamed body ended early.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// `bytes` as a whole response body.
pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Carried from the client through every service a request calls and into its events.
pub const REQUEST_ID: &str = "x-request-id";

/// A buffered HTTP request: buffering lets a conflicting invocation run again.
#[derive(Clone, Debug)]
pub struct HttpRequest {
    pub method: hyper::Method,
    pub uri: hyper::Uri,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

/// `{"error": message}` with `status`: the one error shape every port answers with.
pub fn json_error(status: StatusCode, message: &str) -> HttpResponse {
    json_response(status, &serde_json::json!({ "error": message }))
}

/// `value` as a JSON response with `status`.
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> HttpResponse {
    let mut resp = hyper::Response::new(full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// 503 with `Retry-After: 1`: the host is at a limit, not broken.
pub fn busy(why: &str) -> HttpResponse {
    let mut resp = json_error(StatusCode::SERVICE_UNAVAILABLE, why);
    resp.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
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

/// Hop-by-hop headers mean nothing in process; `wasi:http` refuses them from guests too.
const FORBIDDEN: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// Headers as the WIT gives them to a guest: values decoded lossily, as the sdk does too.
pub fn header_list(headers: &hyper::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

/// Most headers a guest may put on a response or a call: a client may send 100, and a proxying
/// service adds a few.
pub const MAX_HEADERS: usize = 128;
/// Most bytes of header names and values a guest may put on a response or a call.
pub const MAX_HEADER_BYTES: usize = 64 << 10;

/// Headers from a guest. Malformed ones, and more than [`MAX_HEADERS`] or [`MAX_HEADER_BYTES`],
/// are an error; hop-by-hop ones and those that frame the body (which the host sets itself) are
/// left out.
pub fn header_map(list: Vec<(String, String)>) -> Result<hyper::HeaderMap, String> {
    // Checked before anything is allocated for them: a HeaderMap panics past 32,768 entries.
    if list.len() > MAX_HEADERS {
        return Err(format!("{} headers (at most {MAX_HEADERS})", list.len()));
    }
    let bytes: usize = list.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > MAX_HEADER_BYTES {
        return Err(format!(
            "{bytes} bytes of headers (at most {MAX_HEADER_BYTES})"
        ));
    }
    let mut headers = hyper::HeaderMap::with_capacity(list.len() + 2);
    for (name, value) in list {
        let bad = || format!("header {name:?}");
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| bad())?;
        let value = HeaderValue::from_str(&value).map_err(|_| bad())?;
        if !FORBIDDEN.contains(&name.as_str()) && name != CONTENT_LENGTH {
            headers.append(name, value);
        }
    }
    Ok(headers)
}

/// A guest's response given as plain values, as the host sends it on.
pub fn response(
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
) -> Result<HttpResponse, String> {
    let status = StatusCode::from_u16(status).map_err(|_| format!("status {status}"))?;
    let mut resp = hyper::Response::new(full(body));
    *resp.status_mut() = status;
    *resp.headers_mut() = header_map(headers)?;
    Ok(resp)
}

/// `stream` with a cap on how long one write may wait for the client to read: a client that
/// stops reading its response is cut off instead of holding the connection and the response's
/// memory forever. For the service ports and the admin listener alike.
pub fn write_limited(
    stream: tokio::net::TcpStream,
    timeout: std::time::Duration,
) -> std::pin::Pin<Box<tokio_io_timeout::TimeoutStream<tokio::net::TcpStream>>> {
    let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
    stream.set_write_timeout(Some(timeout));
    Box::pin(stream)
}

/// `GET /users/:id`-style label of a request, learnt from no list of routes: a segment of
/// digits (or a hex or UUID id with digits, 8 characters or more) is `:id`, a short name of
/// letters, digits, `-` and `_` is itself, anything else `:other`, and at most 4 segments.
/// Clients still choose the names: [`bounded`] caps the labels per service.
pub fn route_class(method: &hyper::Method, path: &str) -> String {
    let method = match method.as_str() {
        m @ ("GET" | "POST" | "PUT" | "DELETE" | "PATCH" | "HEAD" | "OPTIONS") => m,
        _ => "OTHER",
    };
    let mut class = String::new();
    for seg in path.split('/').filter(|s| !s.is_empty()).take(4) {
        class.push('/');
        class.push_str(segment_class(seg));
    }
    if class.is_empty() {
        class.push('/');
    }
    format!("{method} {class}")
}

fn segment_class(seg: &str) -> &str {
    let digits = seg.bytes().any(|b| b.is_ascii_digit());
    let hex_id = seg.len() >= 8 && seg.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    if seg.bytes().all(|b| b.is_ascii_digit()) || (digits && hex_id) {
        ":id"
    } else if seg.len() <= 32
        && seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        seg
    } else {
        ":other"
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

    #[tokio::test]
    async fn json_errors_are_json() {
        let resp = json_error(StatusCode::NOT_FOUND, "no \"such\" thing");
        assert_eq!(resp.status(), 404);
        assert_eq!(resp.headers()[CONTENT_TYPE], "application/json");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "no \"such\" thing");
    }

    #[test]
    fn guest_responses_are_checked_and_framed_by_the_host() {
        let headers = |list: &[(&str, &str)]| {
            list.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let r = response(
            201,
            headers(&[
                ("content-type", "text/plain"),
                ("content-length", "99"),
                ("transfer-encoding", "chunked"),
            ]),
            b"hi".to_vec(),
        )
        .unwrap();
        assert_eq!(r.status(), 201);
        assert_eq!(r.headers()["content-type"], "text/plain");
        assert!(!r.headers().contains_key("content-length"));
        assert!(!r.headers().contains_key("transfer-encoding"));
        assert!(response(1000, vec![], vec![])
            .unwrap_err()
            .contains("status"));
        assert!(response(200, headers(&[("x", "a\rb")]), vec![])
            .unwrap_err()
            .contains("header"));
        let many = vec![("x".to_string(), "y".to_string()); 30_000];
        assert!(response(200, many, vec![])
            .unwrap_err()
            .contains("30000 headers"));
        let big = vec![("x".to_string(), "y".repeat(MAX_HEADER_BYTES)); 1];
        assert!(response(200, big, vec![])
            .unwrap_err()
            .contains("bytes of headers"));
    }
    #[test]
    fn route_classes_are_bounded() {
        let get = hyper::Method::GET;
        assert_eq!(
            route_class(&get, "/api/v1/users/42"),
            "GET /api/v1/users/:id"
        );
        assert_eq!(route_class(&get, "/"), "GET /");
        assert_eq!(route_class(&get, "/random/x/y/z/w/v"), "GET /random/x/y/z");
        assert_eq!(
            route_class(&get, "/items/550e8400-e29b-41d4-a716-446655440000/5f3a9c1e"),
            "GET /items/:id/:id"
        );
        assert_eq!(
            route_class(&get, "/search/m@ex.com/deadbeef-cafe/v1"),
            "GET /search/:other/deadbeef-cafe/v1"
        );
        assert_eq!(
            route_class(&get, &format!("/{}", "a".repeat(33))),
            "GET /:other"
        );
        let odd = hyper::Method::from_bytes(b"BREW").unwrap();
        assert_eq!(route_class(&odd, "/users"), "OTHER /users");
    }
}
