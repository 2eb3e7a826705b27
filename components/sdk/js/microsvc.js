// What a JavaScript service needs from `microsvc:platform`, as the Rust sdk gives it: JSON
// responses and errors, request input, routing, paged lists, events, calls to peers and
// message handlers. Built with componentize-js against `wit/platform.wit`; `just build`
// copies it beside each service's app.js (`import ... from './microsvc.js'`). A route throws
// `HttpError` to answer an error; anything else it throws is a bug: a 500, which rolls back
// what the request wrote.

import * as state from 'microsvc:platform/state@0.1.0';
import { send } from 'microsvc:platform/producer@0.1.0';
import { call as callServices } from 'microsvc:platform/services@0.1.0';

export { state };

const encoder = new TextEncoder();
const decoder = new TextDecoder();

// Records per page when the client does not say, and at most (the host's cap).
const DEFAULT_LIMIT = 100;
const MAX_LIMIT = 1000;

/** An answer other than success: `{"error": message}` with `status`. */
export class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function json(status, value, headers = []) {
  return {
    status,
    headers: [['content-type', 'application/json'], ...headers],
    body: encoder.encode(JSON.stringify(value)),
  };
}

export function error(status, message) {
  return json(status, { error: message });
}

/** The request's query parameters (the last of each name). */
export function query(request) {
  const text = request.pathWithQuery.split('?')[1] ?? '';
  return Object.fromEntries(
    text.split('&').filter(Boolean).map((pair) => {
      const at = pair.indexOf('=');
      return at < 0 ? [pair, ''] : [pair.slice(0, at), pair.slice(at + 1)];
    }),
  );
}

/** A key that sorts as the number does (as the Rust sdk's `record_key`). */
export function recordKey(id) {
  return String(id).padStart(20, '0');
}

/** A state call. Its error fails the request, which rolls back what it wrote: 503 when the
 *  store is unavailable, else 500 (a bug of ours: a bad name, a value too big). */
function stored(operation, bucket, run) {
  try {
    return run();
  } catch (e) {
    const why = e.payload ?? { tag: 'unknown', val: String(e) };
    const status = why.tag === 'storage' ? 503 : 500;
    throw new HttpError(status, `state ${operation} on ${bucket} failed: ${why.tag}: ${why.val}`);
  }
}

export function getJson(bucket, key) {
  const raw = stored('get', bucket, () => state.get(bucket, key));
  return raw === undefined ? undefined : JSON.parse(decoder.decode(raw));
}

export function putJson(bucket, key, value) {
  const data = encoder.encode(JSON.stringify(value));
  stored('set', bucket, () => state.set(bucket, key, data));
}

export function exists(bucket, key) {
  return stored('get', bucket, () => state.get(bucket, key)) !== undefined;
}

export function setRaw(bucket, key, text) {
  stored('set', bucket, () => state.set(bucket, key, encoder.encode(text)));
}

/** One page of the JSON records of `bucket` whose keys start with `prefix`, as the Rust
 *  services list: `?limit=` (default 100, at most 1000) and an opaque `?cursor=`; the body a
 *  JSON array, the next page's URL in `Link: <...>; rel="next"`. */
export function page(request, bucket, prefix = '') {
  const params = query(request);
  const limitText = params.limit ?? String(DEFAULT_LIMIT);
  const limit = /^[0-9]+$/.test(limitText) ? Number(limitText) : 0;
  if (limit < 1 || limit > MAX_LIMIT) {
    throw new HttpError(400, `limit must be an integer from 1 to ${MAX_LIMIT}, got "${limitText}"`);
  }
  let after;
  if (params.cursor !== undefined) {
    after = fromCursor(params.cursor);
    if (after === undefined || !after.startsWith(prefix)) {
      throw new HttpError(400, 'cursor is not one this service gave out; start again without it');
    }
  }
  const keys = stored('list-keys-after', bucket, () =>
    state.listKeysAfter(bucket, prefix, after, limit),
  );
  const items = keys.map((key) => getJson(bucket, key)).filter((r) => r !== undefined);
  const headers = [];
  if (keys.length === limit) {
    const path = request.pathWithQuery.split('?')[0];
    const kept = Object.entries(params)
      .filter(([name]) => name !== 'limit' && name !== 'cursor')
      .map(([name, value]) => `${name}=${value}&`)
      .join('');
    const cursor = `k${toHex(keys[keys.length - 1])}`;
    headers.push(['link', `<${path}?${kept}limit=${limit}&cursor=${cursor}>; rel="next"`]);
  }
  return json(200, items, headers);
}

function toHex(text) {
  return Array.from(encoder.encode(text), (b) => b.toString(16).padStart(2, '0')).join('');
}

function fromCursor(cursor) {
  const hex = cursor.startsWith('k') ? cursor.slice(1) : '';
  if (hex.length === 0 || hex.length % 2 !== 0 || !/^[0-9a-f]+$/.test(hex)) {
    return undefined;
  }
  const bytes = new Uint8Array(hex.length / 2).map((_, i) => parseInt(hex.slice(2 * i, 2 * i + 2), 16));
  return decoder.decode(bytes);
}

/** Queues an event; the host releases it only if this invocation commits. A refusal is a
 *  500 (the request is rolled back, so nothing is stored unannounced). */
export function sendJson(topic, key, value, eventId) {
  try {
    send({
      topic,
      key,
      payload: encoder.encode(JSON.stringify(value)),
      headers: [['event-id', eventId], ['content-type', 'application/json']],
    });
  } catch (e) {
    const why = e.payload ? `${e.payload.tag}: ${e.payload.val}` : String(e);
    throw new HttpError(500, `could not publish ${topic}: ${why}`);
  }
}

/** Sends `[service, method, path]` requests to peers at once, in process; their answers in
 *  order, each `{status, body}` (the body parsed as JSON, or undefined). A peer that cannot
 *  be reached is a 502. */
export function call(...requests) {
  const calls = requests.map(([service, method, path]) => [
    service,
    { method, pathWithQuery: path, headers: [['accept', 'application/json']], body: new Uint8Array() },
  ]);
  return callServices(calls).map((result, i) => {
    if (result.tag !== 'ok') {
      throw new HttpError(502, `${requests[i][0]} could not be reached: ${result.val.tag}`);
    }
    const { status, body } = result.val;
    let parsed;
    try {
      parsed = body.length ? JSON.parse(decoder.decode(body)) : undefined;
    } catch {
      parsed = undefined;
    }
    return { status, body: parsed };
  });
}

/** Routes `METHOD /path/:param` patterns to functions `(request, params) => response`; an
 *  unknown path is a 404, a known path with another method a 405. */
export class Router {
  constructor() {
    this.routes = [];
  }

  add(method, pattern, handle) {
    const regex = new RegExp(`^${pattern.replace(/:(\w+)/g, '(?<$1>[^/]+)')}$`);
    this.routes.push({ method, regex, handle });
    return this;
  }

  handle(request) {
    const path = request.pathWithQuery.split('?')[0];
    const allowed = [];
    for (const { method, regex, handle } of this.routes) {
      const match = regex.exec(path);
      if (!match) continue;
      if (method !== request.method) {
        allowed.push(method);
        continue;
      }
      try {
        return handle(request, match.groups ?? {});
      } catch (e) {
        if (e instanceof HttpError) return error(e.status, e.message);
        // A bug: a 500 rolls back what the request wrote.
        return error(500, e instanceof Error ? `${e.name}: ${e.message}` : String(e));
      }
    }
    if (allowed.length) {
      const allow = allowed.join(', ');
      return json(405, { error: `method ${request.method} not allowed here; allowed: ${allow}` }, [
        ['allow', allow],
      ]);
    }
    return error(404, `no route for ${request.method} ${path}`);
  }
}

/** The first value of header `name` of a delivered message, or undefined. */
export function header(message, name) {
  const found = message.headers.find(([k]) => k.toLowerCase() === name);
  return found?.[1];
}

/** A delivered message's payload as JSON; one that is not is rejected (dead-lettered now). */
export function jsonPayload(delivery) {
  try {
    return JSON.parse(decoder.decode(delivery.message.payload));
  } catch (e) {
    throw reject(`${delivery.message.topic} payload is not JSON: ${e.message}`);
  }
}

/** Errors a message handler throws: retry with backoff, or dead-letter now. */
export function retry(message) {
  return { tag: 'retry', val: message };
}

export function reject(message) {
  return { tag: 'reject', val: message };
}

/** The `handler` export for `handle(delivery)`: what it throws besides `retry`/`reject` (a
 *  failed state call, a bug) is a retry, so that the record is dead-lettered in the end
 *  rather than trapping the instance. */
export function messageHandler(handle) {
  return {
    handle(delivery) {
      try {
        handle(delivery);
      } catch (e) {
        if (e && (e.tag === 'retry' || e.tag === 'reject')) throw e;
        throw retry(e instanceof Error ? e.message : String(e));
      }
    },
  };
}
