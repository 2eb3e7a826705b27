//! `microsvc:platform/services`: calls from one service to another, run in the caller's task.
//!
//! `wasi:http`'s outgoing-handler (see `outgoing_http`) reaches the same services, but it
//! spawns two tasks per call and moves the bodies through streams; here the callee's
//! invocation is simply awaited inside the caller's host call, and a batch is joined in place.

use super::bindings::microsvc::platform::services::{self as wit, CallError};
use super::outbound::OutboundClient;
use crate::config::ServiceSpec;
use crate::types::http::{header_list, header_map, ResponseBody};
use crate::types::{trace, Budget, HttpRequest, HttpResponse, REQUEST_ID};
use anyhow::Result;
use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use http_body_util::BodyExt;
use hyper::header::{HeaderValue, HOST};
use platform_contract::{MAX_BODY, SERVICE_SUFFIX};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;
use wasmtime::component::{HasData, Linker};

/// What this capability needs from the embedder: running a request on another service.
pub trait ServiceCalls: Send + Sync + 'static {
    /// Whether a service called `name` (without the `-service` suffix) runs in this host.
    fn exists(&self, name: &str) -> bool;

    /// Runs `req` on the service `name` as part of request `request_id`, its span a child of
    /// `trace`; `None` if no such service runs (any more). Errors of the callee are responses
    /// (5xx), not `None`.
    fn call<'a>(
        &'a self,
        name: &'a str,
        req: HttpRequest,
        request_id: &'a str,
        trace: opentelemetry::Context,
    ) -> BoxFuture<'a, Option<HttpResponse>>;
}

/// Who is calling out, and where it may go: one per invocation's store.
#[derive(Clone)]
pub struct Outbound {
    pub caller: Arc<ServiceSpec>,
    pub timeout: Duration,
    /// Bytes of one callee's response collected at most (a streamed one may be longer).
    pub response_bytes: usize,
    pub peers: Arc<dyn ServiceCalls>,
    /// Where requests to the origins of `caller.allowed_outbound_hosts` go.
    pub outside: OutboundClient,
    /// The request being served, passed on to every callee.
    pub request_id: String,
    /// The invocation's trace context (empty while spans are not exported).
    pub trace: opentelemetry::Context,
}

/// Why a call was not made, before any callee ran.
pub enum CallRefused {
    NotFound(String),
    Denied(String),
}

impl Outbound {
    /// The service `host` (`user-service`) names, if the caller may call it.
    pub fn resolve<'h>(&self, host: &'h str) -> Result<&'h str, CallRefused> {
        let name = host
            .strip_suffix(SERVICE_SUFFIX)
            .filter(|name| self.peers.exists(name));
        let Some(name) = name else {
            tracing::warn!(caller = %self.caller.name, destination = host, request_id = %self.request_id, "outbound call to an unknown destination refused");
            return Err(CallRefused::NotFound(format!(
                "no service is called {host:?}"
            )));
        };
        if !self.caller.calls.iter().any(|c| c == name) {
            tracing::warn!(caller = %self.caller.name, destination = host, request_id = %self.request_id, "outbound call not in the caller's allowlist refused");
            return Err(CallRefused::Denied(format!(
                "{}{SERVICE_SUFFIX} may not call {host}",
                self.caller.name
            )));
        }
        Ok(name)
    }

    /// Runs `req` on service `name` (carrying this request's id); `None` after the timeout or
    /// if the service is gone.
    pub async fn call(&self, name: &str, mut req: HttpRequest) -> Option<HttpResponse> {
        if let Ok(v) = HeaderValue::from_str(&self.request_id) {
            req.headers.insert(REQUEST_ID, v);
        }
        let rid = &self.request_id;
        let span = trace::call(&self.caller.name, name, req.method.as_str(), &self.trace);
        let context = trace::context_of(&span);
        let call = (self.peers.call(name, req, rid, context))
            .instrument(span)
            .instrument(tracing::debug_span!("call", service = %name, request_id = %rid));
        tokio::time::timeout(self.timeout, call)
            .await
            .ok()
            .flatten()
    }

    /// One call of a batch, as the WIT function answers it.
    async fn call_wit(
        &self,
        host: String,
        request: wit::Request,
    ) -> Result<wit::Response, CallError> {
        let name = self.resolve(&host).map_err(|r| match r {
            CallRefused::NotFound(m) => CallError::NotFound(m),
            CallRefused::Denied(m) => CallError::Denied(m),
        })?;
        let req = to_request(&host, request).map_err(CallError::Invalid)?;
        let Some(resp) = self.call(name, req).await else {
            return Err(CallError::Timeout(format!(
                "{host} did not answer within {:?}",
                self.timeout
            )));
        };
        let (parts, body) = resp.into_parts();
        let collect = collect(body, self.response_bytes);
        let body = match tokio::time::timeout(self.timeout, collect).await {
            Ok(Ok(body)) => body,
            Ok(Err(e)) => return Err(CallError::Invalid(format!("{host} {e}"))),
            Err(_) => {
                return Err(CallError::Timeout(format!(
                    "{host} did not finish its answer within {:?}",
                    self.timeout
                )))
            }
        };
        Ok(wit::Response {
            status: parts.status.as_u16(),
            headers: header_list(&parts.headers),
            body: body.into(),
        })
    }
}

/// `body` whole, if it is at most `limit` bytes and does not break off.
async fn collect(mut body: ResponseBody, limit: usize) -> Result<Bytes, String> {
    let mut whole = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("broke off its answer: {e}"))?;
        if let Ok(data) = frame.into_data() {
            if whole.len() + data.len() > limit {
                return Err(format!("answered more than {limit} bytes"));
            }
            whole.extend_from_slice(&data);
        }
    }
    Ok(whole.freeze())
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
    pub outbound: &'a Outbound,
    /// The invocation's host budget, which the responses it collects count against.
    pub budget: &'a mut Budget,
}

/// Most calls in one batch: each answer is held by the host until the batch is done.
pub const MAX_BATCH_CALLS: usize = 64;

struct HasServices;
impl HasData for HasServices {
    type Data<'a> = ServicesView<'a>;
}

pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    f: fn(&mut T) -> ServicesView<'_>,
) -> wasmtime::Result<()> {
    wit::add_to_linker::<T, HasServices>(linker, f)
}

impl wit::Host for ServicesView<'_> {
    async fn call(
        &mut self,
        calls: Vec<(String, wit::Request)>,
    ) -> Vec<Result<wit::Response, CallError>> {
        let outbound = self.outbound;
        let n = calls.len();
        let calls = calls
            .into_iter()
            .take(MAX_BATCH_CALLS)
            .map(|(host, req)| outbound.call_wit(host, req));
        // Joined in this task: no spawn, no cross-thread wake-up per call.
        let mut results = futures_util::future::join_all(calls).await;
        let refused = || {
            CallError::Invalid(format!(
                "a batch may hold at most {MAX_BATCH_CALLS} calls, got {n}"
            ))
        };
        results.resize_with(n, || Err(refused()));
        for result in &mut results {
            if let Ok(resp) = result {
                let held = resp.body.len()
                    + resp
                        .headers
                        .iter()
                        .map(|(k, v)| k.len() + v.len())
                        .sum::<usize>();
                if let Err(e) = self.budget.charge(held) {
                    *result = Err(CallError::Invalid(e.to_string()));
                }
            }
        }
        results
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::json_error;

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

    /// Two services, `user` and `product`, that answer with their name and the request id.
    struct Echo;
    impl ServiceCalls for Echo {
        fn exists(&self, name: &str) -> bool {
            ["user", "product"].contains(&name)
        }
        fn call<'a>(
            &'a self,
            name: &'a str,
            req: HttpRequest,
            _: &'a str,
            _: opentelemetry::Context,
        ) -> BoxFuture<'a, Option<HttpResponse>> {
            Box::pin(async move {
                if name == "product" {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
                let rid = req.headers[REQUEST_ID].to_str().unwrap().to_string();
                if req.uri.path() == "/big" {
                    return Some(json_error(hyper::StatusCode::OK, &"x".repeat(600)));
                }
                Some(json_error(hyper::StatusCode::OK, &format!("{name} {rid}")))
            })
        }
    }

    #[tokio::test]
    async fn calls_are_resolved_allowlisted_timed_out_and_carry_the_request_id() {
        use wit::Host;
        let caller = Arc::new(ServiceSpec {
            calls: vec!["user".into(), "product".into()],
            ..ServiceSpec::named("gateway")
        });
        let outbound = Outbound {
            caller,
            timeout: Duration::from_millis(50),
            response_bytes: 512,
            peers: Arc::new(Echo),
            outside: OutboundClient::new(None, Duration::from_secs(1)).unwrap(),
            request_id: "rid-7".into(),
            trace: opentelemetry::Context::new(),
        };
        let mut budget = Budget::default();
        let mut view = ServicesView {
            outbound: &outbound,
            budget: &mut budget,
        };
        let results = view
            .call(vec![
                ("user-service".into(), request("GET", "/users", &[], 0)),
                ("product-service".into(), request("GET", "/", &[], 0)),
                ("billing-service".into(), request("GET", "/", &[], 0)),
                ("user".into(), request("GET", "/", &[], 0)),
                ("user-service".into(), request("GET", "nope", &[], 0)),
                ("user-service".into(), request("GET", "/big", &[], 0)),
            ])
            .await;
        let ok = results[0].as_ref().ok().unwrap();
        assert_eq!(ok.status, 200);
        assert!(String::from_utf8_lossy(&ok.body).contains("user rid-7"));
        assert!(matches!(results[1], Err(CallError::Timeout(_))));
        assert!(matches!(results[2], Err(CallError::NotFound(_))));
        assert!(matches!(results[3], Err(CallError::NotFound(_))));
        assert!(matches!(results[4], Err(CallError::Invalid(_))));
        assert!(
            matches!(&results[5], Err(CallError::Invalid(m)) if m.contains("more than 512 bytes"))
        );

        // A batch over the cap: the first calls run, the rest are refused.
        let big = (0..MAX_BATCH_CALLS + 2)
            .map(|_| ("user-service".into(), request("GET", "/", &[], 0)))
            .collect();
        let results = view.call(big).await;
        assert_eq!(results.len(), MAX_BATCH_CALLS + 2);
        assert!(results[MAX_BATCH_CALLS - 1].is_ok());
        assert!(
            matches!(&results[MAX_BATCH_CALLS], Err(CallError::Invalid(m)) if m.contains("at most"))
        );
        // Answers past the invocation's host budget are refused, and the invocation fails.
        let mut small = Budget::new(10);
        let mut view = ServicesView {
            outbound: &outbound,
            budget: &mut small,
        };
        let results = view
            .call(vec![("user-service".into(), request("GET", "/", &[], 0))])
            .await;
        assert!(
            matches!(&results[0], Err(CallError::Invalid(m)) if m.contains("INVOCATION_HOST_BYTES"))
        );
        assert!(small.overrun().is_some());

        let denied = Outbound {
            caller: Arc::new(ServiceSpec::named("user")),
            ..outbound.clone()
        };
        assert!(matches!(
            denied.resolve("product-service"),
            Err(CallRefused::Denied(_))
        ));
    }
}
