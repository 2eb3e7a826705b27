//! The values a [`message_handler!`](crate::message_handler) function takes and returns.

use serde::de::DeserializeOwned;

pub use crate::subscriber_bindings::exports::microsvc::platform::handler::{Delivery, HandleError};

/// The JSON payload of `delivery`, which `service` expects on `topic` only. Another topic or a
/// payload that is not a `T` is rejected: no retry can fix it, so it goes to the dead letters.
pub fn json_payload<T: DeserializeOwned>(
    delivery: &Delivery,
    topic: &str,
    service: &str,
) -> Result<T, HandleError> {
    let message = &delivery.message;
    if message.topic != topic {
        return Err(HandleError::Reject(format!(
            "{service} does not handle topic {:?}",
            message.topic
        )));
    }
    serde_json::from_slice(&message.payload).map_err(|e| {
        HandleError::Reject(format!(
            "{topic} payload is not a {}: {e}",
            std::any::type_name::<T>()
                .rsplit("::")
                .next()
                .unwrap_or("record")
        ))
    })
}
