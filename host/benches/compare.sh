#!/usr/bin/env bash
# Side by side, same machine, same load generator (wrk -t1 -c32), one after the other on the
# same ports:
#   1. the Node seed (../shared/anchors/seed-node, Express + axios + KafkaJS) against tansu;
#   2. this host against the same (restarted) broker, fresh instance per request
#      (--instance-reuse 1);
#   3. this host with --instance-reuse $BENCH_REUSE (the default, 1000);
#   4. per-request overhead on a trivial component (build/fixtures/hello.wasm): this host next
#      to `wasmtime serve`, each with fresh instances and with reuse, and a bare hyper server
#      (host/benches/bare_hyper.rs) as the floor;
#   5. the host of 3, exporting every span over OTLP (to bare_hyper, which takes any POST):
#      what tracing costs.
# Each of 1-3 also serves the dashboard to 1000 and to 10,000 connections (four wrk processes).
# Prints markdown tables. Run through `just bench`.
set -euo pipefail
cd "$(dirname "$0")/../.."
anchor_src=${ANCHOR_DIR:-../shared/anchors/seed-node}
duration=${BENCH_DURATION:-10s}
reuse=${BENCH_REUSE:-1000}
paths=(":3001/users" ":3000/api/users" ":3000/api/v1/orders/101" ":3000/api/v1/dashboard")
kport=${BENCH_KAFKA_PORT:-19092}

# 10,000 connections are 10,000 files for wrk, and as many for the servers started from here.
ulimit -n "$(ulimit -Hn)"
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; } >/dev/null
wait_port() { for _ in $(seq 1 400); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }
wait_closed() { for _ in $(seq 1 400); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null || return 0; sleep 0.05; done; }
# wrk prints "Requests/sec: N" and a latency distribution; keep req/s, p50, p99, errors.
measure() {
    local url=$1; shift
    local out; out=$(wrk -t1 -c32 -d"$duration" --latency "$@" "http://127.0.0.1$url")
    local rps p50 p99
    rps=$(awk '/Requests\/sec/ {printf "%.0f", $2}' <<<"$out")
    p50=$(awk '$1=="50%" {print $2}' <<<"$out")
    p99=$(awk '$1=="99%" {print $2}' <<<"$out")
    local errors; errors=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ' | sed 's/ *$//')
    echo "$rps $p50 $p99 ${errors:-none}" | tr -s ' '
}
# flood CONNS PROCS [URL]: GET URL (default :3000/api/v1/dashboard) from CONNS connections
# spread over PROCS wrk processes for 6 s: "goodput p99 errors timeouts non-2xx", goodput being
# 2xx answers per second, p99 the worst of the processes', errors the non-2xx answers and
# socket errors, of which timeouts are wrk's (no answer within 2 s).
flood() {
    local conns=$1 procs=$2 url=${3:-:3000/api/v1/dashboard} i pids=()
    for i in $(seq 1 "$procs"); do
        wrk -t1 -c$((conns / procs)) -d6s --latency "http://127.0.0.1$url" >"$work/flood$i" & pids+=($!)
    done
    wait "${pids[@]}" || true
    cat "$work"/flood* | awk '
        function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; if (v ~ /m$/) return v * 60000; return v }
        / requests in / { n = $1; secs = $4; sub(/s,$/, "", secs); good += n / secs }
        /Non-2xx/ { bad += $NF; non2xx += $NF; good -= $NF / secs }
        /Socket errors/ { gsub(/,/, ""); bad += $4 + $6 + $8 + $10; timeouts += $10 }
        $1 == "99%" { if (ms($2) > p99) p99 = ms($2) }
        END { printf "%.0f %.0fms %d %d %d\n", good, p99, bad, timeouts, non2xx }'
    rm -f "$work"/flood*
}
rss_mb() { ps -o rss= -p "$1" | awk '{s+=$1} END {printf "%.0f", s/1024}'; }
seed_user() { curl -sf -XPOST localhost:3000/api/users -H 'content-type: application/json' -d '{"name":"Alice","email":"alice@mail.com"}' >/dev/null; }

work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
# Every POST creates a new user: a unique email per request (one wrk thread, one counter).
cat >"$work/post.lua" <<'EOF'
n = 0
request = function()
  n = n + 1
  return wrk.format("POST", "/api/users", {["Content-Type"] = "application/json"},
    '{"name":"Bench","email":"bench' .. n .. '@ex.com"}')
end
EOF

broker=
start_broker() {
    tansu broker --listener-url "tcp://127.0.0.1:$kport" --advertised-listener-url "tcp://127.0.0.1:$kport" >"$work/tansu.log" 2>&1 & broker=$!
    wait_port "$kport"
    tansu topic create user-created --broker "tcp://127.0.0.1:$kport" --partitions 3 >/dev/null 2>&1 || true
}
stop_broker() { kill "$broker"; wait "$broker" 2>/dev/null || true; wait_closed "$kport"; }

declare -A res rss
# run NAME: measures every GET path, the dashboard under overload, then POST /api/users,
# keeping RSS after the GETs.
run_all() {
    # Not named `pids`: revive_node, called from here, reads the global array of that name.
    local name=$1 measured=$2
    seed_user; sleep 0.5
    for p in "${paths[@]}"; do res[$name$p]=$(measure "$p"); done
    rss[$name]=$(rss_mb "$measured")
    # Before the POSTs: the same state (one user) as the 32-connection figures they are
    # compared with, not a hundred thousand users and the order service's backlog of events.
    res[$name:c1000]=$(flood 1000 1)
    res[$name:c10000]=$(flood 10000 4)
    [ "$name" != node ] || revive_node
    res[$name:post]=$(measure ":3000/api/users" -s "$work/post.lua")
}

# --- the Node seed ---
cp -r "$anchor_src"/. "$work/anchor"
(cd "$work/anchor" && npm install --silent --no-audit --no-fund >/dev/null)
start_broker
node_services=(user product order gateway)
start_node() { (cd "$work/anchor" && KAFKA_BROKERS=127.0.0.1:$kport exec node "services.js" "$1") & }
# The seed's gateway may die under the overload rows (an unhandled ECONNRESET): counts the
# processes still running, and starts again the ones that are not, for the POST row.
revive_node() {
    node_alive=0
    for i in "${!pids[@]}"; do
        if kill -0 "${pids[$i]}" 2>/dev/null; then node_alive=$((node_alive + 1)); continue; fi
        start_node "${node_services[$i]}"; pids[i]=$!
    done
    for p in 3000 3001 3002 3003; do wait_port $p; done
    [ "$node_alive" = 4 ] || sleep 2 # as at the start: KafkaJS connects in the background
}
pids=()
for s in "${node_services[@]}"; do start_node "$s"; pids+=($!); done
for p in 3000 3001 3002 3003; do wait_port $p; done
sleep 2 # KafkaJS connects its producer and joins the consumer group in the background
run_all node "$(IFS=,; echo "${pids[*]}")"
kill "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true
stop_broker
for p in 3000 3001 3002 3003; do wait_closed $p; done

# --- this host: fresh instances, then reused ones, then reused with every span exported ---
bare=$(cargo build --release -p host --bench bare_hyper --message-format=json 2>/dev/null |
    python3 -c 'import json, sys; print(next(m["executable"] for m in map(json.loads, sys.stdin) if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "bare_hyper" and m.get("executable")))')
start_host() { # log-name, flags...
    local name=$1; shift
    ./target/release/host --data-dir "$work/data-$name" --compile-cache build/compile-cache "$@" >"$work/host-$name.log" 2>&1 & hp=$!
    wait_port 3999; until curl -sf localhost:3999/readyz >/dev/null; do sleep 0.05; done
}
stop_host() { kill "$hp"; wait "$hp" 2>/dev/null || true; for p in 3000 3001 3002 3003 3999; do wait_closed $p; done; }
for mode in fresh reuse; do
    start_broker
    n=1; [ "$mode" = reuse ] && n=$reuse
    flags=(--kafka-brokers "127.0.0.1:$kport" --instance-reuse "$n")
    start_host "$mode" "${flags[@]}"
    run_all "$mode" "$hp"
    stop_host
    stop_broker
done
BARE_HYPER_ADDR=127.0.0.1:3101 "$bare" & sink=$!
wait_port 3101
start_broker
start_host traced --kafka-brokers "127.0.0.1:$kport" --otlp-endpoint http://127.0.0.1:3101
seed_user; sleep 0.5
for p in "${paths[@]}"; do res[traced$p]=$(measure "$p"); done
res[traced:post]=$(measure ":3000/api/users" -s "$work/post.lua")
stop_host
stop_broker
kill $sink; wait $sink 2>/dev/null || true; wait_closed 3101

# --- trivial components: this host (as product-service) and wasmtime serve ---
# `hello` is built with the sdk, so it also exports microsvc:platform/http-handler, which this
# host calls; `wasmtime serve` runs its wasi:http export. `hello-wasi` has wasi:http alone, so
# both servers run the same guest code path. `spin-hello` (spin-sdk 7) exports
# wasi:http/handler@0.3.0 and imports WASI alone (`hello-p3` also imports our state interface,
# which `wasmtime serve` lacks); both servers reuse such instances up to 16 at once by default,
# so the fresh column asks for one request per instance.
BARE_HYPER_ADDR=127.0.0.1:3100 "$bare" & b=$!
wait_port 3100; res[bare]=$(measure ":3100/")
# The same floods on a server that does no work: what this machine and its load generators
# allow any server at these connection counts.
res[bare:c1000]=$(flood 1000 1 :3100/)
res[bare:c10000]=$(flood 10000 4 :3100/)
kill $b; wait $b 2>/dev/null || true; wait_closed 3100
wt=${WASMTIME:-$(command -v wasmtime || true)}
[ -n "$wt" ] && wt_version=$("$wt" --version) || wt_version="wasmtime not installed"
for fixture in hello hello-wasi spin-hello; do
    trivial=$work/$fixture; mkdir -p "$trivial"; cp build/components/*.wasm "$trivial"/
    cp "build/fixtures/$fixture.wasm" "$trivial/product.wasm"
    start_host "$fixture-fresh" --components-dir "$trivial" --instance-reuse 1; res[$fixture:hf]=$(measure ":3002/"); stop_host
    start_host "$fixture-reuse" --components-dir "$trivial" --instance-reuse "$reuse"; res[$fixture:hr]=$(measure ":3002/"); stop_host
    for mode in wf wr; do
        res[$fixture:$mode]="n/a - - -"
        [ -n "$wt" ] || continue
        extra=(--max-instance-reuse-count 1); [ $mode = wr ] && extra=(--max-instance-reuse-count "$reuse")
        "$wt" serve --addr 127.0.0.1:3100 -O pooling-allocator -S cli "${extra[@]}" "build/fixtures/$fixture.wasm" >"$work/wt.log" 2>&1 & w=$!
        if wait_port 3100; then res[$fixture:$mode]=$(measure ":3100/"); fi
        kill $w; wait $w 2>/dev/null || true; wait_closed 3100
    done
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0 && a > 0) printf "%.1fx", a/b; else print "-"}'; }
row() { # label, node-key, then the keys of the host columns
    local label=$1 nk=$2; shift 2
    read -r nr n50 n99 nerr <<<"${res[$nk]}"
    local line="| $label | $nr ($n50 / $n99) |"
    for k in "$@"; do
        read -r hr h50 h99 herr <<<"${res[$k]}"
        line+=" $hr ($h50 / $h99) | $(ratio "$hr" "$nr") |"
    done
    echo "$line"
    for k in "$nk" "$@"; do
        read -r _ _ _ err <<<"${res[$k]}"
        [ "$err" = none ] || echo "|  | errors in $k: $err |"
    done
}
echo "wrk -t1 -c32 -d$duration --latency; cells are req/s (p50 / p99)."
echo
echo "| path | Node seed | host, fresh instance per request (\`--instance-reuse 1\`) | ratio | host, \`--instance-reuse $reuse\` (default) | ratio |"
echo "|---|---|---|---|---|---|"
for p in "${paths[@]}"; do row "\`GET $p\`" "node$p" "fresh$p" "reuse$p"; done
row "\`POST :3000/api/users\` (Kafka mode, tansu)" node:post fresh:post reuse:post
echo
echo "Overload: \`GET :3000/api/v1/dashboard\` for 6 s from 1000 connections (one wrk) and from 10,000 (four wrk processes of 2,500), default limits. Cells: answers with 2xx per second (ratio to the same server's 32-connection figure above), p99, errors (non-2xx answers and socket errors; timeouts: no answer within wrk's 2 s). The last column is bare hyper (\`host/benches/bare_hyper.rs\`, no component, no queue) under the same floods of \`GET :3100/\`, its ratio to its own 32-connection figure in the trivial-component table below: what this machine and its load generators (on the same two cores) leave any server."
echo
echo "| connections | Node seed | host, fresh instance per request | host, \`--instance-reuse $reuse\` (default) | bare hyper |"
echo "|---|---|---|---|---|"
share() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f", a/b; else print "-"}'; }
cell() { read -r r a b _ <<<"${res[$1]}"; echo "$r ($a / $b)"; }
flood_cell() { # KEY of a flood, KEY of the same server's 32-connection figure
    local g p e t n base what
    read -r g p e t n <<<"${res[$1]}"; read -r base _ <<<"${res[$2]}"
    what="$e errors"; [ "$e" = 0 ] || what+=" ($t timeouts, $n non-2xx, $((e - t - n)) other)"
    echo " $g ($(share "$g" "$base")×), p99 $p, $what |"
}
for c in 1000 10000; do
    line="| $c |"
    for name in node fresh reuse; do line+=$(flood_cell "$name:c$c" "$name:3000/api/v1/dashboard"); done
    echo "$line$(flood_cell "bare:c$c" bare)"
done
echo
echo "Node seed processes still running after these rows: $node_alive of 4 (the others were started again for the POST row)."
echo
echo "RSS after the GET load: Node seed, four processes: ${rss[node]} MB; host (fresh): ${rss[fresh]} MB; host (reuse): ${rss[reuse]} MB."
echo
echo "### Tracing: the default host with and without span export"
echo
echo "The same host and flags as the \`--instance-reuse $reuse\` column, then with \`--otlp-endpoint\` (every span batched and sent over OTLP/HTTP to a local sink: \`bare_hyper\`). Ratio: with over without."
echo
echo "| path | no tracing | every span exported | ratio |"
echo "|---|---|---|---|"
for p in "${paths[@]}" ":post"; do
    label="\`GET $p\`"; [ "$p" = :post ] && label="\`POST :3000/api/users\`"
    read -r off _ <<<"${res[reuse$p]}"; read -r on _ <<<"${res[traced$p]}"
    echo "| $label | $(cell "reuse$p") | $(cell "traced$p") | $(share "$on" "$off") |"
done
echo
echo "### Per-request overhead: trivial components (\`components/fixtures/hello\`, \`hello-wasi\`, \`spin-hello\`)"
echo
echo "| server | component | fresh instance per request | instance reuse ($reuse) |"
echo "|---|---|---|---|"
echo "| this host (as product-service, :3002) | \`hello\` (sdk: http-handler export) | $(cell hello:hf) | $(cell hello:hr) |"
echo "| this host (as product-service, :3002) | \`hello-wasi\` (wasi:http 0.2 only) | $(cell hello-wasi:hf) | $(cell hello-wasi:hr) |"
echo "| this host (as product-service, :3002) | \`spin-hello\` (spin-sdk 7, wasi:http 0.3; reuse: up to 16 at once) | $(cell spin-hello:hf) | $(cell spin-hello:hr) |"
echo "| \`wasmtime serve -O pooling-allocator -S cli\` ($wt_version) | \`hello\` (its wasi:http export) | $(cell hello:wf) | $(cell hello:wr) |"
echo "| \`wasmtime serve -O pooling-allocator -S cli\` ($wt_version) | \`hello-wasi\` | $(cell hello-wasi:wf) | $(cell hello-wasi:wr) |"
echo "| \`wasmtime serve -O pooling-allocator -S cli\` ($wt_version) | \`spin-hello\` (reuse: up to 16 at once, its default) | $(cell spin-hello:wf) | $(cell spin-hello:wr) |"
echo "| bare hyper (\`host/benches/bare_hyper.rs\`: no component, no isolation) | none: answers \`hello\` itself | $(cell bare) | $(cell bare) |"
echo
read -r bare_rps _ <<<"${res[bare]}"
for f in hello hello-wasi; do
    read -r fresh_rps _ <<<"${res[$f:hf]}"; read -r reuse_rps _ <<<"${res[$f:hr]}"
    echo "\`$f\` on this host against bare hyper: fresh $(share "$fresh_rps" "$bare_rps")×, reused $(share "$reuse_rps" "$bare_rps")×."
done
