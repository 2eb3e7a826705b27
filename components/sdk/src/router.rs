//! Routes a request to one function by method and path pattern: `/users/:id` matches
//! `/users/42` with `id` = `42`. A path some route matches with another method is answered
//! 405 with the `allow` header listing the methods that do match; a path no route matches,
//! 404. Errors are JSON, as every other error of the sdk.
//!
//! ```
//! use sdk::input::Outcome;
//! use sdk::router::{Params, Router};
//! use sdk::{Request, Response};
//!
//! fn route(req: Request) -> Response {
//!     Router::new(&req)
//!         .get("/users", |_, _| Ok(Response::json(200, &["ada"])))
//!         .get("/users/:id", user)
//!         .finish()
//! }
//!
//! fn user(_: &Request, params: &Params) -> Outcome {
//!     Ok(Response::json(200, &params.get("id")))
//! }
//!
//! let req = |method: &str, path: &str| Request {
//!     method: method.into(), path: path.into(), query: None, headers: vec![], body: vec![],
//! };
//! assert_eq!(route(req("GET", "/users/7")).body, br#""7""#);
//! let refused = route(req("DELETE", "/users"));
//! assert_eq!((refused.status, refused.header("allow")), (405, Some("GET")));
//! assert_eq!(route(req("GET", "/nope")).status, 404);
//! ```

use crate::input::{segments, Outcome};
use crate::{Request, Response};

/// What a route's function gets besides the request: the path's `:name` segments.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Params<'r> {
    pairs: Vec<(&'r str, &'r str)>,
}

impl<'r> Params<'r> {
    /// The path segment the pattern's `:name` matched; empty if the pattern has no such name.
    pub fn get(&self, name: &str) -> &'r str {
        self.pairs
            .iter()
            .find(|(n, _)| *n == name)
            .map_or("", |(_, v)| v)
    }
}

/// A function that answers one route.
pub type Handler = fn(&Request, &Params) -> Outcome;

/// Routes one request: the first route whose method and pattern match runs; see the module.
pub struct Router<'r> {
    req: &'r Request,
    segments: Vec<&'r str>,
    answer: Option<Response>,
    /// Methods of routes whose pattern matched the path.
    allowed: Vec<&'static str>,
}

impl<'r> Router<'r> {
    pub fn new(req: &'r Request) -> Router<'r> {
        Router {
            req,
            segments: segments(&req.path),
            answer: None,
            allowed: Vec::new(),
        }
    }

    pub fn get(self, pattern: &'static str, handler: Handler) -> Self {
        self.route("GET", pattern, handler)
    }

    pub fn post(self, pattern: &'static str, handler: Handler) -> Self {
        self.route("POST", pattern, handler)
    }

    pub fn put(self, pattern: &'static str, handler: Handler) -> Self {
        self.route("PUT", pattern, handler)
    }

    pub fn delete(self, pattern: &'static str, handler: Handler) -> Self {
        self.route("DELETE", pattern, handler)
    }

    /// Runs `handler` if the request is `method` on a path `pattern` matches and no route
    /// before answered it.
    pub fn route(mut self, method: &'static str, pattern: &'static str, handler: Handler) -> Self {
        if self.answer.is_some() {
            return self;
        }
        let Some(params) = matches(pattern, &self.segments) else {
            return self;
        };
        if self.req.method == method {
            self.answer = Some(handler(self.req, &params).unwrap_or_else(|r| r));
        } else if !self.allowed.contains(&method) {
            self.allowed.push(method);
        }
        self
    }

    /// The answer of the route that matched, else 405 (the path matched with other methods)
    /// or 404.
    pub fn finish(self) -> Response {
        match self.answer {
            Some(answer) => answer,
            None if !self.allowed.is_empty() => {
                Response::method_not_allowed(&self.req.method, &self.allowed)
            }
            None => Response::no_route(self.req),
        }
    }
}

/// The `:name` segments of `segments` if `pattern` matches them.
fn matches<'r>(pattern: &'static str, segments: &[&'r str]) -> Option<Params<'r>> {
    let parts = segments_of(pattern);
    if parts.len() != segments.len() {
        return None;
    }
    let mut params = Params::default();
    for (part, segment) in parts.iter().zip(segments) {
        match part.strip_prefix(':') {
            Some(name) => params.pairs.push((name, segment)),
            None if part == segment => {}
            None => return None,
        }
    }
    Some(params)
}

fn segments_of(pattern: &'static str) -> Vec<&'static str> {
    pattern.split('/').filter(|s| !s.is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            query: None,
            headers: vec![],
            body: vec![],
        }
    }

    fn named(_: &Request, p: &Params) -> Outcome {
        Ok(Response::json(200, &(p.get("a"), p.get("b"), p.get("c"))))
    }

    fn fails(_: &Request, _: &Params) -> Outcome {
        Err(Response::bad_request("no"))
    }

    fn route(req: &Request) -> Response {
        Router::new(req)
            .get("/x/:a/y/:b", named)
            .post("/x/:a/y/:b", fails)
            .get("/x/fixed/y/:b", fails)
            .delete("/", fails)
            .finish()
    }

    #[test]
    fn the_first_match_answers_and_params_are_named() {
        let r = route(&req("GET", "/x/fixed/y/2"));
        assert_eq!(r.body, br#"["fixed","2",""]"#);
        let r = route(&req("POST", "/x/1/y/2"));
        assert_eq!(r.status, 400);
        assert!(r.json_body().unwrap()["error"].is_string());
    }

    #[test]
    fn other_methods_get_405_with_allow_and_other_paths_404() {
        let r = route(&req("PUT", "/x/1/y/2/"));
        assert_eq!((r.status, r.header("allow")), (405, Some("GET, POST")));
        let r = route(&req("GET", "/"));
        assert_eq!((r.status, r.header("allow")), (405, Some("DELETE")));
        for path in ["/x/1/y", "/x/1/y/2/3", "/z/1/y/2", ""] {
            let r = route(&req("GET", path));
            assert_eq!(r.status, if path.is_empty() { 405 } else { 404 }, "{path}");
        }
    }
}
