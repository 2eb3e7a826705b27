"""What a Python service needs from `microsvc:platform`, as the Rust sdk gives it: JSON
responses and errors, request input, routing, paged lists, events and calls to peers.

Built with componentize-py against `wit/platform.wit` (`just build` puts this directory on the
module path of every Python service). A route raises `HttpError` to answer an error; anything
else it raises is a bug: a 500, which rolls back what the request wrote.
"""

import json
import re

from componentize_py_types import Err, Ok
from wit_world.imports import producer, services, state
from wit_world.imports.services import Request, Response

try:
    # Test builds of a service add a module `build_tag` (TAG = "a"...) to tell versions apart.
    from build_tag import TAG as BUILD_TAG
except ImportError:
    BUILD_TAG = None

__all__ = [
    "Err", "HttpError", "Ok", "Request", "Response", "Router", "call", "error", "get_json",
    "json_body", "json_response", "next_id", "page", "positive_int", "put_json", "query",
    "record_key", "send_json", "state", "string_field",
]

# The bucket of id sequences, apart from any bucket of records (the Rust sdk's).
META_BUCKET = "meta"

# Records per page when the client does not say, and at most (the host's cap).
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


class HttpError(Exception):
    """An answer other than success: `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def json_response(status: int, value, headers=()) -> Response:
    body = json.dumps(value, separators=(",", ":")).encode()
    all_headers = [("content-type", "application/json"), *headers]
    if BUILD_TAG is not None:
        all_headers.append(("x-build", BUILD_TAG))
    return Response(status=status, headers=all_headers, body=body)


def error(status: int, message: str) -> Response:
    return json_response(status, {"error": message})


def query(request: Request) -> dict:
    """The request's query parameters (the last of each name)."""
    _, _, text = request.path_with_query.partition("?")
    pairs = (p.partition("=") for p in text.split("&") if p)
    return {name: value for name, _, value in pairs}


def json_body(request: Request) -> dict:
    """The body as a JSON object, else a 400."""
    if not request.body.strip():
        raise HttpError(400, "request body must be a JSON object, got an empty body")
    try:
        value = json.loads(request.body)
    except ValueError as e:
        raise HttpError(400, f"malformed JSON: {e}") from None
    if not isinstance(value, dict):
        raise HttpError(400, f"request body must be a JSON object, got {type(value).__name__}")
    return value


def positive_int(fields: dict, name: str) -> int:
    """A field that must be a JSON integer >= 1 (`1.0`, `"1"`, `true`, `0` are refused: 400)."""
    value = fields.get(name)
    if value is None:
        raise HttpError(400, f"{name} is required")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HttpError(400, f"{name} must be an integer >= 1, got {json.dumps(value)}")
    return value


def string_field(fields: dict, name: str, max_chars: int) -> str:
    value = fields.get(name)
    if value is None:
        raise HttpError(400, f"{name} is required")
    if not isinstance(value, str):
        raise HttpError(400, f"{name} must be a string, got {json.dumps(value)}")
    if len(value) > max_chars:
        raise HttpError(400, f"{name} is longer than {max_chars} characters")
    return value


def record_key(record_id: int) -> str:
    """A key that sorts as the number does (as the Rust sdk's `record_key`)."""
    return f"{record_id:020}"


def _stored(operation: str, bucket: str, run):
    """`run()`, a state call. Its error fails the request, which rolls back what it wrote:
    503 when the store is unavailable, else 500 (a bug of ours: a bad name, a value too big)."""
    try:
        return run()
    except Err as e:
        status = 503 if isinstance(e.value, state.Error_Storage) else 500
        raise HttpError(status, f"state {operation} on {bucket} failed: {e.value}") from None


def get_json(bucket: str, key: str):
    raw = _stored("get", bucket, lambda: state.get(bucket, key))
    return None if raw is None else json.loads(raw)


def put_json(bucket: str, key: str, value) -> None:
    data = json.dumps(value, separators=(",", ":")).encode()
    _stored("set", bucket, lambda: state.set(bucket, key, data))


def next_id(key: str) -> int:
    """The next id (1, 2, ...) of the sequence `key`, kept apart from records (as the Rust
    sdk's `next_id`). Ids never conflict between concurrent requests; a request that fails
    after taking one leaves a gap."""
    return _stored("next-id", META_BUCKET, lambda: state.next_id(META_BUCKET, key))


def page(request: Request, bucket: str, prefix: str = "") -> Response:
    """One page of the JSON records of `bucket` whose keys start with `prefix`, as the Rust
    services list: `?limit=` (default 100, at most 1000) and an opaque `?cursor=`; the body a
    JSON array, the next page's URL in `Link: <...>; rel="next"`."""
    params = query(request)
    limit = params.get("limit", str(DEFAULT_LIMIT))
    if not limit.isdigit() or not 1 <= int(limit) <= MAX_LIMIT:
        raise HttpError(400, f"limit must be an integer from 1 to {MAX_LIMIT}, got {limit!r}")
    limit = int(limit)
    after = None
    if "cursor" in params:
        cursor = params["cursor"]
        try:
            after = bytes.fromhex(cursor[1:]).decode() if cursor.startswith("k") else None
        except ValueError:
            after = None
        if after is None or not after.startswith(prefix):
            raise HttpError(400, "cursor is not one this service gave out; start again without it")
    keys = _stored("list-keys-after", bucket,
                   lambda: state.list_keys_after(bucket, prefix, after, limit))
    items = [record for record in (get_json(bucket, k) for k in keys) if record is not None]
    headers = []
    if len(keys) == limit:
        path = request.path_with_query.partition("?")[0]
        kept = "".join(f"{n}={v}&" for n, v in params.items() if n not in ("limit", "cursor"))
        link = f"<{path}?{kept}limit={limit}&cursor=k{keys[-1].encode().hex()}>; rel=\"next\""
        headers.append(("link", link))
    return json_response(200, items, headers)


def send_json(topic: str, key: str, value, event_id: str) -> None:
    """Queues an event; the host releases it only if this request commits. A refusal is a
    500 (the request is rolled back, so nothing is stored unannounced)."""
    message = producer.Message(
        topic=topic,
        key=key,
        payload=json.dumps(value, separators=(",", ":")).encode(),
        headers=[("event-id", event_id), ("content-type", "application/json")],
    )
    try:
        producer.send(message)
    except Err as e:
        raise HttpError(500, f"could not publish {topic}: {e.value}") from None


def call(*requests):
    """Sends `(service, method, path)` requests to peers at once, in process; their answers in
    order, each `(status, json or None)`. A peer that cannot be reached is a 502."""
    calls = [(service, Request(method, path, [("accept", "application/json")], b""))
             for service, method, path in requests]
    answers = []
    for (service, _), result in zip(calls, services.call(calls)):
        if not isinstance(result, Ok):
            raise HttpError(502, f"{service} could not be reached: {result.value}")
        response = result.value
        try:
            body = json.loads(response.body) if response.body else None
        except ValueError:
            body = None
        answers.append((response.status, body))
    return answers


class Router:
    """Routes `METHOD /path/:param` patterns to functions `(request, params) -> Response`;
    an unknown path is a 404, a known path with another method a 405."""

    def __init__(self):
        self.routes = []

    def add(self, method: str, pattern: str, handle):
        regex = re.sub(r":(\w+)", r"(?P<\1>[^/]+)", pattern)
        self.routes.append((method, re.compile(f"^{regex}$"), handle))
        return self

    def handle(self, request: Request) -> Response:
        path = request.path_with_query.partition("?")[0]
        allowed = []
        for method, regex, handle in self.routes:
            match = regex.match(path)
            if match is None:
                continue
            if method != request.method:
                allowed.append(method)
                continue
            try:
                return handle(request, match.groupdict())
            except HttpError as e:
                return error(e.status, e.message)
            except Exception as e:  # a bug: a 500 rolls back what the request wrote
                return error(500, f"{type(e).__name__}: {e}")
        if allowed:
            allow = ", ".join(allowed)
            return json_response(
                405, {"error": f"method {request.method} not allowed here; allowed: {allow}"},
                [("allow", allow)])
        return error(404, f"no route for {request.method} {path}")
