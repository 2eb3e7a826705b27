//! Command-line and environment configuration, and the table of services the host runs.

mod units;

use units::{parse_allow, parse_limits, parse_rules, parse_size};

use anyhow::{Context as _, Result};
use clap::Parser;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Runs the gateway, user, product and order services as WebAssembly components in one process.
#[derive(Parser, Debug, Clone)]
#[command(name = "host", version)]
pub struct Args {
    /// Directory holding gateway.wasm, user.wasm, product.wasm and order.wasm.
    #[arg(long, env = "COMPONENTS_DIR", default_value = "build/components")]
    pub components_dir: PathBuf,

    /// Address the four service ports bind to.
    #[arg(long, env = "BIND_ADDR", default_value = "127.0.0.1")]
    pub bind_addr: IpAddr,

    /// Port of the API gateway (0 = any free port).
    #[arg(long, env = "GATEWAY_PORT", default_value_t = 3000)]
    pub gateway_port: u16,

    /// Port of user-service (0 = any free port).
    #[arg(long, env = "USER_PORT", default_value_t = 3001)]
    pub user_port: u16,

    /// Port of product-service (0 = any free port).
    #[arg(long, env = "PRODUCT_PORT", default_value_t = 3002)]
    pub product_port: u16,

    /// Port of order-service (0 = any free port).
    #[arg(long, env = "ORDER_PORT", default_value_t = 3003)]
    pub order_port: u16,

    /// Address of the admin listener (/healthz, /readyz, /components, /metrics, rollback).
    /// Anything but loopback needs ADMIN_TOKEN.
    #[arg(long, env = "ADMIN_ADDR", default_value = "127.0.0.1:3999")]
    pub admin_addr: SocketAddr,

    /// Bearer token every admin call but GET /healthz and /readyz must carry
    /// (`Authorization: Bearer TOKEN`). Required when ADMIN_ADDR is not loopback.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Directory of the durable state (users, products, orders, caches, outbox, embedded log).
    #[arg(long, env = "DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,

    /// Directory of precompiled components, keyed by content digest, reused across restarts.
    #[arg(long, env = "COMPILE_CACHE", default_value = "build/compile-cache")]
    pub compile_cache: PathBuf,

    /// Bytes of compiled components the compile cache keeps; least recently used entries are
    /// removed past it.
    #[arg(long, env = "COMPILE_CACHE_MAX", default_value = "512MiB", value_parser = parse_size)]
    pub compile_cache_max: u64,

    /// Swap a service's component when its file in the components dir changes.
    #[arg(long, env = "WATCH_COMPONENTS", default_value_t = true, action = clap::ArgAction::Set)]
    pub watch: bool,

    /// Keep all state in memory instead of DATA_DIR (lost at exit; for tests and demos).
    #[arg(long, env = "STATE_IN_MEMORY")]
    pub in_memory: bool,

    /// Which services each service may call, as `caller=callee,callee;caller=...`.
    #[arg(
        long,
        env = "OUTBOUND_ALLOW",
        default_value = "gateway=user,product,order;order=product"
    )]
    pub outbound_allow: String,

    /// Largest linear memory one instance may have (e.g. 64MiB); growing past it fails that
    /// request with 500.
    #[arg(long, env = "MEMORY_LIMIT", default_value = "64MiB", value_parser = parse_size)]
    pub memory_limit: u64,

    /// Guest compute time one request or message may use before it is stopped (504).
    #[arg(long, env = "CPU_DEADLINE", default_value = "5s", value_parser = humantime::parse_duration)]
    pub cpu_deadline: Duration,

    /// Requests in flight per service; beyond it 503 with Retry-After (0 = 64 per core).
    #[arg(long, env = "MAX_CONCURRENT", default_value_t = 0)]
    pub max_concurrent: usize,

    /// Per-service overrides of the three limits above, as
    /// `service=memory:32MiB/cpu:1s/concurrency:16,service=...`.
    #[arg(long, env = "SERVICE_LIMITS", default_value = "")]
    pub service_limits: String,

    /// On SIGTERM/Ctrl-C, how long in-flight requests and handlers may take to finish.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Component instances that may exist at once (pooling allocator slots).
    #[arg(long, env = "MAX_INSTANCES", default_value_t = 512)]
    pub max_instances: u32,

    /// Requests one component instance serves before it is thrown away. Above 1 (the default is
    /// 1000) an idle instance is handed the next request of its service: faster, but guest
    /// memory (globals, freed heap) carries over between that service's requests; see the
    /// README. 1 gives every request a fresh instance: nothing in guest memory survives it.
    #[arg(long, env = "INSTANCE_REUSE", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub instance_reuse: u32,

    /// Longest a client may take to send a request's headers, and longest an idle keep-alive
    /// connection is kept.
    #[arg(long, env = "HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,

    /// Longest a response write may wait for the client to read; past it the connection is
    /// closed (a client that stops reading cannot hold a connection and its response).
    #[arg(long, env = "WRITE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub write_timeout: Duration,

    /// Open connections per service port; further clients wait in the listen backlog until one
    /// closes.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,

    /// Request-body bytes all service ports together may hold at once (buffered for their
    /// invocations); beyond it requests get 503 with Retry-After.
    #[arg(long, env = "BODY_BUFFER", default_value = "64MiB", value_parser = parse_size)]
    pub body_buffer: u64,

    /// Wall-clock time one request or message handler may take, waiting included; past it the
    /// request gets 504 (a message is retried) and the instance is thrown away.
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// How long the embedded message log keeps records every consumer group has handled.
    #[arg(long, env = "LOG_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    pub log_retention: Duration,

    /// Bytes per topic past which the embedded log removes its oldest handled records, however
    /// young.
    #[arg(long, env = "LOG_RETENTION_BYTES", default_value = "1GiB", value_parser = parse_size)]
    pub log_retention_bytes: u64,

    /// Bytes of events the outbox may hold while the messaging backend does not take them;
    /// beyond it requests that would send an event get 503 (a message handler is retried).
    #[arg(long, env = "OUTBOX_MAX", default_value = "1GiB", value_parser = parse_size)]
    pub outbox_max: u64,

    /// Host memory one invocation may make the host hold for it, outside the guest's memory
    /// limit: staged writes, copies of values read, listed keys, outgoing messages, its
    /// response body and the responses of services it calls. Past it the invocation fails (500
    /// for a request, a retry for a message) and nothing it staged is kept.
    #[arg(long, env = "INVOCATION_HOST_BYTES", default_value = "16MiB", value_parser = parse_size)]
    pub invocation_host_bytes: u64,

    /// Longest a client may take to send a request's body; past it the request gets 408 and
    /// the connection is closed.
    #[arg(long, env = "BODY_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub body_timeout: Duration,

    /// Longest a service-to-service call may take before the caller sees a timeout.
    #[arg(long, env = "OUTBOUND_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub outbound_timeout: Duration,

    /// Testing aid: delay every call into a service, as `service=duration,...` (e.g. `user=200ms`).
    #[arg(long, env = "INJECT_LATENCY", default_value = "")]
    pub inject_latency: String,

    /// Kafka bootstrap servers (`host:port,...`). Without it, messaging uses the embedded backend.
    #[arg(long, env = "KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,

    /// Partitions of the Kafka topics the host creates.
    #[arg(long, env = "KAFKA_PARTITIONS", default_value_t = 3)]
    pub kafka_partitions: i32,

    /// Replication factor of the Kafka topics the host creates.
    #[arg(long, env = "KAFKA_REPLICATION", default_value_t = 1)]
    pub kafka_replication: i32,

    /// Longest the broker may hold a consumer fetch open (fetch.wait.max.ms).
    #[arg(long, env = "KAFKA_FETCH_WAIT", default_value = "10ms", value_parser = humantime::parse_duration)]
    pub kafka_fetch_wait: Duration,

    /// Records per Kafka produce batch. 1 keeps every offset resumable on brokers that cannot
    /// start a fetch inside a batch (tansu); raise it on Apache Kafka for throughput.
    #[arg(long, env = "KAFKA_BATCH_MESSAGES", default_value_t = 1)]
    pub kafka_batch_messages: u32,

    /// Consumer group of each subscribing service, as `service=group,...` (default `<name>-service`).
    #[arg(long, env = "CONSUMER_GROUPS", default_value = "")]
    pub consumer_groups: String,

    /// Attempts at handling one message before it is dead-lettered to `<topic>.dlq`.
    #[arg(long, env = "RETRY_MAX_ATTEMPTS", default_value_t = 5)]
    pub retry_max_attempts: u32,

    /// Backoff after the first failed attempt; doubles per attempt up to RETRY_BACKOFF_MAX.
    #[arg(long, env = "RETRY_BACKOFF", default_value = "200ms", value_parser = humantime::parse_duration)]
    pub retry_backoff: Duration,

    /// Upper bound of the retry backoff.
    #[arg(long, env = "RETRY_BACKOFF_MAX", default_value = "10s", value_parser = humantime::parse_duration)]
    pub retry_backoff_max: Duration,
}

/// One service the host runs: where its component is, what it may do.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub name: &'static str,
    pub port: u16,
    pub file: PathBuf,
    /// Services it may call over `http://<name>-service/`.
    pub calls: Vec<String>,
    /// Topics its `handler` export receives, and its consumer group.
    pub subscribes: Vec<String>,
    pub group: String,
    /// Topics `producer::send` accepts from it.
    pub produces: Vec<String>,
    /// Injected delay before each in-process call into it (testing aid).
    pub latency: Option<Duration>,
    pub limits: Limits,
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
    pub fn named(name: &'static str) -> ServiceSpec {
        ServiceSpec {
            name,
            port: 0,
            file: PathBuf::new(),
            calls: vec![],
            subscribes: vec![],
            group: format!("{name}-service"),
            produces: vec![],
            latency: None,
            limits: Limits {
                memory: 64 << 20,
                cpu: Duration::from_secs(5),
                concurrency: 64,
            },
        }
    }
}

pub const SERVICES: [&str; 4] = ["gateway", "user", "product", "order"];
pub const USER_CREATED: &str = "user-created";

impl Args {
    pub fn services(&self) -> Result<Vec<ServiceSpec>> {
        let mut allow = parse_allow(&self.outbound_allow)?;
        let mut latency = parse_rules("INJECT_LATENCY", &self.inject_latency)?
            .into_iter()
            .map(|(name, d)| {
                humantime::parse_duration(&d)
                    .with_context(|| format!("INJECT_LATENCY duration {d:?}"))
                    .map(|d| (name, d))
            })
            .collect::<Result<BTreeMap<_, _>>>()?;
        let mut groups = parse_rules("CONSUMER_GROUPS", &self.consumer_groups)?;
        let mut overrides = parse_rules("SERVICE_LIMITS", &self.service_limits)?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let defaults = Limits {
            memory: self.memory_limit,
            cpu: self.cpu_deadline,
            concurrency: if self.max_concurrent == 0 {
                64 * cores
            } else {
                self.max_concurrent
            },
        };
        let port = |name: &str| match name {
            "gateway" => self.gateway_port,
            "user" => self.user_port,
            "product" => self.product_port,
            _ => self.order_port,
        };
        SERVICES
            .iter()
            .map(|&name| -> Result<ServiceSpec> {
                Ok(ServiceSpec {
                    name,
                    port: port(name),
                    file: self.components_dir.join(format!("{name}.wasm")),
                    calls: allow.remove(name).unwrap_or_default(),
                    subscribes: match name {
                        "order" => vec![USER_CREATED.to_string()],
                        _ => vec![],
                    },
                    group: groups
                        .remove(name)
                        .unwrap_or_else(|| format!("{name}-service")),
                    produces: match name {
                        "user" => vec![USER_CREATED.to_string()],
                        _ => vec![],
                    },
                    latency: latency.remove(name),
                    limits: match overrides.remove(name) {
                        Some(spec) => parse_limits(&defaults, &spec)?,
                        None => defaults.clone(),
                    },
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_allowlist_matches_the_seed() {
        let args = Args::parse_from(["host"]);
        let services = args.services().unwrap();
        let calls = |n: &str| services.iter().find(|s| s.name == n).unwrap().calls.clone();
        assert_eq!(calls("gateway"), ["user", "product", "order"]);
        assert_eq!(calls("order"), ["product"]);
        assert!(calls("user").is_empty());
        assert_eq!(
            services[0].file,
            PathBuf::from("build/components/gateway.wasm")
        );
    }

    #[test]
    fn limits_have_defaults_and_per_service_overrides() {
        let args = Args::parse_from([
            "host",
            "--memory-limit",
            "32MiB",
            "--max-concurrent",
            "7",
            "--service-limits",
            "product=cpu:250ms/memory:1GiB",
        ]);
        let s = args.services().unwrap();
        assert_eq!(
            s[0].limits,
            Limits {
                memory: 32 << 20,
                cpu: Duration::from_secs(5),
                concurrency: 7
            }
        );
        assert_eq!(
            s[2].limits,
            Limits {
                memory: 1 << 30,
                cpu: Duration::from_millis(250),
                concurrency: 7
            }
        );
        let bad = |v: &str| {
            Args::parse_from(["host", "--service-limits", v])
                .services()
                .is_err()
        };
        assert!(bad("product=speed:1"));
        assert!(bad("product=memory:lots"));
        assert!(bad("product=cpu"));
    }

    #[test]
    fn latency_and_group_rules_parse() {
        let args = Args::parse_from([
            "host",
            "--inject-latency",
            "user=200ms, product=1s",
            "--consumer-groups",
            "order=orders-v2",
        ]);
        let services = args.services().unwrap();
        assert_eq!(services[1].latency, Some(Duration::from_millis(200)));
        assert_eq!(services[2].latency, Some(Duration::from_secs(1)));
        assert_eq!(services[3].group, "orders-v2");
        assert_eq!(services[0].group, "gateway-service");
        let bad = |flag: &str, v: &str| Args::parse_from(["host", flag, v]).services().is_err();
        assert!(bad("--inject-latency", "user=soon"));
        assert!(bad("--inject-latency", "billing=1s"));
        assert!(bad("--consumer-groups", "order="));
    }
}
