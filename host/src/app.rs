//! The composition root: reads the configuration, builds every part, spawns them, waits for signals.

use crate::config::{Args, ServiceSpec};
use crate::ingress;
use crate::messaging::embedded::{Embedded, Retention};
use crate::messaging::kafka::{Kafka, KafkaConfig};
use crate::messaging::{self, Backend};
use crate::ops::{admin, watch};
use crate::runtime::Runtime;
use crate::storage::Db;
use anyhow::{Context as _, Result};
use hyper_util::server::graceful::GracefulShutdown;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// The store, messaging backend and runtime `args` ask for; no component loaded yet.
pub async fn build(args: &Args, specs: &[ServiceSpec]) -> Result<Arc<Runtime>> {
    let db = if args.in_memory {
        Db::in_memory()?
    } else {
        Db::open(&args.data_dir)?
    };
    let backend: Arc<dyn Backend> = match &args.kafka_brokers {
        Some(brokers) => {
            let kafka = Kafka::new(KafkaConfig {
                brokers: brokers.clone(),
                partitions: args.kafka_partitions,
                replication: args.kafka_replication,
                fetch_wait: args.kafka_fetch_wait,
                batch_messages: args.kafka_batch_messages,
            })?;
            let topics = messaging::topics(specs);
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
        None => {
            let retention = Retention {
                age: args.log_retention,
                bytes: args.log_retention_bytes,
            };
            let log = Arc::new(Embedded::with_retention(db.clone(), retention));
            tokio::spawn(log.clone().retain(Duration::from_secs(30)));
            log
        }
    };
    tracing::info!(backend = %backend.describe(), "messaging backend");
    Runtime::new(args, specs, db, backend)
}

/// Starts everything and serves until Ctrl-C or SIGTERM.
pub async fn run(args: Args) -> Result<()> {
    let access = admin::Access::new(args.admin_addr, args.admin_token.clone())?;
    let mut specs = args.services()?;
    let runtime = build(&args, &specs).await?;

    let admin_listener = TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("binding admin listener {}", args.admin_addr))?;
    tracing::info!(addr = %admin_listener.local_addr()?, "admin listening");
    tokio::spawn(admin::serve(admin_listener, runtime.clone(), access));

    // Bind every port before the slow part so a port in use fails the start at once.
    let mut listeners = Vec::new();
    for spec in specs.iter_mut().filter(|s| s.serves_http) {
        let addr = (args.bind_addr, spec.port);
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {} port {}", spec.name, spec.port))?;
        spec.port = listener.local_addr()?.port();
        listeners.push((spec.name.clone(), listener));
    }
    runtime.load_services(specs).await?;

    tokio::spawn(runtime.outbox.clone().drain(runtime.backend.clone()));
    tokio::spawn(admin::watch_backend(runtime.clone()));
    let (stop_consumers, stopping) = tokio::sync::watch::channel(false);
    let mut consumers = Vec::new();
    for service in runtime.services() {
        for topic in &service.spec.subscribes {
            consumers.push(tokio::spawn(ingress::consumer::run(
                runtime.clone(),
                service.clone(),
                topic.clone(),
                stopping.clone(),
            )));
        }
    }
    let connections = Arc::new(GracefulShutdown::new());
    let body_budget = Arc::new(tokio::sync::Semaphore::new(
        usize::try_from(args.body_buffer)
            .unwrap_or(usize::MAX)
            .min(tokio::sync::Semaphore::MAX_PERMITS),
    ));
    let mut accepting = Vec::new();
    for (name, listener) in listeners {
        let service = runtime
            .service(&name)
            .context("a bound service is loaded")?;
        accepting.push(tokio::spawn(ingress::http::serve(
            listener,
            runtime.clone(),
            service.clone(),
            connections.clone(),
            body_budget.clone(),
        )));
    }
    let _watcher = if args.watch {
        Some(watch::spawn(runtime.clone(), &args.components_dir)?)
    } else {
        None
    };
    runtime.ready.store(true, Ordering::Release);
    tracing::info!("ready");

    let mut signals = Signals::new()?;
    signals.next().await;
    let first = tokio::time::Instant::now();
    tracing::info!(grace = ?args.shutdown_grace, "shutting down: no new connections; finishing in-flight work");
    runtime.ready.store(false, Ordering::Release);
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
        while runtime
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
        while runtime.outbox.depth().unwrap_or(0) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        _ = drained => tracing::info!(outbox = runtime.outbox.depth().unwrap_or(0), "stopped cleanly"),
        _ = tokio::time::sleep(args.shutdown_grace) => tracing::warn!("grace period over; stopping with work in flight (committed data is safe)"),
        _ = signals.next_after(first + SAME_REQUEST) => tracing::warn!("second signal: stopping now (committed data is safe)"),
    }
    Ok(())
}

/// SIGTERM and Ctrl-C.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

/// Signals this soon after the first are copies of it (`just run`, systemd and job control
/// forward a process group's signal), not a second request to stop at once.
const SAME_REQUEST: Duration = Duration::from_secs(1);

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

    /// The next signal at or after `from`; earlier ones are ignored.
    async fn next_after(&mut self, from: tokio::time::Instant) {
        loop {
            self.next().await;
            if tokio::time::Instant::now() >= from {
                return;
            }
            tracing::info!("another signal right after the first: still draining");
        }
    }
}
