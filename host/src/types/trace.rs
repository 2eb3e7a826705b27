//! W3C trace context (`traceparent`, `tracestate`): read from requests and records, written
//! into calls, outgoing requests and events, so that one trace follows a request everywhere.
//!
//! Spans are made only while export is on ([`enabled`]): with no OTLP endpoint configured a
//! request makes no span and carries no context of its own (an incoming `traceparent` is not
//! passed on either).

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SpanData, SpanProcessor};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The `tracing` target of every span meant for export: the log leaves them out.
pub const TARGET: &str = "otel";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (set once by the composition root).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Where spans made outside `tracing` (a component's own, see `capabilities::otel`) go: the
/// host's span processor, set once by the composition root.
static SPANS: OnceLock<Arc<dyn SpanProcessor>> = OnceLock::new();

pub fn export_to(processor: Arc<dyn SpanProcessor>) {
    let _ = SPANS.set(processor);
}

/// Sends a finished span with the host's own (dropped while export is off).
pub fn export(span: SpanData) {
    if let Some(processor) = SPANS.get() {
        processor.on_end(span);
    }
}

/// The trace context in `headers` (an empty context when there is none or it is malformed,
/// or while export is off).
pub fn from_headers(headers: &hyper::HeaderMap) -> Context {
    if !enabled() {
        return Context::new();
    }
    TraceContextPropagator::new().extract(&Headers(headers))
}

/// Writes `cx` into `headers` as `traceparent`/`tracestate` (nothing for an empty context).
pub fn to_headers(cx: &Context, headers: &mut hyper::HeaderMap) {
    if !enabled() {
        return;
    }
    TraceContextPropagator::new().inject_context(cx, &mut HeadersMut(headers));
}

/// The trace context in a record's headers (empty while export is off).
pub fn from_record(headers: &[(String, String)]) -> Context {
    if !enabled() {
        return Context::new();
    }
    TraceContextPropagator::new().extract(&Record(headers))
}

/// Writes `cx` into a record's headers, replacing any trace context there.
pub fn to_record(cx: &Context, headers: &mut Vec<(String, String)>) {
    if !enabled() {
        return;
    }
    TraceContextPropagator::new().inject_context(cx, &mut RecordMut(headers));
}

/// `span` as a child of `parent` when `parent` holds a span (else a root): call before the
/// span is first entered.
pub fn adopt(span: &Span, parent: &Context) {
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent.clone());
    }
}

/// `span`'s context, to parent what it causes (an empty context when export is off).
pub fn context_of(span: &Span) -> Context {
    if span.is_none() {
        Context::new()
    } else {
        span.context()
    }
}

/// The span of one HTTP invocation of `service`, named by its route (`POST /api/users/:id`,
/// see [`super::http::route_class`]): a child of `parent`, the caller's or the client's
/// context, else a root. Its status is recorded by [`answered`].
pub fn server(service: &str, method: &hyper::Method, path: &str, parent: &Context) -> Span {
    if !enabled() {
        return Span::none();
    }
    let route = super::http::route_class(method, path);
    let (method, template) = route.split_once(' ').unwrap_or((route.as_str(), ""));
    let span = tracing::info_span!(target: TARGET, "server", otel.name = %route,
        otel.kind = "server", microsvc.service = %service, http.request.method = %method,
        http.route = %template, url.path = %path, url.scheme = "http",
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty);
    adopt(&span, parent);
    span
}

/// Records the status an invocation's span answered with (5xx: an error).
pub fn answered(span: &Span, status: u16) {
    span.record("http.response.status_code", i64::from(status));
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
}

/// The span of `caller`'s in-process call to `callee`.
pub fn call(caller: &str, callee: &str, method: &str, parent: &Context) -> Span {
    if !enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(target: TARGET, "call", otel.name = %format!("{method} {callee}"),
        otel.kind = "client", microsvc.service = %caller, http.request.method = %method,
        server.address = %callee);
    adopt(&span, parent);
    span
}

/// The span of the commit of one of `service`'s invocations.
pub fn commit(service: &str, parent: &Context) -> Span {
    if !enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(target: TARGET, "commit", otel.name = "commit",
        otel.kind = "internal", microsvc.service = %service);
    adopt(&span, parent);
    span
}

/// The span of publishing one message, a child of the context it was sent in.
pub fn send(system: &str, topic: &str, headers: &[(String, String)]) -> Span {
    if !enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(target: TARGET, "send", otel.name = %format!("send {topic}"),
        otel.kind = "producer", messaging.system = %system, messaging.operation.type = "send",
        messaging.operation.name = "send", messaging.destination.name = %topic);
    adopt(&span, &from_record(headers));
    span
}

/// The span of `service` handling a record for its consumer `group`: a child of the context the record was sent in,
/// and linked to it.
pub fn process(
    service: &str,
    group: &str,
    system: &str,
    topic: &str,
    partition: u32,
    offset: u64,
    headers: &[(String, String)],
) -> Span {
    if !enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(target: TARGET, "process",
        otel.name = %format!("process {topic}"), otel.kind = "consumer",
        microsvc.service = %service, messaging.system = %system,
        messaging.operation.type = "process", messaging.operation.name = "process",
        messaging.destination.name = %topic, messaging.consumer.group.name = %group,
        messaging.destination.partition.id = %partition, messaging.kafka.offset = i64::try_from(offset).unwrap_or(i64::MAX));
    let created = from_record(headers);
    let context = created.span().span_context().clone();
    if context.is_valid() {
        let _ = span.set_parent(created);
        span.add_link(context);
    }
    span
}

struct Headers<'a>(&'a hyper::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeadersMut<'a>(&'a mut hyper::HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            hyper::header::HeaderName::from_bytes(key.as_bytes()),
            hyper::header::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

struct Record<'a>(&'a [(String, String)]);

impl Extractor for Record<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

struct RecordMut<'a>(&'a mut Vec<(String, String)>);

impl Injector for RecordMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.retain(|(k, _)| !k.eq_ignore_ascii_case(key));
        self.0.push((key.to_string(), value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    fn sampled() -> Context {
        let sc = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        Context::new().with_remote_span_context(sc)
    }

    #[test]
    fn context_round_trips_through_headers_and_records() {
        enable();
        let mut headers = hyper::HeaderMap::new();
        to_headers(&sampled(), &mut headers);
        assert_eq!(
            headers["traceparent"],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        let back = from_headers(&headers);
        assert_eq!(
            back.span().span_context().trace_id(),
            sampled().span().span_context().trace_id()
        );
        let mut record = vec![("TraceParent".to_string(), "stale".to_string())];
        to_record(&back, &mut record);
        assert_eq!(
            record
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case("traceparent"))
                .count(),
            1
        );
        assert_eq!(
            from_record(&record).span().span_context().span_id(),
            sampled().span().span_context().span_id()
        );
    }

    #[test]
    fn nothing_is_written_for_an_empty_or_malformed_context() {
        enable();
        let mut headers = hyper::HeaderMap::new();
        to_headers(&Context::new(), &mut headers);
        assert!(headers.is_empty());
        headers.insert(
            "traceparent",
            hyper::header::HeaderValue::from_static("00-zz-00-01"),
        );
        assert!(!from_headers(&headers).span().span_context().is_valid());
    }
}
