"""reviews-service, in Python: reviews of products by users. `POST /reviews` checks the product
and the user with their services (in process), stores the review and publishes
`review-created`; `GET /reviews?productId=N` lists a product's reviews in pages (all reviews
without it). State is `microsvc:platform/state`: what a request writes and sends commits
together or not at all."""

from microsvc import (HttpError, Router, call, json_body, json_response, next_id, page,
                      positive_int, put_json, query, record_key, send_json, string_field)
from wit_world import exports

REVIEWS = "reviews"
NEXT_ID = "next-review-id"
TOPIC = "review-created"
MAX_TEXT = 2000


def product_prefix(product_id: int) -> str:
    """Reviews are keyed by product, then id: a product's reviews are one range of keys."""
    return f"{record_key(product_id)}/"


def create_review(request, _params):
    fields = json_body(request)
    product_id = positive_int(fields, "productId")
    user_id = positive_int(fields, "userId")
    rating = fields.get("rating")
    if isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5:
        raise HttpError(400, f"rating must be an integer from 1 to 5, got {rating!r}")
    text = string_field(fields, "text", MAX_TEXT)
    product, user = call(("product-service", "GET", f"/products/{product_id}"),
                         ("user-service", "GET", f"/users/{user_id}"))
    for (status, _), what, number in ((product, "product", product_id), (user, "user", user_id)):
        if status == 404:
            raise HttpError(422, f"{what} {number} does not exist")
        if status != 200:
            raise HttpError(502, f"{what}-service answered {status}")
    review_id = next_id(NEXT_ID)
    review = {"id": review_id, "productId": product_id, "userId": user_id, "rating": rating,
              "text": text}
    put_json(REVIEWS, product_prefix(product_id) + record_key(review_id), review)
    send_json(TOPIC, str(product_id), review, f"{TOPIC}-{review_id}")
    return json_response(201, review)


def list_reviews(request, _params):
    product = query(request).get("productId")
    if product is None:
        return page(request, REVIEWS)
    if not product.isdigit() or int(product) < 1:
        raise HttpError(400, f"productId must be an integer >= 1, got {product!r}")
    return page(request, REVIEWS, product_prefix(int(product)))


ROUTES = Router().add("GET", "/reviews", list_reviews).add("POST", "/reviews", create_review)


class HttpHandler(exports.HttpHandler):
    def handle(self, request):
        return ROUTES.handle(request)
