#!/usr/bin/env bash
# Side-by-side throughput: the Node seed (../shared/anchors/seed-node) and this host, one after
# the other on the same ports, same machine, same load (wrk -t1 -c32 -d10s). Prints a markdown
# table. Run through `just bench`.
set -euo pipefail
cd "$(dirname "$0")/../.."
anchor_src=${ANCHOR_DIR:-../shared/anchors/seed-node}
duration=${BENCH_DURATION:-10s}
paths=(":3001/users" ":3000/api/users" ":3000/api/v1/orders/101" ":3000/api/v1/dashboard")

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; } >/dev/null
wait_port() { for _ in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }
# wrk prints "Requests/sec: N" and a latency distribution; keep req/s, p50, p99.
measure() {
    local out; out=$(wrk -t1 -c32 -d"$duration" --latency "http://127.0.0.1$1")
    local rps p50 p99
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p50=$(awk '$1=="50%" {print $2}' <<<"$out")
    p99=$(awk '$1=="99%" {print $2}' <<<"$out")
    local errors; errors=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
    echo "$rps $p50 $p99 ${errors:-none}"
}
rss_mb() { ps -o rss= -p "$1" | awk '{s+=$1} END {printf "%.0f", s/1024}'; }
seed_user() { curl -sf -XPOST localhost:3000/api/users -H 'content-type: application/json' -d '{"name":"Alice","email":"alice@mail.com"}' >/dev/null; }

declare -A node host
# --- the Node seed ---
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
cp -r "$anchor_src"/. "$work/anchor"
(cd "$work/anchor" && npm install --silent --no-audit --no-fund >/dev/null)
pids=()
for s in user product order gateway; do (cd "$work/anchor" && exec node services.js $s) & pids+=($!); done
for p in 3000 3001 3002 3003; do wait_port $p; done
seed_user
for p in "${paths[@]}"; do node[$p]=$(measure "$p"); done
node_rss=$(rss_mb "$(IFS=,; echo "${pids[*]}")")
kill "${pids[@]}"; wait "${pids[@]}" 2>/dev/null || true

# --- this host ---
./target/release/host --data-dir "$work/data" --compile-cache build/compile-cache >"$work/host.log" 2>&1 & hp=$!
wait_port 3999; until curl -sf localhost:3999/readyz >/dev/null; do sleep 0.05; done
seed_user; sleep 0.5
for p in "${paths[@]}"; do host[$p]=$(measure "$p"); done
host_rss=$(rss_mb $hp)
kill $hp; wait $hp 2>/dev/null || true

echo "| path (wrk -t1 -c32 -d$duration) | Node seed req/s | host req/s | ratio | Node p50 / p99 | host p50 / p99 | errors (Node / host) |"
echo "|---|---|---|---|---|---|---|"
for p in "${paths[@]}"; do
    read -r nr n50 n99 nerr <<<"${node[$p]}"; read -r hr h50 h99 herr <<<"${host[$p]}"
    ratio=$(awk -v a="$hr" -v b="$nr" 'BEGIN {printf "%.1fx", a/b}')
    echo "| \`GET $p\` | $nr | $hr | $ratio | $n50 / $n99 | $h50 / $h99 | $nerr / $herr |"
done
echo
echo "RSS after the load: Node seed, four processes: ${node_rss} MB; host: ${host_rss} MB."
