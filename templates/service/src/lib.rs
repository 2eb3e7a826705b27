//! NAME-service. `route` gets every HTTP request on its port (and from services whose `calls`
//! name it); state, messages and calls to other services go through `sdk`.

use sdk::input::Outcome;
use sdk::router::{Params, Router};
use sdk::{Request, Response};

sdk::http_service!(super::route);

fn route(req: Request) -> Response {
    Router::new(&req).get("/", hello).finish()
}

fn hello(_: &Request, _: &Params) -> Outcome {
    Ok(Response::json(200, &serde_json::json!({ "service": "NAME" })))
}
