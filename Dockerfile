# The host, its four components and their manifest, built from this repo (used by docker-compose.yml).
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
COPY services.toml /services.toml
ENV COMPONENTS_DIR=/components MANIFEST=/services.toml COMPILE_CACHE=/data/compile-cache WATCH_COMPONENTS=false
EXPOSE 3000 3001 3002 3003 3999
ENTRYPOINT ["host"]
