//! Plain data every layer shares: HTTP requests and responses, messages, contract numbers.

pub mod budget;
pub mod contract;
pub mod http;
pub mod message;

pub use budget::{Budget, Overrun};
pub use http::{json_error, request_id, HttpRequest, Resp, REQUEST_ID};
pub use message::{Delivery, Message};
