//! Prometheus metrics, served as text by the admin listener at `/metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, LazyLock, Mutex};

pub type Labels = Vec<(&'static str, String)>;
type Histograms = Family<Labels, Latency>;

pub struct Metrics {
    registry: Registry,
    pub requests: Family<Labels, Counter>,
    pub latency: Histograms,
    pub instances: Family<Labels, Counter>,
    pub swaps: Family<Labels, Counter>,
    pub swaps_rejected: Family<Labels, Counter>,
    pub produced: Family<Labels, Counter>,
    pub consumed: Family<Labels, Counter>,
    pub retried: Family<Labels, Counter>,
    pub deferred: Family<Labels, Counter>,
    pub dead_lettered: Family<Labels, Counter>,
    pub outbox_depth: Gauge,
    pub parked: Family<Labels, Counter>,
    pub outbox_parked: Gauge,
    pub outbox_bytes: Gauge,
    /// Request body bytes the listeners hold now, against `--body-buffer`.
    pub body_bytes: Gauge,
    /// Client connections open on the service ports.
    pub connections: Gauge,
    pub log_trimmed: Counter,
    /// Components loaded from the compile cache, and compiled (not in it, or not usable).
    pub compile_cache_hits: Counter,
    pub compile_cache_misses: Counter,
    pub log_bytes: Gauge,
    pub log_stale_groups: Gauge,
    pub consumer_lag: Family<Labels, Gauge>,
    pub conflicts: Family<Labels, Counter>,
    /// Requests to origins outside the host, by service, destination host and outcome.
    pub outbound: Family<Labels, Counter>,
    /// Clients waiting for a permit, per service.
    pub queued: Family<Labels, Gauge>,
    /// How long requests that found no free permit waited, per service.
    pub queue_wait: Histograms,
    /// Requests refused with 503 for want of a permit or an instance slot, by service and reason.
    pub shed: Family<Labels, Counter>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::with_prefix("host");
    let m = Metrics {
        registry: Registry::default(),
        requests: Family::default(),
        latency: Family::default(),
        instances: Family::default(),
        swaps: Family::default(),
        swaps_rejected: Family::default(),
        produced: Family::default(),
        consumed: Family::default(),
        retried: Family::default(),
        outbound: Family::default(),
        deferred: Family::default(),
        dead_lettered: Family::default(),
        outbox_depth: Gauge::default(),
        parked: Family::default(),
        outbox_parked: Gauge::default(),
        outbox_bytes: Gauge::default(),
        body_bytes: Gauge::default(),
        connections: Gauge::default(),
        log_trimmed: Counter::default(),
        compile_cache_hits: Counter::default(),
        compile_cache_misses: Counter::default(),
        log_bytes: Gauge::default(),
        log_stale_groups: Gauge::default(),
        consumer_lag: Family::default(),
        conflicts: Family::default(),
        queued: Family::default(),
        queue_wait: Family::default(),
        shed: Family::default(),
    };
    registry.register(
        "http_requests",
        "HTTP requests by service, route class and status",
        m.requests.clone(),
    );
    registry.register(
        "http_request_duration_seconds",
        "HTTP request latency by service",
        m.latency.clone(),
    );
    registry.register(
        "instances_created",
        "Component instances created",
        m.instances.clone(),
    );
    registry.register(
        "swaps",
        "Components swapped in (file change or rollback)",
        m.swaps.clone(),
    );
    registry.register(
        "swaps_rejected",
        "Component files refused",
        m.swaps_rejected.clone(),
    );
    registry.register(
        "messages_parked",
        "Messages the backend refused for good, set aside from the outbox",
        m.parked.clone(),
    );
    registry.register(
        "open_connections",
        "Client connections open on the service ports (each port holds at most --max-connections)",
        m.connections.clone(),
    );
    registry.register(
        "request_body_bytes",
        "Request body bytes held by the listeners (bounded by --body-buffer)",
        m.body_bytes.clone(),
    );
    registry.register(
        "outbox_parked",
        "Messages set aside from the outbox, waiting for an operator",
        m.outbox_parked.clone(),
    );
    registry.register(
        "outbox_bytes",
        "Bytes of events waiting in the outbox (refused past OUTBOX_MAX)",
        m.outbox_bytes.clone(),
    );
    registry.register(
        "compile_cache_hits",
        "Components loaded from the compile cache instead of compiled",
        m.compile_cache_hits.clone(),
    );
    registry.register(
        "compile_cache_misses",
        "Components compiled (not in the compile cache, or it is not usable)",
        m.compile_cache_misses.clone(),
    );
    registry.register(
        "log_records_trimmed",
        "Records the embedded message log removed under its retention",
        m.log_trimmed.clone(),
    );
    registry.register(
        "log_bytes",
        "Bytes of records in the embedded message log",
        m.log_bytes.clone(),
    );
    registry.register(
        "log_stale_groups",
        "Consumer groups of the embedded log that retention no longer waits for (no subscriber for longer than LOG_RETENTION)",
        m.log_stale_groups.clone(),
    );
    registry.register(
        "messages_produced",
        "Messages the backend accepted from the outbox",
        m.produced.clone(),
    );
    registry.register(
        "messages_consumed",
        "Messages handled successfully",
        m.consumed.clone(),
    );
    registry.register(
        "messages_retried",
        "Failed handler attempts that were retried",
        m.retried.clone(),
    );
    registry.register(
        "messages_deferred",
        "Handler runs put off because the host could not run or commit them (no attempt spent)",
        m.deferred.clone(),
    );
    registry.register(
        "messages_dead_lettered",
        "Messages sent to a dead-letter topic",
        m.dead_lettered.clone(),
    );
    registry.register(
        "outbox_depth",
        "Messages waiting in the outbox",
        m.outbox_depth.clone(),
    );
    registry.register(
        "consumer_lag",
        "Records not yet handled, per consumer group and topic",
        m.consumer_lag.clone(),
    );
    registry.register(
        "commit_conflicts",
        "Commits refused because something the invocation read had changed (it is run again)",
        m.conflicts.clone(),
    );
    registry.register(
        "outbound_requests",
        "Requests to origins outside the host (allowed_outbound_hosts), by service, destination host and outcome (status or error)",
        m.outbound.clone(),
    );
    registry.register(
        "queued_requests",
        "Clients waiting for a permit of their service (at most --queue-length each)",
        m.queued.clone(),
    );
    registry.register(
        "queue_wait_seconds",
        "How long requests that found every permit taken waited for one (at most --queue-wait)",
        m.queue_wait.clone(),
    );
    registry.register(
        "requests_shed",
        "Requests refused with 503 by service and reason: queue_full, waited_out (--queue-wait passed), no_slot (--max-instances)",
        m.shed.clone(),
    );
    Metrics { registry, ..m }
});

pub fn get() -> &'static Metrics {
    &METRICS
}

/// Latency buckets: upper bounds 50 µs doubling to ~26 s, then one for the rest.
pub const LATENCY_BOUNDS: usize = 20;

/// The upper bound of latency bucket `i`, in seconds.
pub fn latency_bound(i: usize) -> f64 {
    0.00005 * f64::powi(2.0, i as i32)
}

/// A latency histogram whose buckets can be read back (the console turns two readings into
/// rates and percentiles; `prometheus_client`'s own keeps them private). Clones share counts;
/// observing takes no lock.
#[derive(Clone, Default, Debug)]
pub struct Latency(Arc<LatencyCounts>);

#[derive(Default, Debug)]
struct LatencyCounts {
    nanos: AtomicU64,
    buckets: [AtomicU64; LATENCY_BOUNDS + 1],
}

impl Latency {
    pub fn observe(&self, seconds: f64) {
        let bucket = (0..LATENCY_BOUNDS)
            .find(|&i| seconds <= latency_bound(i))
            .unwrap_or(LATENCY_BOUNDS);
        self.0.buckets[bucket].fetch_add(1, Relaxed);
        self.0.nanos.fetch_add((seconds * 1e9) as u64, Relaxed);
    }

    /// Observations per bucket (not cumulative), since start-up.
    pub fn buckets(&self) -> Vec<u64> {
        self.0.buckets.iter().map(|b| b.load(Relaxed)).collect()
    }
}

impl TypedMetric for Latency {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Latency {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let counts = self.buckets();
        let buckets: Vec<(f64, u64)> = (counts.iter().enumerate())
            .map(|(i, &n)| match i < LATENCY_BOUNDS {
                true => (latency_bound(i), n),
                false => (f64::INFINITY, n),
            })
            .collect();
        let seconds = self.0.nanos.load(Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(seconds, counts.iter().sum(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// One service's route labels, shared by its configurations.
pub type RouteLabels = Arc<Mutex<HashSet<String>>>;

/// The route labels `service` has been counted under, kept across its reconfigurations (the
/// metric series outlive them, so the cap on their number must too).
pub fn routes(service: &str) -> RouteLabels {
    static ROUTES: LazyLock<Mutex<HashMap<String, RouteLabels>>> = LazyLock::new(Mutex::default);
    let mut routes = ROUTES.lock().unwrap_or_else(|e| e.into_inner());
    routes.entry(service.to_string()).or_default().clone()
}

/// The status label of `status`: `2xx`, `4xx`... (a guest may answer with any of 900 codes).
pub fn status_class(status: u16) -> &'static str {
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}

/// 5xx answers per service, beside the per-route series of `http_requests` (which hold the
/// same counts): `/stats` reads one counter instead of summing over route labels.
static SERVER_ERRORS: LazyLock<Family<Labels, Counter>> = LazyLock::new(Family::default);

/// Counts one 5xx answer of `service` on its port.
pub fn count_server_error(service: &str) {
    SERVER_ERRORS
        .get_or_create(&labels([("service", service)]))
        .inc();
}

/// 5xx answers `service` gave on its port since start-up.
pub fn server_errors(service: &str) -> u64 {
    let labels = labels([("service", service)]);
    SERVER_ERRORS.get(&labels).map_or(0, |c| c.get())
}

/// Messages `service` sent to the dead-letter topic of `topic` since start-up.
pub fn dead_lettered(service: &str, topic: &str) -> u64 {
    let labels = labels([("service", service), ("topic", topic)]);
    get().dead_lettered.get(&labels).map_or(0, |c| c.get())
}

pub fn labels<const N: usize>(pairs: [(&'static str, &str); N]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

/// The Prometheus text exposition of everything above.
pub fn render() -> String {
    let mut out = String::new();
    encode(&mut out, &get().registry).expect("writing to a String");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes_are_bounded() {
        assert_eq!(status_class(418), "4xx");
        assert_eq!(status_class(999), "5xx");
    }

    #[test]
    fn latency_buckets_read_back_and_encode_cumulatively() {
        let latency = Latency::default();
        latency.observe(0.00004);
        latency.observe(0.00006);
        latency.observe(0.00006);
        latency.observe(1000.0);
        let buckets = latency.buckets();
        assert_eq!((buckets[0], buckets[1], buckets[LATENCY_BOUNDS]), (1, 2, 1));
        assert_eq!(buckets.iter().sum::<u64>(), 4);

        let mut registry = Registry::default();
        registry.register("wait", "test", latency.clone());
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(text.contains("wait_count 4"), "{text}");
        assert!(text.contains("wait_bucket{le=\"0.0001\"} 3"), "{text}");
        assert!(text.contains("wait_bucket{le=\"+Inf\"} 4"), "{text}");
        assert!(text.contains("wait_sum 1000.00016"), "{text}");
    }
}
