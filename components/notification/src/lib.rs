//! notification-service: a welcome notification for every user created. It consumes
//! `user-created` in its own consumer group, so it and order-service each get every event
//! (fan-out). Added to a host by its manifest entry alone.

use serde::{Deserialize, Serialize};

use sdk::handler::{Delivery, HandleError};
use sdk::input::{self, Outcome};
use sdk::router::{Params, Router};
use sdk::store;
use sdk::{Request, Response};

const NOTIFICATIONS: &str = "notifications";
const USER_CREATED: &str = "user-created";

/// A `user-created` payload (the fields this service uses).
#[derive(Deserialize)]
struct UserCreated {
    id: u64,
    name: String,
    email: String,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Notification {
    user_id: u64,
    to: String,
    message: String,
}

sdk::http_service!(super::route);
sdk::message_handler!(super::handle);

fn route(req: Request) -> Response {
    Router::new(&req)
        .get("/notifications", list)
        .get("/notifications/:user", for_user)
        .finish()
}

fn list(req: &Request, _: &Params) -> Outcome {
    sdk::page::list(req, NOTIFICATIONS, Vec::<(String, Notification)>::new(), Ok)
}

fn for_user(_: &Request, path: &Params) -> Outcome {
    let id = input::path_id(path.get("user"))?;
    match store::get_json::<Notification>(NOTIFICATIONS, &store::record_key(id))? {
        Some(n) => Ok(Response::json(200, &n)),
        None => Err(Response::not_found(format!(
            "no notification for user {id}"
        ))),
    }
}

fn handle(delivery: Delivery) -> Result<(), HandleError> {
    let user: UserCreated =
        sdk::handler::json_payload(&delivery, USER_CREATED, "notification-service")?;
    if user.id == 0 {
        return Err(HandleError::Reject(format!(
            "{USER_CREATED} payload has id 0"
        )));
    }
    // Keyed by the user: a redelivered event writes the same notification again, never a second.
    let notification = Notification {
        user_id: user.id,
        to: user.email,
        message: format!("Welcome, {}!", user.name),
    };
    store::put_json(NOTIFICATIONS, &store::record_key(user.id), &notification)
        .map_err(|e| HandleError::Retry(e.to_string()))
}
