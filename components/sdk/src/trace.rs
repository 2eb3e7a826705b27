//! `wasi:otel/tracing@0.2.0-rc.2`: spans of the component's own, under its invocation's span:
//! `sdk::trace::span("load user", || store::get_json::<User>(USERS, &key))?` (user-service's
//! `store user` is one).
//!
//! While the host exports no spans (its context for the invocation is invalid), [`span`] only
//! runs its closure.

#[allow(clippy::all)]
mod bindings {
    wit_bindgen::generate!({
        path: "../../wit/wasi-otel-0.2.0-rc.2",
        world: "wasi:otel/imports",
        generate_all,
    });
}

use bindings::wasi::clocks::wall_clock::Datetime;
use bindings::wasi::otel::tracing::{self as otel, SpanContext, SpanData, SpanKind, Status};
use bindings::wasi::otel::types::InstrumentationScope;
use std::cell::RefCell;

thread_local! {
    /// The spans open now, innermost last: the next one's parent.
    static OPEN: RefCell<Vec<SpanContext>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` inside a span called `name`, a child of the innermost open [`span`] or else of the
/// invocation's span, and hands the span to the host when `f` returns.
pub fn span<T>(name: &str, f: impl FnOnce() -> T) -> T {
    let parent = OPEN
        .with(|open| open.borrow().last().cloned())
        .unwrap_or_else(otel::outer_span_context);
    if !valid(&parent) {
        return f();
    }
    let context = SpanContext {
        span_id: format!("{:016x}", new_span_id()),
        is_remote: false,
        ..parent.clone()
    };
    otel::on_start(&context);
    let start_time = now();
    OPEN.with(|open| open.borrow_mut().push(context.clone()));
    let out = f();
    OPEN.with(|open| open.borrow_mut().pop());
    otel::on_end(&SpanData {
        span_context: context,
        parent_span_id: parent.span_id,
        span_kind: SpanKind::Internal,
        name: name.to_string(),
        start_time,
        end_time: now(),
        attributes: Vec::new(),
        events: Vec::new(),
        links: Vec::new(),
        status: Status::Unset,
        instrumentation_scope: InstrumentationScope {
            name: "microsvc-sdk".into(),
            version: Some(env!("CARGO_PKG_VERSION").into()),
            schema_url: None,
            attributes: Vec::new(),
        },
        dropped_attributes: 0,
        dropped_events: 0,
        dropped_links: 0,
    });
    out
}

/// Whether `cx` names a span (W3C: neither id is all zeros).
fn valid(cx: &SpanContext) -> bool {
    let zeros = |id: &str| id.bytes().all(|b| b == b'0');
    !zeros(&cx.trace_id) && !zeros(&cx.span_id)
}

fn new_span_id() -> u64 {
    loop {
        let id = wasi::random::random::get_random_u64();
        if id != 0 {
            return id;
        }
    }
}

fn now() -> Datetime {
    let t = wasi::clocks::wall_clock::now();
    Datetime {
        seconds: t.seconds,
        nanoseconds: t.nanoseconds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_context_with_both_ids_is_valid() {
        let cx = |trace: &str, span: &str| SpanContext {
            trace_id: trace.into(),
            span_id: span.into(),
            trace_flags: otel::TraceFlags::SAMPLED,
            is_remote: true,
            trace_state: vec![],
        };
        assert!(valid(&cx(
            "4bf92f3577b34da6a3ce929d0e0e4736",
            "00f067aa0ba902b7"
        )));
        assert!(!valid(&cx(
            "00000000000000000000000000000000",
            "00f067aa0ba902b7"
        )));
        assert!(!valid(&cx(
            "4bf92f3577b34da6a3ce929d0e0e4736",
            "0000000000000000"
        )));
    }
}
