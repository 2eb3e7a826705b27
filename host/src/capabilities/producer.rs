//! `microsvc:platform/producer`: messages staged in the invocation, sent only if it commits.

use super::bindings::microsvc::platform::producer::{self as wit, SendError};
use crate::config::manifest::valid_topic;
use crate::storage::Txn;
use crate::types::http::MAX_HEADERS;
use crate::types::{trace, Message, REQUEST_ID};
use anyhow::Result;
use platform_contract::MAX_BODY;
use wasmtime::component::{HasData, Linker};

/// What `producer::send` works on: the invocation's transaction and the service's permissions.
pub struct ProducerView<'a> {
    pub txn: &'a mut Txn,
    pub allowed_topics: &'a [String],
    pub request_id: &'a str,
    /// The invocation's trace context, written into each message it sends.
    pub trace: &'a opentelemetry::Context,
}

struct HasProducer;
impl HasData for HasProducer {
    type Data<'a> = ProducerView<'a>;
}

pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    f: fn(&mut T) -> ProducerView<'_>,
) -> wasmtime::Result<()> {
    wit::add_to_linker::<T, HasProducer>(linker, f)
}

impl ProducerView<'_> {
    /// Stages `msg` in the invocation if the service may send to its topic and it is within
    /// the broker's limits, stamped with the request id unless it carries one.
    pub(super) fn stage(&mut self, mut msg: Message) -> Result<(), SendError> {
        if !valid_topic(&msg.topic) {
            return Err(SendError::InvalidTopic(msg.topic));
        }
        if !self.allowed_topics.contains(&msg.topic) {
            return Err(SendError::TopicNotAllowed(msg.topic));
        }
        if msg.payload.len() > MAX_BODY {
            return Err(SendError::PayloadTooLarge(msg.payload.len() as u64));
        }
        // Key and headers travel with the payload and count against the same 1 MiB, as the
        // broker counts them against its own message size limit.
        let size = msg.size() - msg.topic.len();
        if size > MAX_BODY || msg.headers.len() > MAX_HEADERS {
            return Err(SendError::PayloadTooLarge(size as u64));
        }
        if msg.header(REQUEST_ID).is_none() {
            msg.headers
                .push((REQUEST_ID.into(), self.request_id.to_string()));
        }
        trace::to_record(self.trace, &mut msg.headers);
        // Past the invocation's host budget: the guest learns it here, and the invocation
        // fails whatever it does next.
        self.txn
            .send(msg)
            .map_err(|e| SendError::PayloadTooLarge(e.limit as u64))
    }
}

impl wit::Host for ProducerView<'_> {
    fn send(&mut self, message: wit::Message) -> Result<(), SendError> {
        self.stage(Message {
            topic: message.topic,
            key: message.key,
            payload: message.payload,
            headers: message.headers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::wit::Host;
    use super::*;
    use crate::storage::redb_store::oldest_local;
    use crate::storage::RedbStore;

    #[test]
    fn send_checks_topic_and_size_and_stamps_request_id() {
        let db = RedbStore::in_memory().unwrap();
        let mut txn = Txn::new("user".into());
        let allowed = vec!["user-created".to_string()];
        let mut view = ProducerView {
            txn: &mut txn,
            allowed_topics: &allowed,
            request_id: "req-1",
            trace: &opentelemetry::Context::new(),
        };
        let m = |topic: &str, size: usize| wit::Message {
            topic: topic.into(),
            key: None,
            payload: vec![b'x'; size],
            headers: vec![],
        };
        assert!(matches!(
            view.send(m("orders", 2)),
            Err(SendError::TopicNotAllowed(_))
        ));
        assert!(matches!(
            view.send(m("bad topic", 2)),
            Err(SendError::InvalidTopic(_))
        ));
        assert!(matches!(
            view.send(m("user-created", MAX_BODY + 1)),
            Err(SendError::PayloadTooLarge(_))
        ));
        let mut keyed = m("user-created", MAX_BODY - 10);
        keyed.key = Some("k".repeat(11));
        assert!(matches!(
            view.send(keyed),
            Err(SendError::PayloadTooLarge(_))
        ));
        let mut headed = m("user-created", 2);
        headed.headers = (0..=MAX_HEADERS)
            .map(|i| (format!("h{i}"), "v".into()))
            .collect();
        assert!(matches!(
            view.send(headed),
            Err(SendError::PayloadTooLarge(_))
        ));
        view.send(m("user-created", 2)).unwrap();
        assert!(txn.sends());
        db.commit_blocking(&txn).unwrap();
        let sent = oldest_local(&db, 10).unwrap();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].1.header(REQUEST_ID), Some("req-1"));
    }
}
