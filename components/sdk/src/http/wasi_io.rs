//! Shared wasi:http plumbing: bodies over wasi streams, headers, methods and URLs.

use wasi::http::types::{ErrorCode, Fields, IncomingBody, Method, OutgoingBody, Scheme};
use wasi::io::streams::StreamError;

/// Why a body could not be read or written.
pub(super) enum BodyError {
    TooLarge,
    Failed {
        code: Option<ErrorCode>,
        detail: String,
    },
}

pub(super) fn read_body(body: IncomingBody, limit: Option<usize>) -> Result<Vec<u8>, BodyError> {
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

pub(super) fn write_all(body: &OutgoingBody, bytes: &[u8]) -> Result<(), BodyError> {
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

pub(super) fn header_list(fields: &Fields) -> Vec<(String, String)> {
    fields
        .entries()
        .into_iter()
        .map(|(name, value)| (name, String::from_utf8_lossy(&value).into_owned()))
        .collect()
}

pub(super) fn method_name(method: &Method) -> String {
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

pub(super) fn to_method(method: &str) -> Method {
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

/// `http://authority/path?query` → (scheme, authority, path-with-query). Only http and https
/// are meaningful to the host.
pub(super) fn split_url(url: &str) -> Option<(Scheme, &str, String)> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
