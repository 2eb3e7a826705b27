// NAME-service, in JavaScript. `routes` gets every HTTP request on its port (and from services
// whose `calls` name it); state, events and calls to other services go through `microsvc.js`
// (components/sdk/js). Exporting `handler = messageHandler(fn)` would make it a subscriber too.

import { Router, json } from './microsvc.js';

function hello(request, params) {
  return json(200, { service: 'NAME' });
}

const routes = new Router().add('GET', '/', hello);

export const httpHandler = {
  handle: (request) => routes.handle(request),
};
