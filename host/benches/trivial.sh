#!/usr/bin/env bash
# This host alone on trivial components and the gateway's dashboard, fresh instance per request
# and reused: a quick check of per-request overhead after a change to the runtime (the full
# side-by-side with the Node seed and `wasmtime serve` is compare.sh, through `just bench`).
# Needs `just build build-fixtures`. Prints a markdown table: req/s (p50 / p99), wrk -t1 -c32.
set -euo pipefail
cd "$(dirname "$0")/../.."
duration=${BENCH_DURATION:-8s}
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; } >/dev/null
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

# measure NAME FIXTURE REUSE PATH [CONCURRENT]: FIXTURE (if any) stands in for product-service,
# whose instances take up to CONCURRENT requests at once (WASI 0.3 only; default 16).
measure() {
    local dir=$work/$1
    mkdir -p "$dir"; cp build/components/*.wasm "$dir"/
    [ -z "$2" ] || cp "build/fixtures/$2.wasm" "$dir/product.wasm"
    sed "/^\[service.product\]/a instances = { concurrent = ${5:-16} }" services.toml >"$dir/services.toml"
    ./target/release/host --manifest "$dir/services.toml" \
        --components-dir "$dir" --data-dir "$dir/data" --instance-reuse "$3" \
        --admin-addr 127.0.0.1:3999 >"$dir/log" 2>&1 & local pid=$!
    for _ in $(seq 1 200); do curl -sf localhost:3002/ -o /dev/null && break; sleep 0.05; done
    curl -sf -XPOST localhost:3000/api/users -H 'content-type: application/json' \
        -d '{"name":"A","email":"a@b.c"}' -o /dev/null
    wrk -t1 -c32 -d"$duration" --latency "http://127.0.0.1$4" |
        awk '/Requests\/sec/ {r=$2} $1=="50%" {a=$2} $1=="99%" {b=$2} END {printf "%.0f (%s / %s)", r, a, b}'
    kill "$pid"; wait "$pid" 2>/dev/null || true
}
echo "| what | fresh instance per request | reused (1000), one at a time | reused, up to 16 at once |"
echo "|---|---|---|---|"
for f in hello hello-wasi; do
    echo "| \`$f\` as product-service, \`GET :3002/\` | $(measure "$f-1" "$f" 1 :3002/) | $(measure "$f-r" "$f" 1000 :3002/) | (WASI 0.3 only) |"
done
for p in / "/sleep?ms=5" "/big?mb=1"; do
    echo "| \`hello-p3\` as product-service, \`GET :3002$p\` | $(measure p3-1 hello-p3 1 ":3002$p") | $(measure p3-r hello-p3 1000 ":3002$p" 1) | $(measure p3-s hello-p3 1000 ":3002$p" 16) |"
done
echo "| \`GET :3000/api/v1/dashboard\` | $(measure dash-1 "" 1 :3000/api/v1/dashboard) | $(measure dash-r "" 1000 :3000/api/v1/dashboard) | (WASI 0.2) |"
