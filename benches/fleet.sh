#!/usr/bin/env bash
# Fleet-mode load cases of SPEC §9, on loopback with a real redis-server (also run by
# `SECTIONS=fleet bash benches/load.sh`):
#   1. L1 hits with Redis configured vs without (wrk -t1 -c64, ~8 KB page, interleaved rounds);
#   2. an L2 hit (another replica fetched the page) vs an L1 hit, p50 for ~80 KB pages;
#   3. three replicas under 10x overload of distinct cold keys: upstream calls vs one budget.
#
#   bash benches/fleet.sh                  # ROUNDS=3 DURATION=10s
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
P=${FLEET_BASE_PORT:-19000}
SIM=127.0.0.1:$((P + 1)); REDIS_PORT=$((P + 2))
A=127.0.0.1:$((P + 10)); A_ADMIN=127.0.0.1:$((P + 20))
SOLO=127.0.0.1:$((P + 13)); SOLO_ADMIN=127.0.0.1:$((P + 23))
R1=127.0.0.1:$((P + 14)); R1_ADMIN=127.0.0.1:$((P + 24))
R2=127.0.0.1:$((P + 15)); R2_ADMIN=127.0.0.1:$((P + 25))
R3=127.0.0.1:$((P + 16)); R3_ADMIN=127.0.0.1:$((P + 26))
ACCOUNTS=${ACCOUNTS:-600}

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v redis-server >/dev/null || need+=(redis-server)
command -v curl >/dev/null || need+=(curl)
if [ "${#need[@]}" -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
cargo build --release --bin thingspace-gateway --example l2_latency >&2
BIN=target/release/thingspace-gateway
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$WORK"; }
trap cleanup EXIT
wait_http() { for _ in $(seq 1 200); do curl -fs -o /dev/null "$1" && return 0; sleep 0.05; done; echo "no answer from $1" >&2; exit 1; }

# Accounts of 1100 devices: each account's first page (1000 devices) is ~80 KB, its second
# (100 devices) ~8 KB.
taskset -c 1 "$BIN" sim --listen "$SIM" --accounts "$ACCOUNTS" --devices 1100 > "$WORK/sim.log" 2>&1 & PIDS+=($!)
taskset -c 1 redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --maxmemory-policy noeviction --dir "$WORK" > "$WORK/redis.log" 2>&1 & PIDS+=($!)
wait_http "http://$SIM/_sim/accounts"
for _ in $(seq 1 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.05; done
curl -fs "http://$SIM/_sim/accounts" | python3 -c 'import json,sys; [print(a["accountName"]) for a in json.load(sys.stdin)]' > "$WORK/accounts.txt"

gateway_config() { # listen admin redis(yes|no) extra
  cat <<CFG
[server]
listen = "$1"
admin_listen = "$2"
[upstream]
base_url = "http://$SIM"
rate_per_second = ${RATE:-100000.0}
burst = ${BURST:-100000}
max_concurrent = ${MAX_CONCURRENT:-256}
[credentials]
client_id = "demo-key"
client_secret = "demo-secret"
username = "demo-user"
password = "demo-pass"
guard_file = ""
[clients]
mode = "none"
token_signing_key = "fleet-bench-signing-key-0123456789abcdef"
[cache]
ttl = "1h"
$4
CFG
  if [ "$3" = yes ]; then printf '[redis]\nurl = "redis://127.0.0.1:%s/0"\nkey_prefix = "%s"\n' "$REDIS_PORT" "${KEY_PREFIX:-tsgw:}"; fi
}
start_gw() { # name listen admin redis extra [core]
  gateway_config "$2" "$3" "$4" "$5" > "$WORK/$1.toml"
  RUST_LOG=warn TOKIO_WORKER_THREADS=1 taskset -c "${6:-0}" "$BIN" serve --config "$WORK/$1.toml" 2> "$WORK/$1.log" & PIDS+=($!)
  wait_http "http://$3/readyz"
}

run_wrk() { # url -> "req/s p50_ms p99_ms"
  taskset -c 1 wrk -t1 -c64 -d"$DURATION" --latency "$1" | python3 -c '
import re, sys
t = sys.stdin.read()
def ms(v):
    n, u = re.match(r"([\d.]+)(us|ms|s)", v).groups()
    return float(n) * {"us": 0.001, "ms": 1, "s": 1000}[u]
print("%s %.3f %.3f" % (re.search(r"Requests/sec:\s+([\d.]+)", t).group(1), ms(re.search(r"\s50%\s+(\S+)", t).group(1)), ms(re.search(r"\s99%\s+(\S+)", t).group(1))))'
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

echo "## Fleet mode ($(nproc) cores, $(uname -m)); redis-server $(redis-server --version | grep -Eo 'v=[0-9.]+')"

# 1. L1 hits with and without Redis: the same page, the same build, one worker each on core 0.
start_gw fleet "$A" "$A_ADMIN" yes ""
start_gw solo "$SOLO" "$SOLO_ADMIN" no ""
ACCT2=$(sed -n 2p "$WORK/accounts.txt")
CURSOR=$(curl -fs "http://$A/api/fota/v1/licenses/$ACCT2/index/0" | python3 -c 'import json,sys; print(json.load(sys.stdin)["lastSeenDeviceId"])')
SMALL=/api/fota/v1/licenses/$ACCT2/index/$CURSOR
for u in "http://$A$SMALL" "http://$SOLO$SMALL"; do curl -fs -o /dev/null "$u"; done
declare -A R
for round in $(seq 1 "$ROUNDS"); do
  for s in fleet solo; do
    url="http://$A$SMALL"; [ "$s" = solo ] && url="http://$SOLO$SMALL"
    R[$s,$round]=$(run_wrk "$url")
    echo "round $round $s: ${R[$s,$round]}" >&2
  done
done
fleet_rps=$(for r in $(seq 1 "$ROUNDS"); do echo "${R[fleet,$r]}" | cut -d' ' -f1; done | median)
solo_rps=$(for r in $(seq 1 "$ROUNDS"); do echo "${R[solo,$r]}" | cut -d' ' -f1; done | median)
# Each round's two runs are side by side; their ratio, round by round, is what the machine's
# drift between rounds does not move.
per_round=$(for r in $(seq 1 "$ROUNDS"); do
  python3 -c "print(100 * ${R[fleet,$r]%% *} / ${R[solo,$r]%% *})"; done | median)
echo "L1 hits, ~8 KB page, wrk -c64 $DURATION x $ROUNDS rounds: with Redis $fleet_rps req/s, without $solo_rps req/s: $(python3 -c "print(f'{100*$fleet_rps/$solo_rps:.1f}%')") of medians, $(python3 -c "print(f'{$per_round:.1f}%')") median of per-round ratios (target >= 97%)"

# 2. L2 vs L1 hits for ~80 KB pages: examples/l2_latency.rs (its own redis-server, simulator
# and two replicas; interleaved rounds).
taskset -c 0 target/release/examples/l2_latency "${L2_ROUNDS:-5}" "${L2_PAGES:-400}"

# 3. Three replicas under 10x overload of distinct cold keys: rate 10/s, burst 20, 4 slots.
# A fleet of its own (another key_prefix) on the same Redis.
RATE=10.0 BURST=20 MAX_CONCURRENT=4 KEY_PREFIX="overload:"
export RATE BURST MAX_CONCURRENT KEY_PREFIX
start_gw r1 "$R1" "$R1_ADMIN" yes "" 0
start_gw r2 "$R2" "$R2_ADMIN" yes "" 0
start_gw r3 "$R3" "$R3_ADMIN" yes "" 0
calls() { curl -fs "http://$SIM/_sim/stats" | python3 -c 'import json,sys; s=json.load(sys.stdin); print(sum(s["requests"].get("licenses",{}).values()))'; }
before=$(calls)
start=$(date +%s.%N)
python3 - "$R1" "$R2" "$R3" "$WORK/accounts.txt" <<'PY'
# 10x the fleet's rate of 10/s: 100 requests/s for 5 s, spread over the three replicas, each a
# distinct cold key (an account's first page).
import concurrent.futures, http.client, sys, time
hosts, accounts = sys.argv[1:4], [l.strip() for l in open(sys.argv[4]) if l.strip()]
assert len(accounts) >= 500, "ACCOUNTS must be at least 500"
def one(i):
    h, p = hosts[i % 3].split(":")
    c = http.client.HTTPConnection(h, int(p), timeout=30)
    c.request("GET", f"/api/fota/v1/licenses/{accounts[i]}/index/0")
    return c.getresponse().status
codes = {}
with concurrent.futures.ThreadPoolExecutor(128) as pool:
    futs = []
    t0 = time.time()
    for i in range(500):
        futs.append(pool.submit(one, i))
        time.sleep(max(0, t0 + (i + 1) / 100 - time.time()))
    for f in futs:
        codes[f.result()] = codes.get(f.result(), 0) + 1
print(f"client answers by status: {codes}")
PY
secs=$(python3 -c "import time; print(f'{time.time() - $start:.1f}')")
after=$(calls)
max_conc=$(curl -fs "http://$SIM/_sim/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("max_concurrency", "n/a"))')
echo "three replicas, 10x overload for ${secs}s: upstream license calls $((after - before)), bound burst + rate x seconds = $(python3 -c "print(int(20 + 10 * $secs))"); simulator's max concurrency $max_conc (max_concurrent 4)"
