//! The service ports: one listener per service with a port, opened and closed as the
//! manifest changes, each finishing its requests in flight when it closes.

use super::http::handle;
use crate::config::ServiceSpec;
use crate::metrics;
use crate::runtime::Runtime;
use crate::types::http::write_limited;
use crate::types::{json_error, HttpResponse};
use anyhow::{Context as _, Result};
use arc_swap::ArcSwap;
use futures_util::FutureExt as _;
use hyper::header::{HeaderValue, CONNECTION};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::StatusCode;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use platform_contract::SERVICE_SUFFIX;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// The service ports this host listens on, each with the connections it has open.
pub struct Ports {
    runtime: Arc<Runtime>,
    bind_addr: IpAddr,
    /// Request-body bytes all ports together may hold (`BODY_BUFFER`).
    budget: Arc<Semaphore>,
    open: HashMap<Arc<str>, Port>,
}

struct Port {
    port: u16,
    /// The service its requests go to: a port can move from one service to another (a renamed
    /// service keeping its port, two services swapping theirs) without closing.
    service: Arc<ArcSwap<String>>,
    accepting: JoinHandle<()>,
    connections: Arc<GracefulShutdown>,
}

/// Ports bound for a change of services, not accepting yet, and open ports that move to
/// another service with it: (from, to).
pub struct Bound {
    bound: Vec<(Arc<str>, TcpListener)>,
    moved: Vec<(Arc<str>, Arc<str>)>,
}

impl Ports {
    pub fn new(runtime: Arc<Runtime>, bind_addr: IpAddr, body_buffer: u64) -> Ports {
        let budget = usize::try_from(body_buffer)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Ports {
            runtime,
            bind_addr,
            budget: Arc::new(Semaphore::new(budget)),
            open: HashMap::new(),
        }
    }

    /// Binds the ports of `specs` that are not open yet (a new service, a changed port) and
    /// writes the bound port into each spec. A service that keeps its port, or asks for any
    /// port (`0`) and has one, keeps its listener.
    ///
    /// A port open for a service that gives it up (removed, or moved to another port) goes to
    /// the service that asks for it, open as it is: it is never closed and bound again.
    pub async fn bind(&self, specs: &mut [ServiceSpec]) -> Result<Bound> {
        let mut bound = Vec::new();
        let mut moved = Vec::new();
        // The services that keep the port they have open.
        let keeps = |name: &str, port: u16| {
            specs
                .iter()
                .any(|s| s.serves_http && &*s.name == name && (s.port == 0 || s.port == port))
        };
        let given_up: HashMap<u16, Arc<str>> = self
            .open
            .iter()
            .filter(|(name, open)| !keeps(name, open.port))
            .map(|(name, open)| (open.port, name.clone()))
            .collect();
        for spec in specs.iter_mut().filter(|s| s.serves_http) {
            if let Some(open) = self.open.get(&spec.name) {
                if spec.port == 0 || spec.port == open.port {
                    spec.port = open.port;
                    continue;
                }
            }
            if let Some(from) = given_up.get(&spec.port).filter(|_| spec.port != 0) {
                moved.push((from.clone(), spec.name.clone()));
                continue;
            }
            let listener = listen(SocketAddr::new(self.bind_addr, spec.port))
                .with_context(|| format!("binding {} port {}", spec.name, spec.port))?;
            spec.port = listener.local_addr()?.port();
            bound.push((spec.name.clone(), listener));
        }
        Ok(Bound { bound, moved })
    }

    /// Starts accepting on `bound`; then stops accepting on the ports no service of `specs`
    /// has any more (a removed service, a changed port), whose requests in flight finish in
    /// the background before their connections close.
    pub fn apply(&mut self, bound: Bound, specs: &[ServiceSpec]) {
        let moving: Vec<(Port, Arc<str>)> = bound
            .moved
            .into_iter()
            .filter_map(|(from, to)| Some((self.open.remove(&from)?, to)))
            .collect();
        for (port, to) in moving {
            tracing::info!(service = %to, port = port.port, from = %port.service.load(), "port moved");
            port.service.store(Arc::new(to.to_string()));
            if let Some(old) = self.open.insert(to, port) {
                tokio::spawn(old.close());
            }
        }
        for (name, listener) in bound.bound {
            let port = listener.local_addr().map_or(0, |a| a.port());
            let connections = Arc::new(GracefulShutdown::new());
            let service = Arc::new(ArcSwap::from_pointee(name.to_string()));
            let accepting = tokio::spawn(serve(
                listener,
                self.runtime.clone(),
                service.clone(),
                connections.clone(),
                self.budget.clone(),
            ));
            let new = Port {
                port,
                service,
                accepting,
                connections,
            };
            if let Some(old) = self.open.insert(name, new) {
                tokio::spawn(old.close());
            }
        }
        let keep = |name: &Arc<str>, port: &Port| {
            specs
                .iter()
                .any(|s| s.serves_http && s.name == *name && s.port == port.port)
        };
        let gone: Vec<Arc<str>> = self
            .open
            .iter()
            .filter(|(name, port)| !keep(name, port))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            if let Some(old) = self.open.remove(&name) {
                tracing::info!(service = %name, port = old.port, "port closed");
                tokio::spawn(old.close());
            }
        }
    }

    /// Stops accepting on every port at once; the returned future finishes the requests in
    /// flight and closes the connections.
    pub fn close(self) -> impl std::future::Future<Output = ()> {
        let closing: Vec<_> = self.open.into_values().map(Port::close).collect();
        futures_util::future::join_all(closing).map(|_| ())
    }
}

impl Port {
    /// Stops accepting now (the listener is closed, so new connections are refused); the
    /// future finishes the requests in flight and closes the connections.
    fn close(self) -> impl std::future::Future<Output = ()> {
        self.accepting.abort();
        async move {
            let _ = self.accepting.await;
            if let Some(connections) = Arc::into_inner(self.connections) {
                connections.shutdown().await;
            }
        }
    }
}

/// Connections the kernel may hold for a port before the host accepts them (it caps this at
/// `net.core.somaxconn`, 4096 on current Linux): a burst of clients waits there instead of
/// having its connection attempts dropped and retried a second later.
const LISTEN_BACKLOG: u32 = 65_535;

/// A listener on `addr` with a backlog of [`LISTEN_BACKLOG`].
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Accepts connections on `service`'s port until aborted; `connections` lets shutdown finish
/// their in-flight requests and close them. At most `MAX_CONNECTIONS` are open at once: beyond
/// that, new ones wait in the kernel's backlog until one closes. Each request goes to the
/// service's settings and component current when it arrives.
async fn serve(
    listener: TcpListener,
    runtime: Arc<Runtime>,
    service: Arc<ArcSwap<String>>,
    connections: Arc<GracefulShutdown>,
    budget: Arc<Semaphore>,
) {
    let open = Arc::new(tokio::sync::Semaphore::new(
        runtime.settings().max_connections,
    ));
    loop {
        let Ok(slot) = open.clone().acquire_owned().await else {
            return;
        };
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(service = %service.load(), error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (runtime, service, budget) = (runtime.clone(), service.clone(), budget.clone());
        let watcher = connections.watcher();
        let header_timeout = runtime.settings().header_timeout;
        let write_timeout = runtime.settings().write_timeout;
        metrics::get().connections.inc();
        tokio::spawn(async move {
            let _open = OpenConnection { _slot: slot };
            let svc = service_fn(move |req| {
                let (runtime, service, budget) = (runtime.clone(), service.clone(), budget.clone());
                async move {
                    let name = service.load_full();
                    let resp = match runtime.service(&name) {
                        Some(service) => handle(&runtime, &service, &budget, req).await,
                        // Removed by a manifest change; its port is closing.
                        None => gone(&name),
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                // Also bounds how long an idle keep-alive connection waits for its next request.
                .header_read_timeout(header_timeout)
                .max_headers(100)
                .max_buf_size(super::http::MAX_HEAD)
                .serve_connection(TokioIo::new(write_limited(stream, write_timeout)), svc);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
}

/// A connection's place among the port's `MAX_CONNECTIONS`, counted in
/// `host_open_connections` until dropped.
struct OpenConnection {
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::get().connections.dec();
    }
}

fn gone(service: &str) -> HttpResponse {
    let mut resp = json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("{service}{SERVICE_SUFFIX} is no longer in the manifest"),
    );
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    resp
}
