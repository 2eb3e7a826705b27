//! The composition root: reads the configuration, builds every part, spawns them, waits for signals.

use crate::config::{Args, ManifestError, ServiceSpec};
use crate::ingress::{consumer, ports};
use crate::messaging::embedded::{Embedded, Retention};
use crate::messaging::kafka::{Kafka, KafkaConfig};
use crate::messaging::{self, Backend};
use crate::ops::{admin, watch};
use crate::runtime::{RejectedFile, Runtime};
use crate::storage::{PostgresStore, RedbStore, StateStore};
use anyhow::{Context as _, Result};
use futures_util::future::BoxFuture;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// The store, messaging backend and runtime `args` ask for; no component loaded yet.
pub async fn build(args: &Args, specs: &[ServiceSpec]) -> Result<Arc<Runtime>> {
    let db = if args.in_memory {
        RedbStore::in_memory()?
    } else {
        RedbStore::open(&args.data_dir)?
    };
    let state: Arc<dyn StateStore> = match &args.state_url {
        None => Arc::new(db.clone()),
        Some(url) => {
            // A quarter of the request's deadline: a request that calls services that call
            // services still answers the store's 503 itself, before its caller's deadline.
            let lock_wait = args.request_timeout / 4;
            let connections = args.state_connections.into();
            let ca_file = args.state_ca_file.as_deref();
            let pg = PostgresStore::connect(url, lock_wait, ca_file, connections).await?;
            tracing::info!(store = %pg.describe(), "state, sequences and the outbox in PostgreSQL");
            Arc::new(pg)
        }
    };
    if args.state_url.is_some() && args.kafka_brokers.is_none() {
        tracing::warn!(
            "STATE_URL without KAFKA_BROKERS: state is shared, but the embedded message log is \
             this host's own; hosts sharing state should share a Kafka too"
        );
    }
    let backend: Arc<dyn Backend> = match &args.kafka_brokers {
        Some(brokers) => Arc::new(Kafka::new(KafkaConfig {
            brokers: brokers.clone(),
            partitions: args.kafka_partitions,
            replication: args.kafka_replication,
            fetch_wait: args.kafka_fetch_wait,
            batch_messages: args.kafka_batch_messages,
        })?),
        None => {
            let retention = Retention {
                age: args.log_retention,
                bytes: args.log_retention_bytes,
            };
            let log = Arc::new(Embedded::with_retention(db.clone(), retention));
            // Often enough that a record outlives LOG_RETENTION by at most half of it.
            let every =
                (args.log_retention / 2).clamp(Duration::from_millis(100), Duration::from_secs(30));
            tokio::spawn(log.clone().retain(every));
            log
        }
    };
    tracing::info!(backend = %backend.describe(), "messaging backend");
    Runtime::new(args, specs, state, backend)
}

/// Starts everything and serves until Ctrl-C or SIGTERM.
pub async fn run(args: Args) -> Result<()> {
    let access = admin::Access::new(args.admin_addr, args.admin_token.clone())?;
    let text = std::fs::read(&args.manifest)
        .map_err(|e| ManifestError(format!("{}: {e}", args.manifest.display())))?;
    let specs = args.services_in(&text)?;
    let runtime = build(&args, &specs).await?;

    let admin_listener = TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("binding admin listener {}", args.admin_addr))?;
    tracing::info!(addr = %admin_listener.local_addr()?, "admin listening");
    tokio::spawn(admin::serve(admin_listener, runtime.clone(), access));

    let deployment = Arc::new(Deployment {
        running: tokio::sync::Mutex::new(Some(Serving {
            ports: ports::Ports::new(runtime.clone(), args.bind_addr, args.body_buffer),
            consumers: consumer::Consumers::new(runtime.clone()),
        })),
        runtime: runtime.clone(),
        args: args.clone(),
    });
    // At start-up a component that does not load is a mistake in the manifest: exit 2.
    deployment.apply(&text, specs).await.map_err(|e| match e {
        NotApplied::Manifest(e) => anyhow::Error::from(e),
        NotApplied::Other(e) => e,
    })?;

    tokio::spawn(runtime.drain_outbox());
    tokio::spawn(runtime.watch_backend());
    let watcher = if args.watch {
        let hooks: Arc<dyn watch::ManifestHooks> = deployment.clone();
        Some(watch::spawn(
            runtime.clone(),
            &args.components_dir,
            &args.manifest,
            hooks,
        )?)
    } else {
        None
    };
    runtime.set_ready(true);
    tracing::info!("ready");

    let mut signals = Signals::new()?;
    signals.next().await;
    let first = tokio::time::Instant::now();
    tracing::info!(grace = ?args.shutdown_grace, "shutting down: no new connections; finishing in-flight work");
    runtime.set_ready(false);
    drop(watcher);
    let running = deployment.running.lock().await.take();
    let Serving { ports, consumers } = running.context("started")?;
    // Both stop at once: no new connection is accepted and no new record is taken from here.
    let (connections, consumers) = (ports.close(), consumers.stop());
    let drained = async {
        // Finishes the request in flight on each connection, then closes it.
        connections.await;
        // In-process calls and anything else still running hold a permit of their service.
        while runtime
            .services()
            .iter()
            .any(|s| s.admission.in_flight() > 0)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        consumers.await;
        // Give the outbox a chance to reach the broker; what stays waits on disk.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while runtime.outbox_depth() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        _ = drained => tracing::info!(outbox = runtime.outbox_depth(), "stopped cleanly"),
        _ = tokio::time::sleep(args.shutdown_grace) => tracing::warn!("grace period over; stopping with work in flight (committed data is safe)"),
        _ = signals.next_after(first + SAME_REQUEST) => tracing::warn!("second signal: stopping now (committed data is safe)"),
    }
    Ok(())
}

/// The services as the manifest declares them, and the ports and consumers that serve them;
/// applies the manifest at start-up and each valid change of it.
struct Deployment {
    args: Args,
    runtime: Arc<Runtime>,
    /// `None` once shutting down.
    running: tokio::sync::Mutex<Option<Serving>>,
}

struct Serving {
    ports: ports::Ports,
    consumers: consumer::Consumers,
}

/// Why a manifest was not applied.
#[derive(Debug, thiserror::Error)]
enum NotApplied {
    /// It is not a valid manifest.
    #[error("{0}")]
    Manifest(ManifestError),
    /// It is, but a port could not be bound or a component not loaded.
    #[error("{0:#}")]
    Other(anyhow::Error),
}

impl Deployment {
    /// Makes `specs` (parsed from `text`) the running services: binds the ports they add or
    /// move first, then loads the components they add or change, then installs them, starts
    /// accepting and consuming for them, and stops what they removed. Any failure before the
    /// install leaves the running services as they were.
    async fn apply(&self, text: &[u8], mut specs: Vec<ServiceSpec>) -> Result<(), NotApplied> {
        let mut running = self.running.lock().await;
        let Some(running) = running.as_mut() else {
            return Ok(());
        };
        let bound = running
            .ports
            .bind(&mut specs)
            .await
            .map_err(NotApplied::Other)?;
        let services = self
            .runtime
            .prepare(specs.clone())
            .await
            .map_err(|e| NotApplied::Manifest(ManifestError(e.to_string())))?;
        let before: Vec<Arc<ServiceSpec>> = self
            .runtime
            .services()
            .iter()
            .map(|s| s.spec.clone())
            .collect();
        ensure_topics(self.runtime.backend().clone(), messaging::topics(&specs)).await;
        self.runtime.install(services);
        running.ports.apply(bound, &specs);
        running.consumers.apply(&specs);
        let sha256 = hex::encode(Sha256::digest(text));
        let generation = self.runtime.manifest_applied(sha256.clone());
        if generation > 1 {
            let name = |s: &ServiceSpec| s.name.to_string();
            let added: Vec<String> = specs
                .iter()
                .filter(|s| !before.iter().any(|b| b.name == s.name))
                .map(name)
                .collect();
            let removed: Vec<String> = before
                .iter()
                .filter(|b| !specs.iter().any(|s| s.name == b.name))
                .map(|b| name(b))
                .collect();
            let changed: Vec<String> = specs
                .iter()
                .filter(|s| before.iter().any(|b| b.name == s.name && **b != **s))
                .map(name)
                .collect();
            tracing::info!(
                generation,
                sha256,
                ?added,
                ?removed,
                ?changed,
                "manifest applied"
            );
            if !added.is_empty() && !removed.is_empty() {
                tracing::warn!(
                    ?added,
                    ?removed,
                    "services added and removed together: state, ids and consumer offsets belong \
                     to a service's name, so a renamed service starts with none (the removed \
                     name's state stays, for that name)"
                );
            }
        }
        Ok(())
    }

    /// The manifest file's text and its sha256, unless it is the one applied.
    async fn changed(&self) -> Option<Result<(Vec<u8>, String), NotApplied>> {
        let path = &self.args.manifest;
        let text = match tokio::fs::read(path).await {
            Ok(text) => text,
            Err(e) => {
                let e = ManifestError(format!("{}: {e}", path.display()));
                return Some(Err(NotApplied::Manifest(e)));
            }
        };
        let sha256 = hex::encode(Sha256::digest(&text));
        (sha256 != self.runtime.manifest().sha256).then_some(Ok((text, sha256)))
    }
}

impl watch::ManifestHooks for Deployment {
    fn reload(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let (sha256, refused) = match self.changed().await {
                None => return,
                Some(Err(refused)) => (String::new(), refused),
                Some(Ok((text, sha256))) => {
                    let applied = match self.args.services_in(&text) {
                        Ok(specs) => self.apply(&text, specs).await,
                        Err(e) => Err(NotApplied::Manifest(e)),
                    };
                    match applied {
                        Ok(()) => return,
                        Err(refused) => (sha256, refused),
                    }
                }
            };
            let error = refused.to_string();
            tracing::warn!(
                error,
                "manifest change refused; the running services keep serving"
            );
            self.runtime.manifest_rejected(RejectedFile {
                sha256,
                error,
                at: std::time::SystemTime::now(),
            });
        })
    }
}

/// Creates the topics the services use; a broker that is down must not stop the host or a
/// manifest change: events wait in the outbox, and creation is retried until it works.
async fn ensure_topics(backend: Arc<dyn Backend>, topics: Vec<String>) {
    if let Err(e) = backend.create_topics(&topics).await {
        tracing::warn!(error = %format!("{e:#}"), "could not create topics yet; retrying in the background");
        tokio::spawn(async move {
            while let Err(e) = backend.create_topics(&topics).await {
                tracing::debug!(error = %format!("{e:#}"), "creating topics");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
    }
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
