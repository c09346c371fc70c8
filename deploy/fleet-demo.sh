#!/usr/bin/env bash
# Fleet mode on loopback (README "Running several replicas"): a throwaway redis-server, the
# ThingSpace simulator and three gateway replicas sharing that Redis, each with its own config
# in a temporary directory (same redis.url, key_prefix and token_signing_key; its own ports;
# guard_file ""). Prints curl lines to try, and stops everything on Ctrl-C or exit.
#
#   bash deploy/fleet-demo.sh            # runs until Ctrl-C
#   bash deploy/fleet-demo.sh --check    # tries the fleet's promises itself, exits 1 on a failure
#
# Options: --bin PATH (the thingspace-gateway binary, built with the default `sim` feature;
# default: the newest of target/{release,debug}, else `cargo build --release`), --port-base N
# (default 18600: Redis N, simulator N+1, replicas N+11..N+13, their admin ports N+21..N+23),
# --keep (leave the temporary directory and its logs). Needs redis-server (Debian's package is
# fine) and curl. Nothing listens beyond 127.0.0.1; Redis keeps nothing on disk.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
mode=demo bin="" base=18600 keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --check) mode=check ;;
    --bin) bin="$2"; shift ;;
    --port-base) base="$2"; shift ;;
    --keep) keep=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

for tool in redis-server redis-cli curl; do
  command -v "$tool" >/dev/null || { echo "$tool is needed (Debian: apt-get install redis-server curl)" >&2; exit 1; }
done

if [ -z "$bin" ]; then
  target="${CARGO_TARGET_DIR:-$repo/target}"
  bin="$(ls -t "$target/release/thingspace-gateway" "$target/debug/thingspace-gateway" 2>/dev/null | head -1 || true)"
  if [ -z "$bin" ]; then
    echo "building thingspace-gateway (cargo build --release)..." >&2
    (cd "$repo" && cargo build --release --quiet --bin thingspace-gateway)
    bin="$target/release/thingspace-gateway"
  fi
fi
[ -x "$bin" ] || { echo "not an executable: $bin" >&2; exit 1; }

# Ports: the first block of 24 from --port-base where nothing listens yet.
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
block_free() { for off in 0 1 11 12 13 21 22 23; do port_free $(($1 + off)) || return 1; done; }
for _ in $(seq 20); do block_free "$base" && break; base=$((base + 100)); done
block_free "$base" || { echo "no free block of ports found near --port-base" >&2; exit 1; }
redis_port=$base sim_port=$((base + 1))
listen() { echo $((base + 10 + $1)); }
admin() { echo $((base + 20 + $1)); }

dir="$(mktemp -d "${TMPDIR:-/tmp}/tsgw-fleet-demo.XXXXXX")"
pids=()
cleanup() {
  trap - EXIT INT TERM
  [ -f "$dir/redis.pid" ] && kill -CONT "$(cat "$dir/redis.pid")" 2>/dev/null || true
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "$keep" = 1 ]; then echo "logs and configs kept in $dir" >&2; else rm -rf "$dir"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Redis: standalone, loopback only, nothing on disk (a demo: production uses AOF, see README).
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" \
  --maxmemory-policy volatile-lru --logfile "$dir/redis.log" &
pids+=($!)
echo $! >"$dir/redis.pid"

"$bin" sim --listen "127.0.0.1:$sim_port" >"$dir/sim.log" 2>&1 &
pids+=($!)

# The fleet's shared values, and one config per replica.
key="$(head -c 24 /dev/urandom | base64 | tr -d '\n')"   # 32 characters, this run only
for i in 1 2 3; do
  cat >"$dir/gateway-$i.toml" <<EOF
# Replica $i of the fleet demo.
[server]
listen = "127.0.0.1:$(listen $i)"
admin_listen = "127.0.0.1:$(admin $i)"

[upstream]
base_url = "http://127.0.0.1:$sim_port"

[credentials]
client_id = "demo-key"
client_secret = "demo-secret"
username = "demo-user"
password = "demo-pass"
guard_file = ""                  # fleet mode: the login counts live in Redis

[clients]
mode = "none"
token_signing_key = "$key"

[log]
format = "json"

[redis]
url = "redis://127.0.0.1:$redis_port/0"
key_prefix = "tsgw:fleet-demo:"
max_replicas = 4
EOF
done

# Redis first (the replicas would serve degraded until it answers), then the three together.
deadline=$((SECONDS + 30))
until redis-cli -p "$redis_port" ping 2>/dev/null | grep -q PONG; do
  [ $SECONDS -lt $deadline ] || { echo "redis-server did not start:" >&2; tail -5 "$dir/redis.log" >&2; exit 1; }
  sleep 0.1
done
for i in 1 2 3; do
  "$bin" serve --config "$dir/gateway-$i.toml" >"$dir/gateway-$i.log" 2>&1 &
  pids+=($!)
done

code() { curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$@" || true; }
for i in 1 2 3; do
  until [ "$(code "http://127.0.0.1:$(admin $i)/readyz")" = 200 ]; do
    if [ $SECONDS -ge $deadline ]; then
      echo "replica $i is not ready after 30 s; its log ($dir/gateway-$i.log):" >&2
      tail -5 "$dir/gateway-$i.log" >&2
      exit 1
    fi
    sleep 0.1
  done
done
until [ "$(code "http://127.0.0.1:$sim_port/_sim/accounts")" = 200 ]; do sleep 0.1; done
account="$(curl -s "http://127.0.0.1:$sim_port/_sim/accounts" | grep -o '"accountName":"[^"]*"' | head -1 | cut -d'"' -f4)"
page="/api/fota/v1/licenses/$account/index/0"

if [ "$mode" = demo ]; then
  cat <<EOF
Fleet demo: Redis 127.0.0.1:$redis_port, simulator http://127.0.0.1:$sim_port, replicas
  1: http://127.0.0.1:$(listen 1) (admin $(admin 1))   2: http://127.0.0.1:$(listen 2) (admin $(admin 2))   3: http://127.0.0.1:$(listen 3) (admin $(admin 3))
Configs and logs: $dir

# A page through replica 1 (fetched from the simulator: X-Cache: MISS)
curl -si http://127.0.0.1:$(listen 1)$page | grep -iE '^(HTTP|x-cache|age|etag)'
# The same page through replicas 2 and 3: from Redis, X-Cache: HIT, same ETag, Age from replica 1's fetch
curl -si http://127.0.0.1:$(listen 2)$page | grep -iE '^(HTTP|x-cache|age|etag)'
curl -si http://127.0.0.1:$(listen 3)$page | grep -iE '^(HTTP|x-cache|age|etag)'
# What the upstream saw: one token call, one login, one page for the whole fleet
curl -s http://127.0.0.1:$sim_port/_sim/stats; echo
# Each replica's link to Redis ("redis": {"configured": true, "connected": true, ...})
curl -s http://127.0.0.1:$(admin 2)/status; echo
curl -s http://127.0.0.1:$(admin 1)/metrics | grep -E '^thingspace_gateway_(redis_up|redis_commands_total|cache_lookups_total)'
# Purge the account on replica 3: the next request on replica 1 is a MISS again
curl -si -X DELETE http://127.0.0.1:$(admin 3)/cache/accounts/$account | head -1
curl -si http://127.0.0.1:$(listen 1)$page | grep -iE '^(HTTP|x-cache)'
# Redis hangs (SIGSTOP) or dies: the replicas keep serving, and rejoin when it is back
kill -STOP $(cat "$dir/redis.pid"); curl -si http://127.0.0.1:$(listen 2)$page | grep -iE '^(HTTP|x-cache)'
curl -s http://127.0.0.1:$(admin 2)/status; echo
kill -CONT $(cat "$dir/redis.pid")
# The keys the fleet keeps (the ThingSpace tokens are sealed: never in clear)
redis-cli -p $redis_port --scan --pattern 'tsgw:fleet-demo:*'

Ctrl-C stops everything.
EOF
  while :; do sleep 3600 & wait $!; done   # wait: a signal interrupts it at once
fi

# --check: the fleet's promises (SPEC §10), each printed ok/FAIL; the exit code says if all held.
failures=0 passed=0
ok() { if [ "$1" = 0 ]; then echo "ok   $2"; passed=$((passed + 1)); else echo "FAIL $2"; failures=$((failures + 1)); fi; }
fetch() { # fetch URL NAME [curl args]: headers in $dir/NAME.h, body in $dir/NAME.b; prints the status
  local url="$1" name="$2"; shift 2
  : >"$dir/$name.h"
  curl -s --max-time 5 -D "$dir/$name.h" -o "$dir/$name.b" -w '%{http_code}' "$@" "$url" || true
}
header() { grep -i "^$2:" "$dir/$1.h" | head -1 | cut -d: -f2- | tr -d ' \r'; }
stats() { curl -s "http://127.0.0.1:$sim_port/_sim/stats"; }
sim_count() { # sim_count ENDPOINT: the 200s the simulator answered there
  stats | grep -o "\"$1\":{[^}]*}" | grep -o '"200":[0-9]*' | cut -d: -f2 | grep . || echo 0
}
redis_up() { curl -s "http://127.0.0.1:$(admin "$1")/metrics" | grep '^thingspace_gateway_redis_up ' | cut -d' ' -f2; }
eventually() { # eventually SECONDS COMMAND...: polls COMMAND until it succeeds or time is up
  local until=$((SECONDS + $1)); shift
  until "$@"; do [ $SECONDS -lt $until ] || return 1; sleep 0.1; done
}

for i in 1 2 3; do
  ok "$([ "$(code "http://127.0.0.1:$(admin $i)/readyz")" = 200 ]; echo $?)" "replica $i: /readyz 200"
  s="$(curl -s "http://127.0.0.1:$(admin $i)/status" | grep -o '"redis":{[^}]*}')"
  ok "$([ "$s" = '"redis":{"configured":true,"connected":true,"degraded_since":null}' ]; echo $?)" "replica $i: /status $s"
  ok "$([ "$(redis_up $i)" = 1 ]; echo $?)" "replica $i: thingspace_gateway_redis_up 1"
done

# Three replicas starting together: one token call and one login for the fleet.
ok "$([ "$(sim_count oauth_token)" = 1 ] && [ "$(sim_count session_login)" = 1 ]; echo $?)" \
  "three replicas started: $(sim_count oauth_token) token call(s), $(sim_count session_login) login(s) upstream (fleet: 1 and 1)"

# A page fetched through replica 1 is served by 2 and 3 from Redis: HIT, same bytes and ETag.
s1="$(fetch "http://127.0.0.1:$(listen 1)$page" r1)"
ok "$([ "$s1" = 200 ] && [ "$(header r1 x-cache)" = MISS ]; echo $?)" "replica 1: $s1, X-Cache $(header r1 x-cache) (fetched upstream)"
for i in 2 3; do
  s="$(fetch "http://127.0.0.1:$(listen $i)$page" r$i)"
  ok "$([ "$s" = 200 ] && [ "$(header r$i x-cache)" = HIT ]; echo $?)" "replica $i: $s, X-Cache $(header r$i x-cache) (fleet: HIT from Redis)"
  ok "$([ "$(header r$i etag)" = "$(header r1 etag)" ] && cmp -s "$dir/r1.b" "$dir/r$i.b"; echo $?)" \
    "replica $i: the same bytes and ETag as replica 1"
done
ok "$([ "$(sim_count licenses)" = 1 ]; echo $?)" "one page upstream for three replicas (saw $(sim_count licenses))"

# A purge on any replica empties Redis and every replica's own cache within a second: a replica
# that holds the page answers its next request after a purge on ANOTHER replica with a MISS.
before="$(sim_count licenses)"
for i in 1 2 3; do
  by=$((i % 3 + 1))
  held="$(fetch "http://127.0.0.1:$(listen $i)$page" h$i)"   # replica i holds the page
  p="$(code -X DELETE "http://127.0.0.1:$(admin $by)/cache/accounts/$account")"
  miss() { fetch "http://127.0.0.1:$(listen $i)$page" p$i >/dev/null; [ "$(header p$i x-cache)" = MISS ]; }
  ok "$([ "$held" = 200 ] && [ "${p:0:1}" = 2 ] && eventually 2 miss; echo $?)" \
    "purge on replica $by ($p): replica $i, holding the page, answers its next request with a MISS"
done
ok "$([ "$(sim_count licenses)" = $((before + 3)) ]; echo $?)" \
  "three purges, three pages upstream (saw $(($(sim_count licenses) - before)); the others came from Redis)"

# Redis hangs (SIGSTOP): every replica keeps answering a cached page at once, and /readyz stays
# 200; the replicas notice (redis_up 0) and rejoin when Redis answers again.
for i in 1 2 3; do fetch "http://127.0.0.1:$(listen $i)$page" w$i >/dev/null; done
kill -STOP "$(cat "$dir/redis.pid")"
for i in 1 2 3; do
  t="$(curl -s -o /dev/null -w '%{http_code} %{time_total}' --max-time 5 "http://127.0.0.1:$(listen $i)$page" || true)"
  ok "$([ "${t% *}" = 200 ] && awk -v t="${t#* }" 'BEGIN { exit !(t < 1.0) }'; echo $?)" \
    "Redis stopped: replica $i answers a cached page: ${t% *} in ${t#* } s (the link costs at most command_timeout)"
done
for i in 1 2 3; do
  down() { [ "$(redis_up $i)" = 0 ]; }
  ok "$(eventually 5 down; echo $?)" "Redis stopped: replica $i notices (redis_up 0)"
  ok "$([ "$(code "http://127.0.0.1:$(admin $i)/readyz")" = 200 ]; echo $?)" "Redis stopped: replica $i /readyz still 200"
done
kill -CONT "$(cat "$dir/redis.pid")"
for i in 1 2 3; do
  up() { [ "$(redis_up $i)" = 1 ]; }
  ok "$(eventually 5 up; echo $?)" "Redis back: replica $i rejoins without a restart (redis_up 1)"
done
ok "$([ "$(sim_count session_login)" = 1 ]; echo $?)" "no login beyond the first (saw $(sim_count session_login))"

echo "$passed passed, $failures failed"
[ "$failures" = 0 ]
