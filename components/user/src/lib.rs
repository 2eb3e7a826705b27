//! user-service: users with unique emails; announces each new user on `user-created`.

use serde::{Deserialize, Serialize};

use sdk::input::{self, Outcome};
use sdk::store;
use sdk::{producer, Request, Response};

const USERS: &str = "users";
const EMAILS: &str = "emails";
const NEXT_ID: &str = "next-user-id";
const TOPIC: &str = "user-created";

#[derive(Debug, Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
    email: String,
}

sdk::http_service!(super::route);

fn route(req: Request) -> Response {
    let outcome = match (req.method.as_str(), req.segments().as_slice()) {
        ("GET", ["users"]) => list_users(&req),
        ("POST", ["users"]) => create_user(&req.body),
        (method, ["users"]) => Err(Response::method_not_allowed(method, &["GET", "POST"])),
        ("GET", ["users", id]) => get_user(id),
        (method, ["users", _]) => Err(Response::method_not_allowed(method, &["GET"])),
        _ => Err(Response::no_route(&req)),
    };
    outcome.unwrap_or_else(|response| response)
}

fn list_users(req: &Request) -> Outcome {
    sdk::page::list(req, USERS, Vec::<User>::new(), Ok)
}

fn get_user(id: &str) -> Outcome {
    let id = input::path_id(id)?;
    match store::get_json::<User>(USERS, &store::record_key(id))? {
        Some(user) => Ok(Response::json(200, &user)),
        None => Err(Response::not_found(format!("user {id} not found"))),
    }
}

fn create_user(body: &[u8]) -> Outcome {
    let fields = input::json_object(body)?;
    let name = input::validate_name("name", input::string_field(&fields, "name")?)
        .map_err(Response::bad_request)?;
    let email = input::string_field(&fields, "email")?;
    input::validate_email(email).map_err(Response::bad_request)?;

    let email_key = store::bounded_key("email:", &email.to_lowercase());
    if store::get_raw(EMAILS, &email_key)?.is_some() {
        return Err(Response::error(
            409,
            format!("a user with email {email:?} already exists"),
        ));
    }

    // Only now, so that rejected requests leave no gaps in the ids.
    let id = store::next_id(NEXT_ID)?;
    let user = User {
        id,
        name,
        email: email.to_string(),
    };
    store::put_json(USERS, &store::record_key(id), &user)?;
    store::set_raw(EMAILS, &email_key, id.to_string().as_bytes())?;
    announce(&user)?;
    Ok(Response::json(201, &user))
}

/// Queues `user-created`; the host only releases it if this invocation commits.
fn announce(user: &User) -> Result<(), Response> {
    let payload = serde_json::to_vec(user)
        .map_err(|e| Response::internal(format!("could not serialize event: {e}")))?;
    let message = producer::Message {
        topic: TOPIC.into(),
        key: Some(user.id.to_string()),
        payload,
        headers: vec![
            ("event-id".into(), format!("{TOPIC}-{}", user.id)),
            ("content-type".into(), "application/json".into()),
        ],
    };
    // A 5xx makes the host roll back the user we just stored, so no user exists unannounced.
    producer::send(&message)
        .map_err(|e| Response::internal(format!("could not publish {TOPIC}: {e:?}")))
}
