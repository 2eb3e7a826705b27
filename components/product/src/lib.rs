//! product-service: a fixed seed catalog plus products created through the API.

use serde::{Deserialize, Serialize};
use serde_json::Number;

use sdk::input::{self, Outcome};
use sdk::store;
use sdk::{Request, Response};

const PRODUCTS: &str = "products";
const NEXT_ID: &str = "next-product-id";

/// Part of the component rather than stored, so there is no init step to run or to forget.
const SEEDS: [(u64, &str, u64); 2] = [(1, "Laptop", 1200), (2, "Phone", 800)];
/// Created products are numbered after the seeds.
const SEED_COUNT: u64 = SEEDS.len() as u64;

#[derive(Debug, Serialize, Deserialize)]
struct Product {
    id: u64,
    name: String,
    /// Kept as sent, so that `1200` stays an integer and `9.99` a float.
    price: Number,
}

sdk::http_service!(super::route);

fn route(req: Request) -> Response {
    let outcome = match (req.method.as_str(), req.segments().as_slice()) {
        ("GET", ["products"]) => list_products(&req),
        ("POST", ["products"]) => create_product(&req.body),
        (method, ["products"]) => Err(Response::method_not_allowed(method, &["GET", "POST"])),
        ("GET", ["products", id]) => get_product(id),
        (method, ["products", _]) => Err(Response::method_not_allowed(method, &["GET"])),
        _ => Err(Response::no_route(&req)),
    };
    outcome.unwrap_or_else(|response| response)
}

fn seeds() -> impl Iterator<Item = Product> {
    SEEDS.iter().map(|&(id, name, price)| Product {
        id,
        name: name.into(),
        price: price.into(),
    })
}

fn list_products(req: &Request) -> Outcome {
    sdk::page::list(req, PRODUCTS, seeds().collect::<Vec<Product>>(), Ok)
}

fn get_product(id: &str) -> Outcome {
    let id = input::path_id(id)?;
    let product = match seeds().find(|p| p.id == id) {
        Some(seed) => Some(seed),
        None => store::get_json::<Product>(PRODUCTS, &store::record_key(id))?,
    };
    match product {
        Some(product) => Ok(Response::json(200, &product)),
        None => Err(Response::not_found(format!("product {id} not found"))),
    }
}

fn create_product(body: &[u8]) -> Outcome {
    let fields = input::json_object(body)?;
    let name = input::validate_name("name", input::string_field(&fields, "name")?)
        .map_err(Response::bad_request)?;
    let price = input::non_negative_number_field(&fields, "price")?;

    let id = SEED_COUNT + store::next_id(NEXT_ID)?;
    let product = Product { id, name, price };
    store::put_json(PRODUCTS, &store::record_key(id), &product)?;
    Ok(Response::json(201, &product))
}
