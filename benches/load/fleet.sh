#!/usr/bin/env bash
# Fleet-mode load harness: the gateway with store.backend = "redis" (a local Redis, AOF on)
# beside the same gateway with backend = "local", in one run, interleaved, in front of the same
# zero-latency emulator. Reports throughput and latency as ratios to the local store, and the
# Redis round trips per request (from INFO commandstats). Beside them, in the same runs, a bare
# Pingora pass-through with 0, 1 and 2 round trips to the same Redis per request (`PING`): what
# consulting a shared store costs any proxy on this machine, whatever it asks the store.
# Loopback only; every run is bounded.
#
#   bash benches/load/fleet.sh          # 3 runs of 5 s per scenario, 16 connections
#   RUNS=5 DURATION=10s CONNS=16 bash benches/load/fleet.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-3}
DURATION=${DURATION:-5s}
CONNS=${CONNS:-16}
MODERATE_DURATION=${MODERATE_DURATION:-8s}
# shellcheck source=benches/load/lib.sh
source benches/load/lib.sh

install_missing wrk wrk redis-server redis-server cmake cmake

build_release --example pingora_floor
FLOOR=target/release/examples/pingora_floor

EMU=$(free_port); REDIS=$(free_port)
LOCAL=$(free_port); LOCAL_ADMIN=$(free_port); SHARED=$(free_port); SHARED_ADMIN=$(free_port)

say "starting the emulator (zero latency) on $EMU and Redis (AOF every second) on $REDIS"
LIVENESS_ORG_API_KEY=$ORG_KEY "$DEV" emulator --listen "127.0.0.1:$EMU" >"$TMP/emulator.log" 2>&1 &
PIDS+=($!)
redis-server --port "$REDIS" --bind 127.0.0.1 --save '' --appendonly yes --appendfsync everysec --dir "$TMP" --logfile redis.log &
PIDS+=($!); REDIS_PID=$!
wait_port "$EMU"; wait_port "$REDIS"
rcli() { redis-cli -p "$REDIS" "$@"; }

gateway_config() { # port admin_port backend
  gateway_base_config "$1" "$2"
  cat <<CFG
[cache]
max_bytes = 67108864
[budgets]
state_file = "$TMP/$3-budgets.json"
[store]
backend = "$3"
url = "redis://127.0.0.1:$REDIS/0"
[[tenants]]
id = "bench"
key_sha256 = ["$TENANT_DIGEST"]
# A budget, so that every miss reserves and commits as a budgeted tenant's does.
daily_budget = 1000000000
CFG
}
start_gateway local "$LOCAL" "$LOCAL_ADMIN" local
start_gateway shared "$SHARED" "$SHARED_ADMIN" redis

# Bare Pingora, with 0, 1 and 2 round trips to Redis before each request goes upstream.
declare -A FLOOR_PORT FLOOR_PID
for trips in 0 1 2; do
  FLOOR_PORT[$trips]=$(free_port)
  extra=(); [ "$trips" -gt 0 ] && extra=(--redis "redis://127.0.0.1:$REDIS/0" "$trips")
  "$FLOOR" "127.0.0.1:${FLOOR_PORT[$trips]}" "127.0.0.1:$EMU" "${extra[@]}" >"$TMP/floor$trips.log" 2>&1 &
  PIDS+=($!); FLOOR_PID[$trips]=$!
  wait_port "${FLOOR_PORT[$trips]}"
done

BOUNDARY=----loadboundary7MA4YWxkTrZu0gW
make_body tests/fixtures/face.jpg 0 "$TMP/gw.body"
make_body tests/fixtures/face.jpg 1 "$TMP/direct.body"

# Warm-up: connections, pools, the scripts loaded in Redis, and the cache entry for the hit runs.
for p in "$LOCAL" "$SHARED"; do
  drive "$p" "$TMP/gw.body" "$TENANT_KEY" 2 1s >/dev/null
  drive "$p" "$TMP/gw.body" "$TENANT_KEY" 2 1s 1 >/dev/null
done
for trips in 0 1 2; do drive "${FLOOR_PORT[$trips]}" "$TMP/direct.body" "" 2 1s 1 >/dev/null; done

port_of() { case $1 in local) echo "$LOCAL" ;; redis) echo "$SHARED" ;; esac; }
# CPU time of a process so far, in microseconds (user + system).
cpu_us() { awk -v t="$TICK_US" '{print ($14 + $15) * t}' "/proc/$1/stat"; }
declare -A R CPU
for run in $(seq 1 "$RUNS"); do
  for kind in miss hit; do
    for backend in local redis; do
      say "$kind $backend run $run/$RUNS ($DURATION, $CONNS connections)"
      gw_pid=$([ "$backend" = local ] && echo "$local_PID" || echo "$shared_PID")
      g0=$(cpu_us "$gw_pid"); r0=$(cpu_us "$REDIS_PID")
      R["$kind,$backend,$run"]=$(drive "$(port_of "$backend")" "$TMP/gw.body" "$TENANT_KEY" "$CONNS" "$DURATION" "$([ "$kind" = miss ] && echo 1 || echo 0)")
      n=$(echo "${R["$kind,$backend,$run"]}" | cut -d' ' -f4)
      CPU["$kind,$backend,$run"]="$((($(cpu_us "$gw_pid") - g0) / n)) $((($(cpu_us "$REDIS_PID") - r0) / n))"
    done
  done
  for trips in 0 1 2; do
    say "bare Pingora, $trips Redis round trips per request, run $run/$RUNS"
    g0=$(cpu_us "${FLOOR_PID[$trips]}"); r0=$(cpu_us "$REDIS_PID")
    R["floor,$trips,$run"]=$(drive "${FLOOR_PORT[$trips]}" "$TMP/direct.body" "" "$CONNS" "$DURATION" 1)
    n=$(echo "${R["floor,$trips,$run"]}" | cut -d' ' -f4)
    CPU["floor,$trips,$run"]="$((($(cpu_us "${FLOOR_PID[$trips]}") - g0) / n)) $((($(cpu_us "$REDIS_PID") - r0) / n))"
  done
done

# Moderate load: each connection pauses so that the offered load is about 40% of what the local
# gateway served on misses; the latency a shared store adds when the machine has room.
local_miss=$(for r in $(seq 1 "$RUNS"); do echo "${R["miss,local,$r"]}" | cut -d' ' -f1; done | median)
PACE=$(awk -v c="$CONNS" -v r="$local_miss" 'BEGIN {printf "%d", c * 1000 / (0.4 * r) + 0.5}')
for run in $(seq 1 "$RUNS"); do
  for backend in local redis; do
    say "moderate miss $backend run $run/$RUNS ($CONNS connections, $PACE ms pause)"
    R["moderate,$backend,$run"]=$(drive "$(port_of "$backend")" "$TMP/gw.body" "$TENANT_KEY" "$CONNS" "$MODERATE_DURATION" 1 "$PACE")
  done
  # The same pace through bare Pingora: what one or two round trips add by themselves.
  for trips in 0 1 2; do
    say "moderate bare Pingora, $trips Redis round trips per request, run $run/$RUNS"
    R["moderate-floor,$trips,$run"]=$(drive "${FLOOR_PORT[$trips]}" "$TMP/direct.body" "" "$CONNS" "$MODERATE_DURATION" 1 "$PACE")
  done
done

# Round trips: the commands the gateway sent during a run of one kind, per request. Commands a
# script runs inside Redis are counted under their own names, so only what a client sends is
# summed: scripts (EVALSHA, EVAL), transactions (one EXEC each) and the plain reads. The
# maintenance task's own (a PING or a batch of usage counts each second) are included.
trips() { # kind
  rcli CONFIG RESETSTAT >/dev/null
  local n total
  n=$(drive "$SHARED" "$TMP/gw.body" "$TENANT_KEY" 4 3s "$([ "$1" = miss ] && echo 1 || echo 0)" | cut -d' ' -f4)
  total=$(rcli INFO commandstats | awk -F'[:=,]' '$1 ~ /^cmdstat_(evalsha|eval|exec|ping|mget|hgetall|scan|unlink|script\|load)$/ {s += $3} END {print s+0}')
  awk -v t="$total" -v n="$n" 'BEGIN {printf "%.2f", t / n}'
}
say "round trips per request"
TRIPS_MISS=$(trips miss); TRIPS_HIT=$(trips hit)
BREAKDOWN=$(rcli INFO commandstats | grep '^cmdstat_' | cut -d, -f1 | tr '\n' ' ')

med() { for r in $(seq 1 "$RUNS"); do echo "${R["$1,$2,$r"]}" | cut -d' ' -f"$3"; done | median; }
printf '\n## Fleet mode: %s, %s, %s runs of %s per scenario, %s connections, 68 KB photo (median of runs)\n\n' "$(date -u +%Y-%m-%d)" "$(nproc) cores" "$RUNS" "$DURATION" "$CONNS"
printf '| scenario | local req/s | redis req/s | redis / local | local p50 ms | redis p50 ms | added p50 ms |\n|---|---|---|---|---|---|---|\n'
for kind in miss hit moderate; do
  lr=$(med "$kind" local 1); rr=$(med "$kind" redis 1); lp=$(med "$kind" local 2); rp=$(med "$kind" redis 2)
  name=$(case $kind in miss) echo "cache miss (every image new), saturated" ;; hit) echo "cache hit (L1), saturated" ;; moderate) echo "cache miss, moderate load ($PACE ms pause)" ;; esac)
  printf '| %s | %.0f | %.0f | %s | %.3f | %.3f | %s |\n' "$name" "$lr" "$rr" "$(awk -v a="$rr" -v b="$lr" 'BEGIN {printf "%.2fx", a/b}')" "$lp" "$rp" "$(awk -v a="$rp" -v b="$lp" 'BEGIN {printf "%+.3f", a-b}')"
done
printf '\n| CPU per request (µs, median of runs) | gateway, local store | gateway, redis store | Redis server |\n|---|---|---|---|\n'
for kind in miss hit; do
  cmed() { for r in $(seq 1 "$RUNS"); do echo "${CPU["$kind,$1,$r"]}" | cut -d' ' -f"$2"; done | median; }
  printf '| %s | %s | %s | %s |\n' "$kind" "$(cmed local 1)" "$(cmed redis 1)" "$(cmed redis 2)"
done
printf '\n| bare Pingora pass-through (every request upstream), saturated | req/s | vs no round trip | p50 ms | proxy CPU µs/request | Redis CPU µs/request |\n|---|---|---|---|---|---|\n'
for trips in 0 1 2; do
  fmed() { for r in $(seq 1 "$RUNS"); do echo "${CPU["floor,$trips,$r"]}" | cut -d' ' -f"$1"; done | median; }
  printf '| %s | %.0f | %s | %.3f | %s | %s |\n' "$(case $trips in 0) echo "no store" ;; 1) echo "1 Redis round trip (PING) per request" ;; 2) echo "2 Redis round trips per request" ;; esac)" \
    "$(med floor "$trips" 1)" "$(awk -v a="$(med floor "$trips" 1)" -v b="$(med floor 0 1)" 'BEGIN {printf "%.2fx", a/b}')" "$(med floor "$trips" 2)" "$(fmed 1)" "$(fmed 2)"
done
printf '\n| bare Pingora pass-through, moderate load (%s ms pause) | req/s | p50 ms | added p50 ms |\n|---|---|---|---|\n' "$PACE"
for trips in 0 1 2; do
  printf '| %s | %.0f | %.3f | %s |\n' "$(case $trips in 0) echo "no store" ;; 1) echo "1 Redis round trip (PING) per request" ;; 2) echo "2 Redis round trips per request" ;; esac)" \
    "$(med moderate-floor "$trips" 1)" "$(med moderate-floor "$trips" 2)" "$(awk -v a="$(med moderate-floor "$trips" 2)" -v b="$(med moderate-floor 0 2)" 'BEGIN {printf "%+.3f", a-b}')"
done
printf '\nRedis commands per request: %s on a miss, %s on an L1 hit (last run: %s).\n' "$TRIPS_MISS" "$TRIPS_HIT" "$BREAKDOWN"
