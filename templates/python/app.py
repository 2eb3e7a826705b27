"""NAME-service, in Python. `ROUTES` gets every HTTP request on its port (and from services
whose `calls` name it); state, events and calls to other services go through `microsvc`
(components/sdk/python/microsvc.py). A class `Handler` (with `handle(self, delivery)`) would
make it a subscriber too."""

from microsvc import Router, json_response
from wit_world import exports


def hello(request, params):
    return json_response(200, {"service": "NAME"})


ROUTES = Router().add("GET", "/", hello)


class HttpHandler(exports.HttpHandler):
    def handle(self, request):
        return ROUTES.handle(request)
