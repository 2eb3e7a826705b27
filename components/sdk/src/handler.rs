//! The values a [`message_handler!`](crate::message_handler) function takes and returns.

pub use crate::subscriber_bindings::exports::microsvc::platform::handler::{Delivery, HandleError};
