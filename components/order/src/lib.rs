//! order-service: orders for known users and products. Users are known from `user-created`
//! messages (kept in a local cache); products are checked with product-service on each order.

use serde::{Deserialize, Serialize};

use sdk::handler::{Delivery, HandleError};
use sdk::input::{self, Outcome};
use sdk::router::{Params, Router};
use sdk::store;
use sdk::{Request, Response};

const ORDERS: &str = "orders";
const USER_CACHE: &str = "user-cache";
const NEXT_ID: &str = "next-order-id";
const USER_CREATED: &str = "user-created";
const PRODUCT_SERVICE: &str = "product-service";

/// Part of the component rather than stored, so there is no init step to run or to forget.
const SEED: Order = Order {
    id: 101,
    user_id: 1,
    product_id: 1,
    quantity: 1,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Order {
    id: u64,
    user_id: u64,
    product_id: u64,
    quantity: u64,
}

/// A `user-created` payload, as cached.
#[derive(Debug, Serialize, Deserialize)]
struct CachedUser {
    id: u64,
    name: String,
    email: String,
}

sdk::http_service!(super::route);
sdk::message_handler!(super::handle);

/// Stores the user under its id. Overwriting makes redelivery of the same message harmless.
fn handle(delivery: Delivery) -> Result<(), HandleError> {
    let user: CachedUser = sdk::handler::json_payload(&delivery, USER_CREATED, "order-service")?;
    if user.id == 0 {
        return Err(HandleError::Reject(format!(
            "{USER_CREATED} payload has id 0"
        )));
    }
    // Storage failures are the host's and may pass; let it retry.
    store::put_json(USER_CACHE, &user.id.to_string(), &user)
        .map_err(|e| HandleError::Retry(e.to_string()))
}

fn route(req: Request) -> Response {
    Router::new(&req)
        .get("/orders", list_orders)
        .post("/orders", create_order)
        .get("/orders/:id", get_order)
        .finish()
}

/// An order as served by GET: the stored fields plus `"user"`, the cached user or `null` if
/// it is not (yet) known.
#[derive(Debug, Serialize)]
struct OrderView {
    #[serde(flatten)]
    order: Order,
    user: Option<CachedUser>,
}

fn cached_user(user_id: u64) -> Result<Option<CachedUser>, store::StoreError> {
    store::get_json(USER_CACHE, &user_id.to_string())
}

fn with_user(order: Order) -> Result<OrderView, store::StoreError> {
    let user = cached_user(order.user_id)?;
    Ok(OrderView { order, user })
}

/// The seed first (its key is the lowest), then the stored orders.
fn list_orders(req: &Request, _: &Params) -> Outcome {
    let seed = vec![(store::record_key(SEED.id), SEED)];
    sdk::page::list(req, ORDERS, seed, with_user)
}

fn get_order(_: &Request, path: &Params) -> Outcome {
    let id = input::path_id(path.get("id"))?;
    let order = if id == SEED.id {
        Some(SEED)
    } else {
        store::get_json::<Order>(ORDERS, &store::record_key(id))?
    };
    match order {
        Some(order) => Ok(Response::json(200, &with_user(order)?)),
        None => Err(Response::not_found(format!("order {id} not found"))),
    }
}

fn create_order(req: &Request, _: &Params) -> Outcome {
    let fields = input::json_object(&req.body)?;
    let user_id = input::positive_int_field(&fields, "userId")?;
    let product_id = input::positive_int_field(&fields, "productId")?;
    let quantity = input::positive_int_field(&fields, "quantity")?;

    if cached_user(user_id)?.is_none() {
        return Err(Response::error(
            422,
            format!("user {user_id} does not exist"),
        ));
    }
    check_product(product_id)?;

    let id = SEED.id + store::next_id(NEXT_ID)?;
    let order = Order {
        id,
        user_id,
        product_id,
        quantity,
    };
    store::put_json(ORDERS, &store::record_key(id), &order)?;
    Ok(Response::json(201, &order))
}

fn check_product(product_id: u64) -> Result<(), Response> {
    let url = format!("http://{PRODUCT_SERVICE}/products/{product_id}");
    let accept = vec![("accept".to_string(), "application/json".to_string())];
    match sdk::fetch("GET", &url, accept, Vec::new()) {
        Ok(r) if r.is_success() => Ok(()),
        Ok(r) if r.status == 404 => Err(Response::error(
            422,
            format!("product {product_id} does not exist"),
        )),
        Ok(r) => Err(Response::error(
            502,
            format!(
                "{PRODUCT_SERVICE} answered {} for product {product_id}",
                r.status
            ),
        )),
        Err(e) => Err(e.to_response(PRODUCT_SERVICE)),
    }
}
