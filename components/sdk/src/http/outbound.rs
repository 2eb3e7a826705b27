//! Calling other services: in process through `services` when the URL names one, else `wasi:http`.

use std::fmt;

use wasi::http::outgoing_handler;
use wasi::http::types::{
    ErrorCode, Fields, FutureIncomingResponse, IncomingResponse, OutgoingBody, OutgoingRequest,
    Scheme,
};
use wasi::io::poll::{self, Pollable};

use super::wasi_io::{header_list, read_body, split_url, to_method, write_all, BodyError};
use crate::contract::SERVICE_SUFFIX;
use crate::{services, Response};

/// One request to another service, e.g. `GET http://user-service/users`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundRequest {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl OutboundRequest {
    pub fn new(method: impl Into<String>, url: impl Into<String>) -> Self {
        OutboundRequest {
            method: method.into(),
            url: url.into(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn get(url: impl Into<String>) -> Self {
        OutboundRequest::new("GET", url)
    }

    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// What went wrong, grouped by the status a caller should answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboundErrorKind {
    /// The host refused the call (e.g. not on this service's allowlist). 502.
    Denied,
    /// No such destination. 502.
    NotFound,
    /// Connecting, or waiting for the response, took too long. 504.
    Timeout,
    /// The destination exists but is not taking requests right now. 503.
    Unavailable,
    /// The exchange broke down (protocol error, connection dropped, upstream trapped). 502.
    Failed,
    /// The request could not be built (bad URL, header or method). 502: the caller asked for
    /// something we cannot send upstream.
    Invalid,
}

impl OutboundErrorKind {
    /// Groups a `wasi:http` error code.
    pub fn of(code: &ErrorCode) -> Self {
        use ErrorCode as E;
        match code {
            E::HttpRequestDenied | E::DestinationIpProhibited => OutboundErrorKind::Denied,
            E::DestinationNotFound | E::DnsError(_) | E::DestinationIpUnroutable => {
                OutboundErrorKind::NotFound
            }
            E::DnsTimeout
            | E::ConnectionTimeout
            | E::ConnectionReadTimeout
            | E::ConnectionWriteTimeout
            | E::HttpResponseTimeout => OutboundErrorKind::Timeout,
            E::ConnectionRefused | E::DestinationUnavailable | E::ConnectionLimitReached => {
                OutboundErrorKind::Unavailable
            }
            E::HttpRequestMethodInvalid
            | E::HttpRequestUriInvalid
            | E::HttpRequestUriTooLong
            | E::HttpRequestHeaderSectionSize(_)
            | E::HttpRequestHeaderSize(_)
            | E::HttpRequestBodySize(_)
            | E::HttpRequestLengthRequired => OutboundErrorKind::Invalid,
            _ => OutboundErrorKind::Failed,
        }
    }

    /// The status to answer our own client with.
    pub fn status(self) -> u16 {
        match self {
            OutboundErrorKind::Timeout => 504,
            OutboundErrorKind::Unavailable => 503,
            OutboundErrorKind::Denied
            | OutboundErrorKind::NotFound
            | OutboundErrorKind::Failed
            | OutboundErrorKind::Invalid => 502,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            OutboundErrorKind::Denied => "request denied",
            OutboundErrorKind::NotFound => "destination not found",
            OutboundErrorKind::Timeout => "timed out",
            OutboundErrorKind::Unavailable => "unavailable",
            OutboundErrorKind::Failed => "request failed",
            OutboundErrorKind::Invalid => "invalid request",
        }
    }
}

/// An outbound call that produced no HTTP response. An upstream that answers, even with a
/// 5xx, is a `Response`, not an `OutboundError`.
#[derive(Debug, Clone)]
pub struct OutboundError {
    pub kind: OutboundErrorKind,
    /// The host's error code, when there was one.
    pub code: Option<ErrorCode>,
    pub detail: String,
}

impl OutboundError {
    pub fn from_code(code: ErrorCode) -> Self {
        OutboundError {
            kind: OutboundErrorKind::of(&code),
            detail: format!("{code:?}"),
            code: Some(code),
        }
    }

    fn new(kind: OutboundErrorKind, detail: impl Into<String>) -> Self {
        OutboundError {
            kind,
            code: None,
            detail: detail.into(),
        }
    }

    fn from_call(e: services::CallError) -> Self {
        use services::CallError as E;
        match e {
            E::Denied(m) => OutboundError::new(OutboundErrorKind::Denied, m),
            E::NotFound(m) => OutboundError::new(OutboundErrorKind::NotFound, m),
            E::Timeout(m) => OutboundError::new(OutboundErrorKind::Timeout, m),
            E::Invalid(m) => OutboundError::new(OutboundErrorKind::Invalid, m),
        }
    }

    fn from_body(e: BodyError, what: &str) -> Self {
        match e {
            BodyError::Failed {
                code: Some(code), ..
            } => OutboundError::from_code(code),
            BodyError::Failed { code: None, detail } => {
                OutboundError::new(OutboundErrorKind::Failed, format!("{what}: {detail}"))
            }
            BodyError::TooLarge => OutboundError::new(OutboundErrorKind::Failed, what),
        }
    }

    pub fn status(&self) -> u16 {
        self.kind.status()
    }

    /// JSON error response naming the upstream, e.g. `{"error": "user-service: timed out (…)"}`.
    pub fn to_response(&self, upstream: &str) -> Response {
        Response::error(self.status(), format!("{upstream}: {self}"))
    }
}

impl fmt::Display for OutboundError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.kind.describe(), self.detail)
    }
}

impl std::error::Error for OutboundError {}

/// One outbound call; see [`fetch_all`].
pub fn fetch(
    method: &str,
    url: &str,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
) -> Result<Response, OutboundError> {
    let request = OutboundRequest {
        method: method.to_string(),
        url: url.to_string(),
        headers,
        body,
    };
    fetch_all(vec![request])
        .into_iter()
        .next()
        .unwrap_or_else(|| Err(OutboundError::new(OutboundErrorKind::Failed, "no result")))
}

/// Runs all requests concurrently; results are in the order of `requests`.
///
/// Requests to `http://<name>-service/...` go through the host's `services` interface: one host
/// call for all of them, which the host runs concurrently in process. Any other URL goes through
/// `wasi:http`: each request is sent (body written and finished) first, then responses are
/// collected as they become ready.
pub fn fetch_all(requests: Vec<OutboundRequest>) -> Vec<Result<Response, OutboundError>> {
    let mut results: Vec<Option<Result<Response, OutboundError>>> =
        requests.iter().map(|_| None).collect();
    let mut pending: Vec<(usize, FutureIncomingResponse)> = Vec::new();
    let mut in_process: Vec<(usize, (String, services::Request))> = Vec::new();
    for (i, request) in requests.into_iter().enumerate() {
        match in_process_call(request) {
            Ok(call) => in_process.push((i, call)),
            Err(request) => match start(&request) {
                Ok(future) => pending.push((i, future)),
                Err(e) => results[i] = Some(Err(e)),
            },
        }
    }

    // The wasi:http requests above are already in flight while these run.
    if !in_process.is_empty() {
        let (order, calls): (Vec<usize>, Vec<_>) = in_process.into_iter().unzip();
        for (i, result) in order.into_iter().zip(services::call(&calls)) {
            results[i] = Some(
                result
                    .map(|r| Response {
                        status: r.status,
                        headers: r.headers,
                        body: r.body,
                    })
                    .map_err(OutboundError::from_call),
            );
        }
    }

    collect_wasi_http(pending, &mut results);

    results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| Err(OutboundError::new(OutboundErrorKind::Failed, "not sent")))
        })
        .collect()
}

/// One request through `wasi:http` only, whatever the URL: for code that must also run on hosts
/// without the `services` interface. [`fetch_all`] is cheaper on this host.
pub fn fetch_via_wasi_http(request: &OutboundRequest) -> Result<Response, OutboundError> {
    let mut results = vec![None];
    match start(request) {
        Ok(future) => collect_wasi_http(vec![(0, future)], &mut results),
        Err(e) => results[0] = Some(Err(e)),
    }
    results
        .pop()
        .flatten()
        .unwrap_or_else(|| Err(OutboundError::new(OutboundErrorKind::Failed, "not sent")))
}

/// Waits for every pending `wasi:http` response, putting each at its index in `results`.
fn collect_wasi_http(
    mut pending: Vec<(usize, FutureIncomingResponse)>,
    results: &mut [Option<Result<Response, OutboundError>>],
) {
    while !pending.is_empty() {
        let ready = {
            // Pollables are children of their futures and must be gone before a future is
            // consumed below.
            let pollables: Vec<Pollable> = pending.iter().map(|(_, f)| f.subscribe()).collect();
            let refs: Vec<&Pollable> = pollables.iter().collect();
            poll::poll(&refs)
        };
        let mut ready: Vec<usize> = ready
            .into_iter()
            .map(|i| i as usize)
            .filter(|&i| i < pending.len())
            .collect();
        ready.sort_unstable();
        ready.dedup();
        // Highest index first, so that `swap_remove` only moves entries already handled or not
        // ready.
        for idx in ready.into_iter().rev() {
            let (i, future) = pending.swap_remove(idx);
            results[i] = Some(finish(&future));
        }
    }
}

/// `http://<name>-service/path` as a `services` call to `<name>-service`; any other URL is
/// given back.
fn in_process_call(
    request: OutboundRequest,
) -> Result<(String, services::Request), OutboundRequest> {
    let Some((Scheme::Http, authority, path_with_query)) = split_url(&request.url) else {
        return Err(request);
    };
    if !authority.ends_with(SERVICE_SUFFIX) || authority.contains([':', '@']) {
        return Err(request);
    }
    let service = authority.to_string();
    Ok((
        service,
        services::Request {
            method: request.method,
            path_with_query,
            headers: request.headers,
            body: request.body,
        },
    ))
}

fn start(request: &OutboundRequest) -> Result<FutureIncomingResponse, OutboundError> {
    let invalid = |detail: String| OutboundError::new(OutboundErrorKind::Invalid, detail);
    let (scheme, authority, path_with_query) = split_url(&request.url)
        .ok_or_else(|| invalid(format!("not an http(s) URL: {:?}", request.url)))?;

    let headers = Fields::new();
    for (name, value) in &request.headers {
        headers
            .append(name, value.as_bytes())
            .map_err(|e| invalid(format!("header {name:?}: {e:?}")))?;
    }
    let outgoing = OutgoingRequest::new(headers);
    outgoing
        .set_method(&to_method(&request.method))
        .map_err(|()| invalid(format!("method {:?}", request.method)))?;
    outgoing
        .set_scheme(Some(&scheme))
        .map_err(|()| invalid(format!("scheme of {:?}", request.url)))?;
    outgoing
        .set_authority(Some(authority))
        .map_err(|()| invalid(format!("authority {authority:?}")))?;
    outgoing
        .set_path_with_query(Some(&path_with_query))
        .map_err(|()| invalid(format!("path {path_with_query:?}")))?;

    let body = outgoing
        .body()
        .map_err(|()| invalid("request body already taken".into()))?;
    // Hand the request over before writing its body: the host may only drain the body once the
    // request is in flight, so writing first could block on a large body.
    let future = outgoing_handler::handle(outgoing, None).map_err(OutboundError::from_code)?;
    write_all(&body, &request.body)
        .map_err(|e| OutboundError::from_body(e, "could not send request body"))?;
    OutgoingBody::finish(body, None).map_err(OutboundError::from_code)?;
    Ok(future)
}

fn finish(future: &FutureIncomingResponse) -> Result<Response, OutboundError> {
    match future.get() {
        Some(Ok(Ok(response))) => read_response(response),
        Some(Ok(Err(code))) => Err(OutboundError::from_code(code)),
        Some(Err(())) => Err(OutboundError::new(
            OutboundErrorKind::Failed,
            "response already taken",
        )),
        None => Err(OutboundError::new(
            OutboundErrorKind::Failed,
            "response not ready",
        )),
    }
}

fn read_response(response: IncomingResponse) -> Result<Response, OutboundError> {
    let status = response.status();
    let headers = header_list(&response.headers());
    let body = match response.consume() {
        Ok(body) => read_body(body, None)
            .map_err(|e| OutboundError::from_body(e, "could not read response body"))?,
        Err(()) => Vec::new(),
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_map_to_statuses() {
        let status = |code| OutboundError::from_code(code).status();
        assert_eq!(status(ErrorCode::HttpRequestDenied), 502);
        assert_eq!(status(ErrorCode::DestinationNotFound), 502);
        assert_eq!(status(ErrorCode::ConnectionTimeout), 504);
        assert_eq!(status(ErrorCode::HttpResponseTimeout), 504);
        assert_eq!(status(ErrorCode::ConnectionRefused), 503);
        assert_eq!(status(ErrorCode::DestinationUnavailable), 503);
        assert_eq!(status(ErrorCode::InternalError(None)), 502);
        let r = OutboundError::from_code(ErrorCode::ConnectionReadTimeout).to_response("x-service");
        assert_eq!(r.status, 504);
        let v = r.json_body().unwrap();
        assert!(v["error"]
            .as_str()
            .unwrap()
            .starts_with("x-service: timed out"));
    }

    #[test]
    fn only_plain_http_service_urls_go_in_process() {
        let call = |url: &str| in_process_call(OutboundRequest::get(url)).ok();
        let (service, request) = call("http://user-service/users?limit=1").unwrap();
        assert_eq!(service, "user-service");
        assert_eq!(request.path_with_query, "/users?limit=1");
        for other in [
            "https://user-service/users",
            "http://user-service:80/users",
            "http://a@user-service/users",
            "http://example.com/users",
        ] {
            assert!(call(other).is_none(), "{other}");
        }
    }
}
