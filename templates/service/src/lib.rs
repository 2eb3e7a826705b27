//! NAME-service. `route` gets every HTTP request on its port (and from services whose `calls`
//! name it); state, messages and calls to other services go through `sdk`.

use sdk::input::Outcome;
use sdk::{Request, Response};

sdk::http_service!(super::route);

fn route(req: Request) -> Response {
    let outcome = match (req.method.as_str(), req.segments().as_slice()) {
        ("GET", []) => hello(),
        _ => Err(Response::no_route(&req)),
    };
    outcome.unwrap_or_else(|r| r)
}

fn hello() -> Outcome {
    Ok(Response::json(200, &serde_json::json!({ "service": "NAME" })))
}
