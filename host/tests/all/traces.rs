//! Span export over OTLP/HTTP: one trace per request, from the gateway through the in-process
//! call, the state commit and the outbox to the handler of the event; an incoming
//! `traceparent` continues its trace.

use crate::broker::Broker;
use crate::harness::Host;
use crate::postgres_server::Postgres;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// An OTLP/HTTP receiver on a free port, keeping every span posted to it.
struct Receiver {
    url: String,
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let spans = Arc::<Mutex<Vec<Span>>>::default();
        let kept = spans.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let kept = kept.clone();
                let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    let kept = kept.clone();
                    async move {
                        assert_eq!(req.uri().path(), "/v1/traces");
                        let body = req.into_body().collect().await?.to_bytes();
                        let export = ExportTraceServiceRequest::decode(body)
                            .expect("an OTLP protobuf export");
                        let spans = export
                            .resource_spans
                            .into_iter()
                            .flat_map(|r| r.scope_spans)
                            .flat_map(|s| s.spans);
                        kept.lock().unwrap().extend(spans);
                        Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::new())))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        Receiver { url, spans }
    }

    /// The spans received once `done` holds for them (within 20 s; the host exports in
    /// batches every few seconds).
    async fn until(&self, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let spans = self.spans.lock().unwrap().clone();
            if done(&spans) || tokio::time::Instant::now() > deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn text<'a>(span: &'a Span, key: &str) -> &'a str {
    match attr(span, key) {
        Some(Value::StringValue(s)) => s,
        _ => "",
    }
}

fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// The one span of `kind` named `name` that `service` made in trace `trace` (any, if empty).
fn one<'a>(spans: &'a [Span], trace: &[u8], kind: SpanKind, name: &str, service: &str) -> &'a Span {
    let found: Vec<_> = spans
        .iter()
        .filter(|s| {
            s.kind == kind as i32 && s.name == name && text(s, "microsvc.service") == service
        })
        .filter(|s| trace.is_empty() || s.trace_id == trace)
        .collect();
    let all: Vec<_> = spans
        .iter()
        .map(|s| (&s.name, text(s, "microsvc.service"), s.kind))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{kind:?} {name} of {service}: {found:?}\nall: {all:?}"
    );
    found[0]
}

#[tokio::test]
async fn a_created_user_is_one_trace_through_call_commit_outbox_and_handler() {
    one_trace_per_request(&[], "microsvc-log").await;
}

/// The same with state and outbox rows in PostgreSQL and the events in Kafka (tansu): the
/// trace context travels in the outbox row and as Kafka record headers.
#[tokio::test]
async fn the_trace_goes_through_postgresql_and_kafka_too() {
    let pg = Postgres::start().expect("the trace tests need PostgreSQL (pg_config on PATH)");
    let url = pg.create_database("traces").unwrap();
    let broker = Broker::start()
        .expect("the trace tests need tansu: cargo install tansu --locked --features dynostore");
    one_trace_per_request(
        &["--state-url", &url, "--kafka-brokers", &broker.addr],
        "kafka",
    )
    .await;
}

async fn one_trace_per_request(flags: &[&str], system: &str) {
    let receiver = Receiver::start().await;
    let mut flags = flags.to_vec();
    flags.extend(["--otlp-endpoint", &receiver.url]);
    let host = Host::start_with(None, &flags).await;
    let r = host
        .post(
            "/api/users",
            &json!({"name": "Grace", "email": "grace@example.org"}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.json);
    let processed = |spans: &[Span]| {
        spans
            .iter()
            .any(|s| s.kind == SpanKind::Consumer as i32 && text(s, "microsvc.service") == "order")
    };
    let spans = receiver.until(processed).await;

    let gateway = one(&spans, &[], SpanKind::Server, "POST /api/users", "gateway");
    assert!(
        gateway.parent_span_id.is_empty(),
        "no traceparent came in: a root"
    );
    let trace = gateway.trace_id.clone();
    assert_eq!(text(gateway, "http.request.method"), "POST");
    assert!(matches!(
        attr(gateway, "http.response.status_code"),
        Some(Value::IntValue(201))
    ));
    let call = one(&spans, &trace, SpanKind::Client, "POST user", "gateway");
    assert_eq!(call.parent_span_id, gateway.span_id);
    let user = one(&spans, &trace, SpanKind::Server, "POST /users", "user");
    assert_eq!(user.parent_span_id, call.span_id);
    let commit = one(&spans, &trace, SpanKind::Internal, "commit", "user");
    assert_eq!(commit.parent_span_id, user.span_id);
    // The component's own span (`sdk::trace::span`, through `wasi:otel`), inside its invocation.
    let stored = one(&spans, &trace, SpanKind::Internal, "store user", "user");
    assert_eq!(stored.parent_span_id, user.span_id);
    assert!(user.start_time_unix_nano <= stored.start_time_unix_nano);
    assert!(stored.end_time_unix_nano <= user.end_time_unix_nano);
    let send = one(&spans, &trace, SpanKind::Producer, "send user-created", "");
    assert_eq!(send.parent_span_id, user.span_id);
    let process = one(
        &spans,
        &trace,
        SpanKind::Consumer,
        "process user-created",
        "order",
    );
    assert_eq!(
        process.parent_span_id, user.span_id,
        "parented to the creation context"
    );
    assert_eq!(process.links.len(), 1);
    assert_eq!(process.links[0].span_id, user.span_id);
    assert_eq!(text(process, "messaging.destination.name"), "user-created");
    assert_eq!(
        text(process, "messaging.consumer.group.name"),
        "order-service"
    );
    assert_eq!(text(process, "messaging.system"), system);
    assert_eq!(text(send, "messaging.system"), system);
    assert!(matches!(
        attr(process, "messaging.kafka.offset"),
        Some(Value::IntValue(_))
    ));

    // Another request, another trace; a `traceparent` sent by the client is continued.
    let parent_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_span = "00f067aa0ba902b7";
    let traced = |request: reqwest::RequestBuilder, traceparent: String| async move {
        request
            .header("traceparent", traceparent)
            .send()
            .await
            .unwrap()
            .status()
    };
    let users = || host.http.get(host.url("gateway", "/api/users"));
    let status = traced(users(), format!("00-{parent_trace}-{parent_span}-01")).await;
    assert_eq!(status, 200);
    host.get("/api/products").await;
    let listed = |spans: &[Span]| {
        spans
            .iter()
            .filter(|s| {
                s.kind == SpanKind::Server as i32 && text(s, "microsvc.service") == "gateway"
            })
            .count()
            >= 3
    };
    let spans = receiver.until(listed).await;
    let continued = one(&spans, &[], SpanKind::Server, "GET /api/users", "gateway");
    assert_eq!(hex(&continued.trace_id), parent_trace);
    assert_eq!(hex(&continued.parent_span_id), parent_span);
    let fresh = one(
        &spans,
        &[],
        SpanKind::Server,
        "GET /api/products",
        "gateway",
    );
    assert!(fresh.parent_span_id.is_empty());
    // Reading commits nothing: no commit span in its trace.
    assert!(!spans
        .iter()
        .any(|s| s.trace_id == fresh.trace_id && s.name == "commit"));
    let traces: std::collections::HashSet<_> = [&trace, &continued.trace_id, &fresh.trace_id]
        .into_iter()
        .collect();
    assert_eq!(traces.len(), 3, "one trace per request");

    // A client's sampled-out trace stays absent, the component's own span included; a later
    // sampled request's spans arriving shows the earlier ones would have (one FIFO batch queue).
    let dropped_trace = "0af7651916cd43dd8448eb211c80319c";
    let create = (host.http.post(host.url("gateway", "/api/users")))
        .json(&json!({"name": "Ada", "email": "ada@example.org"}));
    let status = traced(create, format!("00-{dropped_trace}-b7ad6b7169203331-00")).await;
    assert_eq!(status, 201);
    let later_trace = "5b8efff798038103d269b633813fc60c";
    let status = traced(users(), format!("00-{later_trace}-eee19b7ec3c1b174-01")).await;
    assert_eq!(status, 200);
    let later = |spans: &[Span]| {
        spans
            .iter()
            .any(|s| hex(&s.trace_id) == later_trace && text(s, "microsvc.service") == "user")
    };
    let spans = receiver.until(later).await;
    assert!(later(&spans), "the sampled request after it was exported");
    let leaked: Vec<_> = (spans.iter())
        .filter(|s| hex(&s.trace_id) == dropped_trace)
        .map(|s| &s.name)
        .collect();
    assert!(
        leaked.is_empty(),
        "spans of a sampled-out trace: {leaked:?}"
    );
}
