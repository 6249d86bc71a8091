#!/usr/bin/env bash
# TLS load harness: the gateway terminating TLS against nginx terminating TLS, both in front of
# the same zero-latency upstream emulator, with the same certificate (ECDSA P-256) and photos, in
# one run. h2load drives every scenario, over HTTP/1.1 and over HTTP/2 (kept-alive connections),
# and openssl s_time counts new TLS 1.3 connections per second, with and without resumption.
# Beside them, Pingora alone over TLS with the same settings: a bare pass-through (the floor of
# a miss) and a responder that reads the upload and answers (the floor of a cache hit).
# Loopback only; every run is bounded.
#
#   bash benches/load/tls.sh            # defaults: 3 runs of 5 s per scenario, 16 connections
#   RUNS=5 DURATION=10 CONNS=16 STREAMS=4 bash benches/load/tls.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-3}
DURATION=${DURATION:-5}
CONNS=${CONNS:-16}
STREAMS=${STREAMS:-4}
HANDSHAKE_SECS=${HANDSHAKE_SECS:-5}
PHOTO=${PHOTO:-face.jpg}
# shellcheck source=benches/load/lib.sh
source benches/load/lib.sh

install_missing nginx nginx-light h2load nghttp2-client openssl openssl bc bc cmake cmake
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

build_release --example pingora_floor --example responder_floor

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost" \
  -keyout "$TMP/tls.key" -out "$TMP/tls.pem" 2>/dev/null

EMU=$(free_port); NGX=$(free_port); FLOOR=$(free_port); RESPOND=$(free_port)
MISS=$(free_port); MISS_TLS=$(free_port); MISS_ADMIN=$(free_port)
HIT=$(free_port); HIT_TLS=$(free_port); HIT_ADMIN=$(free_port)

say "starting the emulator (zero latency) on $EMU"
LIVENESS_ORG_API_KEY=$ORG_KEY "$DEV" emulator --listen "127.0.0.1:$EMU" >"$TMP/emulator.log" 2>&1 &
PIDS+=($!)
wait_port "$EMU"

gateway_config() { # port admin_port "tls_port cache_enabled"
  local tls_port cache
  read -r tls_port cache <<<"$3"
  gateway_base_config "$1" "$2"
  cat <<CFG
[server.tls]
listen = "127.0.0.1:$tls_port"
cert_file = "$TMP/tls.pem"
key_file = "$TMP/tls.key"
[cache]
enabled = $cache
max_bytes = 67108864
[[tenants]]
id = "bench"
key_sha256 = ["$TENANT_DIGEST"]
CFG
}
say "starting the gateway with the cache off (TLS on $MISS_TLS) and on (TLS on $HIT_TLS)"
start_gateway miss "$MISS" "$MISS_ADMIN" "$MISS_TLS false"
start_gateway hit "$HIT" "$HIT_ADMIN" "$HIT_TLS true"
wait_port "$MISS_TLS"; wait_port "$HIT_TLS"

say "starting Pingora alone with TLS: a pass-through on $FLOOR, a responder on $RESPOND"
target/release/examples/pingora_floor "127.0.0.1:$FLOOR" "127.0.0.1:$EMU" --tls "$TMP/tls.pem" "$TMP/tls.key" >"$TMP/floor.log" 2>&1 &
PIDS+=($!); floor_PID=$!
target/release/examples/responder_floor pingora "127.0.0.1:$RESPOND" "$TMP/tls.pem" "$TMP/tls.key" >"$TMP/respond.log" 2>&1 &
PIDS+=($!); respond_PID=$!
wait_port "$FLOOR"; wait_port "$RESPOND"

say "starting nginx with TLS on $NGX"
mkdir -p "$TMP/nginx-body" "$TMP/nginx-proxy"
sed -e "s|@TMP@|$TMP|g" -e "s|@EMU_PORT@|$EMU|g" -e "s|@NGINX_PORT@|$NGX|g" benches/load/nginx-tls.conf >"$TMP/nginx-tls.conf"
"$NGINX" -c "$TMP/nginx-tls.conf" -p "$TMP" &
PIDS+=($!)
wait_port "$NGX"

BOUNDARY=----loadboundary7MA4YWxkTrZu0gW
make_body "tests/fixtures/$PHOTO" 1 "$TMP/direct.body"
make_body "tests/fixtures/$PHOTO" 0 "$TMP/gw.body"

# h2load → "rps mean_ms requests"; any answer but 2xx fails the run.
h2drive() { # port body api_key proto(h1|h2) duration
  local args=(-c "$CONNS" -t 2 -D "$5" -d "$2"
    -H "content-type: multipart/form-data; boundary=$BOUNDARY")
  [ -n "$3" ] && args+=(-H "authorization: Bearer $3")
  if [ "$4" = h1 ]; then args+=(--h1); else args+=(-m "$STREAMS"); fi
  local out
  out=$(h2load "${args[@]}" "https://localhost:$1$ROUTE" 2>&1) || { echo "$out" >&2; exit 1; }
  local ok total
  ok=$(echo "$out" | awk '/^status codes:/ {print $3}')
  total=$(echo "$out" | awk '/^requests:/ {print $2}')
  if [ -z "$ok" ] || [ "$ok" != "$total" ] || [ "$total" = 0 ]; then
    echo "answers other than 2xx, or none:" >&2; echo "$out" >&2; exit 1
  fi
  local rps mean
  rps=$(echo "$out" | awk '/^finished in/ {print $4}')
  mean=$(echo "$out" | awk '/^time for request:/ {print $5}' | to_ms)
  echo "$rps $mean $total"
}

# The CPU a server spent: user + system clock ticks of its processes (nginx: its workers).
cpu_ticks() { # scenario
  local pids=() t=0 a b
  case $1 in
    nginx_*) mapfile -t pids < <(pgrep -P "$(cat "$TMP/nginx-tls.pid")") ;;
    miss_*) pids=("$miss_PID") ;;
    hit_*) pids=("$hit_PID") ;;
    floor_*) pids=("$floor_PID") ;;
    respond_*) pids=("$respond_PID") ;;
  esac
  for p in "${pids[@]}"; do
    read -r a b < <(awk '{print $14, $15}' "/proc/$p/stat")
    t=$((t + a + b))
  done
  echo "$t"
}
ROUTE=/api/v1/backend/liveness/short/

target() {
  case $1 in
    nginx_*) port=$NGX; body=direct; key="" ;;
    miss_*) port=$MISS_TLS; body=gw; key=$TENANT_KEY ;;
    hit_*) port=$HIT_TLS; body=gw; key=$TENANT_KEY ;;
    floor_*) port=$FLOOR; body=direct; key="" ;;
    respond_*) port=$RESPOND; body=gw; key="" ;;
  esac
  proto=${1##*_}
}
name_of() {
  case $1 in
    nginx_*) echo "nginx TLS pass-through, ${1##*_}" ;;
    miss_*) echo "gateway TLS, cache off, ${1##*_}" ;;
    hit_*) echo "gateway TLS, cache hit, ${1##*_}" ;;
    floor_*) echo "Pingora alone: TLS pass-through, ${1##*_}" ;;
    respond_*) echo "Pingora alone: TLS, reads the upload and answers, ${1##*_}" ;;
  esac
}

say "warming up (connections, pools, the hit gateway's cache entry)"
SCENARIOS=(nginx_h1 miss_h1 hit_h1 floor_h1 respond_h1 nginx_h2 miss_h2 hit_h2 floor_h2 respond_h2)
for sc in "${SCENARIOS[@]}"; do
  target "$sc"; h2drive "$port" "$TMP/$body.body" "$key" "$proto" 1 >/dev/null
done

declare -A res
for r in $(seq 1 "$RUNS"); do
  # The order turns each run, so that no scenario always runs first or last.
  for i in "${!SCENARIOS[@]}"; do
    sc=${SCENARIOS[$(( (i + r) % ${#SCENARIOS[@]} ))]}
    target "$sc"
    t0=$(cpu_ticks "$sc")
    res[$sc,$r]=$(h2drive "$port" "$TMP/$body.body" "$key" "$proto" "$DURATION")
    t1=$(cpu_ticks "$sc")
    n=$(echo "${res[$sc,$r]}" | cut -d' ' -f3)
    res[$sc,$r]="${res[$sc,$r]} $(((t1 - t0) * TICK_US / n))"
    say "run $r $sc: ${res[$sc,$r]} (req/s, mean ms, requests, server CPU us/request)"
  done
done
med() { for r in $(seq 1 "$RUNS"); do echo "${res[$1,$r]}" | cut -d' ' -f"$2"; done | median; }

# New connections per second (TLS 1.3), each with one small request (s_time reads its answer,
# and with it the session ticket a resumption needs): full handshakes, then resumed ones.
# → "connections/s resumed_share server_cpu_us_per_connection"
handshakes() { # scenario(nginx_|miss_) port mode(-new|-reuse)
  local t0 t1 c0 c1 out n r
  c0=$(cpu_ticks "$1"); t0=$(date +%s.%N)
  out=$(openssl s_time -connect "127.0.0.1:$2" "$3" -tls1_3 -time "$HANDSHAKE_SECS" -www /tls-probe 2>&1)
  t1=$(date +%s.%N); c1=$(cpu_ticks "$1")
  n=$(echo "$out" | awk '/connections in [0-9.]+s;/ {print $1; exit}')
  r=$(echo "$out" | tr -cd 'r' | wc -c)
  awk -v n="$n" -v r="$r" -v t="$(echo "$t1 - $t0" | bc)" -v c=$(((c1 - c0) * TICK_US)) \
    'BEGIN {printf "%.0f %.2f %.0f", n/t, (r > n ? n : r)/n, c/n}'
}
declare -A hs
for r in $(seq 1 "$RUNS"); do
  for who in nginx_ miss_; do
    port=$NGX; [ "$who" = miss_ ] && port=$MISS_TLS
    hs[$who,new,$r]=$(handshakes "$who" "$port" -new)
    hs[$who,reuse,$r]=$(handshakes "$who" "$port" -reuse)
    say "run $r handshakes $who: new ${hs[$who,new,$r]}, resumed ${hs[$who,reuse,$r]} (connections/s, share resumed, server CPU us/connection)"
  done
done
hmed() { for r in $(seq 1 "$RUNS"); do echo "${hs[$1,$2,$r]}" | cut -d' ' -f"$3"; done | median; }

echo
echo "TLS, $PHOTO, $CONNS connections ($STREAMS streams each over HTTP/2), ${DURATION} s x $RUNS runs (medians), $(nproc) cores"
printf '| scenario | req/s | mean ms | req/s vs nginx TLS, same protocol | server CPU µs/request | CPU vs nginx |\n|---|---|---|---|---|---|\n'
for sc in "${SCENARIOS[@]}"; do
  ref=nginx_${sc##*_}
  ratio=$(awk -v a="$(med "$sc" 1)" -v b="$(med "$ref" 1)" 'BEGIN {printf "%.2fx", a/b}')
  cpu=$(awk -v a="$(med "$sc" 4)" -v b="$(med "$ref" 4)" 'BEGIN {printf "%.2fx", a/b}')
  printf '| %s | %s | %s | %s | %s | %s |\n' "$(name_of "$sc")" "$(med "$sc" 1)" "$(med "$sc" 2)" "$ratio" "$(med "$sc" 4)" "$cpu"
done
echo
printf '| TLS 1.3, a new connection and one small request (openssl s_time, %s s) | nginx conn/s | gateway conn/s | gateway vs nginx | resumed (nginx / gateway) | server CPU µs per connection (nginx / gateway) |\n|---|---|---|---|---|---|\n' "$HANDSHAKE_SECS"
for mode in new reuse; do
  a=$(hmed miss_ "$mode" 1); b=$(hmed nginx_ "$mode" 1)
  printf '| %s | %s | %s | %s | %s / %s | %s / %s |\n' "$([ "$mode" = new ] && echo "full handshake" || echo "resumed session")" "$b" "$a" \
    "$(awk -v a="$a" -v b="$b" 'BEGIN {if (b > 0) printf "%.2fx", a/b; else print "n/a"}')" \
    "$(hmed nginx_ "$mode" 2)" "$(hmed miss_ "$mode" 2)" "$(hmed nginx_ "$mode" 3)" "$(hmed miss_ "$mode" 3)"
done
