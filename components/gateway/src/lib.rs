//! gateway: the public entry point. Forwards `/api/...` and `/api/v1/...` to the services and
//! serves the dashboard, which combines users and products.

// The incoming handler is only exported for wasm (see `component`), so natively, where the unit
// tests run, the routing functions look unused.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

use serde::de::IgnoredAny;

use sdk::input;
use sdk::{OutboundRequest, Request, Response};

/// Public path prefix → (service, path prefix on that service).
const UPSTREAMS: [(&str, &str, &str); 10] = [
    ("/api/v1/users", "user-service", "/users"),
    ("/api/users", "user-service", "/users"),
    ("/api/v1/products", "product-service", "/products"),
    ("/api/products", "product-service", "/products"),
    ("/api/v1/orders", "order-service", "/orders"),
    ("/api/orders", "order-service", "/orders"),
    ("/api/v1/reviews", "reviews-service", "/reviews"),
    ("/api/reviews", "reviews-service", "/reviews"),
    ("/api/v1/ratings", "ratings-service", "/ratings"),
    ("/api/ratings", "ratings-service", "/ratings"),
];

/// Request headers passed on to the service; everything else stays at the gateway.
const FORWARDED_REQUEST_HEADERS: [&str; 3] = ["content-type", "accept", "x-request-id"];
/// Response headers passed back. `allow` goes with the upstream's 405s, which are otherwise
/// not actionable; `link` (the next page of a list) is rewritten to the public path.
const FORWARDED_RESPONSE_HEADERS: [&str; 3] = ["content-type", "allow", "link"];

const JSON: &str = "application/json";

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Dashboard,
    Forward { service: &'static str, path: String },
    NotFound,
}

sdk::http_service!(super::route);

fn route(req: Request) -> Response {
    match classify(&req.path) {
        Route::Dashboard if req.method == "GET" => dashboard(&req),
        Route::Dashboard => Response::method_not_allowed(&req.method, &["GET"]),
        Route::Forward { service, path } => forward(req, service, &path),
        Route::NotFound => Response::no_route(&req),
    }
}

fn classify(path: &str) -> Route {
    if matches!(
        input::segments(path).as_slice(),
        ["api", "dashboard"] | ["api", "v1", "dashboard"]
    ) {
        return Route::Dashboard;
    }
    for (prefix, service, target) in UPSTREAMS {
        if let Some(rest) = path.strip_prefix(prefix) {
            // Only whole segments: `/api/usersX` is not under `/api/users`.
            if rest.is_empty() || rest.starts_with('/') {
                return Route::Forward {
                    service,
                    path: format!("{target}{rest}"),
                };
            }
        }
    }
    Route::NotFound
}

fn forwarded_headers(headers: &[(String, String)]) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(name, _)| {
            FORWARDED_REQUEST_HEADERS
                .iter()
                .any(|h| name.eq_ignore_ascii_case(h))
        })
        .cloned()
        .collect()
}

fn forward(req: Request, service: &str, path: &str) -> Response {
    let url = match &req.query {
        Some(query) => format!("http://{service}{path}?{query}"),
        None => format!("http://{service}{path}"),
    };
    let headers = forwarded_headers(&req.headers);
    match sdk::fetch(&req.method, &url, headers, req.body) {
        Ok(upstream) => relay(upstream, path, &req.path),
        Err(e) => e.to_response(service),
    }
}

/// The upstream's answer as ours: status and body unchanged, only the headers that describe
/// them, with links to the upstream's `path` made links to our `public` one.
fn relay(upstream: Response, path: &str, public: &str) -> Response {
    let headers = upstream
        .headers
        .into_iter()
        .filter(|(name, _)| {
            FORWARDED_RESPONSE_HEADERS
                .iter()
                .any(|h| name.eq_ignore_ascii_case(h))
        })
        .map(|(name, value)| {
            let value = match value.strip_prefix(&format!("<{path}?")) {
                Some(rest) if name.eq_ignore_ascii_case("link") => format!("<{public}?{rest}"),
                _ => value,
            };
            (name, value)
        })
        .collect();
    Response::new(upstream.status, headers, upstream.body)
}

fn dashboard(req: &Request) -> Response {
    let mut headers = vec![("accept".to_string(), JSON.to_string())];
    headers.extend(
        req.header_values("x-request-id")
            .map(|v| ("x-request-id".to_string(), v.to_string())),
    );
    let get = |url: &str| OutboundRequest {
        headers: headers.clone(),
        ..OutboundRequest::get(url)
    };
    let results = sdk::fetch_all(vec![
        get("http://user-service/users"),
        get("http://product-service/products"),
    ]);
    let Ok([users, products]) = <[_; 2]>::try_from(results) else {
        return Response::internal("fetch_all returned the wrong number of results");
    };
    match (
        dashboard_part("user-service", users),
        dashboard_part("product-service", products),
    ) {
        (Ok(users), Ok(products)) => Response::json_bytes(200, dashboard_body(&users, &products)),
        (Err(response), _) | (_, Err(response)) => response,
    }
}

/// `{"users":…,"products":…}` around the upstream bodies as they came, so that the records
/// keep the field order the services gave them.
fn dashboard_body(users: &[u8], products: &[u8]) -> Vec<u8> {
    [
        &b"{\"users\":"[..],
        users,
        b",\"products\":",
        products,
        b"}",
    ]
    .concat()
}

/// A dashboard source's body, checked to be a JSON array. Any failure fails the dashboard
/// (it has no partial form) with an error naming the source: 504/503/502 for a timed-out,
/// unavailable or refused call like a forwarded request, 502 for a bad answer.
fn dashboard_part(
    service: &str,
    result: Result<Response, sdk::OutboundError>,
) -> Result<Vec<u8>, Response> {
    let bad_gateway = |why: String| Response::error(502, format!("{service}: {why}"));
    match result {
        Ok(r) if r.is_success() => match serde_json::from_slice::<Vec<IgnoredAny>>(&r.body) {
            Ok(_) => Ok(r.body),
            Err(e) => Err(bad_gateway(format!(
                "answered something other than a JSON array: {e}"
            ))),
        },
        Ok(r) => Err(bad_gateway(format!("answered {}", r.status))),
        Err(e) => Err(Response::error(e.status(), format!("{service}: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fwd(service: &'static str, path: &str) -> Route {
        Route::Forward {
            service,
            path: path.into(),
        }
    }

    #[test]
    fn prefixes_match_whole_segments() {
        assert_eq!(classify("/api/users"), fwd("user-service", "/users"));
        assert_eq!(classify("/api/users/"), fwd("user-service", "/users/"));
        assert_eq!(classify("/api/users/7"), fwd("user-service", "/users/7"));
        assert_eq!(classify("/api/v1/users/7"), fwd("user-service", "/users/7"));
        assert_eq!(
            classify("/api/products"),
            fwd("product-service", "/products")
        );
        assert_eq!(
            classify("/api/v1/products/2/"),
            fwd("product-service", "/products/2/")
        );
        assert_eq!(
            classify("/api/orders/101"),
            fwd("order-service", "/orders/101")
        );
        assert_eq!(classify("/api/v1/orders"), fwd("order-service", "/orders"));
        assert_eq!(classify("/api/reviews"), fwd("reviews-service", "/reviews"));
        assert_eq!(
            classify("/api/v1/ratings/2"),
            fwd("ratings-service", "/ratings/2")
        );

        for unknown in [
            "/",
            "/api",
            "/api/",
            "/api/v1",
            "/api/v1/",
            "/api/usersX",
            "/api/v1/usersX",
            "/api/users-admin",
            "/api/productsX/1",
            "/api/v2/users",
            "/API/users",
            "/users",
            "/api/dashboardX",
            "/api/dashboard/x",
            "/api//users",
        ] {
            assert_eq!(classify(unknown), Route::NotFound, "{unknown}");
        }
    }

    #[test]
    fn dashboard_paths() {
        for path in [
            "/api/dashboard",
            "/api/dashboard/",
            "/api/v1/dashboard",
            "/api/v1/dashboard/",
        ] {
            assert_eq!(classify(path), Route::Dashboard, "{path}");
        }
    }

    #[test]
    fn only_listed_headers_cross() {
        let h = |n: &str, v: &str| (n.to_string(), v.to_string());
        let incoming = vec![
            h("content-type", "application/json"),
            h("Accept", "*/*"),
            h("x-request-id", "abc"),
            h("authorization", "secret"),
            h("host", "localhost:3000"),
        ];
        assert_eq!(
            forwarded_headers(&incoming),
            vec![
                h("content-type", "application/json"),
                h("Accept", "*/*"),
                h("x-request-id", "abc")
            ]
        );

        let upstream = Response::new(
            405,
            vec![
                h("content-type", "application/json"),
                h("allow", "GET"),
                h("content-length", "9"),
                h("link", "</users?limit=2&cursor=k30>; rel=\"next\""),
            ],
            b"{\"a\":1}".to_vec(),
        );
        let relayed = relay(upstream, "/users", "/api/v1/users");
        assert_eq!(relayed.status, 405);
        assert_eq!(
            relayed.headers,
            vec![
                h("content-type", "application/json"),
                h("allow", "GET"),
                h("link", "</api/v1/users?limit=2&cursor=k30>; rel=\"next\""),
            ]
        );
        assert_eq!(relayed.body, b"{\"a\":1}");
    }

    #[test]
    fn dashboard_sources_fail_with_the_upstream_error() {
        let ok = Response::json_bytes(200, br#"[{"id":1}]"#.to_vec());
        let users = dashboard_part("user-service", Ok(ok)).unwrap();
        let body = dashboard_body(&users, b"[]");
        assert_eq!(body, br#"{"users":[{"id":1}],"products":[]}"#);
        let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(parsed["users"][0]["id"], 1);

        let not_array = Response::json_bytes(200, br#"{"id":1}"#.to_vec());
        assert_eq!(
            dashboard_part("user-service", Ok(not_array))
                .unwrap_err()
                .status,
            502
        );

        let not_ok = Response::error(503, "down");
        let err = dashboard_part("user-service", Ok(not_ok)).unwrap_err();
        assert_eq!(err.status, 502);
        assert!(err.json_body().unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("user-service"));

        let garbage = Response::new(200, vec![], b"<html>".to_vec());
        assert_eq!(
            dashboard_part("product-service", Ok(garbage))
                .unwrap_err()
                .status,
            502
        );

        let timeout =
            sdk::OutboundError::from_code(sdk::wasi::http::types::ErrorCode::ConnectionReadTimeout);
        assert_eq!(
            dashboard_part("product-service", Err(timeout))
                .unwrap_err()
                .status,
            504
        );
    }
}
