//! user-service: users with unique emails; announces each new user on `user-created`.

use serde::{Deserialize, Serialize};

mod email;

use sdk::input::{self, Outcome};
use sdk::router::{Params, Router};
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
    Router::new(&req)
        .get("/users", list_users)
        .post("/users", create_user)
        .get("/users/:id", get_user)
        .finish()
}

fn list_users(req: &Request, _: &Params) -> Outcome {
    sdk::page::list(req, USERS, Vec::<(String, User)>::new(), Ok)
}

fn get_user(_: &Request, path: &Params) -> Outcome {
    let id = input::path_id(path.get("id"))?;
    match store::get_json::<User>(USERS, &store::record_key(id))? {
        Some(user) => Ok(Response::json(200, &user)),
        None => Err(Response::not_found(format!("user {id} not found"))),
    }
}

fn create_user(req: &Request, _: &Params) -> Outcome {
    let fields = input::json_object(&req.body)?;
    let name = input::validate_name("name", input::string_field(&fields, "name")?)
        .map_err(Response::bad_request)?;
    let email = input::string_field(&fields, "email")?;
    email::validate_email(email).map_err(Response::bad_request)?;

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
    sdk::trace::span("store user", || {
        store::put_json(USERS, &store::record_key(id), &user)?;
        store::set_raw(EMAILS, &email_key, id.to_string().as_bytes())
    })?;
    announce(&user)?;
    Ok(Response::json(201, &user))
}

/// Queues `user-created`; the host only releases it if this invocation commits. A 5xx makes
/// the host roll back the user just stored, so no user exists unannounced.
fn announce(user: &User) -> Result<(), Response> {
    producer::send_json(TOPIC, &user.id.to_string(), user)
}
