//! `wasi:http` plumbing: answering the incoming request and calling other services.

use std::fmt;

use wasi::http::outgoing_handler;
use wasi::http::types::{
    ErrorCode, Fields, FutureIncomingResponse, IncomingBody, IncomingRequest, IncomingResponse,
    Method, OutgoingBody, OutgoingRequest, OutgoingResponse, ResponseOutparam, Scheme,
};
use wasi::io::poll::{self, Pollable};
use wasi::io::streams::StreamError;

use crate::services;
use crate::{Request, Response};

/// Other services' host names end with this: `http://user-service/users`.
const SERVICE_SUFFIX: &str = "-service";

/// Largest request body a service reads. The host keeps values and messages under 1 MiB too,
/// so nothing larger could be stored anyway; refusing early keeps memory bounded.
pub const MAX_REQUEST_BODY_BYTES: usize = 1 << 20;

/// Reads the incoming request, runs `handler` and sends its response.
///
/// Call this from `wasi:http/incoming-handler#handle`. Requests that cannot be read (body too
/// large, client gone) get an error response without reaching `handler`.
pub fn serve(
    request: IncomingRequest,
    response_out: ResponseOutparam,
    handler: impl FnOnce(Request) -> Response,
) {
    let response = match read_request(&request) {
        Ok(req) => handler(req),
        Err(resp) => resp,
    };
    drop(request);
    send_response(response_out, &response);
}

/// [`serve`] for the host's `microsvc:platform/http-handler` export: the same request and
/// response as plain values, with no `wasi:http` resources or streams to go through.
pub fn serve_values(
    request: services::Request,
    handler: impl FnOnce(Request) -> Response,
) -> services::Response {
    let services::Request {
        method,
        path_with_query,
        headers,
        body,
    } = request;
    let response = if body.len() > MAX_REQUEST_BODY_BYTES {
        too_large()
    } else {
        let (path, query) = split_path(path_with_query);
        handler(Request {
            method,
            path,
            query,
            headers,
            body,
        })
    };
    let mut headers = response.headers;
    if let Some(tag) = BUILD_TAG {
        headers.retain(|(name, _)| !name.eq_ignore_ascii_case("x-build"));
        headers.push(("x-build".into(), tag.into()));
    }
    services::Response {
        status: response.status,
        headers,
        body: response.body,
    }
}

/// Lets a caller tell two builds of one service apart (hot-swap tests, canaries).
const BUILD_TAG: Option<&str> = option_env!("COMPONENT_BUILD_TAG");

fn too_large() -> Response {
    Response::error(
        413,
        format!("request body is larger than {MAX_REQUEST_BODY_BYTES} bytes"),
    )
}

/// `/users?limit=1` → (`/users`, `Some("limit=1")`).
fn split_path(path_with_query: String) -> (String, Option<String>) {
    match path_with_query.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (path_with_query, None),
    }
}

fn read_request(request: &IncomingRequest) -> Result<Request, Response> {
    let method = method_name(&request.method());
    let (path, query) = split_path(request.path_with_query().unwrap_or_else(|| "/".into()));
    let headers = header_list(&request.headers());
    let body = match request.consume() {
        Ok(body) => read_body(body, Some(MAX_REQUEST_BODY_BYTES)).map_err(|e| match e {
            BodyError::TooLarge => too_large(),
            BodyError::Failed { detail, .. } => {
                Response::bad_request(format!("could not read request body: {detail}"))
            }
        })?,
        Err(()) => Vec::new(),
    };
    Ok(Request {
        method,
        path,
        query,
        headers,
        body,
    })
}

fn send_response(out: ResponseOutparam, response: &Response) {
    let headers = Fields::new();
    for (name, value) in &response.headers {
        // Headers come from our own code or from another service's response; one the host
        // refuses (forbidden or malformed) is dropped rather than failing the whole response.
        let _ = headers.append(name, value.as_bytes());
    }
    // An explicit length spares the client chunked decoding; the host checks that the body
    // written matches it.
    let _ = headers.set(
        "content-length",
        &[response.body.len().to_string().into_bytes()],
    );
    if let Some(tag) = BUILD_TAG {
        let _ = headers.set("x-build", &[tag.as_bytes().to_vec()]);
    }
    let outgoing = OutgoingResponse::new(headers);
    if outgoing.set_status_code(response.status).is_err() {
        let _ = outgoing.set_status_code(500);
    }
    let body = outgoing.body();
    ResponseOutparam::set(out, Ok(outgoing));
    if let Ok(body) = body {
        // A failed write means the client went away; there is nobody left to tell.
        if write_all(&body, &response.body).is_ok() {
            let _ = OutgoingBody::finish(body, None);
        }
    }
}

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

/// `http://authority/path?query` → (scheme, authority, path-with-query). Only http and https
/// are meaningful to the host.
fn split_url(url: &str) -> Option<(Scheme, &str, String)> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("http://") {
        (Scheme::Http, rest)
    } else if let Some(rest) = url.strip_prefix("https://") {
        (Scheme::Https, rest)
    } else {
        return None;
    };
    let (authority, path_with_query) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.is_empty() {
        return None;
    }
    let path_with_query = if path_with_query.starts_with('/') {
        path_with_query.to_string()
    } else {
        format!("/{path_with_query}")
    };
    Some((scheme, authority, path_with_query))
}

enum BodyError {
    TooLarge,
    Failed {
        code: Option<ErrorCode>,
        detail: String,
    },
}

fn read_body(body: IncomingBody, limit: Option<usize>) -> Result<Vec<u8>, BodyError> {
    let stream = body.stream().map_err(|()| BodyError::Failed {
        code: None,
        detail: "body stream already taken".into(),
    })?;
    let mut bytes = Vec::new();
    let result = loop {
        match stream.blocking_read(64 * 1024) {
            Ok(chunk) => {
                bytes.extend_from_slice(&chunk);
                if limit.is_some_and(|limit| bytes.len() > limit) {
                    break Err(BodyError::TooLarge);
                }
            }
            Err(StreamError::Closed) => break Ok(()),
            Err(StreamError::LastOperationFailed(e)) => {
                break Err(BodyError::Failed {
                    code: wasi::http::types::http_error_code(&e),
                    detail: e.to_debug_string(),
                })
            }
        }
    };
    // The stream is a child of the body and has to go first.
    drop(stream);
    drop(IncomingBody::finish(body));
    result.map(|()| bytes)
}

fn write_all(body: &OutgoingBody, bytes: &[u8]) -> Result<(), BodyError> {
    let stream = body.write().map_err(|()| BodyError::Failed {
        code: None,
        detail: "body stream already taken".into(),
    })?;
    // `blocking-write-and-flush` accepts at most 4096 bytes per call.
    for chunk in bytes.chunks(4096) {
        if let Err(e) = stream.blocking_write_and_flush(chunk) {
            return Err(match e {
                StreamError::Closed => BodyError::Failed {
                    code: None,
                    detail: "stream closed".into(),
                },
                StreamError::LastOperationFailed(e) => BodyError::Failed {
                    code: wasi::http::types::http_error_code(&e),
                    detail: e.to_debug_string(),
                },
            });
        }
    }
    Ok(())
}

fn header_list(fields: &Fields) -> Vec<(String, String)> {
    fields
        .entries()
        .into_iter()
        .map(|(name, value)| (name, String::from_utf8_lossy(&value).into_owned()))
        .collect()
}

fn method_name(method: &Method) -> String {
    match method {
        Method::Get => "GET",
        Method::Head => "HEAD",
        Method::Post => "POST",
        Method::Put => "PUT",
        Method::Delete => "DELETE",
        Method::Connect => "CONNECT",
        Method::Options => "OPTIONS",
        Method::Trace => "TRACE",
        Method::Patch => "PATCH",
        Method::Other(other) => other,
    }
    .to_string()
}

fn to_method(method: &str) -> Method {
    match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "CONNECT" => Method::Connect,
        "OPTIONS" => Method::Options,
        "TRACE" => Method::Trace,
        "PATCH" => Method::Patch,
        other => Method::Other(other.to_string()),
    }
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
    fn values_in_and_out_of_the_http_handler() {
        let request = |path: &str, body: usize| services::Request {
            method: "POST".into(),
            path_with_query: path.into(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: vec![b'x'; body],
        };
        let seen = std::cell::RefCell::new(None);
        let echo = |req: Request| {
            *seen.borrow_mut() = Some(req.clone());
            Response::new(201, vec![("a".into(), "b".into())], req.body)
        };
        let out = serve_values(request("/users?limit=1", 2), echo);
        assert_eq!(out.status, 201);
        assert_eq!(out.body, b"xx");
        assert!(out.headers.contains(&("a".into(), "b".into())));
        let req = seen.take().unwrap();
        assert_eq!((req.method.as_str(), req.path.as_str()), ("POST", "/users"));
        assert_eq!(req.query.as_deref(), Some("limit=1"));
        assert_eq!(req.header("Content-Type"), Some("application/json"));

        let out = serve_values(request("/users", MAX_REQUEST_BODY_BYTES + 1), |_| {
            unreachable!("an oversized body never reaches the handler")
        });
        assert_eq!(out.status, 413);
    }

    #[test]
    fn urls_split_into_parts() {
        let (scheme, authority, pq) = split_url("http://user-service/users/1?x=1").unwrap();
        assert!(matches!(scheme, Scheme::Http));
        assert_eq!((authority, pq.as_str()), ("user-service", "/users/1?x=1"));
        let (_, authority, pq) = split_url("https://a:8080").unwrap();
        assert_eq!((authority, pq.as_str()), ("a:8080", "/"));
        let (_, _, pq) = split_url("http://a?q").unwrap();
        assert_eq!(pq, "/?q");
        assert!(split_url("ftp://a/").is_none());
        assert!(split_url("http:///x").is_none());
        assert!(split_url("user-service/users").is_none());
    }

    #[test]
    fn methods_round_trip() {
        for m in ["GET", "POST", "PATCH", "PURGE"] {
            assert_eq!(method_name(&to_method(m)), m);
        }
    }
}
