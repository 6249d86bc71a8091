#!/usr/bin/env bash
# Tracing load harness, on the cache-hit path (every request validated, hashed and answered
# from the cache: the cheapest request there is, so the one where tracing weighs most). Four
# gateways: two without `[tracing]` (the second shows how far two equal gateways differ), one
# with `sample_ratio = 0` (ids made and sent back, no span kept), one with `sample_ratio = 1`
# (every request's spans written and exported over OTLP/HTTP to a collector: nginx answering
# 200).
#
# 1. Throughput, all four at once on one core: the gateways (every thread, the exporting one
#    included) are pinned to the last CPU, and each one's wrk, the emulator and the collector
#    to the others. The scheduler gives the gateways the same CPU time at the same moments,
#    so each serves in inverse proportion to what a request costs it, and the machine's
#    swings (which move two equal gateways run one after the other by 10% and more here) fall
#    on all four alike. Each round's ratios to the gateways without tracing; medians. With
#    them, the CPU each gateway spent a request, every thread's, from the scheduler's own
#    account in nanoseconds (/proc/PID/task/TID/schedstat), and the exporting thread's part.
#    The four are started anew for each of LAUNCHES launches (see below). LAYOUT=alone loads
#    them one at a time instead (in an order rotated by the round), each alone on that CPU for
#    its turn: whether the cost tracing shows is the shared core's doing.
# 2. Instructions a request (callgrind, user space): each gateway alone under valgrind, the
#    same N hits counted after a warm-up. Within about 2,000 instructions in 470,000, so
#    it shows what a change to the traced path costs where throughput cannot. With them, the
#    misses of a simulated cache of this machine's sizes (a core's L1 and L2, from sysfs):
#    where a traced hit's time goes that instructions do not show.
# Loopback only; every run is bounded.
#
#   bash benches/load/traces.sh            # 3 launches, 9 rounds of 5 s, 8 connections each; 1,000 hits
#   LAUNCHES=5 ROUNDS=15 DURATION=5s CONNS=8 N=2000 bash benches/load/traces.sh
#   LAYOUT=alone bash benches/load/traces.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-9}
LAUNCHES=${LAUNCHES:-3}
[ "$LAUNCHES" -ge 1 ] && [ "$LAUNCHES" -le "$ROUNDS" ] || { echo "LAUNCHES must be from 1 to ROUNDS" >&2; exit 1; }
DURATION=${DURATION:-5s}
CONNS=${CONNS:-8}
N=${N:-1000}
LAYOUT=${LAYOUT:-together}
case $LAYOUT in together | alone) ;; *) echo "LAYOUT is together or alone" >&2; exit 1 ;; esac
# shellcheck source=benches/load/lib.sh
source benches/load/lib.sh

install_missing wrk wrk nginx nginx cmake cmake valgrind valgrind taskset util-linux

CPUS=$(nproc)
if [ "$CPUS" -lt 2 ]; then echo "this harness needs two CPUs (the gateways on one, the load on the others)" >&2; exit 1; fi
GW_CPU=$((CPUS - 1)); LOAD_CPUS=0-$((CPUS - 2))

build_release

EMU=$(free_port); OTLP=$(free_port)
say "starting the emulator (zero latency) on $EMU and a collector (nginx) on $OTLP, on CPU $LOAD_CPUS"
LIVENESS_ORG_API_KEY=$ORG_KEY taskset -c "$LOAD_CPUS" "$DEV" emulator --listen "127.0.0.1:$EMU" >"$TMP/emulator.log" 2>&1 &
PIDS+=($!)
cat >"$TMP/collector.conf" <<CONF
worker_processes 1;
pid $TMP/collector.pid;
error_log $TMP/collector-error.log;
events { worker_connections 256; }
http {
  access_log off;
  client_body_temp_path $TMP/collector-body;
  server {
    listen 127.0.0.1:$OTLP;
    client_max_body_size 16m;
    location /v1/traces { return 200; }
  }
}
CONF
taskset -c "$LOAD_CPUS" nginx -c "$TMP/collector.conf" -g 'daemon off;' &
PIDS+=($!)
wait_port "$EMU"; wait_port "$OTLP"

gateway_config() { # port admin_port tracing
  gateway_base_config "$1" "$2"
  cat <<CFG
[cache]
enabled = true
[[tenants]]
id = "bench"
key_sha256 = ["$TENANT_DIGEST"]
CFG
  if [ "${3#off}" = "$3" ]; then
    printf '[tracing]\notlp_endpoint = "http://127.0.0.1:%s"\nsample_ratio = %s\n' "$OTLP" "$3"
  fi
}
BOUNDARY=----loadboundary7MA4YWxkTrZu0gW
make_body tests/fixtures/face.jpg 0 "$TMP/gw.body"
KINDS="off off2 0.0 1.0"

# 1. Throughput, all four at once (or one at a time: LAYOUT=alone), the gateways on one CPU,
#    in LAUNCHES launches: the gateways are started anew for each (in a rotated order) and
#    serve ROUNDS/LAUNCHES rounds. Four launches of one binary, untraced, differ by up to 2%
#    in the CPU a request costs, launch to launch, where rounds within one launch agree within
#    1% (where in memory each one's code and heap fall, and the order they start in): one
#    launch's luck would stand for tracing's cost.
GATEWAY=$BIN
printf '#!/bin/sh\nexec taskset -c %s %s "$@"\n' "$GW_CPU" "$PWD/$GATEWAY" >"$TMP/pinned"
chmod +x "$TMP/pinned"
declare -A PORT ADMIN R C X
DROPPED=0
spans() { curl -s "127.0.0.1:${ADMIN[$1]}/metrics" | awk '/^liveness_gateway_trace_spans_dropped_total/ {print $2+0}'; }
launch_of() { echo $(( ($1 - 1) * LAUNCHES / ROUNDS + 1 )); }
launch() { # number: start the four, in an order rotated by the launch's number
  local order=() i kind
  read -ra order <<<"$KINDS"
  BIN=$TMP/pinned
  for i in $(seq 0 3); do
    kind=${order[$(( (i + $1 - 1) % 4 ))]}
    PORT[$kind]=$(free_port); ADMIN[$kind]=$(free_port)
    start_gateway "gw_${kind//./_}" "${PORT[$kind]}" "${ADMIN[$kind]}" "$kind"
  done
  BIN=$GATEWAY
  # The first request of each gateway is its one call; every other is a hit.
  for kind in $KINDS; do drive "${PORT[$kind]}" "$TMP/gw.body" "$TENANT_KEY" 2 1s >/dev/null; done
}
stop_launch() {
  local kind pid
  DROPPED=$((DROPPED + $(spans 1.0)))
  for kind in $KINDS; do
    pid=$(pid_of "$kind"); kill -INT "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true
  done
}

load() { # kind: its wrk, for one round
  BODY_FILE=$TMP/gw.body CONTENT_TYPE="multipart/form-data; boundary=$BOUNDARY" API_KEY=$TENANT_KEY \
    taskset -c "$LOAD_CPUS" wrk -t1 -c"$CONNS" -d"$DURATION" -s benches/load/post.lua \
    "http://127.0.0.1:${PORT[$1]}" >"$TMP/wrk-$1" 2>&1
}
measure() { # kind round: its throughput, and the CPU a request cost it since T0
  local kind=$1 run=$2 n all ex all0 ex0
  if grep -q "Non-2xx" "$TMP/wrk-$kind"; then echo "non-2xx answers in a run:" >&2; cat "$TMP/wrk-$kind" >&2; exit 1; fi
  n=$(awk '/requests in/ {print $1}' "$TMP/wrk-$kind")
  R["$kind,$run"]=$(awk '/Requests\/sec/ {print $2}' "$TMP/wrk-$kind")
  read -r all ex < <(cpu_ns "$(pid_of "$kind")" trace-export)
  read -r all0 ex0 <<<"${T0[$kind]}"
  C["$kind,$run"]=$(awk -v t="$((all - all0))" -v n="$n" 'BEGIN {printf "%.2f", t / n / 1000}')
  X["$kind,$run"]=$(awk -v t="$((ex - ex0))" -v n="$n" 'BEGIN {printf "%.2f", t / n / 1000}')
}

for run in $(seq 1 "$ROUNDS"); do
  if [ "$run" -eq 1 ] || [ "$(launch_of "$run")" != "$(launch_of $((run - 1)))" ]; then
    [ "$run" -eq 1 ] || stop_launch
    say "launch $(launch_of "$run")/$LAUNCHES: the four gateways started anew"
    launch "$(launch_of "$run")"
  fi
  declare -A T0
  if [ "$LAYOUT" = alone ]; then
    # One at a time, in an order rotated by the round: each alone on its CPU for its turn.
    read -ra order <<<"$KINDS"
    for i in $(seq 0 3); do
      kind=${order[$(( (i + run - 1) % 4 ))]}
      say "$kind alone on CPU $GW_CPU, round $run/$ROUNDS ($DURATION, $CONNS connections)"
      T0[$kind]=$(cpu_ns "$(pid_of "$kind")" trace-export)
      load "$kind" || { echo "wrk failed against $kind:" >&2; cat "$TMP/wrk-$kind" >&2; exit 1; }
      sleep 1.2
      measure "$kind" "$run"
    done
    continue
  fi
  say "all four at once on CPU $GW_CPU, round $run/$ROUNDS ($DURATION, $CONNS connections each)"
  jobs=()
  for kind in $KINDS; do T0[$kind]=$(cpu_ns "$(pid_of "$kind")" trace-export); done
  for kind in $KINDS; do
    load "$kind" &
    jobs+=($!)
  done
  i=0
  for kind in $KINDS; do
    wait "${jobs[$i]}" || { echo "wrk failed against $kind:" >&2; cat "$TMP/wrk-$kind" >&2; exit 1; }
    i=$((i + 1))
  done
  # The round's CPU is read once the last batch of its spans is sent.
  sleep 1.2
  for kind in $KINDS; do measure "$kind" "$run"; done
done
stop_launch
# Ratios of a round: to the gateway without tracing, and to the mean of both without it.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", a/b}'; }
both() { awk -v a="${R["off,$2"]}" -v b="${R["off2,$2"]}" -v x="${R["$1,$2"]}" 'BEGIN {printf "%.3f", 2*x/(a+b)}'; }
cpu_both() { awk -v a="${C["off,$2"]}" -v b="${C["off2,$2"]}" -v x="${C["$1,$2"]}" 'BEGIN {printf "%.3f", 2*x/(a+b)}'; }
rounds() { for r in $(seq 1 "$ROUNDS"); do "$@" "$r"; echo; done; }
name() { case $1 in off) echo "off (no [tracing])" ;; off2) echo "off, a second gateway (the same config: the noise of the machine)" ;; 0.0) echo "sample_ratio = 0 (ids only)" ;; 1.0) echo "sample_ratio = 1 (every span exported)" ;; esac; }

case $LAYOUT in together) how="all four gateways at once on CPU $GW_CPU" ;; alone) how="one gateway at a time, alone on CPU $GW_CPU" ;; esac
printf '\n## Tracing: %s, %s CPUs, %s, %s launches, %s rounds of %s, %s connections each, 68 KB photo, cache hits\n\n' \
  "$(date -u +%Y-%m-%d)" "$CPUS" "$how" "$LAUNCHES" "$ROUNDS" "$DURATION" "$CONNS"
printf '| tracing | req/s (median) | / off | / both off | range of rounds, / both off | CPU µs/request (median) | / both off | range of rounds | of which the exporting thread |\n|---|---|---|---|---|---|---|---|---|\n'
for kind in $KINDS; do
  r=$(for x in $(seq 1 "$ROUNDS"); do echo "${R["$kind,$x"]}"; done | median)
  o=$(for x in $(seq 1 "$ROUNDS"); do ratio "${R["$kind,$x"]}" "${R["off,$x"]}"; echo; done | median)
  b=$(rounds both "$kind" | median)
  lo=$(rounds both "$kind" | sort -g | head -1); hi=$(rounds both "$kind" | sort -g | tail -1)
  c=$(for x in $(seq 1 "$ROUNDS"); do echo "${C["$kind,$x"]}"; done | median)
  cb=$(rounds cpu_both "$kind" | median)
  clo=$(rounds cpu_both "$kind" | sort -g | head -1); chi=$(rounds cpu_both "$kind" | sort -g | tail -1)
  ex=$(for x in $(seq 1 "$ROUNDS"); do echo "${X["$kind,$x"]}"; done | median)
  printf '| %s | %.0f | %sx | **%sx** | %sx to %sx | %s | **%sx** | %sx to %sx | %s |\n' "$(name "$kind")" "$r" "$o" "$b" "$lo" "$hi" "$c" "$cb" "$clo" "$chi" "$ex"
done
printf '\nSpans dropped (queue full or collector too slow): %s with sample_ratio = 1.\n' "$DROPPED"
for kind in off2 0.0 1.0; do printf '%s, round by round, / both off: %s\n' "$kind" "$(rounds both "$kind" | tr '\n' ' ')"; done
# Each launch's median: how far one launch alone would have read.
for kind in 0.0 1.0; do
  printf '%s, launch by launch (median of its rounds), req/s / both off: ' "$kind"
  for l in $(seq 1 "$LAUNCHES"); do
    for r in $(seq 1 "$ROUNDS"); do
      if [ "$(launch_of "$r")" = "$l" ]; then both "$kind" "$r"; echo; fi
    done | median | tr '\n' ' '
  done
  echo
done

# 2. Instructions a request, each gateway alone under callgrind.
for p in "${PIDS[@]:2}"; do kill "$p" 2>/dev/null || true; done
# The simulated caches: those of the gateways' CPU (level 1 for instructions and data, level 2
# as the last level: a miss there goes to the L3 that all cores share), as sysfs has them. A
# geometry valgrind cannot simulate (a number of sets not a power of two, no ways given) or
# none in sysfs: no cache is simulated, and only the instructions are counted.
cache_of() { # level type → valgrind's size,ways,line
  local d size ways line sets
  for d in /sys/devices/system/cpu/cpu"$GW_CPU"/cache/index*; do
    if [ "$(cat "$d/level" 2>/dev/null)" = "$1" ] && [ "$(cat "$d/type" 2>/dev/null)" = "$2" ]; then
      size=$(sed -n 's/^\([0-9]*\)K$/\1/p' "$d/size" 2>/dev/null); ways=$(cat "$d/ways_of_associativity" 2>/dev/null)
      line=$(cat "$d/coherency_line_size" 2>/dev/null)
      [ -n "$size" ] && [ "${ways:-0}" -ge 1 ] && [ "${line:-0}" -ge 1 ] || return 0
      sets=$((size * 1024 / ways / line))
      [ "$sets" -ge 1 ] && [ $((sets & (sets - 1))) -eq 0 ] || return 0
      echo "$((size * 1024)),$ways,$line"
      return 0
    fi
  done
}
I1=$(cache_of 1 Instruction); D1=$(cache_of 1 Data); L2=$(cache_of 2 Unified)
if [ -n "$I1" ] && [ -n "$D1" ] && [ -n "$L2" ]; then
  CACHES=(--cache-sim=yes --I1="$I1" --D1="$D1" --LL="$L2")
else
  CACHES=(--cache-sim=no)
  say "no cache geometry valgrind can simulate in sysfs for CPU $GW_CPU: instructions only"
fi
instructions() { # kind → a hit's instructions, L1 instruction misses, L1 data misses, L2 misses
  local port admin out=$TMP/callgrind-$1
  port=$(free_port); admin=$(free_port)
  gateway_config "$port" "$admin" "$1" >"$TMP/cg-$1.toml"
  LIVENESS_ORG_API_KEY=$ORG_KEY valgrind --tool=callgrind --instr-atstart=no "${CACHES[@]}" \
    --callgrind-out-file="$out" "$BIN" serve -c "$TMP/cg-$1.toml" >"$TMP/cg-$1.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 600); do
    (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    kill -0 "$pid" 2>/dev/null || { echo "the gateway under callgrind ($1) stopped:" >&2; cat "$TMP/cg-$1.log" >&2; exit 1; }
    sleep 0.1
  done
  # Keep-alive hits, one at a time: 50 to warm up, then N counted. The pauses let the
  # exporting thread send what came before (and, at the end, what the N hits wrote).
  python3 - "$port" "$TMP/gw.body" "$BOUNDARY" "$TENANT_KEY" "$N" "$pid" <<'PY'
import http.client, subprocess, sys, time
port, body, b, key, n, pid = int(sys.argv[1]), open(sys.argv[2], "rb").read(), sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6]
c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
def hit():
    c.request("POST", "/api/v1/backend/liveness/short/", body,
              {"Content-Type": f"multipart/form-data; boundary={b}", "X-Api-Key": key})
    r = c.getresponse(); r.read()
    assert r.status == 200, r.status
for _ in range(51): hit()
time.sleep(1.5)
subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
for _ in range(n): hit()
time.sleep(1.5)
subprocess.run(["callgrind_control", "-i", "off", pid], check=True, capture_output=True)
PY
  kill -INT "$pid"; wait "$pid" || true
  # events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw (Ir alone without a cache simulated)
  awk -v n="$N" '/^totals:/ {printf "%.0f %.0f %.0f %.0f\n", $2 / n, $5 / n, ($6 + $7) / n, ($8 + $9 + $10) / n; found = 1}
    END {exit !found}' "$out"
}
declare -A I I1M D1M L2M
for kind in off 0.0 1.0; do
  say "instructions a hit, $kind, under callgrind ($N hits)"
  # Run apart, so that its failure is said here (a process substitution's status is lost).
  instructions "$kind" >"$TMP/counts-$kind" || { echo "callgrind run for $kind failed:" >&2; cat "$TMP/cg-$kind.log" >&2; exit 1; }
  read -r "I[$kind]" "I1M[$kind]" "D1M[$kind]" "L2M[$kind]" <"$TMP/counts-$kind" || { echo "no counts for $kind" >&2; exit 1; }
done
if [ "${CACHES[0]}" = --cache-sim=no ]; then
  printf '\n### A cache hit under callgrind (user space, %s hits after a warm-up, one gateway at a time)\n\n' "$N"
  printf '| tracing | instructions a hit | / off |\n|---|---|---|\n'
  for kind in off 0.0 1.0; do
    printf '| %s | %s | %sx |\n' "$(name "$kind")" "${I[$kind]}" "$(ratio "${I[$kind]}" "${I[off]}")"
  done
  exit 0
fi
printf '\n### A cache hit under callgrind (user space, %s hits after a warm-up, one gateway at a time; caches simulated: %s)\n\n' "$N" "${CACHES[*]:1}"
printf '| tracing | instructions | / off | L1 instruction misses | / off | L1 data misses | / off | L2 misses | / off |\n|---|---|---|---|---|---|---|---|---|\n'
for kind in off 0.0 1.0; do
  printf '| %s | %s | %sx | %s | %sx | %s | %sx | %s | %sx |\n' "$(name "$kind")" \
    "${I[$kind]}" "$(ratio "${I[$kind]}" "${I[off]}")" "${I1M[$kind]}" "$(ratio "${I1M[$kind]}" "${I1M[off]}")" \
    "${D1M[$kind]}" "$(ratio "${D1M[$kind]}" "${D1M[off]}")" "${L2M[$kind]}" "$(ratio "${L2M[$kind]}" "${L2M[off]}")"
done
