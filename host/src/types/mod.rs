//! Plain data every layer shares: HTTP requests and responses, messages, budgets, TLS settings.

pub mod budget;
pub mod http;
pub mod message;
pub mod tls;
pub mod trace;

pub use budget::{Budget, Overrun};
pub use http::{json_error, request_id, HttpRequest, HttpResponse, REQUEST_ID};
pub use message::{Delivery, Message};
