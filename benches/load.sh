#!/usr/bin/env bash
# Whole-gateway load benchmark (SPEC §9), side by side with nginx proxy_cache and a bare hyper
# server (the ceiling), all in front of the same simulator, on loopback.
#
#   bash benches/load.sh                 # 3 interleaved rounds of 10 s per server and case
#   ROUNDS=5 DURATION=15s bash benches/load.sh
#   SECTIONS=miss,walk MISS_DURATION=3s bash benches/load.sh
#
# Servers run pinned to core 0 (one worker each: nginx worker_processes 1, the gateway and the
# bare server with one tokio worker), wrk -t1 -c64 pinned to core 1. Prints medians.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
SECTIONS=${SECTIONS:-hits,stampede,miss,walk,memory,fleet}   # any subset, comma-separated
want() { [[ ",$SECTIONS," == *",$1,"* ]]; }
P=${BASE_PORT:-18000}
SIM=127.0.0.1:$((P + 81)); GW=127.0.0.1:$((P + 80)); GW_ADMIN=127.0.0.1:$((P + 90))
NGINX=127.0.0.1:$((P + 82)); BARE=127.0.0.1:$((P + 83))
MISS=127.0.0.1:$((P + 84)); MISS_ADMIN=127.0.0.1:$((P + 94))
MEM=127.0.0.1:$((P + 85)); MEM_ADMIN=127.0.0.1:$((P + 95))
MEM_MAX_MIB=${MEM_MAX_MIB:-128}

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || need+=(nginx-light)
command -v curl >/dev/null || need+=(curl)
if [ "${#need[@]}" -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
cargo build --release --bin thingspace-gateway --example bare_hyper >&2
TARGET=${CARGO_TARGET_DIR:-target}
BIN=$TARGET/release/thingspace-gateway
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$WORK"; }
trap cleanup EXIT
wait_http() { for _ in $(seq 1 200); do curl -fs -o /dev/null "$1" && return 0; sleep 0.05; done; echo "no answer from $1" >&2; exit 1; }

# The simulator: 3 accounts of 2100 devices, so pages are 1000, 1000 and 100 devices.
taskset -c 1 "$BIN" sim --listen "$SIM" --accounts 3 --devices 2100 > "$WORK/sim.log" 2>&1 & PIDS+=($!)
wait_http "http://$SIM/_sim/accounts"
ACCT=$(curl -fs "http://$SIM/_sim/accounts" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["accountName"])')
TOKEN=$(curl -fs -u demo-key:demo-secret -d grant_type=client_credentials "http://$SIM/api/ts/v1/oauth2/token" | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
SESSION=$(curl -fs -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' -d '{"username":"demo-user","password":"demo-pass"}' "http://$SIM/api/m2m/v1/session/login" | python3 -c 'import json,sys; print(json.load(sys.stdin)["sessionToken"])')
auth=(-H "Authorization: Bearer $TOKEN" -H "VZ-M2M-Token: $SESSION")
BIG=/api/fota/v1/licenses/$ACCT/index/0
CURSOR=$(curl -fs "${auth[@]}" "http://$SIM$BIG" | python3 -c 'import json,sys; print(json.load(sys.stdin)["lastSeenDeviceId"])')
CURSOR=$(curl -fs "${auth[@]}" "http://$SIM/api/fota/v1/licenses/$ACCT/index/$CURSOR" | python3 -c 'import json,sys; print(json.load(sys.stdin)["lastSeenDeviceId"])')
SMALL=/api/fota/v1/licenses/$ACCT/index/$CURSOR
curl -fs "${auth[@]}" "http://$SIM$BIG" > "$WORK/big.json"
curl -fs "${auth[@]}" "http://$SIM$SMALL" > "$WORK/small.json"
gzip -6 -c "$WORK/big.json" > "$WORK/big.json.gz"

gateway_config() { # listen admin extra
  cat <<CFG
[server]
listen = "$1"
admin_listen = "$2"
[upstream]
base_url = "http://$SIM"
rate_per_second = 100000.0
burst = 100000
max_concurrent = 256
[credentials]
client_id = "demo-key"
client_secret = "demo-secret"
username = "demo-user"
password = "demo-pass"
guard_file = ""
[clients]
mode = "none"
$3
CFG
}
gateway_config "$GW" "$GW_ADMIN" $'[cache]\nttl = "1h"' > "$WORK/gw.toml"
RUST_LOG=warn TOKIO_WORKER_THREADS=1 taskset -c 0 "$BIN" serve --config "$WORK/gw.toml" 2> "$WORK/gw.log" & PIDS+=($!)

mkdir -p "$WORK/nginx/cache"
chmod 755 "$WORK" "$WORK/nginx"; chmod 777 "$WORK/nginx/cache"  # nginx workers run as nobody
cat > "$WORK/nginx/nginx.conf" <<CFG
worker_processes 1;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on;
  tcp_nopush off;
  tcp_nodelay on;
  keepalive_requests 1000000;
  proxy_cache_path $WORK/nginx/cache levels=1:2 keys_zone=pages:64m max_size=1g inactive=1h use_temp_path=off;
  upstream sim { server $SIM; keepalive 64; }
  server {
    listen $NGINX;
    location / {
      proxy_pass http://sim;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer $TOKEN";
      proxy_set_header VZ-M2M-Token "$SESSION";
      proxy_cache pages;
      proxy_cache_valid 200 1h;
      proxy_cache_lock on;
      gzip on;
      gzip_types application/json;
      gzip_min_length 256;
    }
  }
}
CFG
taskset -c 0 nginx -c "$WORK/nginx/nginx.conf" -g 'daemon off;' & PIDS+=($!)
TOKIO_WORKER_THREADS=1 taskset -c 0 "$TARGET/release/examples/bare_hyper" "$BARE" "$WORK/big.json" "$WORK/small.json" "$WORK/big.json.gz" > /dev/null & PIDS+=($!)
wait_http "http://$GW_ADMIN/readyz"; wait_http "http://$NGINX$BIG"; wait_http "http://$BARE/big"
for u in "http://$GW$BIG" "http://$GW$SMALL" "http://$NGINX$BIG" "http://$NGINX$SMALL"; do
  curl -fs -o /dev/null "$u"; curl -fs -o /dev/null -H 'Accept-Encoding: gzip' "$u"
done
cmp <(curl -fs "http://$GW$BIG") "$WORK/big.json"
cmp <(curl -fs "http://$NGINX$BIG") "$WORK/big.json"

# wrk -> "req/s p50_ms p99_ms"
run_wrk() { # url [header]
  local out
  if [ -n "${2:-}" ]; then
    out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"$DURATION" --latency -H "$2" "$1")
  else
    out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"$DURATION" --latency "$1")
  fi
  echo "$out" | python3 -c '
import re, sys
t = sys.stdin.read()
def ms(v):
    n, u = re.match(r"([\d.]+)(us|ms|s)", v).groups()
    return float(n) * {"us": 0.001, "ms": 1, "s": 1000}[u]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
p50 = ms(re.search(r"\s50%\s+(\S+)", t).group(1))
p99 = ms(re.search(r"\s99%\s+(\S+)", t).group(1))
errs = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
if errs: sys.stderr.write("non-2xx: " + errs.group(1) + "\n")
print(f"{rps:.0f} {p50:.3f} {p99:.3f}")'
}

declare -A R
if want hits; then
cases=(big small gzip)
servers=(gateway nginx bare)
url_for() { # case server
  local path
  case $1 in big|gzip) path=$BIG ;; small) path=$SMALL ;; esac
  case $2 in
    gateway) echo "http://$GW$path" ;;
    nginx) echo "http://$NGINX$path" ;;
    bare) if [ "$1" = small ]; then echo "http://$BARE/small"; else echo "http://$BARE/big"; fi ;;
  esac
}
for round in $(seq 1 "$ROUNDS"); do
  for c in "${cases[@]}"; do
    for s in "${servers[@]}"; do
      hdr=""; [ "$c" = gzip ] && hdr="Accept-Encoding: gzip"
      R[$c,$s,$round]=$(run_wrk "$(url_for "$c" "$s")" "$hdr")
      echo "round $round $c $s: ${R[$c,$s,$round]}" >&2
    done
  done
done

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo
echo "## Cache hits: wrk -t1 -c$CONNS -d$DURATION, medians of $ROUNDS interleaved rounds ($(nproc) cores, $(uname -m))"
printf '%-22s %10s %9s %9s %10s %9s %9s %12s %12s\n' case gw_req/s gw_p50ms gw_p99ms nginx_req/s ngx_p50 ngx_p99 gw/nginx gw/bare
for c in "${cases[@]}"; do
  declare -A M=()
  for s in "${servers[@]}"; do
    for i in 1 2 3; do
      M[$s,$i]=$(for r in $(seq 1 "$ROUNDS"); do echo "${R[$c,$s,$r]}" | cut -d' ' -f$i; done | median)
    done
  done
  label=$c; [ "$c" = big ] && label="1000 devices (~80 KB)"; [ "$c" = small ] && label="100 devices (~8 KB)"; [ "$c" = gzip ] && label="1000 devices, gzip"
  printf '%-22s %10s %9s %9s %10s %9s %9s %12s %12s\n' "$label" "${M[gateway,1]}" "${M[gateway,2]}" "${M[gateway,3]}" \
    "${M[nginx,1]}" "${M[nginx,2]}" "${M[nginx,3]}" \
    "$(python3 -c "print(f'{${M[gateway,1]}/${M[nginx,1]}:.2f}x')")" \
    "$(python3 -c "print(f'{100*${M[gateway,1]}/${M[bare,1]}:.0f}% ({${M[bare,1]}})')")"
done

fi

if want stampede; then
echo
echo "## 1000-way stampede on one cold key"
curl -fs -X POST "http://$SIM/_sim/faults" -d '{"latency":"200ms"}' >/dev/null
before=$(curl -fs "http://$SIM/_sim/stats" | python3 -c 'import json,sys; print(sum(json.load(sys.stdin)["requests"].get("licenses",{}).values()))')
COLD=/api/fota/v1/licenses/$(curl -fs "http://$SIM/_sim/accounts" | python3 -c 'import json,sys; print(json.load(sys.stdin)[2]["accountName"])')/index/0
taskset -c 1 wrk -t1 -c1000 -d2s "http://$GW$COLD" > "$WORK/stampede.txt" 2>&1 || true
after=$(curl -fs "http://$SIM/_sim/stats" | python3 -c 'import json,sys; print(sum(json.load(sys.stdin)["requests"].get("licenses",{}).values()))')
echo "requests sent: $(grep -Eo '[0-9]+ requests in' "$WORK/stampede.txt" | cut -d' ' -f1) over 1000 connections; upstream license calls: $((after - before))"
curl -fs -X POST "http://$SIM/_sim/faults" -d '{"latency":"0ms"}' >/dev/null
fi

if want miss; then
# Every request a distinct cold key, upstream budget opened wide: one simulator per page size
# (one account; every device id is a cursor, so every key is distinct), every key rendered once
# by the simulator first so that all three clients find the same upstream. Before each run the
# gateway's cache is purged and nginx gets a fresh cache key space (X-Run is part of its key),
# so every request of the run is a miss for both. Overhead = p50 / p99 minus the simulator's own.
MISS_DURATION=${MISS_DURATION:-3s}
MSIM=127.0.0.1:$((P + 86)); NGINX_MISS=127.0.0.1:$((P + 87))
cat > "$WORK/rotate.lua" <<'LUA'
local paths = {}
for line in io.lines(os.getenv("PATHS_FILE")) do paths[#paths + 1] = line end
local i = 0
local h = {}
if (os.getenv("AUTH") or "") ~= "" then
  h["Authorization"] = os.getenv("AUTH"); h["VZ-M2M-Token"] = os.getenv("SESSION")
end
if (os.getenv("RUN") or "") ~= "" then h["X-Run"] = os.getenv("RUN") end
request = function()
  i = i + 1
  if i > #paths then i = 1 end
  return wrk.format("GET", paths[i], h)
end
LUA
# wrk over the key list -> "requests req/s p50_ms p99_ms"
miss_wrk() { # url conns [auth session run]
  PATHS_FILE="$WORK/miss_paths.txt" AUTH="${3:-}" SESSION="${4:-}" RUN="${5:-}" \
    taskset -c 1 wrk -t1 -c"$2" -d"$MISS_DURATION" --latency -s "$WORK/rotate.lua" "$1" | python3 -c '
import re, sys
t = sys.stdin.read()
def ms(v):
    n, u = re.match(r"([\d.]+)(us|ms|s)", v).groups()
    return float(n) * {"us": 0.001, "ms": 1, "s": 1000}[u]
n = int(re.search(r"(\d+) requests in", t).group(1))
errs = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
if errs: sys.stderr.write("non-2xx: " + errs.group(1) + "\n")
print(n, re.search(r"Requests/sec:\s+([\d.]+)", t).group(1),
      "%.3f" % ms(re.search(r"\s50%\s+(\S+)", t).group(1)), "%.3f" % ms(re.search(r"\s99%\s+(\S+)", t).group(1)))'
}
metric() { curl -fs "http://$MISS_ADMIN/metrics" | awk -v s="$1" 'index($0, s " ") == 1 {print $2}'; }
echo
echo "## Miss path: every request a distinct cold key, budget opened wide (wrk -t1, $MISS_DURATION per run, medians of $ROUNDS interleaved rounds; load average $(cut -d' ' -f1-3 /proc/loadavg))"
printf '%-14s %5s %15s %24s %24s %9s %9s\n' page conns "sim p50/p99" "gateway p50/p99 (+over)" "nginx p50/p99 (+over)" gw_req/s ngx_req/s
for size in 8 80; do
  if [ "$size" = 8 ]; then ps=100; devices=${MISS_KEYS_8K:-60000}; else ps=1000; devices=${MISS_KEYS_80K:-20000}; fi
  taskset -c 1 "$BIN" sim --listen "$MSIM" --accounts 1 --devices "$devices" --page-size "$ps" > "$WORK/msim.log" 2>&1 & MSIM_PID=$!
  wait_http "http://$MSIM/_sim/accounts"
  read -r MTOKEN MSESSION < <(python3 - "$MSIM" <<'PY'
import json, sys, urllib.request
sim = sys.argv[1]
tok = json.load(urllib.request.urlopen(urllib.request.Request(f"http://{sim}/api/ts/v1/oauth2/token",
    data=b"grant_type=client_credentials", headers={"Authorization": "Basic ZGVtby1rZXk6ZGVtby1zZWNyZXQ="})))["access_token"]
ses = json.load(urllib.request.urlopen(urllib.request.Request(f"http://{sim}/api/m2m/v1/session/login",
    data=b'{"username":"demo-user","password":"demo-pass"}',
    headers={"Authorization": "Bearer " + tok, "Content-Type": "application/json"})))["sessionToken"]
print(tok, ses)
PY
)
  python3 - "$MSIM" "$MTOKEN" "$MSESSION" > "$WORK/miss_paths.txt" <<'PY'
import json, sys, urllib.request
sim, token, session = sys.argv[1:]
acct = json.load(urllib.request.urlopen(f"http://{sim}/_sim/accounts"))[0]["accountName"]
idx = 0
while True:
    req = urllib.request.Request(f"http://{sim}/api/fota/v1/licenses/{acct}/index/{idx}",
                                 headers={"Authorization": f"Bearer {token}", "VZ-M2M-Token": session})
    page = json.load(urllib.request.urlopen(req))
    for d in page["deviceList"]:
        print(f"/api/fota/v1/licenses/{acct}/index/{d['deviceId']}")
    if not page["hasMoreData"]:
        break
    idx = page["lastSeenDeviceId"]
PY
  KEYS=$(wc -l < "$WORK/miss_paths.txt")
  # The simulator renders each page once and keeps it: render every key now.
  sed "s#^\(.*\)#url = \"http://$MSIM\1\"\noutput = \"/dev/null\"#" "$WORK/miss_paths.txt" > "$WORK/miss_curl.cfg"
  taskset -c 1 curl -s --parallel --parallel-max 16 -H "Authorization: Bearer $MTOKEN" -H "VZ-M2M-Token: $MSESSION" -K "$WORK/miss_curl.cfg" > /dev/null 2>&1 || true
  gateway_config "$MISS" "$MISS_ADMIN" "" | sed "s#http://$SIM\"#http://$MSIM\"#" > "$WORK/miss.toml"
  RUST_LOG=warn TOKIO_WORKER_THREADS=1 taskset -c 0 "$BIN" serve --config "$WORK/miss.toml" 2> "$WORK/miss.log" & MISS_PID=$!
  mkdir -p "$WORK/nginx_miss/cache"; chmod 755 "$WORK/nginx_miss"; chmod 777 "$WORK/nginx_miss/cache"
  sed -e "s#$WORK/nginx/#$WORK/nginx_miss/#g" -e "s#server $SIM;#server $MSIM;#" -e "s#listen $NGINX;#listen $NGINX_MISS;#" \
      -e "s#Bearer $TOKEN#Bearer $MTOKEN#" -e "s#\"$SESSION\"#\"$MSESSION\"#" \
      -e "s#proxy_cache pages;#proxy_cache pages; proxy_cache_key \"\$request_uri \$http_x_run\";#" \
      "$WORK/nginx/nginx.conf" > "$WORK/nginx_miss/nginx.conf"
  taskset -c 0 nginx -c "$WORK/nginx_miss/nginx.conf" -g 'daemon off;' & NGINX_MISS_PID=$!
  wait_http "http://$MISS_ADMIN/readyz"; wait_http "http://$NGINX_MISS/_sim/accounts"
  conns_before=$(( $(metric 'thingspace_gateway_upstream_connections_total{reused="false"}') + $(metric 'thingspace_gateway_upstream_connections_total{reused="true"}') ))
  new_before=$(metric 'thingspace_gateway_upstream_connections_total{reused="false"}')
  declare -A MR=()
  for round in $(seq 1 "$ROUNDS"); do
    for c in 1 16; do
      MR[sim,$c,$round]=$(miss_wrk "http://$MSIM" "$c" "Bearer $MTOKEN" "$MSESSION")
      curl -fs -X DELETE "http://$MISS_ADMIN/cache" > /dev/null
      MR[gateway,$c,$round]=$(miss_wrk "http://$MISS" "$c")
      MR[nginx,$c,$round]=$(miss_wrk "http://$NGINX_MISS" "$c" "" "" "$size-$c-$round")
      for s in sim gateway nginx; do
        echo "miss ${size}KB c$c round $round $s: ${MR[$s,$c,$round]}" >&2
        n=$(echo "${MR[$s,$c,$round]}" | cut -d' ' -f1)
        [ "$s" = sim ] || [ "$n" -le "$KEYS" ] || echo "WARNING: $s made $n requests over $KEYS keys: some were not cold (raise MISS_KEYS_${size}K)" >&2
      done
    done
  done
  for c in 1 16; do
    declare -A M=()
    for s in sim gateway nginx; do
      for i in 2 3 4; do
        M[$s,$i]=$(for r in $(seq 1 "$ROUNDS"); do echo "${MR[$s,$c,$r]}" | cut -d' ' -f$i; done | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
      done
    done
    over() { python3 -c "print(f'{$1:.3f}/{$2:.3f} (+{$1-$3:.3f}/+{$2-$4:.3f})')"; }
    printf '%-14s %5s %15s %24s %24s %9.0f %9.0f\n' "~${size} KB ($ps dev)" "$c" "${M[sim,3]}/${M[sim,4]}" \
      "$(over "${M[gateway,3]}" "${M[gateway,4]}" "${M[sim,3]}" "${M[sim,4]}")" \
      "$(over "${M[nginx,3]}" "${M[nginx,4]}" "${M[sim,3]}" "${M[sim,4]}")" "${M[gateway,2]}" "${M[nginx,2]}"
  done
  new_after=$(metric 'thingspace_gateway_upstream_connections_total{reused="false"}')
  conns_after=$(( new_after + $(metric 'thingspace_gateway_upstream_connections_total{reused="true"}') ))
  python3 -c "n = $conns_after - $conns_before; new = $new_after - $new_before; print(f'  gateway upstream responses: {n}, on {new} new connections ({100 * (n - new) / max(n, 1):.2f} % on kept-alive ones)')"
  kill "$MISS_PID" "$NGINX_MISS_PID" "$MSIM_PID" 2>/dev/null || true
  wait "$MISS_PID" "$NGINX_MISS_PID" "$MSIM_PID" 2>/dev/null || true
done
fi

if want walk; then
# A whole-account walk of a cold 25-page account (1000 devices a page, ~2 MB merged): the
# gateway's /gateway/v1/accounts/{a}/licenses after a purge, against a client walking the
# simulator's 25 pages itself over one kept-alive connection (curl). Medians of WALKS.
WALKS=${WALKS:-7}
WSIM=127.0.0.1:$((P + 88))
taskset -c 1 "$BIN" sim --listen "$WSIM" --accounts 1 --devices 25000 > "$WORK/wsim.log" 2>&1 & WSIM_PID=$!
wait_http "http://$WSIM/_sim/accounts"
gateway_config "$MISS" "$MISS_ADMIN" "" | sed "s#http://$SIM\"#http://$WSIM\"#" > "$WORK/walk.toml"
RUST_LOG=warn TOKIO_WORKER_THREADS=1 taskset -c 0 "$BIN" serve --config "$WORK/walk.toml" 2> "$WORK/walk.log" & WALK_PID=$!
wait_http "http://$MISS_ADMIN/readyz"
python3 - "$WSIM" > "$WORK/walk_urls.txt" <<'PY'
import json, sys, urllib.request
sim = sys.argv[1]
tok = json.load(urllib.request.urlopen(urllib.request.Request(f"http://{sim}/api/ts/v1/oauth2/token",
    data=b"grant_type=client_credentials", headers={"Authorization": "Basic ZGVtby1rZXk6ZGVtby1zZWNyZXQ="})))["access_token"]
ses = json.load(urllib.request.urlopen(urllib.request.Request(f"http://{sim}/api/m2m/v1/session/login",
    data=b'{"username":"demo-user","password":"demo-pass"}',
    headers={"Authorization": "Bearer " + tok, "Content-Type": "application/json"})))["sessionToken"]
acct = json.load(urllib.request.urlopen(f"http://{sim}/_sim/accounts"))[0]["accountName"]
print(acct, tok, ses)
idx = 0
while True:
    url = f"http://{sim}/api/fota/v1/licenses/{acct}/index/{idx}"
    print(url)
    page = json.load(urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": f"Bearer {tok}", "VZ-M2M-Token": ses})))
    if not page["hasMoreData"]:
        break
    idx = page["lastSeenDeviceId"]
PY
read -r WACCT WTOKEN WSESSION < <(head -1 "$WORK/walk_urls.txt")
tail -n +2 "$WORK/walk_urls.txt" > "$WORK/walk_pages.txt"
PAGES=$(wc -l < "$WORK/walk_pages.txt")
sed 's#^\(.*\)#url = "\1"\noutput = "/dev/null"#' "$WORK/walk_pages.txt" > "$WORK/walk_curl.cfg"
direct=(); gw=()
for _ in $(seq 1 "$WALKS"); do
  # One curl, the pages in cursor order on one connection: the walk a client would make.
  direct+=("$(taskset -c 1 curl -fs -w '%{time_total}\n' -H "Authorization: Bearer $WTOKEN" -H "VZ-M2M-Token: $WSESSION" \
    -K "$WORK/walk_curl.cfg" | awk '{s += $1} END {printf "%.2f", s * 1000}')")
  curl -fs -X DELETE "http://$MISS_ADMIN/cache" > /dev/null
  gw+=("$(taskset -c 1 curl -fs -o /dev/null -w '%{time_total}' "http://$MISS/gateway/v1/accounts/$WACCT/licenses" | awk '{printf "%.2f", $1 * 1000}')")
done
med() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo
echo "## Cold whole-account walk, $PAGES pages of 1000 devices (medians of $WALKS; load average $(cut -d' ' -f1-3 /proc/loadavg))"
echo "gateway, /gateway/v1/accounts/{a}/licenses after a purge: $(med "${gw[@]}") ms (runs: ${gw[*]})"
echo "a client walking the simulator directly (curl, one connection): $(med "${direct[@]}") ms (runs: ${direct[*]})"
kill "$WALK_PID" "$WSIM_PID" 2>/dev/null || true
wait "$WALK_PID" "$WSIM_PID" 2>/dev/null || true
fi

if want memory; then
echo
echo "## Memory with the cache full (cache.max_bytes = ${MEM_MAX_MIB} MiB)"
gateway_config "$MEM" "$MEM_ADMIN" "$(printf '[cache]\nttl = "1h"\nmax_bytes = "%sMiB"' "$MEM_MAX_MIB")" > "$WORK/mem.toml"
RUST_LOG=warn taskset -c 0 "$BIN" serve --config "$WORK/mem.toml" 2> "$WORK/mem.log" & PIDS+=($!)
wait_http "http://$MEM_ADMIN/readyz"
python3 - "$SIM" "$TOKEN" "$SESSION" > "$WORK/all_paths.txt" <<'PY'
import json, sys, urllib.request
sim, token, session = sys.argv[1:]
for a in json.load(urllib.request.urlopen(f"http://{sim}/_sim/accounts")):
    acct, idx = a["accountName"], 0
    while True:
        req = urllib.request.Request(f"http://{sim}/api/fota/v1/licenses/{acct}/index/{idx}",
                                     headers={"Authorization": f"Bearer {token}", "VZ-M2M-Token": session})
        page = json.load(urllib.request.urlopen(req))
        for d in page["deviceList"]:
            print(f"/api/fota/v1/licenses/{acct}/index/{d['deviceId']}")
        if not page["hasMoreData"]:
            break
        idx = page["lastSeenDeviceId"]
PY
# One curl process, 16 transfers at a time, every body to /dev/null.
sed "s#^\(.*\)#url = \"http://$MEM\1\"\noutput = \"/dev/null\"#" "$WORK/all_paths.txt" > "$WORK/curl.cfg"
taskset -c 1 curl -s --parallel --parallel-max 16 -H 'Accept-Encoding: gzip' -K "$WORK/curl.cfg" > /dev/null 2>&1 || true
taskset -c 1 curl -s --parallel --parallel-max 16 -K "$WORK/curl.cfg" > /dev/null 2>&1 || true
curl -fs "http://$MEM_ADMIN/status" | python3 -c "
import json, sys
s = json.load(sys.stdin)
print(f\"cache: {s['cache']['entries']} entries, {s['cache']['bytes']/2**20:.1f} MiB of {$MEM_MAX_MIB} MiB\")"
rss=$(curl -fs "http://$MEM_ADMIN/metrics" | awk '/^process_resident_memory_bytes/ {print $2}')
python3 -c "
rss = float('$rss') / 2**20; limit = 1.3 * $MEM_MAX_MIB + 64
print(f'resident: {rss:.1f} MiB; target <= 1.3 x {$MEM_MAX_MIB} + 64 = {limit:.1f} MiB: {\"met\" if rss <= limit else \"MISSED\"}')"
echo "distinct pages fetched: $(wc -l < "$WORK/all_paths.txt") (identity and gzip)"
fi

if want fleet; then
echo
# SPEC §9's fleet cases, with their own simulator, redis-server and replicas.
ROUNDS=$ROUNDS DURATION=$DURATION bash benches/fleet.sh
fi
