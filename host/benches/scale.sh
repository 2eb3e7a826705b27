#!/usr/bin/env bash
# State on PostgreSQL next to redb (wrk -t1 -c32, one after the other, Kafka mode against a
# fresh tansu each time):
#   1. one host, state in redb (the default);
#   2. one host, STATE_URL on a throwaway PostgreSQL (fsync on: the server's defaults);
#   3. two hosts on that PostgreSQL, each loaded by its own wrk (-c16 each) at the same time,
#      as a round-robin balancer would spread 32 connections; cells sum both.
# Prints a markdown table. Run through `just bench`, or alone after `just build`; HOST_BIN runs
# another build of the host (e.g. one from before a change, for a comparison in one sitting).
set -euo pipefail
cd "$(dirname "$0")/../.."
duration=${BENCH_DURATION:-10s}
kport=${BENCH_KAFKA_PORT:-19092}
pgport=${BENCH_PG_PORT:-15432}
paths=(":3001/users" ":3000/api/users" ":3000/api/v1/orders/101")
host_bin=${HOST_BIN:-./target/release/host}

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; } >/dev/null
test -x "$(pg_config --bindir 2>/dev/null)/initdb" || { apt-get update -qq && apt-get install -y -qq postgresql; } >/dev/null
wait_port() { for _ in $(seq 1 400); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }
wait_closed() { for _ in $(seq 1 400); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null || return 0; sleep 0.05; done; }

work=$(mktemp -d); chmod 777 "$work"
pgbin=$(pg_config --bindir)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
    kill $(jobs -p) 2>/dev/null || true
    as_pg "$pgbin/pg_ctl" -D "$work/pg" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
as_pg "$pgbin/initdb" -D "$work/pg" -U postgres --auth=trust -E UTF8 >/dev/null
as_pg "$pgbin/pg_ctl" -D "$work/pg" -l "$work/pg.log" -w \
    -o "-p $pgport -c listen_addresses=127.0.0.1 -c unix_socket_directories=$work -c max_connections=200" start >/dev/null
url_for() { as_pg "$pgbin/psql" -h 127.0.0.1 -p "$pgport" -U postgres -qc "CREATE DATABASE $1" >/dev/null; echo "postgres://postgres@127.0.0.1:$pgport/$1"; }

cat >"$work/post.lua" <<'EOF'
n = 0
prefix = os.getenv("BENCH_PREFIX") or "a"
request = function()
  n = n + 1
  return wrk.format("POST", "/api/users", {["Content-Type"] = "application/json"},
    '{"name":"Bench","email":"' .. prefix .. n .. '@ex.com"}')
end
EOF
# wrk's "Requests/sec" and p50/p99 of one run; non-2xx counted.
wrk_run() { # url connections [wrk args...]
    local url=$1 c=$2; shift 2
    wrk -t1 -c"$c" -d"$duration" --latency "$@" "http://127.0.0.1$url"
}
summary() { # wrk outputs... -> "req/s (p50 / p99)[, N non-2xx]"
    awk '/Requests\/sec/ {r += $2} $1=="50%" {p50 = p50 ? p50 "," $2 : $2} $1=="99%" {p99 = p99 ? p99 "," $2 : $2}
         /Non-2xx/ {e += $NF} END {printf "%.0f (%s / %s)%s", r, p50, p99, e ? ", " e " non-2xx" : ""}'
}

broker=
start_broker() {
    tansu broker --listener-url "tcp://127.0.0.1:$kport" --advertised-listener-url "tcp://127.0.0.1:$kport" >"$work/tansu.log" 2>&1 & broker=$!
    wait_port "$kport"
}
stop_broker() { kill "$broker"; wait "$broker" 2>/dev/null || true; wait_closed "$kport"; }
hosts=()
start_host() { # name admin-port [flags...]
    local name=$1 admin=$2; shift 2
    "$host_bin" --data-dir "$work/data-$name" --compile-cache build/compile-cache \
        --kafka-brokers "127.0.0.1:$kport" --admin-addr "127.0.0.1:$admin" "$@" >"$work/host-$name.log" 2>&1 &
    hosts+=($!)
    local pid=$!
    until curl -sf "localhost:$admin/readyz" >/dev/null; do
        kill -0 "$pid" 2>/dev/null || { echo "host $name exited:" >&2; tail -5 "$work/host-$name.log" >&2; exit 1; }
        sleep 0.05
    done
}
stop_hosts() { kill "${hosts[@]}"; wait "${hosts[@]}" 2>/dev/null || true; hosts=(); for p in 3000 3001 3002 3003 3004 3005 4000 4001 4002 4003 4004 4005 3999 4999; do wait_closed $p; done; }
seed_user() { curl -sf -XPOST "localhost:$1/api/users" -H 'content-type: application/json' -d '{"name":"Alice","email":"alice@mail.com"}' >/dev/null || true; }

declare -A res
# One host: every path with 32 connections.
one() { # column
    seed_user 3000; sleep 0.5
    for p in "${paths[@]}"; do res[$1$p]=$(wrk_run "$p" 32 | summary); done
    res[$1:post]=$(BENCH_PREFIX=$1 wrk_run ":3000/api/users" 32 -s "$work/post.lua" | summary)
}

start_broker; start_host redb 3999; one redb; stop_hosts; stop_broker
# Transactions the server rolled back during the one-host POST run: conflicts (re-runs).
rollbacks() { as_pg "$pgbin/psql" -h 127.0.0.1 -p "$pgport" -U postgres -d one -tAc "SELECT xact_rollback FROM pg_stat_database WHERE datname = 'one'"; }
# Transactions that wrote (each takes a transaction id, counted at once, unlike the statistics).
xid() { as_pg "$pgbin/psql" -h 127.0.0.1 -p "$pgport" -U postgres -d one -tAc "SELECT txid_current()"; }
users() { as_pg "$pgbin/psql" -h 127.0.0.1 -p "$pgport" -U postgres -d one -tAc "SELECT count(*) FROM kv WHERE service = 'user' AND bucket = 'users'"; }
start_broker; start_host pg1 3999 --state-url "$(url_for one)"
seed_user 3000; sleep 0.5
for p in "${paths[@]}"; do res[pg1$p]=$(wrk_run "$p" 32 | summary); done
before=$(rollbacks); xid0=$(xid)
res[pg1:post]=$(BENCH_PREFIX=pg1 wrk_run ":3000/api/users" 32 -s "$work/post.lua" | summary)
writes=$(( $(xid) - xid0 - 1 )); created=$(( $(users) - 1 ))
aborts="$(( $(rollbacks) - before )) transactions rolled back (conflicts) while $created users were created; $writes transactions wrote, $(awk "BEGIN {printf \"%.2f\", $writes / ($created > 0 ? $created : 1)}") per created user"
stop_hosts; stop_broker

start_broker
url=$(url_for two)
start_host pga 3999 --state-url "$url"
start_host pgb 4999 --state-url "$url" --port gateway=4000,user=4001,product=4002,order=4003,reviews=4004,ratings=4005
seed_user 3000; sleep 0.5
for p in "${paths[@]}"; do
    other=${p/:300/:400}
    res[pg2$p]=$( { wrk_run "$p" 16 & wrk_run "$other" 16; wait; } | summary)
done
res[pg2:post]=$( { BENCH_PREFIX=x wrk_run ":3000/api/users" 16 -s "$work/post.lua" & BENCH_PREFIX=y wrk_run ":4000/api/users" 16 -s "$work/post.lua"; wait; } | summary)
stop_hosts; stop_broker

echo "wrk -t1 -d$duration --latency, Kafka mode (tansu), instance reuse 1000 (the default); cells are req/s (p50 / p99). PostgreSQL $("$pgbin/postgres" --version | awk '{print $3}') on the same machine, its default settings (fsync on)."
echo
echo "| path | one host, redb | one host, PostgreSQL | two hosts, one PostgreSQL (two wrk -c16, summed; p50s, p99s of each) |"
echo "|---|---|---|---|"
for p in "${paths[@]}"; do echo "| \`GET $p\` | ${res[redb$p]} | ${res[pg1$p]} | ${res[pg2$p]} |"; done
echo "| \`POST :3000/api/users\` | ${res[redb:post]} | ${res[pg1:post]} | ${res[pg2:post]} |"
echo
echo "One host on PostgreSQL, during its POST run: $aborts."
