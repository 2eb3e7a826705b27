//! `microsvc:platform/services`: calls from one service to another, run in the caller's task;
//! and the request and response values that `http-handler` shares with it.
//!
//! `wasi:http`'s outgoing-handler (see `http::Outbound`) reaches the same services, but it
//! spawns two tasks per call and moves the bodies through streams; here the callee's
//! invocation is simply awaited inside the caller's host call, and a batch is joined in place.

use crate::bindings::services::{self as wit, CallError};
use crate::http::{Resp, MAX_BODY, REQUEST_ID};
use crate::invocation::{self, HttpRequest};
use crate::platform::Platform;
use crate::registry::Service;
use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::Full;
use hyper::header::{HeaderName, HeaderValue, CONTENT_LENGTH, HOST};
use std::sync::Arc;
use tracing::Instrument;

/// Services are addressed by other services as `<name>-service` (in URLs: `http://user-service/`).
pub const HOST_SUFFIX: &str = "-service";

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

/// Who is calling: the calling service and the request it is serving.
#[derive(Clone)]
pub struct Caller {
    pub platform: Arc<Platform>,
    pub service: Arc<Service>,
    pub request_id: String,
}

/// Why a call was not made, before any callee ran.
pub enum Refused {
    NotFound(String),
    Denied(String),
}

impl Caller {
    /// The service `host` (`user-service`) names, if the caller may call it.
    pub fn resolve(&self, host: &str) -> Result<Arc<Service>, Refused> {
        let target = host
            .strip_suffix(HOST_SUFFIX)
            .and_then(|name| self.platform.service(name));
        let Some(target) = target else {
            tracing::warn!(caller = %self.service.name, destination = host, request_id = %self.request_id, "outbound call to an unknown destination refused");
            return Err(Refused::NotFound(format!("no service is called {host:?}")));
        };
        if !self.service.spec.calls.iter().any(|c| **c == *target.name) {
            tracing::warn!(caller = %self.service.name, destination = host, request_id = %self.request_id, "outbound call not in the caller's allowlist refused");
            return Err(Refused::Denied(format!(
                "{}-service may not call {host}",
                self.service.name
            )));
        }
        Ok(target.clone())
    }

    /// Runs `req` on `target` (carrying this request's id), or `None` after the outbound timeout.
    pub async fn call(&self, target: &Arc<Service>, mut req: HttpRequest) -> Option<Resp> {
        if let Ok(v) = HeaderValue::from_str(&self.request_id) {
            req.headers.insert(REQUEST_ID, v);
        }
        let platform = &self.platform;
        let rid = &self.request_id;
        let call = async {
            if let Some(delay) = target.spec.latency {
                tokio::time::sleep(delay).await;
            }
            invocation::http(platform, target, req, rid).await
        }
        .instrument(tracing::debug_span!("call", service = %target.name, request_id = %rid));
        tokio::time::timeout(platform.outbound_timeout, call)
            .await
            .ok()
    }

    /// One call of a batch, as the WIT function answers it.
    async fn call_wit(
        &self,
        host: String,
        request: wit::Request,
    ) -> Result<wit::Response, CallError> {
        let target = self.resolve(&host).map_err(|r| match r {
            Refused::NotFound(m) => CallError::NotFound(m),
            Refused::Denied(m) => CallError::Denied(m),
        })?;
        let req = to_request(&host, request).map_err(CallError::Invalid)?;
        let Some(resp) = self.call(&target, req).await else {
            return Err(CallError::Timeout(format!(
                "{host} did not answer within {:?}",
                self.platform.outbound_timeout
            )));
        };
        let (parts, body) = resp.into_parts();
        // A `Full` body yields its one frame at once and cannot fail.
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Ok(wit::Response {
            status: parts.status.as_u16(),
            headers: header_list(&parts.headers),
            body: body.into(),
        })
    }
}

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

/// Headers from a guest. Malformed ones are an error; hop-by-hop ones and those that frame the
/// body (which the host sets itself) are left out.
fn header_map(list: Vec<(String, String)>) -> Result<hyper::HeaderMap, String> {
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

/// A guest's `http-handler` response, as the host sends it on.
pub fn to_response(r: wit::Response) -> Result<Resp, String> {
    let status =
        hyper::StatusCode::from_u16(r.status).map_err(|_| format!("status {}", r.status))?;
    let mut resp = hyper::Response::new(Full::new(Bytes::from(r.body)));
    *resp.status_mut() = status;
    *resp.headers_mut() = header_map(r.headers)?;
    Ok(resp)
}

fn to_request(host: &str, r: wit::Request) -> Result<HttpRequest, String> {
    let method = hyper::Method::from_bytes(r.method.as_bytes())
        .map_err(|_| format!("method {:?}", r.method))?;
    if !r.path_with_query.starts_with('/') {
        return Err(format!(
            "path {:?} does not start with /",
            r.path_with_query
        ));
    }
    let uri = format!("http://{host}{}", r.path_with_query)
        .parse()
        .map_err(|_| format!("path {:?}", r.path_with_query))?;
    if r.body.len() > MAX_BODY {
        return Err(format!(
            "request body of {} bytes is over 1 MiB",
            r.body.len()
        ));
    }
    let mut headers = header_map(r.headers)?;
    headers.insert(
        HOST,
        HeaderValue::from_str(host).map_err(|_| format!("service {host:?}"))?,
    );
    Ok(HttpRequest {
        method,
        uri,
        headers,
        body: Bytes::from(r.body),
    })
}

/// The `services` view of an invocation's store.
pub struct ServicesView<'a> {
    pub caller: &'a Caller,
}

pub struct ServicesData;
impl wasmtime::component::HasData for ServicesData {
    type Data<'a> = ServicesView<'a>;
}

impl wit::Host for ServicesView<'_> {
    async fn call(
        &mut self,
        calls: Vec<(String, wit::Request)>,
    ) -> Vec<Result<wit::Response, CallError>> {
        let caller = self.caller;
        let calls = calls
            .into_iter()
            .map(|(host, req)| caller.call_wit(host, req));
        // Joined in this task: no spawn, no cross-thread wake-up per call.
        futures_util::future::join_all(calls).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, path: &str, headers: &[(&str, &str)], body: usize) -> wit::Request {
        wit::Request {
            method: method.into(),
            path_with_query: path.into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: vec![b'x'; body],
        }
    }

    #[test]
    fn requests_are_checked_and_addressed_to_the_service() {
        let r = to_request(
            "user-service",
            request(
                "POST",
                "/users?x=1",
                &[
                    ("content-type", "application/json"),
                    ("connection", "close"),
                    ("host", "evil"),
                ],
                3,
            ),
        )
        .unwrap();
        assert_eq!(r.method, hyper::Method::POST);
        assert_eq!(r.uri, "http://user-service/users?x=1");
        assert_eq!(r.headers[HOST], "user-service");
        assert_eq!(r.headers["content-type"], "application/json");
        assert!(!r.headers.contains_key("connection"));
        assert_eq!(r.body.len(), 3);

        let bad = |r| to_request("user-service", r).unwrap_err();
        assert!(bad(request("GE T", "/users", &[], 0)).contains("method"));
        assert!(bad(request("GET", "users", &[], 0)).contains("path"));
        assert!(bad(request("GET", "/us ers", &[], 0)).contains("path"));
        assert!(bad(request("GET", "/users", &[("bad name", "v")], 0)).contains("header"));
        assert!(bad(request("GET", "/users", &[("x", "a\nb")], 0)).contains("header"));
        assert!(bad(request("POST", "/users", &[], MAX_BODY + 1)).contains("1 MiB"));
    }

    #[test]
    fn guest_responses_are_checked_and_framed_by_the_host() {
        let response = |status, headers: &[(&str, &str)]| wit::Response {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: b"hi".to_vec(),
        };
        let r = to_response(response(
            201,
            &[
                ("content-type", "text/plain"),
                ("content-length", "99"),
                ("transfer-encoding", "chunked"),
            ],
        ))
        .unwrap();
        assert_eq!(r.status(), 201);
        assert_eq!(r.headers()["content-type"], "text/plain");
        assert!(!r.headers().contains_key("content-length"));
        assert!(!r.headers().contains_key("transfer-encoding"));
        assert!(to_response(response(1000, &[]))
            .unwrap_err()
            .contains("status"));
        assert!(to_response(response(200, &[("x", "a\rb")]))
            .unwrap_err()
            .contains("header"));
    }
}
