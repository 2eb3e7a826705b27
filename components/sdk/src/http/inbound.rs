//! Answering the incoming request: read it, run the handler, send its response.

use wasi::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

use super::wasi_io::{header_list, method_name, read_body, write_all, BodyError};
use crate::{contract, services, Request, Response};

/// Largest request body a service reads. The host keeps values and messages under the same
/// limit, so nothing larger could be stored anyway; refusing early keeps memory bounded.
pub const MAX_REQUEST_BODY_BYTES: usize = contract::MAX_BODY;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
