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
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

pub async fn serve(listener: TcpListener, runtime: Arc<Runtime>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let runtime = runtime.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let resp = route(&runtime, req.method(), req.uri().path());
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = http1::Builder::new()
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
                }),
            )
        }
        (&Method::GET, "/components") => json(StatusCode::OK, components(runtime)),
        (&Method::GET, "/metrics") => {
            metrics::get()
                .outbox_depth
                .set(runtime.outbox.depth().unwrap_or(0) as i64);
            let mut resp = hyper::Response::new(Full::new(Bytes::from(metrics::render())));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            resp
        }
        (method, path) if path.starts_with("/components/") && path.ends_with("/rollback") => {
            let name = &path["/components/".len()..path.len() - "/rollback".len()];
            if method != Method::POST {
                return json_error(StatusCode::METHOD_NOT_ALLOWED, "use POST");
            }
            rollback(runtime, name)
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
