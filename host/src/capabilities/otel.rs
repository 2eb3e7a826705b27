//! `wasi:otel@0.2.0-rc.2` (`tracing`, `logs`, `metrics`): a component's own spans, under its
//! invocation's span, and its log records, in the host's log.
//!
//! Spans a component ends go out with the host's (see [`trace::export`]); while export is off
//! they are dropped and `outer-span-context` is the invalid (all-zero) context. What a guest
//! hands over is bounded before it is kept: names and values are cut, lists are capped and
//! what was dropped is counted. Metrics are not exported: `export` says so.

use crate::types::trace;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use std::borrow::Cow;
use std::time::{Duration, SystemTime};
use wasmtime::component::{HasData, Linker};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit/wasi-otel-0.2.0-rc.2",
        world: "wasi:otel/imports",
        require_store_data_send: true,
        with: {
            "wasi:clocks/wall-clock": wasmtime_wasi::p2::bindings::clocks::wall_clock,
            "wasi:clocks/monotonic-clock": wasmtime_wasi::p2::bindings::clocks::monotonic_clock,
            "wasi:io/poll": wasmtime_wasi::p2::bindings::io::poll,
        },
    });
}

use bindings::wasi::otel::{logs, metrics, tracing as wit, types};
use wasmtime_wasi::p2::bindings::clocks::wall_clock::Datetime;

/// Bytes of a span or event name, attribute key or value kept (longer ones are cut).
const MAX_TEXT: usize = 4096;
/// Attributes per span, event or link kept; events and links per span.
const MAX_ATTRIBUTES: usize = 128;
const MAX_EVENTS: usize = 128;
const MAX_LINKS: usize = 32;

/// The invocation a component's telemetry belongs to.
pub struct OtelView<'a> {
    pub service: &'a str,
    pub request_id: &'a str,
    /// The invocation's trace context (empty while spans are not exported).
    pub trace: &'a opentelemetry::Context,
}

struct HasOtel;
impl HasData for HasOtel {
    type Data<'a> = OtelView<'a>;
}

/// Links `tracing`, `logs`, `metrics` and `types` (the clocks and poll they use are WASI's).
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    f: fn(&mut T) -> OtelView<'_>,
) -> wasmtime::Result<()> {
    wit::add_to_linker::<T, HasOtel>(linker, f)?;
    logs::add_to_linker::<T, HasOtel>(linker, f)?;
    metrics::add_to_linker::<T, HasOtel>(linker, f)?;
    types::add_to_linker::<T, HasOtel>(linker, f)?;
    Ok(())
}

impl types::Host for OtelView<'_> {}

impl wit::Host for OtelView<'_> {
    fn on_start(&mut self, _context: wit::SpanContext) {}

    fn on_end(&mut self, span: wit::SpanData) {
        if !trace::enabled() {
            return;
        }
        match span_data(span, self.service) {
            Some(span) => trace::export(span),
            None => ::tracing::debug!(service = self.service, "dropped a span with invalid ids"),
        }
    }

    fn outer_span_context(&mut self) -> wit::SpanContext {
        to_wit(self.trace.span().span_context())
    }
}

impl logs::Host for OtelView<'_> {
    fn on_emit(&mut self, record: logs::LogRecord) {
        let body = record.body.as_deref().map(|b| cut(b.to_string()));
        let body = body.as_deref().unwrap_or("");
        let trace_id = record.trace_id.as_deref().unwrap_or("");
        let (service, request_id) = (self.service, self.request_id);
        macro_rules! emit {
            ($level:ident) => {
                ::tracing::$level!(target: "guest", service, request_id, trace_id, "{body}")
            };
        }
        // OpenTelemetry's severity numbers: 1-4 trace, 5-8 debug, 9-12 info, 13-16 warn, 17-24
        // error (none given: info).
        match record.severity_number.unwrap_or(9) {
            0..=4 => emit!(trace),
            5..=8 => emit!(debug),
            9..=12 => emit!(info),
            13..=16 => emit!(warn),
            _ => emit!(error),
        }
    }
}

impl metrics::Host for OtelView<'_> {
    fn export(&mut self, _metrics: metrics::ResourceMetrics) -> Result<(), metrics::Error> {
        Err("this host does not export a component's metrics; it serves its own on /metrics".into())
    }
}

/// The SDK's span for a guest's, with `microsvc.service` added; `None` if its ids are invalid.
fn span_data(span: wit::SpanData, service: &str) -> Option<SpanData> {
    let span_context = from_wit(&span.span_context)?;
    let parent_span_id = match span.parent_span_id.as_str() {
        "" => SpanId::INVALID,
        id => SpanId::from_hex(id).ok()?,
    };
    let (mut kept, dropped) = attributes(span.attributes);
    kept.push(KeyValue::new("microsvc.service", service.to_string()));
    let mut events = SpanEvents::default();
    events.dropped_count =
        count(span.events.len().saturating_sub(MAX_EVENTS)) + span.dropped_events;
    events.events = (span.events.into_iter().take(MAX_EVENTS))
        .map(|e| {
            let (kept, dropped) = attributes(e.attributes);
            opentelemetry::trace::Event::new(cut(e.name), time(e.time), kept, dropped)
        })
        .collect();
    let mut links = SpanLinks::default();
    links.dropped_count = count(span.links.len().saturating_sub(MAX_LINKS)) + span.dropped_links;
    links.links = (span.links.into_iter().take(MAX_LINKS))
        .filter_map(|l| {
            let (kept, dropped) = attributes(l.attributes);
            let context = from_wit(&l.span_context)?;
            Some(opentelemetry::trace::Link::new(context, kept, dropped))
        })
        .collect();
    let scope = span.instrumentation_scope;
    let instrumentation_scope = InstrumentationScope::builder(cut(scope.name))
        .with_version(scope.version.map(cut).unwrap_or_default())
        .build();
    Some(SpanData {
        span_context,
        parent_span_id,
        parent_span_is_remote: false,
        span_kind: match span.span_kind {
            wit::SpanKind::Client => SpanKind::Client,
            wit::SpanKind::Server => SpanKind::Server,
            wit::SpanKind::Producer => SpanKind::Producer,
            wit::SpanKind::Consumer => SpanKind::Consumer,
            wit::SpanKind::Internal => SpanKind::Internal,
        },
        name: Cow::Owned(cut(span.name)),
        start_time: time(span.start_time),
        end_time: time(span.end_time),
        attributes: kept,
        dropped_attributes_count: dropped + span.dropped_attributes,
        events,
        links,
        status: match span.status {
            wit::Status::Unset => Status::Unset,
            wit::Status::Ok => Status::Ok,
            wit::Status::Error(description) => Status::error(cut(description)),
        },
        instrumentation_scope,
    })
}

/// At most [`MAX_ATTRIBUTES`] attributes, and how many were dropped. A value is JSON (the
/// WIT's `AnyValue` encoding): strings, numbers and booleans become typed values, anything
/// else its JSON text.
fn attributes(list: Vec<types::KeyValue>) -> (Vec<KeyValue>, u32) {
    let dropped = count(list.len().saturating_sub(MAX_ATTRIBUTES));
    let kept = (list.into_iter().take(MAX_ATTRIBUTES))
        .map(|kv| {
            let value: opentelemetry::Value = match serde_json::from_str(&kv.value) {
                Ok(serde_json::Value::String(s)) => cut(s).into(),
                Ok(serde_json::Value::Bool(b)) => b.into(),
                Ok(serde_json::Value::Number(n)) => match n.as_i64() {
                    Some(i) => i.into(),
                    None => n.as_f64().unwrap_or_default().into(),
                },
                _ => cut(kv.value).into(),
            };
            KeyValue::new(cut(kv.key), value)
        })
        .collect();
    (kept, dropped)
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// `text` cut to at most [`MAX_TEXT`] bytes, on a character boundary.
fn cut(mut text: String) -> String {
    if text.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

fn time(t: Datetime) -> SystemTime {
    let since = Duration::new(t.seconds, t.nanoseconds.min(999_999_999));
    SystemTime::UNIX_EPOCH
        .checked_add(since)
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn from_wit(cx: &wit::SpanContext) -> Option<SpanContext> {
    let trace_id = TraceId::from_hex(&cx.trace_id).ok()?;
    let span_id = SpanId::from_hex(&cx.span_id).ok()?;
    let flags = if cx.trace_flags.contains(wit::TraceFlags::SAMPLED) {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let state = TraceState::from_key_value(
        (cx.trace_state.iter().take(32)).map(|(k, v)| (k.as_str(), v.as_str())),
    )
    .unwrap_or_default();
    let context = SpanContext::new(trace_id, span_id, flags, cx.is_remote, state);
    context.is_valid().then_some(context)
}

fn to_wit(cx: &SpanContext) -> wit::SpanContext {
    let state = cx.trace_state().header();
    wit::SpanContext {
        trace_id: cx.trace_id().to_string(),
        span_id: cx.span_id().to_string(),
        trace_flags: if cx.is_sampled() {
            wit::TraceFlags::SAMPLED
        } else {
            wit::TraceFlags::empty()
        },
        is_remote: cx.is_remote(),
        trace_state: (state.split(',').filter_map(|kv| kv.split_once('=')))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(trace_id: &str, span_id: &str) -> wit::SpanContext {
        wit::SpanContext {
            trace_id: trace_id.into(),
            span_id: span_id.into(),
            trace_flags: wit::TraceFlags::SAMPLED,
            is_remote: false,
            trace_state: vec![],
        }
    }

    fn guest_span(name: String, attributes: Vec<types::KeyValue>) -> wit::SpanData {
        let at = |seconds| Datetime {
            seconds,
            nanoseconds: 5,
        };
        wit::SpanData {
            span_context: context("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"),
            parent_span_id: "b7ad6b7169203331".into(),
            span_kind: wit::SpanKind::Internal,
            name,
            start_time: at(10),
            end_time: at(11),
            attributes,
            events: vec![],
            links: vec![],
            status: wit::Status::Error("no".into()),
            instrumentation_scope: types::InstrumentationScope {
                name: "app".into(),
                version: None,
                schema_url: None,
                attributes: vec![],
            },
            dropped_attributes: 0,
            dropped_events: 0,
            dropped_links: 0,
        }
    }

    #[test]
    fn a_guest_span_keeps_its_ids_and_typed_attributes_and_is_bounded() {
        let kv = |key: &str, value: &str| types::KeyValue {
            key: key.into(),
            value: value.into(),
        };
        let mut attrs = vec![kv("n", "42"), kv("s", "\"hi\""), kv("b", "true")];
        attrs.extend((0..200).map(|i| kv(&format!("k{i}"), "1")));
        let span = span_data(guest_span("x".repeat(10_000), attrs), "user").unwrap();
        assert_eq!(
            span.span_context.span_id(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap()
        );
        assert_eq!(
            span.parent_span_id,
            SpanId::from_hex("b7ad6b7169203331").unwrap()
        );
        assert_eq!(span.name.len(), MAX_TEXT);
        assert_eq!(span.attributes.len(), MAX_ATTRIBUTES + 1);
        assert_eq!(span.dropped_attributes_count, 203 - MAX_ATTRIBUTES as u32);
        assert_eq!(span.attributes[0].value, opentelemetry::Value::I64(42));
        assert_eq!(span.attributes[1].value, opentelemetry::Value::from("hi"));
        assert_eq!(span.attributes[2].value, opentelemetry::Value::Bool(true));
        assert!(span
            .attributes
            .contains(&KeyValue::new("microsvc.service", "user")));
        assert_eq!(span.status, Status::error("no"));
        let start = span.start_time.duration_since(SystemTime::UNIX_EPOCH);
        assert_eq!(start.unwrap(), Duration::new(10, 5));
    }

    #[test]
    fn invalid_ids_are_refused_and_the_outer_context_round_trips() {
        let mut bad = guest_span("s".into(), vec![]);
        bad.span_context.trace_id = "00000000000000000000000000000000".into();
        assert!(span_data(bad, "user").is_none());
        let mut bad = guest_span("s".into(), vec![]);
        bad.parent_span_id = "not hex".into();
        assert!(span_data(bad, "user").is_none());
        let outer = context("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
        let back = to_wit(&from_wit(&outer).unwrap());
        assert_eq!(
            (back.trace_id, back.span_id),
            (outer.trace_id, outer.span_id)
        );
        assert!(back.trace_flags.contains(wit::TraceFlags::SAMPLED));
        let none = to_wit(&SpanContext::empty_context());
        assert_eq!(none.trace_id, "00000000000000000000000000000000");
    }
}
