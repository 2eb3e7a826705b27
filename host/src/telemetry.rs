//! Logging, and span export over OTLP/HTTP when an endpoint is configured: the `tracing`
//! subscriber of the `host` binary.

use anyhow::{Context as _, Result};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::runtime::TokioCurrentThread;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanProcessor};
use opentelemetry_sdk::Resource;
use std::sync::Arc;
use std::time::Duration;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

use crate::types::trace;

/// Exports spans until dropped through [`Telemetry::shutdown`].
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Installs the subscriber: the log on stdout (`RUST_LOG`, default `info`), and when
/// `endpoint` (the OTLP base URL, `OTEL_EXPORTER_OTLP_ENDPOINT`) or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, spans exported there in batches. The other
/// standard `OTEL_*` variables apply (service name, resource attributes, headers, batch sizes).
pub fn init(endpoint: Option<&str>) -> Result<Telemetry> {
    use std::io::IsTerminal as _;
    let log_filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,wasmtime_wasi_http=warn".into())
        .add_directive(format!("{}=off", trace::TARGET).parse()?);
    let log = tracing_subscriber::fmt::layer()
        // Colours for a terminal; a file or a pipe gets plain text.
        .with_ansi(std::io::stdout().is_terminal())
        .with_filter(log_filter);
    let traces_endpoint = std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let provider = match (endpoint, traces_endpoint) {
        (None, None) => None,
        (base, signal) => Some(provider(signal.is_none().then_some(base).flatten())?),
    };
    let spans = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("microsvc-host"))
            .with_threads(false)
            .with_location(false)
            .with_filter(Targets::new().with_target(trace::TARGET, tracing::Level::TRACE))
    });
    tracing_subscriber::registry().with(log).with(spans).init();
    if provider.is_some() {
        trace::enable();
    }
    Ok(Telemetry { provider })
}

/// A provider that batches spans and sends them to `base` + `/v1/traces` (or where the
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` says, when `base` is `None`).
fn provider(base: Option<&str>) -> Result<SdkTracerProvider> {
    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_http();
    if let Some(base) = base {
        exporter = exporter.with_endpoint(format!("{}/v1/traces", base.trim_end_matches('/')));
    }
    let exporter = exporter.build().context("the OTLP span exporter")?;
    // Exports on a thread of its own with its own runtime: the batch processor's default
    // thread has no runtime, which the hyper client needs.
    let mut processor = BatchSpanProcessor::builder(exporter, TokioCurrentThread).build();
    let resource = resource();
    // The provider's spans and the components' own (`wasi:otel`) go out in the same batches.
    processor.set_resource(&resource);
    let processor: Arc<dyn SpanProcessor> = Arc::new(processor);
    trace::export_to(processor.clone());
    Ok(SdkTracerProvider::builder()
        .with_resource(resource)
        .with_span_processor(Shared(processor))
        .build())
}

/// One span processor with two users: the provider and [`trace::export`].
#[derive(Debug)]
struct Shared(Arc<dyn SpanProcessor>);

impl SpanProcessor for Shared {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        self.0.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        self.0.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
}

/// The standard resource (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`), named
/// `microsvc-host` when neither names the service.
fn resource() -> Resource {
    let detected = Resource::builder().build();
    let named = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|name| !name.as_str().starts_with("unknown_service"));
    if named {
        detected
    } else {
        Resource::builder()
            .with_service_name("microsvc-host")
            .build()
    }
}

impl Telemetry {
    /// Sends the spans still queued, waiting at most `limit` (from a thread of its own: the
    /// processor's flush blocks its caller).
    pub async fn shutdown(self, limit: Duration) {
        let Some(provider) = self.provider else {
            return;
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let _ = tx.send(provider.shutdown());
        });
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "sending the last spans failed"),
            _ => tracing::warn!(?limit, "the last spans were not sent in time"),
        }
    }
}
