//! Messages as the host stores and moves them, and records handed to subscribers.

use serde::{Deserialize, Serialize};

/// A record as the host stores and moves it: the WIT `message`, owned by the host.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Message {
    /// Bytes the message holds: topic, key, payload and headers.
    pub fn size(&self) -> usize {
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        self.topic.len() + self.key.as_ref().map_or(0, String::len) + self.payload.len() + headers
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One record handed to a subscriber, with where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub message: Message,
    pub partition: u32,
    pub offset: u64,
}
