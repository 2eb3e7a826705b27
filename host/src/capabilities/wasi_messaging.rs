//! `wasi:messaging@0.2.0-draft` `types` and `producer`, and the `incoming-handler` export: the
//! outbox and the consumers, in the standard's words.
//!
//! `client.connect(name)` opens a client the manifest lists (`messaging_clients`); any other
//! name is `permission-denied`. A sent message is the record `send` stages in the invocation,
//! as `microsvc:platform/producer` does: it leaves only if the invocation commits, to a topic
//! the manifest's `produces` lists. Its data is the record's value, its content type the
//! `content-type` header, its metadata the other headers, except `key` (or CloudEvents'
//! `partitionkey`), which is the record's key, and the names [`DELIVERY_METADATA`] that a
//! delivered message carries, which are not sent on. Messages the guest holds count against
//! the invocation's host budget.

use super::bindings::exports::microsvc::platform::handler::Delivery;
use super::producer::ProducerView;
use crate::types::budget::ENTRY_OVERHEAD;
use crate::types::Message;
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit/deps/wasi-messaging-0.2.0-draft",
        world: "wasi:messaging/messaging-core",
        imports: { default: trappable },
        exports: { default: async },
        with: {
            "wasi:messaging/types.client": super::Client,
            "wasi:messaging/types.message": super::WasiMessage,
        },
    });
}

pub use bindings::exports::wasi::messaging::incoming_handler;
use bindings::wasi::messaging::{producer, types};
use types::Error;

/// The metadata a delivered message carries about where it came from.
pub const DELIVERY_METADATA: [&str; 4] = ["topic", "partition", "offset", "attempt"];

/// Metadata entries whose value is the record's key, in order of preference.
const KEY_METADATA: [&str; 2] = ["key", "partitionkey"];

const CONTENT_TYPE: &str = "content-type";

/// A connection the manifest allowed: its label.
pub struct Client {
    name: String,
}

/// A message a guest builds or was handed.
#[derive(Default)]
pub struct WasiMessage {
    topic: Option<String>,
    content_type: Option<String>,
    data: Vec<u8>,
    metadata: Vec<(String, String)>,
}

impl WasiMessage {
    /// Host bytes it holds, as the budget counts them.
    fn size(&self) -> usize {
        let metadata: usize = self.metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
        ENTRY_OVERHEAD
            + self.data.len()
            + metadata
            + self.topic.as_ref().map_or(0, String::len)
            + self.content_type.as_ref().map_or(0, String::len)
    }

    /// The record `send` stages for it on `topic`.
    fn into_record(self, topic: String) -> Message {
        let key = KEY_METADATA.iter().find_map(|name| {
            let (_, value) = self.metadata.iter().find(|(k, _)| k == name)?;
            Some(value.clone())
        });
        let passed_on = |name: &str| {
            !KEY_METADATA.contains(&name)
                && !DELIVERY_METADATA.contains(&name)
                && !name.eq_ignore_ascii_case(CONTENT_TYPE)
        };
        let mut headers: Vec<(String, String)> = (self.content_type.into_iter())
            .map(|t| (CONTENT_TYPE.to_string(), t))
            .collect();
        headers.extend(self.metadata.into_iter().filter(|(k, _)| passed_on(k)));
        Message {
            topic,
            key,
            payload: self.data,
            headers,
        }
    }

    /// The message a handler is handed for `delivery`.
    fn delivered(delivery: &Delivery) -> WasiMessage {
        let record = &delivery.message;
        let is_content_type = |name: &str| name.eq_ignore_ascii_case(CONTENT_TYPE);
        let content_type = (record.headers.iter())
            .find(|(k, _)| is_content_type(k))
            .map(|(_, v)| v.clone());
        let mut metadata: Vec<(String, String)> = (record.headers.iter())
            .filter(|(k, _)| !is_content_type(k))
            .cloned()
            .collect();
        metadata.extend(
            record
                .key
                .iter()
                .map(|k| (KEY_METADATA[0].into(), k.clone())),
        );
        let place = [
            record.topic.clone(),
            delivery.partition.to_string(),
            delivery.offset.to_string(),
            delivery.attempt.to_string(),
        ];
        metadata.extend(DELIVERY_METADATA.iter().map(|n| n.to_string()).zip(place));
        WasiMessage {
            topic: Some(record.topic.clone()),
            content_type,
            data: record.payload.clone(),
            metadata,
        }
    }
}

/// What `wasi:messaging` works on: the service's producer, the store's resources and the
/// clients the manifest allows.
pub struct MessagingView<'a> {
    pub producer: ProducerView<'a>,
    pub table: &'a mut ResourceTable,
    pub clients: &'a [String],
}

struct HasMessaging;
impl HasData for HasMessaging {
    type Data<'a> = MessagingView<'a>;
}

/// Links `types` and `producer`.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    f: fn(&mut T) -> MessagingView<'_>,
) -> wasmtime::Result<()> {
    types::add_to_linker::<T, HasMessaging>(linker, f)?;
    producer::add_to_linker::<T, HasMessaging>(linker, f)?;
    Ok(())
}

/// `delivery`, as the message resource `incoming-handler.handle` takes, in `table`.
pub fn incoming(
    table: &mut ResourceTable,
    delivery: &Delivery,
) -> wasmtime::Result<Resource<WasiMessage>> {
    Ok(table.push(WasiMessage::delivered(delivery))?)
}

/// What a handler's error says, for the dead-letter record and the logs.
pub fn describe(error: &incoming_handler::Error) -> String {
    match error {
        Error::Timeout => "timeout".to_string(),
        Error::Connection(m) => format!("connection: {m}"),
        Error::PermissionDenied(m) => format!("permission denied: {m}"),
        Error::Other(m) => m.clone(),
    }
}

impl MessagingView<'_> {
    /// Charges what `message` now holds and gives back what it held before.
    fn resize(
        &mut self,
        message: &Resource<WasiMessage>,
        change: impl FnOnce(&mut WasiMessage),
    ) -> wasmtime::Result<()> {
        let message = self.table.get_mut(message)?;
        let before = message.size();
        change(message);
        let after = message.size();
        let budget = &mut self.producer.txn.budget;
        budget.refund(before);
        budget.charge(after)?;
        Ok(())
    }

    fn message(&self, message: &Resource<WasiMessage>) -> wasmtime::Result<&WasiMessage> {
        Ok(self.table.get(message)?)
    }
}

type Outcome<T> = wasmtime::Result<Result<T, Error>>;

impl types::Host for MessagingView<'_> {}

impl types::HostClient for MessagingView<'_> {
    fn connect(&mut self, name: String) -> Outcome<Resource<Client>> {
        if !self.clients.contains(&name) {
            tracing::warn!(client = %name, "wasi:messaging client not in the manifest's messaging_clients refused");
            return Ok(Err(Error::PermissionDenied(format!(
                "messaging client {name:?} is not in this service's messaging_clients"
            ))));
        }
        self.producer
            .txn
            .budget
            .charge(ENTRY_OVERHEAD + name.len())?;
        Ok(Ok(self.table.push(Client { name })?))
    }

    fn disconnect(&mut self, _client: Resource<Client>) -> Outcome<()> {
        Ok(Ok(()))
    }

    fn drop(&mut self, client: Resource<Client>) -> wasmtime::Result<()> {
        let client = self.table.delete(client)?;
        (self.producer.txn.budget).refund(ENTRY_OVERHEAD + client.name.len());
        Ok(())
    }
}

impl types::HostMessage for MessagingView<'_> {
    fn new(&mut self, data: Vec<u8>) -> wasmtime::Result<Resource<WasiMessage>> {
        let message = WasiMessage {
            data,
            ..WasiMessage::default()
        };
        self.producer.txn.budget.charge(message.size())?;
        Ok(self.table.push(message)?)
    }

    fn topic(&mut self, message: Resource<WasiMessage>) -> wasmtime::Result<Option<String>> {
        Ok(self.message(&message)?.topic.clone())
    }

    fn content_type(&mut self, message: Resource<WasiMessage>) -> wasmtime::Result<Option<String>> {
        Ok(self.message(&message)?.content_type.clone())
    }

    fn set_content_type(
        &mut self,
        message: Resource<WasiMessage>,
        content_type: String,
    ) -> wasmtime::Result<()> {
        self.resize(&message, |m| m.content_type = Some(content_type))
    }

    fn data(&mut self, message: Resource<WasiMessage>) -> wasmtime::Result<Vec<u8>> {
        Ok(self.message(&message)?.data.clone())
    }

    fn set_data(&mut self, message: Resource<WasiMessage>, data: Vec<u8>) -> wasmtime::Result<()> {
        self.resize(&message, |m| m.data = data)
    }

    fn metadata(
        &mut self,
        message: Resource<WasiMessage>,
    ) -> wasmtime::Result<Option<Vec<(String, String)>>> {
        let metadata = &self.message(&message)?.metadata;
        Ok((!metadata.is_empty()).then(|| metadata.clone()))
    }

    fn add_metadata(
        &mut self,
        message: Resource<WasiMessage>,
        key: String,
        value: String,
    ) -> wasmtime::Result<()> {
        self.resize(&message, |m| {
            match m.metadata.iter_mut().find(|(k, _)| *k == key) {
                Some(entry) => entry.1 = value,
                None => m.metadata.push((key, value)),
            }
        })
    }

    fn set_metadata(
        &mut self,
        message: Resource<WasiMessage>,
        metadata: Vec<(String, String)>,
    ) -> wasmtime::Result<()> {
        self.resize(&message, |m| m.metadata = metadata)
    }

    fn remove_metadata(
        &mut self,
        message: Resource<WasiMessage>,
        key: String,
    ) -> wasmtime::Result<()> {
        self.resize(&message, |m| m.metadata.retain(|(k, _)| *k != key))
    }

    fn drop(&mut self, message: Resource<WasiMessage>) -> wasmtime::Result<()> {
        let message = self.table.delete(message)?;
        self.producer.txn.budget.refund(message.size());
        Ok(())
    }
}

impl producer::Host for MessagingView<'_> {
    fn send(
        &mut self,
        client: Resource<Client>,
        topic: String,
        message: Resource<WasiMessage>,
    ) -> Outcome<()> {
        self.table.get(&client)?;
        let message = self.table.delete(message)?;
        self.producer.txn.budget.refund(message.size());
        Ok(self
            .producer
            .stage(message.into_record(topic))
            .map_err(|e| {
                use super::bindings::microsvc::platform::producer::SendError;
                match e {
                    SendError::TopicNotAllowed(t) => Error::PermissionDenied(format!(
                        "topic {t:?} is not in this service's produces"
                    )),
                    SendError::PayloadTooLarge(n) => Error::Other(format!(
                    "message too large: {n} bytes (at most 1 MiB, within the invocation's budget)"
                )),
                    SendError::InvalidTopic(t) => Error::Other(format!("invalid topic {t:?}")),
                }
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::types::{HostClient, HostMessage};
    use super::*;
    use crate::capabilities::bindings::microsvc::platform::producer::Message as Record;
    use crate::storage::Txn;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_delivered_message_says_where_it_came_from_and_sends_on_without_it() {
        let delivery = Delivery {
            message: Record {
                topic: "visited".into(),
                key: Some("k1".into()),
                payload: b"{}".to_vec(),
                headers: pairs(&[("Content-Type", "application/json"), ("event-id", "e1")]),
            },
            partition: 3,
            offset: 42,
            attempt: 2,
        };
        let message = WasiMessage::delivered(&delivery);
        assert_eq!(message.topic.as_deref(), Some("visited"));
        assert_eq!(message.content_type.as_deref(), Some("application/json"));
        assert_eq!(
            message.metadata,
            pairs(&[
                ("event-id", "e1"),
                ("key", "k1"),
                ("topic", "visited"),
                ("partition", "3"),
                ("offset", "42"),
                ("attempt", "2"),
            ])
        );
        let record = message.into_record("elsewhere".into());
        assert_eq!(record.topic, "elsewhere");
        assert_eq!(record.key.as_deref(), Some("k1"));
        assert_eq!(
            record.headers,
            pairs(&[("content-type", "application/json"), ("event-id", "e1")])
        );
    }

    #[test]
    fn key_comes_before_partitionkey_and_neither_is_a_header() {
        let message = WasiMessage {
            metadata: pairs(&[("partitionkey", "p"), ("key", "k"), ("trace", "t")]),
            ..WasiMessage::default()
        };
        let record = message.into_record("t".into());
        assert_eq!(record.key.as_deref(), Some("k"));
        assert_eq!(record.headers, pairs(&[("trace", "t")]));
        let message = WasiMessage {
            metadata: pairs(&[("partitionkey", "p")]),
            ..WasiMessage::default()
        };
        assert_eq!(message.into_record("t".into()).key.as_deref(), Some("p"));
    }

    #[test]
    fn messages_the_guest_holds_count_against_the_invocation_budget() {
        let (produces, clients) = (vec![], vec!["events".to_string()]);
        let no_trace = opentelemetry::Context::new();
        let mut table = ResourceTable::new();
        let mut held = |txn: &mut Txn, hold: &dyn Fn(&mut MessagingView<'_>)| {
            let mut view = MessagingView {
                producer: ProducerView {
                    txn,
                    allowed_topics: &produces,
                    request_id: "r",
                    trace: &no_trace,
                },
                table: &mut table,
                clients: &clients,
            };
            hold(&mut view);
        };

        let mut txn = Txn::limited("svc".into(), 4096);
        held(&mut txn, &|view| {
            let denied = view.connect("other".into()).unwrap();
            assert!(matches!(denied, Err(Error::PermissionDenied(_))));
            view.connect("events".into()).unwrap().unwrap();
            let message = view.new(vec![0; 3000]).unwrap();
            // Grown past the budget, the message fails the invocation.
            let again = Resource::new_borrow(message.rep());
            assert!(view.set_data(again, vec![0; 5000]).is_err());
        });
        assert!(txn.budget.overrun().is_some());

        // Dropped messages give their bytes back.
        let mut txn = Txn::limited("svc".into(), 4096);
        held(&mut txn, &|view| {
            for _ in 0..10 {
                let message = view.new(vec![0; 3000]).unwrap();
                HostMessage::drop(view, message).unwrap();
            }
        });
        assert!(txn.budget.overrun().is_none());
    }
}
