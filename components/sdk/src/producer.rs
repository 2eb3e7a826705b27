//! `microsvc:platform/producer`: events staged in the invocation; the host sends them with its
//! commit, or never. [`send`] takes a [`Message`] as the interface has it; [`send_json`] builds
//! the usual one.

pub use crate::bindings::microsvc::platform::producer::*;

use crate::Response;
use serde::Serialize;

/// Stages `value` as a JSON event on `topic`, keyed by `key` (one key's events stay in order),
/// with the `event-id` `<topic>-<key>`: for an event that happens once per key, such as a
/// creation. Consumers drop an `event-id` they have seen, so redeliveries and re-runs of the
/// invocation count once. A failure is a 500, which rolls the invocation back.
pub fn send_json<T: Serialize + ?Sized>(topic: &str, key: &str, value: &T) -> Result<(), Response> {
    send_json_as(&format!("{topic}-{key}"), topic, key, value)
}

/// [`send_json`] with an `event-id` of the caller's, for keys that have several events.
pub fn send_json_as<T: Serialize + ?Sized>(
    event_id: &str,
    topic: &str,
    key: &str,
    value: &T,
) -> Result<(), Response> {
    let message = json_message(event_id, topic, key, value)?;
    send(&message).map_err(|e| Response::internal(format!("could not publish {topic}: {e:?}")))
}

fn json_message<T: Serialize + ?Sized>(
    event_id: &str,
    topic: &str,
    key: &str,
    value: &T,
) -> Result<Message, Response> {
    let payload = serde_json::to_vec(value)
        .map_err(|e| Response::internal(format!("could not serialize {topic}: {e}")))?;
    Ok(Message {
        topic: topic.into(),
        key: Some(key.into()),
        payload,
        headers: vec![
            ("event-id".into(), event_id.into()),
            ("content-type".into(), "application/json".into()),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_event_carries_its_key_id_and_content_type() {
        let m = json_message("user-created-7", "user-created", "7", &[1, 2]).unwrap();
        assert_eq!(
            (m.topic.as_str(), m.key.as_deref()),
            ("user-created", Some("7"))
        );
        assert_eq!(m.payload, b"[1,2]");
        assert_eq!(
            m.headers,
            [
                ("event-id".to_string(), "user-created-7".to_string()),
                ("content-type".to_string(), "application/json".to_string())
            ]
        );
    }
}
