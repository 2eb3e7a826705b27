// ratings-service, in JavaScript: each product's average rating. It consumes `review-created`
// in its own consumer group and keeps a count and a sum per product, once per event: a
// redelivered record (same `event-id`) changes nothing. `GET /ratings/:productId` answers
// `{productId, count, average}`.

import {
  HttpError, Router, exists, getJson, header, json, jsonPayload, messageHandler, putJson,
  recordKey, reject, setRaw,
} from './microsvc.js';

const RATINGS = 'ratings';
const SEEN = 'seen-events';

function productRating(request, params) {
  const id = params.productId;
  if (!/^[0-9]+$/.test(id) || Number(id) < 1) {
    throw new HttpError(400, `productId must be an integer >= 1, got "${id}"`);
  }
  const stored = getJson(RATINGS, recordKey(id)) ?? { count: 0, sum: 0 };
  const average = stored.count ? Math.round((stored.sum / stored.count) * 100) / 100 : null;
  return json(200, { productId: Number(id), count: stored.count, average });
}

const routes = new Router().add('GET', '/ratings/:productId', productRating);

export const httpHandler = {
  handle: (request) => routes.handle(request),
};

/** Adds one review's rating to its product, unless this event was counted already. */
function reviewCreated(delivery) {
  const eventId = header(delivery.message, 'event-id');
  if (!eventId) throw reject('review-created without an event-id header');
  const review = jsonPayload(delivery);
  const { productId, rating } = review;
  if (!Number.isInteger(productId) || productId < 1 || !Number.isInteger(rating) || rating < 1 || rating > 5) {
    throw reject(`review-created payload has no valid productId and rating: ${JSON.stringify(review)}`);
  }
  if (exists(SEEN, eventId)) return;
  const key = recordKey(productId);
  const stored = getJson(RATINGS, key) ?? { count: 0, sum: 0 };
  putJson(RATINGS, key, { count: stored.count + 1, sum: stored.sum + rating });
  setRaw(SEEN, eventId, '1');
}

export const handler = messageHandler(reviewCreated);
