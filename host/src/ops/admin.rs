//! The admin listener (loopback by default): health, readiness, components, metrics, rollback,
//! dead letters, and the console page.

use super::{console, dead_letters};
use crate::metrics;
use crate::runtime::{RejectedFile, Runtime, VersionMoveError};
use crate::types::http::{full, json_response, write_limited};
use crate::types::{json_error, HttpResponse};
use http_body_util::{BodyExt as _, Limited};
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST, WWW_AUTHENTICATE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Who may use the admin API: anyone who can reach it, or holders of a bearer token.
#[derive(Clone)]
pub struct Access {
    token: Option<Arc<str>>,
    /// The listener's address: without a token, a request must name it (or a loopback name).
    addr: std::net::SocketAddr,
}

impl Access {
    /// `token` is `ADMIN_TOKEN`; without one the listener must be on loopback, where only this
    /// machine reaches it.
    pub fn new(addr: std::net::SocketAddr, token: Option<String>) -> anyhow::Result<Access> {
        let token = token.filter(|t| !t.is_empty());
        if token.is_none() && !addr.ip().is_loopback() {
            anyhow::bail!(
                "ADMIN_ADDR {addr} is reachable from other machines: set ADMIN_TOKEN (a bearer \
                 token every admin call but /healthz and /readyz must carry), or bind loopback"
            );
        }
        Ok(Access {
            token: token.map(Into::into),
            addr,
        })
    }

    /// Whether `host` (a `Host` header) names this listener: a loopback name or address, or
    /// the listener's own address. A page whose name was rebound to 127.0.0.1 sends its own
    /// name, and is refused.
    fn named_by(&self, host: &str) -> bool {
        let Ok(authority) = host.parse::<hyper::http::uri::Authority>() else {
            return false;
        };
        let name = authority.host();
        let name = name
            .strip_prefix('[')
            .and_then(|n| n.strip_suffix(']'))
            .unwrap_or(name);
        name.eq_ignore_ascii_case("localhost")
            || name
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback() || ip == self.addr.ip())
    }

    /// The refusal for a request that may not do what it asks, if any.
    fn check(&self, method: &Method, path: &str, headers: &HeaderMap) -> Option<HttpResponse> {
        // The probes, and the console's files (no data: the page sends the token itself).
        let probe = method == Method::GET
            && (matches!(path, "/healthz" | "/readyz") || console::is_asset(path));
        let bearer = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if let Some(token) = &self.token {
            let ok = bearer.is_some_and(|b| same(b.as_bytes(), token.as_bytes()));
            if !ok && !probe {
                let mut resp = json_error(
                    StatusCode::UNAUTHORIZED,
                    "admin calls need Authorization: Bearer <ADMIN_TOKEN>",
                );
                resp.headers_mut()
                    .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return Some(resp);
            }
            return None;
        }
        // No token (loopback only): a page the operator visits whose name an attacker rebound
        // to 127.0.0.1 is same-origin with this listener; it sends its own name as `Host`.
        let host = headers.get(HOST).map(|h| h.to_str().unwrap_or_default());
        if host.is_some_and(|h| !self.named_by(h)) {
            return Some(json_error(
                StatusCode::FORBIDDEN,
                "without ADMIN_TOKEN the admin API answers only requests to localhost or a loopback address (Host header)",
            ));
        }
        // A web page the operator visits can still make the browser send a form POST here. A form cannot set a JSON content type, and a script that sets
        // one needs a CORS preflight this listener never grants.
        let json_body = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if method == Method::POST && !json_body {
            return Some(json_error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "admin POSTs need Content-Type: application/json",
            ));
        }
        None
    }
}

/// Compares in time independent of where the inputs differ and of their lengths: the digests
/// compared are always 32 bytes.
fn same(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    let (a, b) = (Sha256::digest(a), Sha256::digest(b));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

pub async fn serve(listener: TcpListener, runtime: Arc<Runtime>, access: Access) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(listener = "admin", error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let runtime = runtime.clone();
        let access = access.clone();
        tokio::spawn(async move {
            let header_timeout = runtime.settings().header_timeout;
            let write_timeout = runtime.settings().write_timeout;
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let (runtime, access) = (runtime.clone(), access.clone());
                async move {
                    let (method, path) = (req.method().clone(), req.uri().path().to_string());
                    if let Some(refused) = access.check(&method, &path, req.headers()) {
                        return Ok::<_, Infallible>(refused);
                    }
                    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                        Ok(body) => body.to_bytes(),
                        Err(_) => {
                            let too_large = StatusCode::PAYLOAD_TOO_LARGE;
                            return Ok(json_error(too_large, "admin bodies are at most 64 KiB"));
                        }
                    };
                    Ok(route(&runtime, &method, &path, &body).await)
                }
            });
            // The service ports' cut-off for slow and idle clients holds here too.
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(write_limited(stream, write_timeout)), svc)
                .await;
        });
    }
}

/// Largest request body the admin listener reads.
const MAX_BODY: usize = 64 << 10;

fn json(status: StatusCode, value: Value) -> HttpResponse {
    json_response(status, &value)
}

async fn route(runtime: &Runtime, method: &Method, path: &str, body: &[u8]) -> HttpResponse {
    if let Some(asset) = (method == Method::GET)
        .then(|| console::asset(path))
        .flatten()
    {
        return asset;
    }
    if let Some(rest) = path.strip_prefix("/dead-letters/") {
        return match (dead_letters::subscribed(runtime, rest), method) {
            (None, _) => json_error(StatusCode::NOT_FOUND, "no service consumes that topic"),
            (Some((topic, false)), &Method::GET) => dead_letters::list(runtime, topic).await,
            (Some((topic, true)), &Method::POST) => {
                dead_letters::replay(runtime, topic, body).await
            }
            (Some((_, replay)), _) => {
                let allowed = if replay { "use POST" } else { "use GET" };
                json_error(StatusCode::METHOD_NOT_ALLOWED, allowed)
            }
        };
    }
    match (method, path) {
        (&Method::GET, "/healthz") => json(StatusCode::OK, json!({ "status": "ok" })),
        (&Method::GET, "/readyz") => {
            let health = runtime.health();
            let status = if health.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(
                status,
                json!({
                    "ready": health.ready,
                    "messaging": health.messaging,
                    "messaging_reachable": health.messaging_reachable,
                    "outbox_depth": health.outbox_depth,
                    "outbox_parked": health.outbox_parked,
                    "outbox_bytes": health.outbox_bytes,
                }),
            )
        }
        (&Method::GET, "/components") => json(StatusCode::OK, components(runtime)),
        (&Method::GET, "/stats") => json(StatusCode::OK, console::stats(runtime)),
        (&Method::GET, "/dead-letters") => json(StatusCode::OK, dead_letters::topics(runtime)),
        (&Method::GET, "/metrics") => {
            let (health, m) = (runtime.health(), metrics::get());
            m.outbox_depth.set(health.outbox_depth.unwrap_or(0) as i64);
            m.outbox_parked
                .set(health.outbox_parked.unwrap_or(0) as i64);
            m.outbox_bytes.set(health.outbox_bytes as i64);
            m.log_bytes.set(health.log_bytes.unwrap_or(0) as i64);
            let mut resp = hyper::Response::new(full(metrics::render()));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            resp
        }
        (method, path) if version_move(path).is_some() => {
            if method != Method::POST {
                return json_error(StatusCode::METHOD_NOT_ALLOWED, "use POST");
            }
            let (name, forward) = version_move(path).unwrap_or_default();
            move_version(runtime, name, forward)
        }
        (_, "/healthz" | "/readyz" | "/components" | "/metrics" | "/stats" | "/dead-letters") => {
            json_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => json_error(StatusCode::NOT_FOUND, "no such admin route"),
    }
}

/// The manifest (what it is, what became of its last change) and each service it runs.
fn components(runtime: &Runtime) -> Value {
    let services: Vec<Value> = runtime
        .services()
        .iter()
        .map(|s| {
            let loaded = s.loaded.load();
            let (back, forward) = s.history();
            let version = |v: &Arc<crate::runtime::component::Loaded>| {
                json!({ "sha256": v.sha256, "loaded_at": time(v.loaded_at) })
            };
            json!({
                "name": &*s.name,
                "port": s.spec.serves_http.then_some(s.spec.port),
                "path": loaded.path.display().to_string(),
                "sha256": loaded.sha256,
                "http": loaded.http.interface(),
                "loaded_at": time(loaded.loaded_at),
                "calls": s.spec.calls,
                "subscribes": s.spec.subscribes,
                "produces": s.spec.produces,
                "generation": s.generation(),
                "rollback_to": back.last().map(version),
                "history": back.iter().map(version).collect::<Vec<_>>(),
                "rollforward_to": forward.last().map(version),
                "last_rejected": s.rejected().map(|r| rejected(&r)),
            })
        })
        .collect();
    let manifest = runtime.manifest();
    json!({
        "manifest": {
            "path": manifest.path.display().to_string(),
            "sha256": manifest.sha256,
            "generation": manifest.generation,
            "applied_at": time(manifest.applied_at),
            "last_rejected": manifest.rejected.as_ref().map(rejected),
        },
        "services": services,
    })
}

fn time(at: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

fn rejected(r: &RejectedFile) -> Value {
    json!({ "sha256": r.sha256, "error": r.error, "at": time(r.at) })
}

/// `NAME` of `/components/NAME/rollback` or `/rollforward` (then `true`), if `path` is one
/// (`NAME` not empty).
fn version_move(path: &str) -> Option<(&str, bool)> {
    let rest = path.strip_prefix("/components/")?;
    let (name, forward) = match rest.strip_suffix("/rollback") {
        Some(name) => (name, false),
        None => (rest.strip_suffix("/rollforward")?, true),
    };
    (!name.is_empty()).then_some((name, forward))
}

fn move_version(runtime: &Runtime, name: &str, forward: bool) -> HttpResponse {
    let verb = if forward {
        "rolled forward"
    } else {
        "rolled back"
    };
    match runtime.move_version(name, forward) {
        Ok((generation, loaded)) => {
            metrics::get()
                .swaps
                .get_or_create(&metrics::labels([("service", name)]))
                .inc();
            tracing::info!(service = name, generation, sha256 = %loaded.sha256, "{verb}");
            json(
                StatusCode::OK,
                json!({ "name": name, "generation": generation, "sha256": loaded.sha256 }),
            )
        }
        Err(e @ VersionMoveError::NoService(_)) => {
            json_error(StatusCode::NOT_FOUND, &e.to_string())
        }
        Err(e) => json_error(StatusCode::CONFLICT, &e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Args;
    use clap::Parser;
    use http_body_util::BodyExt;
    use proptest::prelude::*;

    /// `route`'s answer, on a runtime of the tests'.
    fn answer(runtime: &Runtime, method: &Method, path: &str, body: &str) -> HttpResponse {
        static TOKIO: std::sync::LazyLock<tokio::runtime::Runtime> =
            std::sync::LazyLock::new(|| tokio::runtime::Runtime::new().unwrap());
        TOKIO.block_on(route(runtime, method, path, body.as_bytes()))
    }

    /// A runtime with no services, shared by every case.
    fn runtime() -> Arc<Runtime> {
        static RUNTIME: std::sync::LazyLock<Arc<Runtime>> = std::sync::LazyLock::new(|| {
            let args = Args::parse_from(["host", "--max-instances", "4"]);
            let runtime = Runtime::in_memory(&args);
            // A started host: `/readyz` answers 200, so every 4xx/5xx below is an error.
            runtime.set_ready(true);
            runtime
        });
        RUNTIME.clone()
    }

    fn body(resp: HttpResponse) -> Value {
        let bytes = futures_util::FutureExt::now_or_never(resp.into_body().collect())
            .expect("a full body")
            .unwrap()
            .to_bytes();
        serde_json::from_slice(&bytes).expect("a JSON body")
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (k.parse().unwrap(), v.parse().unwrap()))
            .collect()
    }

    #[test]
    fn without_a_token_only_loopback_and_only_json_posts() {
        let public: std::net::SocketAddr = "0.0.0.0:3999".parse().unwrap();
        let err = Access::new(public, None).err().unwrap().to_string();
        assert!(err.contains("ADMIN_TOKEN"), "{err}");
        assert!(Access::new(public, Some(String::new())).is_err());
        let open = Access::new("127.0.0.1:3999".parse().unwrap(), None).unwrap();
        let path = "/components/user/rollback";
        let form = headers(&[("content-type", "application/x-www-form-urlencoded")]);
        let refused = open.check(&Method::POST, path, &form).unwrap();
        assert_eq!(refused.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert!(body(refused)["error"].is_string());
        assert!(open.check(&Method::POST, path, &HeaderMap::new()).is_some());
        let json = headers(&[("content-type", "application/json")]);
        assert!(open.check(&Method::POST, path, &json).is_none());
        assert!(open
            .check(&Method::GET, "/components", &HeaderMap::new())
            .is_none());
        // A page whose name was rebound to 127.0.0.1 names itself, not this listener.
        for host in [
            "localhost:3999",
            "127.0.0.1:3999",
            "127.0.0.1",
            "[::1]:3999",
            "LOCALHOST",
        ] {
            let named = headers(&[("host", host), ("content-type", "application/json")]);
            assert!(open.check(&Method::POST, path, &named).is_none(), "{host}");
        }
        for host in [
            "rebind.attacker.example",
            "localhost.attacker.example:3999",
            "10.0.0.1:3999",
            "",
        ] {
            let named = headers(&[("host", host), ("content-type", "application/json")]);
            for (method, path) in [(Method::POST, path), (Method::GET, "/components")] {
                let refused = open.check(&method, path, &named).unwrap();
                assert_eq!(refused.status(), StatusCode::FORBIDDEN, "{host}");
            }
        }
    }

    #[test]
    fn tokens_compare_equal_only_when_equal_whatever_their_lengths() {
        assert!(same(b"s3cret", b"s3cret"));
        assert!(!same(b"s3cret", b"s3cre"));
        assert!(!same(b"s3cret", b"s3cret\0"));
        assert!(!same(b"", b"s"));
    }

    #[test]
    fn with_a_token_everything_but_the_probes_needs_it() {
        let access = Access::new("0.0.0.0:3999".parse().unwrap(), Some("s3cret".into())).unwrap();
        let none = HeaderMap::new();
        let good = headers(&[("authorization", "Bearer s3cret")]);
        let bad = headers(&[("authorization", "Bearer s3cres")]);
        for probe in ["/healthz", "/readyz"] {
            assert!(access.check(&Method::GET, probe, &none).is_none());
        }
        for (method, path) in [
            (Method::GET, "/components"),
            (Method::GET, "/metrics"),
            (Method::POST, "/components/user/rollback"),
        ] {
            let refused = access.check(&method, path, &bad).unwrap();
            assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
            assert_eq!(refused.headers()[WWW_AUTHENTICATE], "Bearer");
            assert!(access.check(&method, path, &none).is_some());
            // The token is enough: a script with it needs no JSON content type.
            assert!(access.check(&method, path, &good).is_none(), "{path}");
        }
    }

    #[test]
    fn rollback_paths_without_a_name_are_not_found_not_a_panic() {
        let runtime = runtime();
        for path in [
            "/components/rollback",
            "/components//rollback",
            "/components/",
        ] {
            let resp = answer(&runtime, &Method::POST, path, "{}");
            assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
            assert!(body(resp)["error"].is_string());
        }
        let resp = answer(&runtime, &Method::POST, "/components/nobody/rollback", "{}");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert!(body(resp)["error"].as_str().unwrap().contains("nobody"));
    }

    proptest! {
        #[test]
        fn any_method_and_path_gets_an_answer_and_errors_are_json(
            method in prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "PATCH", "BREW"]),
            prefix in prop::sample::select(vec!["", "/components", "/components/", "/healthz", "/metrics", "/readyz", "/dead-letters", "/dead-letters/", "/stats", "/console.js"]),
            rest in "[a-z/%.]{0,20}",
            suffix in prop::sample::select(vec!["", "/rollback", "rollback", "/", "/rollforward", "/replay"]),
        ) {
            let runtime = runtime();
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let resp = answer(&runtime, &method, &format!("{prefix}{rest}{suffix}"), "{\"all\": true}");
            if resp.status().is_client_error() || resp.status().is_server_error() {
                prop_assert!(body(resp)["error"].is_string());
            }
        }
    }
}
