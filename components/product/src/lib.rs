//! product-service: a fixed seed catalog plus products created through the API.

use serde::{Deserialize, Serialize};
use serde_json::Number;

use sdk::input::{self, Outcome};
use sdk::router::{Params, Router};
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
    Router::new(&req)
        .get("/products", list_products)
        .post("/products", create_product)
        .get("/products/:id", get_product)
        .finish()
}

fn seeds() -> impl Iterator<Item = Product> {
    SEEDS.iter().map(|&(id, name, price)| Product {
        id,
        name: name.into(),
        price: price.into(),
    })
}

/// The seeds first (their keys are the lowest), then the stored products.
fn list_products(req: &Request, _: &Params) -> Outcome {
    let seeds = seeds().map(|p| (store::record_key(p.id), p)).collect();
    sdk::page::list(req, PRODUCTS, seeds, Ok)
}

fn get_product(_: &Request, path: &Params) -> Outcome {
    let id = input::path_id(path.get("id"))?;
    let product = match seeds().find(|p| p.id == id) {
        Some(seed) => Some(seed),
        None => store::get_json::<Product>(PRODUCTS, &store::record_key(id))?,
    };
    match product {
        Some(product) => Ok(Response::json(200, &product)),
        None => Err(Response::not_found(format!("product {id} not found"))),
    }
}

fn create_product(req: &Request, _: &Params) -> Outcome {
    let fields = input::json_object(&req.body)?;
    let name = input::validate_name("name", input::string_field(&fields, "name")?)
        .map_err(Response::bad_request)?;
    let price = input::non_negative_number_field(&fields, "price")?;

    let id = SEED_COUNT + store::next_id(NEXT_ID)?;
    let product = Product { id, name, price };
    store::put_json(PRODUCTS, &store::record_key(id), &product)?;
    Ok(Response::json(201, &product))
}
