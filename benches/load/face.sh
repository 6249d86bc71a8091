#!/usr/bin/env bash
# Face check load harness: the miss path (cache off, every request a call to the emulator at
# zero latency) with `[intake.face] mode = "observe"` beside the same gateway with the check
# off, for the 68 KB and the 1.6 MB photo; then the hit path (cache on) with the check on and
# off, where no check runs. Interleaved runs; throughput as a ratio to the check off, and the
# gateway's CPU per request (from /proc/<pid>/stat), whose difference is the check's cost.
# Loopback only; every run is bounded.
#
#   bash benches/load/face.sh          # 3 runs of 5 s per scenario, 16 connections
#   RUNS=5 DURATION=10s CONNS=16 bash benches/load/face.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-3}
DURATION=${DURATION:-5s}
CONNS=${CONNS:-16}
# shellcheck source=benches/load/lib.sh
source benches/load/lib.sh

install_missing wrk wrk cmake cmake

build_release

EMU=$(free_port)
say "starting the emulator (zero latency) on $EMU"
LIVENESS_ORG_API_KEY=$ORG_KEY "$DEV" emulator --listen "127.0.0.1:$EMU" >"$TMP/emulator.log" 2>&1 &
PIDS+=($!)
wait_port "$EMU"

gateway_config() { # port admin_port "cache face_mode"
  gateway_base_config "$1" "$2"
  local cache=${3%% *} face=${3##* }
  cat <<CFG
[cache]
enabled = $cache
[intake.face]
mode = "$face"
[[tenants]]
id = "bench"
key_sha256 = ["$TENANT_DIGEST"]
CFG
}
SCENARIOS=(miss_off miss_observe hit_off hit_observe)
declare -A PORT ADMIN
for sc in "${SCENARIOS[@]}"; do
  PORT[$sc]=$(free_port); ADMIN[$sc]=$(free_port)
  cache=false; [ "${sc%%_*}" = hit ] && cache=true
  mode=${sc##*_}
  start_gateway "gw_$sc" "${PORT[$sc]}" "${ADMIN[$sc]}" "$cache $mode"
done

BOUNDARY=----loadboundary7MA4YWxkTrZu0gW
SIZES=("68KB:tests/fixtures/face.jpg" "1.6MB:tests/fixtures/face-large.jpg")
for s in "${SIZES[@]}"; do make_body "${s#*:}" 0 "$TMP/${s%%:*}.body"; done

declare -A R C
for s in "${SIZES[@]}"; do
  size=${s%%:*}
  # The hit gateways' one call.
  for sc in hit_off hit_observe; do drive "${PORT[$sc]}" "$TMP/$size.body" "$TENANT_KEY" 1 1s >/dev/null; done
  for run in $(seq 1 "$RUNS"); do
    for sc in "${SCENARIOS[@]}"; do
      say "$size $sc run $run/$RUNS ($DURATION, $CONNS connections)"
      t0=$(ticks "$(pid_of "$sc")")
      R["$size,$sc,$run"]=$(drive "${PORT[$sc]}" "$TMP/$size.body" "$TENANT_KEY" "$CONNS" "$DURATION")
      t1=$(ticks "$(pid_of "$sc")")
      n=$(echo "${R["$size,$sc,$run"]}" | cut -d' ' -f4)
      C["$size,$sc,$run"]=$(((t1 - t0) * TICK_US / n))
    done
  done
done

checks() { curl -s "127.0.0.1:${ADMIN[$1]}/metrics" | awk '/^liveness_gateway_face_checks_total\{.*outcome="face"/ {s += $2} END {print s + 0}'; }
med() { for r in $(seq 1 "$RUNS"); do echo "${R["$1,$2,$r"]}" | cut -d' ' -f"$3"; done | median; }
cpu() { for r in $(seq 1 "$RUNS"); do echo "${C["$1,$2,$r"]}"; done | median; }
printf '\n## Face check: %s, %s, %s runs of %s per scenario, %s connections (median of runs)\n\n' "$(date -u +%Y-%m-%d)" "$(nproc) cores" "$RUNS" "$DURATION" "$CONNS"
printf '| photo | path | face check | req/s | / off | p99 ms | gateway CPU µs/request |\n|---|---|---|---|---|---|---|\n'
for s in "${SIZES[@]}"; do
  size=${s%%:*}
  for path in miss hit; do
    base=$(med "$size" "${path}_off" 1)
    for mode in off observe; do
      sc="${path}_$mode"; r=$(med "$size" "$sc" 1)
      printf '| %s | %s | %s | %.0f | %s | %.2f | %s |\n' "$size" "$path" "$mode" "$r" \
        "$(awk -v a="$r" -v b="$base" 'BEGIN {printf "%.2fx", a/b}')" "$(med "$size" "$sc" 3)" "$(cpu "$size" "$sc")"
    done
  done
done
printf '\nChecks run: %s on the miss gateway, %s on the hit gateway (a hit is never checked).\n' "$(checks miss_observe)" "$(checks hit_observe)"
