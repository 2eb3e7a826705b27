//! HTTP requests and responses as plain values, independent of `wasi:http` resources.

use serde::Serialize;

/// An incoming request, fully read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Upper-case method name, e.g. `GET`.
    pub method: String,
    /// Path without the query string; always starts with `/`.
    pub path: String,
    /// Everything after the first `?`, if there was one.
    pub query: Option<String>,
    /// Header names as the host gave them (lower-case in practice); values decoded lossily.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// First value of a header, matched case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// Every value of a header, matched case-insensitively, in order.
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Path segments for route matching; see [`crate::input::segments`].
    pub fn segments(&self) -> Vec<&str> {
        crate::input::segments(&self.path)
    }
}

/// A response to send, or one received from another service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

pub const CONTENT_TYPE_JSON: &str = "application/json";

impl Response {
    pub fn new(status: u16, headers: Vec<(String, String)>, body: Vec<u8>) -> Self {
        Response {
            status,
            headers,
            body,
        }
    }

    /// `value` serialized as JSON. Takes `&serde_json::Value` as well as any `Serialize` type.
    pub fn json<T: Serialize + ?Sized>(status: u16, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Response::json_bytes(status, body),
            // Only possible for types that refuse to serialize (e.g. maps with non-string keys):
            // a bug on our side, so a 500 rather than a panic.
            Err(e) => Response::error(500, format!("could not serialize response: {e}")),
        }
    }

    /// A body that is already JSON, labelled as such.
    pub fn json_bytes(status: u16, body: Vec<u8>) -> Self {
        Response::new(
            status,
            vec![("content-type".into(), CONTENT_TYPE_JSON.into())],
            body,
        )
    }

    /// `{"error": message}` with the given status.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        let body = serde_json::json!({ "error": message.into() });
        // Serializing a `Value` holding only a string cannot fail.
        Response::json_bytes(status, serde_json::to_vec(&body).unwrap_or_default())
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Response::error(400, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Response::error(404, message)
    }

    /// 404 for a path no route matches.
    pub fn no_route(req: &Request) -> Self {
        Response::error(404, format!("no route for {} {}", req.method, req.path))
    }

    /// 405 with the `allow` header listing what the route does accept.
    pub fn method_not_allowed(method: &str, allowed: &[&str]) -> Self {
        let allow = allowed.join(", ");
        Response::error(
            405,
            format!("method {method} not allowed here; allowed: {allow}"),
        )
        .with_header("allow", allow)
    }

    /// 500 for failures that are ours (storage, messaging, corrupt records). The host rolls back
    /// the invocation's writes and messages when it sees a 5xx.
    pub fn internal(message: impl Into<String>) -> Self {
        Response::error(500, message)
    }

    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// First value of a header, matched case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body parsed as JSON, for responses from other services.
    pub fn json_body(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_is_json_object() {
        let r = Response::error(409, "taken \"x\"");
        assert_eq!(r.status, 409);
        assert_eq!(r.header("Content-Type"), Some("application/json"));
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v, serde_json::json!({"error": "taken \"x\""}));
    }

    #[test]
    fn method_not_allowed_has_allow_header() {
        let r = Response::method_not_allowed("DELETE", &["GET", "POST"]);
        assert_eq!(r.status, 405);
        assert_eq!(r.header("allow"), Some("GET, POST"));
    }

    #[test]
    fn json_serializes_values_and_structs() {
        #[derive(Serialize)]
        struct P {
            id: u64,
        }
        assert_eq!(Response::json(201, &P { id: 3 }).body, br#"{"id":3}"#);
        let v = serde_json::json!([1, 2]);
        assert_eq!(Response::json(200, &v).body, b"[1,2]");
    }
}
