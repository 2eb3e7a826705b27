//! The admin API's dead letters: the records of `<topic>.dlq` for each subscribed topic, and
//! replaying them to `<topic>` (through the outbox, as the consumer dead-lettered them) once
//! the handler is fixed.

use crate::messaging::dlq_topic;
use crate::metrics;
use crate::runtime::Runtime;
use crate::types::http::json_response;
use crate::types::{json_error, Delivery, HttpResponse, Message};
use hyper::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};

/// Records listed per partition of a dead-letter topic: its newest.
pub const LISTED: usize = 200;
/// Bytes of a payload shown in the list.
const SHOWN_PAYLOAD: usize = 2048;

/// The headers the consumer adds to a dead letter; a replay leaves them out.
const DLQ_PREFIX: &str = "dlq-";

/// `GET /dead-letters`: each subscribed topic, its dead-letter topic, the services that
/// consume it and how many of its records they dead-lettered since start-up.
pub fn topics(runtime: &Runtime) -> Value {
    let services = runtime.services();
    let mut topics: Vec<&String> = services.iter().flat_map(|s| &s.spec.subscribes).collect();
    topics.sort();
    topics.dedup();
    let list: Vec<Value> = topics
        .into_iter()
        .map(|topic| {
            let consumers: Vec<&str> = (services.iter())
                .filter(|s| s.spec.subscribes.contains(topic))
                .map(|s| &*s.name)
                .collect();
            let dead_lettered: u64 = (consumers.iter())
                .map(|service| metrics::dead_lettered(service, topic))
                .sum();
            json!({
                "topic": topic,
                "dead_letter_topic": dlq_topic(topic),
                "consumers": consumers,
                "dead_lettered": dead_lettered,
            })
        })
        .collect();
    json!({ "topics": list })
}

/// The topic of `/dead-letters/<topic>` (and whether `/replay` follows), if it is a
/// subscribed one.
pub fn subscribed<'a>(runtime: &Runtime, rest: &'a str) -> Option<(&'a str, bool)> {
    let (topic, replay) = match rest.strip_suffix("/replay") {
        Some(topic) => (topic, true),
        None => (rest, false),
    };
    let known = (runtime.services().iter()).any(|s| s.spec.subscribes.iter().any(|t| t == topic));
    known.then_some((topic, replay))
}

/// `GET /dead-letters/<topic>`: the newest records of `<topic>.dlq`.
pub async fn list(runtime: &Runtime, topic: &str) -> HttpResponse {
    let dlq = dlq_topic(topic);
    match runtime.backend().read_tail(&dlq, LISTED).await {
        Ok(records) => {
            let records: Vec<Value> = records.iter().map(describe).collect();
            json_response(
                StatusCode::OK,
                &json!({ "topic": topic, "dead_letter_topic": dlq, "records": records }),
            )
        }
        Err(e) => unavailable(&dlq, e),
    }
}

/// Which dead letters to replay: `{"all": true}`, or `{"records": [{"partition": P,
/// "offset": O}, …]}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Replay {
    #[serde(default)]
    all: bool,
    #[serde(default)]
    records: Vec<At>,
}

#[derive(Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct At {
    partition: u32,
    offset: u64,
}

/// `POST /dead-letters/<topic>/replay`: sends the chosen dead letters (among the listed
/// ones) to `topic` again, as they were first sent (key, payload and headers, without the
/// consumer's `dlq-*` headers), through the outbox.
pub async fn replay(runtime: &Runtime, topic: &str, body: &[u8]) -> HttpResponse {
    let chosen: Replay = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("expected {{\"all\": true}} or {{\"records\": [{{\"partition\": 0, \"offset\": 0}}]}}: {e}"),
            )
        }
    };
    if !chosen.all && chosen.records.is_empty() {
        return json_error(StatusCode::BAD_REQUEST, "no records chosen");
    }
    let dlq = dlq_topic(topic);
    let records = match runtime.backend().read_tail(&dlq, LISTED).await {
        Ok(records) => records,
        Err(e) => return unavailable(&dlq, e),
    };
    let at = |d: &Delivery| At {
        partition: d.partition,
        offset: d.offset,
    };
    let picked: Vec<&Delivery> = (records.iter())
        .filter(|d| chosen.all || chosen.records.contains(&at(d)))
        .collect();
    if let Some(missing) = (chosen.records.iter()).find(|a| !records.iter().any(|d| at(d) == **a)) {
        return json_error(
            StatusCode::NOT_FOUND,
            &format!(
                "{dlq} has no record at partition {} offset {} among its newest {LISTED}",
                missing.partition, missing.offset
            ),
        );
    }
    // Sent in the name of a service that consumes the topic (the outbox entry's owner).
    let services = runtime.services();
    let Some(owner) = services
        .iter()
        .find(|s| s.spec.subscribes.iter().any(|t| t == topic))
    else {
        return json_error(
            StatusCode::NOT_FOUND,
            &format!("no service consumes {topic}"),
        );
    };
    let messages: Vec<Message> = (picked.into_iter())
        .map(|record| Message {
            topic: topic.to_string(),
            key: record.message.key.clone(),
            payload: record.message.payload.clone(),
            headers: (record.message.headers.iter())
                .filter(|(name, _)| !name.starts_with(DLQ_PREFIX))
                .cloned()
                .collect(),
        })
        .collect();
    let (replayed, sent) = runtime.send_later(&owner.name, messages).await;
    if let Err(e) = sent {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("replayed {replayed}, then the outbox refused: {e:#}"),
        );
    }
    tracing::info!(topic, replayed, "dead letters replayed");
    json_response(
        StatusCode::OK,
        &json!({ "topic": topic, "replayed": replayed }),
    )
}

/// A dead letter as the list shows it.
fn describe(d: &Delivery) -> Value {
    let header = |name: &str| d.message.header(name);
    let payload = &d.message.payload[..d.message.payload.len().min(SHOWN_PAYLOAD)];
    json!({
        "partition": d.partition,
        "offset": d.offset,
        "key": d.message.key,
        "payload": String::from_utf8_lossy(payload),
        "payload_bytes": d.message.payload.len(),
        "error": header("dlq-error"),
        "attempts": header("dlq-attempts").and_then(|a| a.parse::<u32>().ok()),
        "service": header("dlq-service"),
        "original": {
            "topic": header("dlq-topic"),
            "partition": header("dlq-partition").and_then(|p| p.parse::<u32>().ok()),
            "offset": header("dlq-offset").and_then(|o| o.parse::<u64>().ok()),
        },
        "headers": d.message.headers,
    })
}

fn unavailable(topic: &str, e: anyhow::Error) -> HttpResponse {
    tracing::warn!(topic, error = %format!("{e:#}"), "reading dead letters failed");
    json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("could not read {topic}: {e:#}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_names_all_or_records_and_nothing_else() {
        let all: Replay = serde_json::from_str(r#"{"all": true}"#).unwrap();
        assert!(all.all && all.records.is_empty());
        let some: Replay =
            serde_json::from_str(r#"{"records": [{"partition": 1, "offset": 7}]}"#).unwrap();
        assert!(
            some.records
                == [At {
                    partition: 1,
                    offset: 7
                }]
        );
        assert!(serde_json::from_str::<Replay>(r#"{"everything": true}"#).is_err());
        assert!(serde_json::from_str::<Replay>(r#"{"records": [{"offset": -1}]}"#).is_err());
    }

    #[test]
    fn a_dead_letter_is_described_with_its_error_and_origin() {
        let d = Delivery {
            message: Message {
                topic: "user-created.dlq".into(),
                key: Some("7".into()),
                payload: vec![b'x'; SHOWN_PAYLOAD + 10],
                headers: vec![
                    ("event-id".into(), "e7".into()),
                    ("dlq-error".into(), "bad payload".into()),
                    ("dlq-attempts".into(), "3".into()),
                    ("dlq-topic".into(), "user-created".into()),
                    ("dlq-offset".into(), "41".into()),
                ],
            },
            partition: 0,
            offset: 2,
        };
        let v = describe(&d);
        assert_eq!(v["error"], "bad payload");
        assert_eq!(v["attempts"], 3);
        assert_eq!(v["original"]["offset"], 41);
        assert_eq!(v["payload"].as_str().unwrap().len(), SHOWN_PAYLOAD);
        assert_eq!(v["payload_bytes"], SHOWN_PAYLOAD + 10);
    }
}
