//! The admin listener (loopback by default): health, readiness, components, metrics, rollback.

use crate::metrics;
use crate::runtime::Runtime;
use crate::types::{json_error, Resp};
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

pub async fn serve(listener: TcpListener, runtime: Arc<Runtime>) {
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
        tokio::spawn(async move {
            let header_timeout = runtime.settings.header_timeout;
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let resp = route(&runtime, req.method(), req.uri().path());
                async move { Ok::<_, Infallible>(resp) }
            });
            // The service ports' cut-off for slow and idle clients holds here too.
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn json(status: StatusCode, value: Value) -> Resp {
    let mut resp = hyper::Response::new(Full::new(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn route(runtime: &Runtime, method: &Method, path: &str) -> Resp {
    match (method, path) {
        (&Method::GET, "/healthz") => json(StatusCode::OK, json!({ "status": "ok" })),
        (&Method::GET, "/readyz") => {
            let ready = runtime.is_ready();
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(
                status,
                json!({
                    "ready": ready,
                    "messaging": runtime.backend.describe(),
                    "messaging_reachable": runtime.backend_up.load(Ordering::Acquire),
                    "outbox_depth": runtime.outbox.depth().ok(),
                    "outbox_parked": runtime.outbox.parked().ok(),
                }),
            )
        }
        (&Method::GET, "/components") => json(StatusCode::OK, components(runtime)),
        (&Method::GET, "/metrics") => {
            metrics::get()
                .outbox_depth
                .set(runtime.outbox.depth().unwrap_or(0) as i64);
            metrics::get()
                .outbox_parked
                .set(runtime.outbox.parked().unwrap_or(0) as i64);
            let mut resp = hyper::Response::new(Full::new(Bytes::from(metrics::render())));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            resp
        }
        (method, path) if rollback_target(path).is_some() => {
            if method != Method::POST {
                return json_error(StatusCode::METHOD_NOT_ALLOWED, "use POST");
            }
            rollback(runtime, rollback_target(path).unwrap_or_default())
        }
        (_, "/healthz" | "/readyz" | "/components" | "/metrics") => {
            json_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => json_error(StatusCode::NOT_FOUND, "no such admin route"),
    }
}

fn components(runtime: &Runtime) -> Value {
    let list: Vec<Value> = runtime
        .services()
        .iter()
        .map(|s| {
            let loaded = s.loaded.load();
            json!({
                "name": &*s.name,
                "port": s.spec.port,
                "path": loaded.path.display().to_string(),
                "sha256": loaded.sha256,
                "loaded_at": humantime::format_rfc3339_millis(loaded.loaded_at).to_string(),
                "calls": s.spec.calls,
                "subscribes": s.spec.subscribes,
                "produces": s.spec.produces,
                "generation": s.generation(),
                "last_rejected": s.rejected().map(|r| json!({
                    "sha256": r.sha256,
                    "error": r.error,
                    "at": humantime::format_rfc3339_millis(r.at).to_string(),
                })),
            })
        })
        .collect();
    Value::Array(list)
}

/// `NAME` of `/components/NAME/rollback`, if `path` is one (`NAME` not empty).
fn rollback_target(path: &str) -> Option<&str> {
    path.strip_prefix("/components/")?
        .strip_suffix("/rollback")
        .filter(|name| !name.is_empty())
}

fn rollback(runtime: &Runtime, name: &str) -> Resp {
    let Some(service) = runtime.service(name) else {
        return json_error(StatusCode::NOT_FOUND, &format!("no service named {name:?}"));
    };
    match service.rollback() {
        Some((generation, loaded)) => {
            metrics::get()
                .swaps
                .get_or_create(&metrics::labels([("service", name)]))
                .inc();
            tracing::info!(service = name, generation, sha256 = %loaded.sha256, "rolled back");
            json(
                StatusCode::OK,
                json!({ "name": name, "generation": generation, "sha256": loaded.sha256 }),
            )
        }
        None => json_error(
            StatusCode::CONFLICT,
            &format!("{name} has no previous version to roll back to"),
        ),
    }
}

/// Keeps `backend_up` (shown by `/readyz`) current and says in the log when the backend goes
/// away or comes back.
pub async fn watch_backend(runtime: Arc<Runtime>) {
    loop {
        let up = match runtime.backend.health().await {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), "messaging backend health check failed");
                false
            }
        };
        let was = runtime.backend_up.swap(up, Ordering::AcqRel);
        if was != up {
            let waiting = runtime.outbox.depth().unwrap_or(0);
            if up {
                tracing::info!(backend = %runtime.backend.describe(), waiting, "messaging backend reachable again");
            } else {
                tracing::warn!(backend = %runtime.backend.describe(), waiting, "messaging backend unreachable; events wait in the outbox");
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Args;
    use crate::messaging::embedded::Embedded;
    use crate::storage::Db;
    use clap::Parser;
    use http_body_util::BodyExt;
    use proptest::prelude::*;

    /// A runtime with no services, shared by every case.
    fn runtime() -> Arc<Runtime> {
        static RUNTIME: std::sync::LazyLock<Arc<Runtime>> = std::sync::LazyLock::new(|| {
            let db = Db::in_memory().unwrap();
            let args = Args::parse_from(["host", "--max-instances", "4"]);
            let runtime =
                Runtime::new(&args, &[], db.clone(), Arc::new(Embedded::new(db))).unwrap();
            // A started host: `/readyz` answers 200, so every 4xx/5xx below is an error.
            runtime.ready.store(true, Ordering::Release);
            runtime
        });
        RUNTIME.clone()
    }

    fn body(resp: Resp) -> Value {
        let bytes = futures_util::FutureExt::now_or_never(resp.into_body().collect())
            .expect("a full body")
            .unwrap()
            .to_bytes();
        serde_json::from_slice(&bytes).expect("a JSON body")
    }

    #[test]
    fn rollback_paths_without_a_name_are_not_found_not_a_panic() {
        let runtime = runtime();
        for path in [
            "/components/rollback",
            "/components//rollback",
            "/components/",
        ] {
            let resp = route(&runtime, &Method::POST, path);
            assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
            assert!(body(resp)["error"].is_string());
        }
        let resp = route(&runtime, &Method::POST, "/components/nobody/rollback");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert!(body(resp)["error"].as_str().unwrap().contains("nobody"));
    }

    proptest! {
        #[test]
        fn any_method_and_path_gets_an_answer_and_errors_are_json(
            method in prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "PATCH", "BREW"]),
            prefix in prop::sample::select(vec!["", "/components", "/components/", "/healthz", "/metrics", "/readyz"]),
            rest in "[a-z/%.]{0,20}",
            suffix in prop::sample::select(vec!["", "/rollback", "rollback", "/"]),
        ) {
            let runtime = runtime();
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let resp = route(&runtime, &method, &format!("{prefix}{rest}{suffix}"));
            if resp.status().is_client_error() || resp.status().is_server_error() {
                prop_assert!(body(resp)["error"].is_string());
            }
        }
    }
}
