#!/usr/bin/env bash
# Load harness: the gateway against nginx pass-through, both in front of the same zero-latency
# upstream emulator, with the same photos, in one run. Loopback only; every run is bounded.
#
#   bash benches/load/run.sh            # defaults: 3 runs of 5 s per scenario, 16 connections
#   RUNS=5 DURATION=10s CONNS=16 bash benches/load/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-3}
DURATION=${DURATION:-5s}
CONNS=${CONNS:-16}
RSS_CONNS=${RSS_CONNS:-256}
MODERATE_DURATION=${MODERATE_DURATION:-8s}
# shellcheck source=benches/load/lib.sh
source benches/load/lib.sh

install_missing nginx nginx-light wrk wrk cmake cmake
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

build_release --example pingora_floor
FLOOR=target/release/examples/pingora_floor

EMU=$(free_port); NGX=$(free_port); PGR=$(free_port)
MISS=$(free_port); MISS_ADMIN=$(free_port); HIT=$(free_port); HIT_ADMIN=$(free_port)

say "starting the emulator (zero latency) on $EMU"
LIVENESS_ORG_API_KEY=$ORG_KEY "$DEV" emulator --listen "127.0.0.1:$EMU" >"$TMP/emulator.log" 2>&1 &
PIDS+=($!)
wait_port "$EMU"

gateway_config() { # port admin_port cache_enabled
  gateway_base_config "$1" "$2"
  cat <<CFG
[cache]
enabled = $3
max_bytes = 67108864
[[tenants]]
id = "bench"
key_sha256 = ["$TENANT_DIGEST"]
CFG
}
say "starting the gateway with the cache off on $MISS and on on $HIT"
start_gateway miss "$MISS" "$MISS_ADMIN" false
start_gateway hit "$HIT" "$HIT_ADMIN" true

say "starting a bare Pingora pass-through on $PGR"
"$FLOOR" "127.0.0.1:$PGR" "127.0.0.1:$EMU" >"$TMP/pingora.log" 2>&1 &
PIDS+=($!); PGR_PID=$!
wait_port "$PGR"

say "starting nginx on $NGX"
mkdir -p "$TMP/nginx-body" "$TMP/nginx-proxy"
sed -e "s|@TMP@|$TMP|g" -e "s|@EMU_PORT@|$EMU|g" -e "s|@NGINX_PORT@|$NGX|g" benches/load/nginx.conf >"$TMP/nginx.conf"
"$NGINX" -c "$TMP/nginx.conf" -p "$TMP" &
PIDS+=($!); NGX_PID=$!
wait_port "$NGX"

BOUNDARY=----loadboundary7MA4YWxkTrZu0gW

SIZES=("68KB:face.jpg" "134KB:face-selfie.jpg" "1.6MB:face-large.jpg")
for s in "${SIZES[@]}"; do
  make_body "tests/fixtures/${s#*:}" 1 "$TMP/direct-${s%%:*}.body"
  make_body "tests/fixtures/${s#*:}" 0 "$TMP/gw-${s%%:*}.body"
done

# The CPU a proxy spent: "user system" clock ticks of its processes (nginx: its workers).
cpu_ticks() { # scenario
  local pids=() u=0 s=0 a b
  case $1 in
    nginx) mapfile -t pids < <(pgrep -P "$NGX_PID") ;;
    pingora) pids=("$PGR_PID") ;;
    miss) pids=("$miss_PID") ;;
  esac
  for p in "${pids[@]}"; do
    read -r a b < <(awk '{print $14, $15}' "/proc/$p/stat")
    u=$((u + a)); s=$((s + b))
  done
  echo "$u $s"
}

# Warm-up: connections, pools, and the hit gateway's cache entry for each photo.
for s in "${SIZES[@]}"; do
  size=${s%%:*}
  drive "$HIT" "$TMP/gw-$size.body" "$TENANT_KEY" 2 1s >/dev/null
  drive "$MISS" "$TMP/gw-$size.body" "$TENANT_KEY" 2 1s >/dev/null
  drive "$NGX" "$TMP/direct-$size.body" "" 2 1s >/dev/null
  drive "$PGR" "$TMP/direct-$size.body" "" 2 1s >/dev/null
done

# A scenario's target: sets port, body (which of the two bodies) and key.
target() {
  case $1 in
    direct) port=$EMU; body=direct; key="" ;;
    nginx | nginx_distinct) port=$NGX; body=direct; key="" ;;
    pingora) port=$PGR; body=direct; key="" ;;
    miss) port=$MISS; body=gw; key=$TENANT_KEY ;;
    distinct | hit) port=$HIT; body=gw; key=$TENANT_KEY ;;
  esac
}
name_of() {
  case $1 in
    direct) echo "direct to emulator" ;;
    nginx) echo "nginx pass-through" ;;
    pingora) echo "bare Pingora pass-through (reference)" ;;
    nginx_distinct) echo "nginx, every image new (control)" ;;
    miss) echo "gateway, cache off" ;;
    distinct) echo "gateway, cache on, every image new" ;;
    hit) echo "gateway, cache hit" ;;
  esac
}
# The median over the runs of one field (1 req/s, 2 p50, 3 p99) of results array $1.
median_of() { # results size scenario field
  local -n res=$1
  for r in $(seq 1 "$RUNS"); do echo "${res[$2,$3,$r]}" | cut -d' ' -f"$4"; done | median
}
# The medians of results array $1 at size $2 for each scenario given, into the caller's
# associative arrays rps, p50 and p99.
medians() { # results size scenarios...
  local res=$1 size=$2 sc; shift 2
  for sc in "$@"; do
    rps[$sc]=$(median_of "$res" "$size" "$sc" 1); p50[$sc]=$(median_of "$res" "$size" "$sc" 2); p99[$sc]=$(median_of "$res" "$size" "$sc" 3)
  done
}
# A scenario's p99 over the direct one's, from the caller's p99 array.
added_p99() {
  if [ "$1" = direct ]; then echo "(floor)"; else awk -v a="${p99[$1]}" -v b="${p99[direct]}" 'BEGIN {printf "%+.2f", a-b}'; fi
}
SATURATION=(direct nginx pingora miss nginx_distinct distinct hit)
MODERATE=(direct nginx pingora miss)

declare -A R M C
for s in "${SIZES[@]}"; do
  size=${s%%:*}
  for run in $(seq 1 "$RUNS"); do
    # Interleaved, so that the machine's noise falls on every scenario alike.
    for sc in "${SATURATION[@]}"; do
      target "$sc"
      say "$size $sc run $run/$RUNS ($DURATION, $CONNS connections)"
      read -r u0 s0 < <(cpu_ticks "$sc")
      R["$size,$sc,$run"]=$(drive "$port" "$TMP/$body-$size.body" "$key" "$CONNS" "$DURATION" "$(case $sc in *distinct) echo 1 ;; *) echo 0 ;; esac)")
      read -r u1 s1 < <(cpu_ticks "$sc")
      n=$(echo "${R["$size,$sc,$run"]}" | cut -d' ' -f4)
      C["$size,$sc,$run"]="$(((u1 - u0) * TICK_US / n)) $(((s1 - s0) * TICK_US / n))"
    done
  done
done

# Moderate load: the same 16 connections, each pausing between requests so that the offered
# load is about 40% of what the emulator alone served above. Latency under saturation is mostly
# queueing for the 2 cores; this is the latency a proxy adds when the machine has room.
declare -A PACE
for s in "${SIZES[@]}"; do
  size=${s%%:*}
  direct_rps=$(median_of R "$size" direct 1)
  PACE[$size]=$(awk -v c="$CONNS" -v r="$direct_rps" 'BEGIN {printf "%d", c * 1000 / (0.4 * r) + 0.5}')
  for run in $(seq 1 "$RUNS"); do
    for sc in "${MODERATE[@]}"; do
      target "$sc"
      say "$size $sc moderate run $run/$RUNS ($CONNS connections, ${PACE[$size]} ms pause)"
      M["$size,$sc,$run"]=$(drive "$port" "$TMP/$body-$size.body" "$key" "$CONNS" "$MODERATE_DURATION" 0 "${PACE[$size]}")
    done
  done
done

say "one connection at a time, 68KB: the latency the gateway adds to a single request"
SINGLE_DIRECT=$(for r in $(seq 1 "$RUNS"); do drive "$EMU" "$TMP/direct-68KB.body" "" 1 "$DURATION"; done)
SINGLE_GW=$(for r in $(seq 1 "$RUNS"); do drive "$MISS" "$TMP/gw-68KB.body" "$TENANT_KEY" 1 "$DURATION"; done)

hwm() { awk '/VmHWM/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }
RSS_MISS=$(hwm "$miss_PID"); RSS_HIT=$(hwm "$hit_PID")

say "peak RSS: $RSS_CONNS concurrent 134 KB uploads, distinct images, 64 MiB cache, fresh gateway"
RSS=$(free_port); RSS_ADMIN=$(free_port)
start_gateway rss "$RSS" "$RSS_ADMIN" true
drive "$RSS" "$TMP/gw-134KB.body" "$TENANT_KEY" "$RSS_CONNS" 10s 1 >"$TMP/rss.out"
RSS_256=$(hwm "$rss_PID")
CACHED=$(curl -s "127.0.0.1:$RSS_ADMIN/admin/cache")

printf '\n## Load test: %s, %s, %s runs of %s per scenario, %s connections (median of runs)\n\n' "$(date -u +%Y-%m-%d)" "$(nproc) cores" "$RUNS" "$DURATION" "$CONNS"
printf '| photo | scenario | req/s | p50 ms | p99 ms | req/s vs nginx (same client load) | p99 added over direct (ms) |\n|---|---|---|---|---|---|---|\n'
for s in "${SIZES[@]}"; do
  size=${s%%:*}
  declare -A rps p50 p99
  medians R "$size" "${SATURATION[@]}"
  for sc in "${SATURATION[@]}"; do
    ref=nginx; [ "$sc" = distinct ] && ref=nginx_distinct
    ratio=$(awk -v a="${rps[$sc]}" -v b="${rps[$ref]}" 'BEGIN {printf "%.2fx", a/b}')
    printf '| %s | %s | %.0f | %.2f | %.2f | %s | %s |\n' "$size" "$(name_of "$sc")" "${rps[$sc]}" "${p50[$sc]}" "${p99[$sc]}" "$ratio" "$(added_p99 "$sc")"
  done
  unset rps p50 p99
done
printf '\n## Moderate load: %s connections, each pausing between requests (about 40%% of the emulator'"'"'s own rate), %s per run (median of %s runs)\n\n' "$CONNS" "$MODERATE_DURATION" "$RUNS"
printf '| photo | pause ms | scenario | req/s | p50 ms | p99 ms | p99 added over direct (ms) |\n|---|---|---|---|---|---|---|\n'
for s in "${SIZES[@]}"; do
  size=${s%%:*}
  declare -A rps p50 p99
  medians M "$size" "${MODERATE[@]}"
  for sc in "${MODERATE[@]}"; do
    printf '| %s | %s | %s | %.0f | %.2f | %.2f | %s |\n' "$size" "${PACE[$size]}" "$(name_of "$sc")" "${rps[$sc]}" "${p50[$sc]}" "${p99[$sc]}" "$(added_p99 "$sc")"
  done
  unset rps p50 p99
done

printf '\n## CPU per request at saturation, in microseconds (from /proc/<pid>/stat; median of runs)\n\n'
printf '| photo | scenario | user | system | total |\n|---|---|---|---|---|\n'
for s in "${SIZES[@]}"; do
  size=${s%%:*}
  for sc in nginx pingora miss; do
    u=$(median_of C "$size" "$sc" 1); k=$(median_of C "$size" "$sc" 2)
    printf '| %s | %s | %s | %s | %s |\n' "$size" "$(name_of "$sc")" "$u" "$k" "$((u + k))"
  done
done

p50d=$(echo "$SINGLE_DIRECT" | cut -d' ' -f2 | median); p50g=$(echo "$SINGLE_GW" | cut -d' ' -f2 | median)
p99d=$(echo "$SINGLE_DIRECT" | cut -d' ' -f3 | median); p99g=$(echo "$SINGLE_GW" | cut -d' ' -f3 | median)
printf '\nOne request at a time (68 KB, one connection): direct p50 %.3f ms, through the gateway (cache off) p50 %.3f ms: %+.3f ms added (p99 %.3f vs %.3f ms).\n' \
  "$p50d" "$p50g" "$(awk -v a="$p50g" -v b="$p50d" 'BEGIN {print a-b}')" "$p99d" "$p99g"
printf '\nGateway peak RSS (VmHWM): cache-miss instance %s MiB, cache-hit instance %s MiB after the runs above;\n' "$RSS_MISS" "$RSS_HIT"
printf '%s MiB with %s concurrent 134 KB uploads of distinct images (cache: %s).\n' "$RSS_256" "$RSS_CONNS" "$CACHED"
