//! Command-line and environment configuration, and the table of services the host runs.

pub mod manifest;
mod origin;
mod units;

pub use origin::{origin_allowed, AllowedOrigin};

pub use manifest::ManifestError;
use units::parse_size;

use clap::Parser;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Runs the services of a manifest (`services.toml`) as WebAssembly components in one process.
#[derive(Parser, Debug, Clone)]
#[command(name = "host", version)]
pub struct Args {
    /// The manifest: which services run, from which component, on which port, with which
    /// permissions and limits (see docs/manifest.md).
    #[arg(
        help_heading = "Services",
        long,
        env = "MANIFEST",
        default_value = "services.toml"
    )]
    pub manifest: PathBuf,

    /// Overrides a service's port, as NAME=PORT (repeatable; env PORTS=NAME=PORT,...). 0 = any
    /// free port. For tests, and for two hosts side by side.
    #[arg(help_heading = "Services", long = "port", env = "PORTS", value_delimiter = ',', value_parser = manifest::parse_port)]
    pub ports: Vec<(String, u16)>,

    /// Directory the manifest's component files are relative to.
    #[arg(
        help_heading = "Services",
        long,
        env = "COMPONENTS_DIR",
        default_value = "build/components"
    )]
    pub components_dir: PathBuf,

    /// Address the service ports bind to.
    #[arg(
        help_heading = "Services",
        long,
        env = "BIND_ADDR",
        default_value = "127.0.0.1"
    )]
    pub bind_addr: IpAddr,

    /// Swap a service's component when its file in the components dir changes, and apply a
    /// changed manifest.
    #[arg(help_heading = "Services", long, env = "WATCH_COMPONENTS", default_value_t = true, action = clap::ArgAction::Set)]
    pub watch: bool,

    /// Address of the admin listener (/healthz, /readyz, /components, /metrics, rollback).
    /// Anything but loopback needs ADMIN_TOKEN.
    #[arg(
        help_heading = "Admin",
        long,
        env = "ADMIN_ADDR",
        default_value = "127.0.0.1:3999"
    )]
    pub admin_addr: SocketAddr,

    /// Bearer token every admin call but GET /healthz, /readyz and the console's files must carry
    /// (`Authorization: Bearer TOKEN`). Required when ADMIN_ADDR is not loopback.
    #[arg(
        help_heading = "Admin",
        long,
        env = "ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,

    /// Base URL of an OTLP/HTTP receiver (`http://localhost:4318`): spans are exported to
    /// its /v1/traces. Without it (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) no span is made.
    /// The other standard OTEL_* variables apply (OTEL_SERVICE_NAME, headers, batching).
    #[arg(help_heading = "Telemetry", long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Directory of the durable state: the services' state, id sequences, outbox and embedded
    /// message log.
    #[arg(help_heading = "State", long, env = "DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,

    /// Keep all state in memory instead of DATA_DIR (lost at exit; for tests and demos).
    #[arg(help_heading = "State", long, env = "STATE_IN_MEMORY")]
    pub in_memory: bool,

    /// PostgreSQL URL (`postgres://user:password@host:port/db`) for state, id sequences and
    /// the outbox, shared by every host given the same one. Without it, state is in DATA_DIR.
    /// TLS follows the URL's `sslmode`: `prefer` (the default: TLS when the server offers it),
    /// `require`, or `disable`. Servers are verified against the public web's authorities
    /// (Mozilla's list) and those of STATE_CA_FILE.
    #[arg(
        help_heading = "State",
        long,
        env = "STATE_URL",
        hide_env_values = true
    )]
    pub state_url: Option<String>,

    /// PEM file of certificate authorities to trust for STATE_URL's TLS, besides the public
    /// ones (a managed PostgreSQL's CA bundle, or your own).
    #[arg(help_heading = "State", long, env = "STATE_CA_FILE")]
    pub state_ca_file: Option<PathBuf>,

    /// Connections this host keeps open to STATE_URL for invocations' reads, commits and ids
    /// (the outbox relay has one more). More connections than the server has cores make it
    /// switch between backends rather than work: on two cores, 8 served `POST /api/users`
    /// faster than 32 with less of the server's CPU (see BENCHMARKS.md).
    #[arg(help_heading = "State", long, env = "STATE_CONNECTIONS", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    pub state_connections: u16,

    /// Bytes of events the outbox may hold while the messaging backend does not take them;
    /// beyond it requests that would send an event get 503 (a message handler is retried).
    #[arg(help_heading = "State", long, env = "OUTBOX_MAX", default_value = "1GiB", value_parser = parse_size)]
    pub outbox_max: u64,

    /// Requests one component instance serves before it is thrown away. Above 1 (the default is
    /// 1000) an idle instance is handed the next request of its service: faster, but guest
    /// memory (globals, freed heap) carries over between that service's requests; see
    /// docs/instance-reuse.md. 1 gives every request a fresh instance: nothing in guest memory
    /// survives it.
    #[arg(help_heading = "Instances", long, env = "INSTANCE_REUSE", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub instance_reuse: u32,

    /// Component instances that may exist at once (pooling allocator slots).
    #[arg(
        help_heading = "Instances",
        long,
        env = "MAX_INSTANCES",
        default_value_t = 512
    )]
    pub max_instances: u32,

    /// Largest linear memory one instance may have (e.g. 64MiB); growing past it fails that
    /// request with 500. A service's `limits` in the manifest override this, CPU_DEADLINE and
    /// MAX_CONCURRENT.
    #[arg(help_heading = "Instances", long, env = "MEMORY_LIMIT", default_value = "64MiB", value_parser = parse_size)]
    pub memory_limit: u64,

    /// Guest compute time one request or message may use before it is stopped (504).
    #[arg(help_heading = "Instances", long, env = "CPU_DEADLINE", default_value = "5s", value_parser = humantime::parse_duration)]
    pub cpu_deadline: Duration,

    /// Wall-clock time one request or message handler may take, waiting included; past it the
    /// request gets 504 (a message is retried) and the instance is thrown away.
    #[arg(help_heading = "Instances", long, env = "REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// Host memory one invocation may make the host hold for it, outside the guest's memory
    /// limit: staged writes, copies of values read, listed keys, outgoing messages, its
    /// response body and the responses of services it calls. Past it the invocation fails (500
    /// for a request, a retry for a message) and nothing it staged is kept.
    #[arg(help_heading = "Instances", long, env = "INVOCATION_HOST_BYTES", default_value = "16MiB", value_parser = parse_size)]
    pub invocation_host_bytes: u64,

    /// Requests in flight per service; beyond it requests wait in the service's queue
    /// (QUEUE_LENGTH, QUEUE_WAIT), then get 503 with Retry-After (0 = 32 per core).
    #[arg(
        help_heading = "Instances",
        long,
        env = "MAX_CONCURRENT",
        default_value_t = 0
    )]
    pub max_concurrent: usize,

    /// Clients that may wait per service when all its permits are taken; one more gets 503
    /// with Retry-After at once.
    #[arg(
        help_heading = "Instances",
        long,
        env = "QUEUE_LENGTH",
        default_value_t = 16384
    )]
    pub queue_length: usize,

    /// Longest a request waits in its service's queue for a permit; past it, 503 with
    /// Retry-After.
    #[arg(help_heading = "Instances", long, env = "QUEUE_WAIT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub queue_wait: Duration,

    /// Directory of precompiled components, keyed by content digest, reused across restarts.
    #[arg(
        help_heading = "Instances",
        long,
        env = "COMPILE_CACHE",
        default_value = "build/compile-cache"
    )]
    pub compile_cache: PathBuf,

    /// Bytes of compiled components the compile cache keeps; least recently used entries are
    /// removed past it.
    #[arg(help_heading = "Instances", long, env = "COMPILE_CACHE_MAX", default_value = "512MiB", value_parser = parse_size)]
    pub compile_cache_max: u64,

    /// Open connections per service port; further clients wait in the listen backlog until one
    /// closes.
    #[arg(
        help_heading = "Connections",
        long,
        env = "MAX_CONNECTIONS",
        default_value_t = 16384
    )]
    pub max_connections: usize,

    /// Request-body bytes all service ports together may hold at once (buffered for their
    /// invocations); beyond it requests get 503 with Retry-After.
    #[arg(help_heading = "Connections", long, env = "BODY_BUFFER", default_value = "64MiB", value_parser = parse_size)]
    pub body_buffer: u64,

    /// Longest a client may take to send a request's headers, and longest an idle keep-alive
    /// connection is kept.
    #[arg(help_heading = "Connections", long, env = "HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,

    /// Longest a client may take to send a request's body; past it the request gets 408 and
    /// the connection is closed.
    #[arg(help_heading = "Connections", long, env = "BODY_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub body_timeout: Duration,

    /// Longest a response write may wait for the client to read; past it the connection is
    /// closed (a client that stops reading cannot hold a connection and its response).
    #[arg(help_heading = "Connections", long, env = "WRITE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub write_timeout: Duration,

    /// Longest a service-to-service call may take before the caller sees a timeout; for a
    /// request to an origin outside the host, the longest wait to connect, for the response's
    /// head, and between its body's bytes.
    #[arg(help_heading = "Connections", long, env = "OUTBOUND_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub outbound_timeout: Duration,

    /// PEM certificates of authorities trusted, beside Mozilla's, for requests to origins
    /// outside the host (a service's `allowed_outbound_hosts`).
    #[arg(help_heading = "Connections", long, env = "OUTBOUND_CA_FILE")]
    pub outbound_ca_file: Option<PathBuf>,

    /// On SIGTERM/Ctrl-C, how long in-flight requests and handlers may take to finish.
    #[arg(help_heading = "Connections", long, env = "SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Kafka bootstrap servers (`host:port,...`). Without it, messaging uses the embedded backend.
    #[arg(help_heading = "Messaging", long, env = "KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,

    /// Partitions of the Kafka topics the host creates.
    #[arg(
        help_heading = "Messaging",
        long,
        env = "KAFKA_PARTITIONS",
        default_value_t = 3
    )]
    pub kafka_partitions: i32,

    /// Replication factor of the Kafka topics the host creates.
    #[arg(
        help_heading = "Messaging",
        long,
        env = "KAFKA_REPLICATION",
        default_value_t = 1
    )]
    pub kafka_replication: i32,

    /// Longest the broker may hold a consumer fetch open (fetch.wait.max.ms).
    #[arg(help_heading = "Messaging", long, env = "KAFKA_FETCH_WAIT", default_value = "10ms", value_parser = humantime::parse_duration)]
    pub kafka_fetch_wait: Duration,

    /// Records per Kafka produce batch. 1 keeps every offset resumable on brokers that cannot
    /// start a fetch inside a batch (tansu); raise it on Apache Kafka for throughput.
    #[arg(
        help_heading = "Messaging",
        long,
        env = "KAFKA_BATCH_MESSAGES",
        default_value_t = 1
    )]
    pub kafka_batch_messages: u32,

    /// How long the embedded message log keeps records every consumer group has handled.
    #[arg(help_heading = "Messaging", long, env = "LOG_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    pub log_retention: Duration,

    /// Bytes per topic past which the embedded log removes its oldest handled records, however
    /// young.
    #[arg(help_heading = "Messaging", long, env = "LOG_RETENTION_BYTES", default_value = "1GiB", value_parser = parse_size)]
    pub log_retention_bytes: u64,

    /// Attempts at handling one message before it is dead-lettered to `<topic>.dlq`.
    #[arg(
        help_heading = "Messaging",
        long,
        env = "RETRY_MAX_ATTEMPTS",
        default_value_t = 5
    )]
    pub retry_max_attempts: u32,

    /// Backoff after the first failed attempt; doubles per attempt up to RETRY_BACKOFF_MAX.
    #[arg(help_heading = "Messaging", long, env = "RETRY_BACKOFF", default_value = "200ms", value_parser = humantime::parse_duration)]
    pub retry_backoff: Duration,

    /// Upper bound of the retry backoff.
    #[arg(help_heading = "Messaging", long, env = "RETRY_BACKOFF_MAX", default_value = "10s", value_parser = humantime::parse_duration)]
    pub retry_backoff_max: Duration,
}

/// One service the host runs: where its component is, what it may do.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    pub name: Arc<str>,
    /// `FILE:LINE:COLUMN` of its `component` in the manifest, for errors found after parsing
    /// (a component that does not load).
    pub at: String,
    /// 0 = any free port.
    pub port: u16,
    /// Whether it has a port at all; without one only other services reach it.
    pub serves_http: bool,
    pub file: PathBuf,
    /// Services it may call over `http://<name>-service/` (its `next` among them).
    pub calls: Vec<String>,
    /// Where a middleware's `wasi:http/handler@0.3.0` import hands requests (a service name);
    /// `None`: where each request's authority says, as `wasi:http/client` does.
    pub next: Option<String>,
    /// Topics its `handler` export receives, and its consumer group.
    pub subscribes: Vec<String>,
    pub group: String,
    /// Where its consumer group starts reading when it has committed nothing yet.
    pub start: Start,
    /// Topics `producer::send` accepts from it.
    pub produces: Vec<String>,
    /// Injected delay before each in-process call into it (testing aid).
    pub latency: Option<Duration>,
    pub limits: Limits,
    pub instances: Instances,
    /// Buckets it may open through `wasi:keyvalue` (its own state's buckets of those names).
    pub key_value_stores: Vec<String>,
    /// Clients it may connect through `wasi:messaging` (labels; every client reaches the
    /// host's one messaging backend).
    pub messaging_clients: Vec<String>,
    /// What `wasi:config/store` answers it.
    pub config: ConfigValues,
    /// Origins outside the host its outgoing `wasi:http` requests may go to.
    pub allowed_outbound_hosts: Vec<AllowedOrigin>,
}

/// A service's configuration values, secrets among them: shown by key only.
#[derive(Clone, Default, PartialEq)]
pub struct ConfigValues(pub Arc<BTreeMap<String, String>>);

impl std::fmt::Debug for ConfigValues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// How a service's instances are reused (the manifest's `instances` table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Instances {
    /// Requests one instance serves before it is dropped; `None`: the host's
    /// `--instance-reuse`.
    pub reuse: Option<u32>,
    /// Requests one instance of a WASI 0.3 component serves at once (an async `handle` that
    /// waits lets another run); 1 serves them one at a time.
    pub concurrent: u32,
    /// How long an instance that serves requests at once waits for one before it ends.
    pub idle: Duration,
}

impl Default for Instances {
    fn default() -> Instances {
        Instances {
            reuse: None,
            concurrent: DEFAULT_CONCURRENT,
            idle: DEFAULT_IDLE,
        }
    }
}

/// Default of `instances.concurrent` (see docs/instance-reuse.md for the measurement).
pub const DEFAULT_CONCURRENT: u32 = 16;
/// Default of `instances.idle`.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(1);

/// Where a new consumer group starts reading a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Start {
    /// At the oldest record kept: it sees what was published before it existed.
    #[default]
    Earliest,
    /// After the newest record: only what is published from now on.
    Latest,
}

/// What one service's invocations may use.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub memory: u64,
    pub cpu: Duration,
    pub concurrency: usize,
}

impl ServiceSpec {
    /// A service with no file, port, calls, topics or limits beyond the defaults: a starting
    /// point for tests.
    #[cfg(test)]
    pub fn named(name: &str) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            at: String::new(),
            port: 0,
            serves_http: true,
            file: PathBuf::new(),
            calls: vec![],
            next: None,
            subscribes: vec![],
            group: format!("{name}-service"),
            start: Start::Earliest,
            produces: vec![],
            latency: None,
            limits: Limits {
                memory: 64 << 20,
                cpu: Duration::from_secs(5),
                concurrency: 64,
            },
            instances: Instances::default(),
            key_value_stores: vec![],
            messaging_clients: vec![],
            config: ConfigValues::default(),
            allowed_outbound_hosts: vec![],
        }
    }
}

impl Args {
    /// The services of the manifest, with the limits the flags set as their defaults.
    pub fn services(&self) -> Result<Vec<ServiceSpec>, ManifestError> {
        let text = std::fs::read(&self.manifest)
            .map_err(|e| ManifestError(format!("{}: {e}", self.manifest.display())))?;
        self.services_in(&text)
    }

    /// The services of `text`, read from the manifest file (for a change seen while running).
    pub fn services_in(&self, text: &[u8]) -> Result<Vec<ServiceSpec>, ManifestError> {
        let text = std::str::from_utf8(text)
            .map_err(|e| ManifestError(format!("{}: {e}", self.manifest.display())))?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let defaults = Limits {
            memory: self.memory_limit,
            cpu: self.cpu_deadline,
            concurrency: if self.max_concurrent == 0 {
                32 * cores
            } else {
                self.max_concurrent
            },
        };
        let ports = self.ports.iter().cloned().collect();
        manifest::Context {
            path: &self.manifest,
            components_dir: &self.components_dir,
            defaults: &defaults,
            ports: &ports,
        }
        .parse(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repository_manifest_declares_the_seed_with_flag_defaults() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let dir = tempfile::tempdir().unwrap();
        for c in ["gateway", "user", "product", "order", "reviews", "ratings"] {
            std::fs::write(dir.path().join(format!("{c}.wasm")), b"").unwrap();
        }
        let manifest = format!("{root}/services.toml");
        let components = dir.path().to_str().unwrap();
        let args = Args::parse_from([
            "host",
            "--manifest",
            &manifest,
            "--components-dir",
            components,
            "--memory-limit",
            "32MiB",
            "--max-concurrent",
            "7",
            "--port",
            "user=0,order=4003",
        ]);
        let services = args.services().unwrap();
        let names: Vec<&str> = services.iter().map(|s| &*s.name).collect();
        assert_eq!(
            names,
            ["gateway", "user", "product", "order", "reviews", "ratings"]
        );
        let ports: Vec<u16> = services.iter().map(|s| s.port).collect();
        assert_eq!(ports, [3000, 0, 3002, 4003, 3004, 3005]);
        assert_eq!(
            services[0].calls,
            ["user", "product", "order", "reviews", "ratings"]
        );
        assert_eq!(services[5].subscribes, ["review-created"]);
        assert_eq!(services[3].calls, ["product"]);
        assert_eq!(services[1].produces, ["user-created"]);
        assert_eq!(services[3].subscribes, ["user-created"]);
        assert_eq!(services[3].group, "order-service");
        assert_eq!(
            services[0].limits,
            Limits {
                memory: 32 << 20,
                cpu: Duration::from_secs(5),
                concurrency: 7
            }
        );
        assert_eq!(services[0].file, dir.path().join("gateway.wasm"));
    }
}
