#!/usr/bin/env bash
# The services in other languages beside a Rust one: component size, start-up of each alone
# with a cold and a warm compile cache, and wrk on one read each (reviews in Python, ratings in JavaScript,
# product in Rust), with instances reused and with a fresh instance per request.
# Needs `just build`. Prints two markdown tables.
set -euo pipefail
cd "$(dirname "$0")/../.."
duration=${BENCH_DURATION:-8s}
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; } >/dev/null
work=$(mktemp -d)
trap 'kill ${pid:-} $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

# start DIR [FLAGS...]: the host on the repository's manifest, its components copied to DIR,
# compile cache DIR/cache; sets $ms, the milliseconds until it was ready, and $pid, running.
start() {
    local dir=$1; shift
    mkdir -p "$dir"; cp -n build/components/*.wasm "$dir"/ 2>/dev/null || true
    local t0; t0=$(date +%s%N)
    ./target/release/host --components-dir "$dir" --data-dir "$dir/data" \
        --compile-cache "$dir/cache" --admin-addr 127.0.0.1:3999 "$@" >>"$dir/log" 2>&1 & pid=$!
    until curl -sf localhost:3999/readyz -o /dev/null; do
        kill -0 "$pid" 2>/dev/null || { echo "the host exited:" >&2; tail -5 "$dir/log" >&2; exit 1; }
        sleep 0.01
    done
    ms=$(( ($(date +%s%N) - t0) / 1000000 ))
}

stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; }

# Each service alone (its manifest section, without `calls`): start-up until `/readyz` with an
# empty compile cache (the component is compiled) and with it warm (loaded from the cache).
echo "| service | language | component | start, cold cache | start, warm cache | compiled (cache entry) |"
echo "|---|---|---|---|---|---|"
for s in product:Rust reviews:Python ratings:JavaScript; do
    name=${s%%:*}
    dir=$work/alone-$name
    mkdir -p "$dir"
    awk -v s="[service.$name]" '$0==s {p=1} p && /^$/ {exit} p' services.toml |
        grep -v '^calls' >"$dir/services.toml"
    start "$dir" --manifest "$dir/services.toml"; cold=$ms; stop
    start "$dir" --manifest "$dir/services.toml"; warm=$ms; stop
    size=$(stat -c %s "build/components/$name.wasm")
    cached=$(stat -c %s "$dir"/cache/*.cwasm)
    echo "| $name | ${s#*:} | $(numfmt --to=iec-i --suffix=B "$size") | $cold ms | $warm ms | $(numfmt --to=iec-i --suffix=B "$cached") |"
done
echo

# measure REUSE PATH: req/s (p50 / p99) of GET PATH, the host started with INSTANCE_REUSE.
measure() {
    local dir; dir=$(mktemp -d -p "$work")
    start "$dir" --instance-reuse "$1"
    curl -sf -XPOST localhost:3000/api/users -H 'content-type: application/json' \
        -d '{"name":"A","email":"a@b.c"}' -o /dev/null
    for r in 5 4 3; do
        curl -sf -XPOST localhost:3004/reviews -H 'content-type: application/json' \
            -d "{\"productId\":1,\"userId\":1,\"rating\":$r,\"text\":\"bench\"}" -o /dev/null
    done
    until curl -sf localhost:3005/ratings/1 | grep -q '"count":3'; do sleep 0.05; done
    wrk -t1 -c32 -d"$duration" --latency "http://127.0.0.1$2" |
        awk '/Requests\/sec/ {r=$2} $1=="50%" {a=$2} $1=="99%" {b=$2} /Non-2xx/ {e=$4} END {printf "%.0f (%s / %s)%s", r, a, b, e ? ", " e " errors" : ""}'
    stop
}
echo "| request | reused (1000) | fresh instance per request |"
echo "|---|---|---|"
for p in ":3002/products/1 (Rust)" ":3004/reviews?productId=1 (Python)" ":3005/ratings/1 (JavaScript)"; do
    path=${p%% *}
    echo "| \`GET $path\` ${p#* } | $(measure 1000 "$path") | $(measure 1 "$path") |"
done
