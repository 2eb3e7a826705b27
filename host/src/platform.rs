//! The shared host: engine, linked capabilities, services, state and messaging, wired together.

use crate::config::{Args, ServiceSpec};
use crate::invocation::Ctx;
use crate::messaging::kafka::{Kafka, KafkaConfig};
use crate::messaging::{embedded::Embedded, Backend, Outbox, RetryPolicy};
use crate::registry::{self, Service};
use crate::state::{CommitError, Db, Txn};
use crate::{admin, http, messaging, watch};
use anyhow::{Context as _, Result};
use hyper_util::server::graceful::GracefulShutdown;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use wasmtime::component::Linker;
use wasmtime::Engine;

pub struct Platform {
    pub engine: Engine,
    pub linker: Linker<Ctx>,
    pub db: Db,
    pub outbox: Outbox,
    pub backend: Arc<dyn Backend>,
    /// Set once every component is loaded; the admin listener runs before that.
    pub services: OnceLock<Vec<Arc<Service>>>,
    pub ready: AtomicBool,
    /// Last result of the messaging backend's health check.
    pub backend_up: AtomicBool,
    pub outbound_timeout: Duration,
    pub header_timeout: Duration,
    pub compile_cache: PathBuf,
    pub retry: RetryPolicy,
    /// Requests per instance (1 = a fresh instance per request).
    pub instance_reuse: u32,
    /// Idle instances kept per service when instances are reused.
    pub idle_max: usize,
}

impl Platform {
    pub fn services(&self) -> &[Arc<Service>] {
        self.services.get().map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn service(&self, name: &str) -> Option<&Arc<Service>> {
        self.services().iter().find(|s| &*s.name == name)
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Commits an invocation (on disk when this returns) and wakes the outbox drainer if it sent
    /// messages. `serialized` is held by re-runs after a conflict until their commit is done.
    pub async fn commit(
        &self,
        txn: Txn,
        serialized: Option<tokio::sync::OwnedMutexGuard<()>>,
    ) -> Result<(), CommitError> {
        let sent = !txn.outbox.is_empty();
        self.db.commit(txn).await?;
        drop(serialized);
        if sent {
            self.outbox.poke();
        }
        Ok(())
    }

    /// Applies a message handler's writes (visible at once, durable with a later durable
    /// commit): the consumer waits for the disk once per batch of records, before it commits
    /// their offsets (see `messaging::consumer`).
    pub async fn commit_handled(&self, txn: Txn) -> Result<(), CommitError> {
        let sent = !txn.outbox.is_empty();
        self.db.apply(txn).await?;
        if sent {
            self.outbox.poke();
        }
        Ok(())
    }

    /// The engine, state and messaging backend `args` ask for; no component loaded yet.
    pub async fn new(args: &Args, specs: &[ServiceSpec]) -> Result<Arc<Platform>> {
        let db = if args.in_memory {
            Db::in_memory()?
        } else {
            Db::open(&args.data_dir)?
        };
        let max_memory = specs
            .iter()
            .map(|s| s.limits.memory)
            .max()
            .unwrap_or(64 << 20);
        let engine = registry::engine(args.max_instances, max_memory)?;
        let linker = registry::linker(&engine)?;
        let backend: Arc<dyn Backend> = match &args.kafka_brokers {
            Some(brokers) => {
                let kafka = Kafka::new(KafkaConfig {
                    brokers: brokers.clone(),
                    partitions: args.kafka_partitions,
                    replication: args.kafka_replication,
                    fetch_wait: args.kafka_fetch_wait,
                    batch_messages: args.kafka_batch_messages,
                })?;
                let topics = Args::topics(specs);
                // A broker that is down at start-up must not stop the host: events wait in the
                // outbox, and topic creation is retried until it works.
                if let Err(e) = kafka.ensure_topics(&topics).await {
                    tracing::warn!(error = %format!("{e:#}"), "could not create Kafka topics yet; retrying in the background");
                    let kafka = Kafka::new(kafka.config().clone())?;
                    tokio::spawn(async move {
                        while let Err(e) = kafka.ensure_topics(&topics).await {
                            tracing::debug!(error = %format!("{e:#}"), "creating Kafka topics");
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        }
                    });
                }
                Arc::new(kafka)
            }
            None => Arc::new(Embedded::new(db.clone())),
        };
        tracing::info!(backend = %backend.describe(), "messaging backend");
        let platform = Arc::new(Platform {
            engine,
            linker,
            outbox: Outbox::new(db.clone()),
            db,
            backend,
            services: OnceLock::new(),
            ready: AtomicBool::new(false),
            backend_up: AtomicBool::new(true),
            outbound_timeout: args.outbound_timeout,
            header_timeout: args.header_timeout,
            compile_cache: args.compile_cache.clone(),
            retry: RetryPolicy {
                max_attempts: args.retry_max_attempts.max(1),
                base: args.retry_backoff,
                max: args.retry_backoff_max,
            },
            instance_reuse: args.instance_reuse,
            // Idle instances hold pool slots: leave at least half the slots for fresh ones.
            idle_max: (args.max_instances as usize / (2 * specs.len().max(1))).min(64),
        });
        Ok(platform)
    }

    /// Compiles (or takes from the cache) and pre-instantiates every service's component.
    pub async fn load_services(&self, specs: Vec<ServiceSpec>) -> Result<()> {
        let mut services = Vec::new();
        for spec in specs {
            let loaded = registry::load(&self.engine, &self.linker, &spec, &self.compile_cache)
                .await
                .with_context(|| format!("loading the {} component", spec.name))?;
            tracing::info!(
                service = spec.name,
                port = spec.port,
                path = %loaded.path.display(),
                sha256 = %loaded.sha256,
                "component loaded"
            );
            services.push(Arc::new(Service::new(spec, loaded)));
        }
        let _ = self.services.set(services);
        Ok(())
    }
}

/// Starts everything and serves until Ctrl-C or SIGTERM.
pub async fn run(args: Args) -> Result<()> {
    let mut specs = args.services()?;
    let platform = Platform::new(&args, &specs).await?;

    let admin_listener = TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("binding admin listener {}", args.admin_addr))?;
    tracing::info!(addr = %admin_listener.local_addr()?, "admin listening");
    tokio::spawn(admin::serve(admin_listener, platform.clone()));

    // Bind every port before the slow part so a port in use fails the start at once.
    let mut listeners = Vec::new();
    for spec in &mut specs {
        let addr = (args.bind_addr, spec.port);
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {} port {}", spec.name, spec.port))?;
        spec.port = listener.local_addr()?.port();
        listeners.push(listener);
    }
    platform.load_services(specs).await?;

    tokio::spawn(platform.outbox.clone().drain(platform.backend.clone()));
    tokio::spawn(watch_backend(platform.clone()));
    let (stop_consumers, stopping) = tokio::sync::watch::channel(false);
    let mut consumers = Vec::new();
    for service in platform.services() {
        for topic in &service.spec.subscribes {
            consumers.push(tokio::spawn(messaging::consumer::run(
                platform.clone(),
                service.clone(),
                topic.clone(),
                stopping.clone(),
            )));
        }
    }
    let connections = Arc::new(GracefulShutdown::new());
    let mut accepting = Vec::new();
    for (listener, service) in listeners.into_iter().zip(platform.services()) {
        accepting.push(tokio::spawn(http::serve(
            listener,
            platform.clone(),
            service.clone(),
            connections.clone(),
        )));
    }
    let _watcher = if args.watch {
        Some(watch::spawn(platform.clone(), &args.components_dir)?)
    } else {
        None
    };
    platform.ready.store(true, Ordering::Release);
    tracing::info!("ready");

    let mut signals = Signals::new()?;
    signals.next().await;
    tracing::info!(grace = ?args.shutdown_grace, "shutting down: no new connections; finishing in-flight work");
    platform.ready.store(false, Ordering::Release);
    for task in &accepting {
        task.abort();
    }
    for task in accepting {
        let _ = task.await;
    }
    let _ = stop_consumers.send(true);
    let drained = async {
        // Finishes the request in flight on each connection, then closes it.
        if let Some(connections) = Arc::into_inner(connections) {
            connections.shutdown().await;
        }
        // In-process calls and anything else still running hold a permit of their service.
        while platform
            .services()
            .iter()
            .any(|s| s.permits.available_permits() < s.spec.limits.concurrency)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for consumer in consumers {
            let _ = consumer.await;
        }
        // Give the outbox a chance to reach the broker; what stays waits on disk.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while platform.outbox.depth().unwrap_or(0) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        _ = drained => tracing::info!(outbox = platform.outbox.depth().unwrap_or(0), "stopped cleanly"),
        _ = tokio::time::sleep(args.shutdown_grace) => tracing::warn!("grace period over; stopping with work in flight (committed data is safe)"),
        _ = signals.next() => tracing::warn!("second signal: stopping now (committed data is safe)"),
    }
    Ok(())
}

/// Keeps `backend_up` current and says in the log when the backend goes away or comes back.
async fn watch_backend(platform: Arc<Platform>) {
    loop {
        let up = match platform.backend.health().await {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), "messaging backend health check failed");
                false
            }
        };
        let was = platform.backend_up.swap(up, Ordering::AcqRel);
        if was != up {
            let waiting = platform.outbox.depth().unwrap_or(0);
            if up {
                tracing::info!(backend = %platform.backend.describe(), waiting, "messaging backend reachable again");
            } else {
                tracing::warn!(backend = %platform.backend.describe(), waiting, "messaging backend unreachable; events wait in the outbox");
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// SIGTERM and Ctrl-C.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
