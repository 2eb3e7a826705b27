# The host, its six components and their manifest, built from this repo (used by docker-compose.yml).
# The Python and JavaScript services are built as the Justfile's `_python` and `_js` recipes do.
FROM python:3.11-slim-bookworm AS python
WORKDIR /src
COPY wit wit
COPY components/sdk/python components/sdk/python
COPY components/reviews components/reviews
RUN python3 -m venv /venv && /venv/bin/pip install --quiet -r components/sdk/python/requirements.txt \
    && mkdir -p /out && /venv/bin/componentize-py -d wit -w microsvc:platform/http-service componentize app \
       -p components/reviews -p components/sdk/python -o /out/reviews.wasm

FROM node:20-bookworm-slim AS js
WORKDIR /src
COPY wit wit
COPY components/sdk/js components/sdk/js
COPY components/ratings components/ratings
RUN cd components/sdk/js && npm ci --no-audit --no-fund && cd /src \
    && mkdir -p /stage /out && cp components/ratings/*.js components/sdk/js/microsvc.js /stage/ \
    && components/sdk/js/node_modules/.bin/componentize-js /stage/app.js --wit wit --world-name runtime \
       --disable http fetch-event -o /out/ratings.wasm

FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/* \
    && rustup target add wasm32-wasip2
WORKDIR /src
COPY . .
RUN cargo build --profile component --target wasm32-wasip2 -p gateway -p user -p product -p order \
    && cargo build --release -p host \
    && mkdir -p /out/components \
    && for c in gateway user product order; do cp target/wasm32-wasip2/component/$c.wasm /out/components/; done

FROM debian:bookworm-slim
COPY --from=build /src/target/release/host /usr/local/bin/host
COPY --from=build /out/components /components
COPY --from=python /out/reviews.wasm /components/
COPY --from=js /out/ratings.wasm /components/
COPY services.toml /services.toml
ENV COMPONENTS_DIR=/components MANIFEST=/services.toml COMPILE_CACHE=/data/compile-cache WATCH_COMPONENTS=false
EXPOSE 3000 3001 3002 3003 3004 3005 3999
ENTRYPOINT ["host"]
