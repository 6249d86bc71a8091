#!/usr/bin/env bash
# Tracing load harness: four gateways on the cache-hit path (every request validated, hashed
# and answered from the cache), two without `[tracing]` (the second one shows how far two equal
# gateways differ on this machine), one tracing with `sample_ratio = 0`
# (ids made and sent back, no span kept), one with `sample_ratio = 1` (every request's spans
# built and exported over OTLP/HTTP to a collector: nginx answering 200, so that the collector
# costs next to nothing). Interleaved runs; throughput and latency as ratios to tracing off, and
# the gateway's CPU per request (from /proc/<pid>/stat, its exporting thread included), which
# this noisy 2-core machine measures more steadily than throughput.
# Then all four at once, each with its own wrk, for TOGETHER runs: they share the two cores at
# the same moments, so the machine's swings (which move two equal gateways run one after the
# other by 10% and more) fall on all of them alike, and the share of requests each serves
# follows its CPU per request.
# Loopback only; every run is bounded.
#
#   bash benches/load/traces.sh          # 3 runs of 5 s per scenario, 16 connections
#   RUNS=5 DURATION=10s CONNS=16 bash benches/load/traces.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-3}
TOGETHER=${TOGETHER:-5}
DURATION=${DURATION:-5s}
CONNS=${CONNS:-16}
# shellcheck source=benches/load/lib.sh
source benches/load/lib.sh

install_missing wrk wrk nginx nginx cmake cmake

build_release

EMU=$(free_port); OTLP=$(free_port)
say "starting the emulator (zero latency) on $EMU and a collector (nginx) on $OTLP"
LIVENESS_ORG_API_KEY=$ORG_KEY "$DEV" emulator --listen "127.0.0.1:$EMU" >"$TMP/emulator.log" 2>&1 &
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
nginx -c "$TMP/collector.conf" -g 'daemon off;' &
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
declare -A PORT ADMIN
for kind in off off2 0.0 1.0; do
  PORT[$kind]=$(free_port); ADMIN[$kind]=$(free_port)
  start_gateway "gw_${kind//./_}" "${PORT[$kind]}" "${ADMIN[$kind]}" "$kind"
done

BOUNDARY=----loadboundary7MA4YWxkTrZu0gW
make_body tests/fixtures/face.jpg 0 "$TMP/gw.body"
# The first request of each gateway is its one call; every other is a hit.
for kind in off off2 0.0 1.0; do drive "${PORT[$kind]}" "$TMP/gw.body" "$TENANT_KEY" 2 1s >/dev/null; done

declare -A R C
for run in $(seq 1 "$RUNS"); do
  for kind in off off2 0.0 1.0; do
    say "tracing $kind run $run/$RUNS ($DURATION, $CONNS connections)"
    t0=$(ticks "$(pid_of "$kind")")
    R["$kind,$run"]=$(drive "${PORT[$kind]}" "$TMP/gw.body" "$TENANT_KEY" "$CONNS" "$DURATION")
    t1=$(ticks "$(pid_of "$kind")")
    n=$(echo "${R["$kind,$run"]}" | cut -d' ' -f4)
    C["$kind,$run"]=$(awk -v t="$((t1 - t0))" -v u="$TICK_US" -v n="$n" 'BEGIN {printf "%.1f", t * u / n}')
  done
done
spans() { curl -s "127.0.0.1:${ADMIN[$1]}/metrics" | awk '/^liveness_gateway_trace_spans_dropped_total/ {print $2+0}'; }

med() { for r in $(seq 1 "$RUNS"); do echo "${R["$1,$r"]}" | cut -d' ' -f"$2"; done | median; }
cpu() { for r in $(seq 1 "$RUNS"); do echo "${C["$1,$r"]}"; done | median; }
printf '\n## Tracing: %s, %s, %s runs of %s per scenario, %s connections, 68 KB photo, cache hits (median of runs)\n\n' "$(date -u +%Y-%m-%d)" "$(nproc) cores" "$RUNS" "$DURATION" "$CONNS"
printf '| tracing | req/s | / off | p50 ms | p99 ms | gateway CPU µs/request | / off |\n|---|---|---|---|---|---|---|\n'
base=$(med off 1); base_cpu=$(cpu off)
for kind in off off2 0.0 1.0; do
  r=$(med "$kind" 1)
  name=$(case $kind in off) echo "off (no [tracing])" ;; off2) echo "off, a second gateway (the same config: the noise of the machine)" ;; 0.0) echo "sample_ratio = 0 (ids only)" ;; 1.0) echo "sample_ratio = 1 (every span exported)" ;; esac)
  c=$(cpu "$kind")
  printf '| %s | %.0f | %s | %.3f | %.3f | %s | %s |\n' "$name" "$r" "$(awk -v a="$r" -v b="$base" 'BEGIN {printf "%.2fx", a/b}')" "$(med "$kind" 2)" "$(med "$kind" 3)" \
    "$c" "$(awk -v a="$c" -v b="$base_cpu" 'BEGIN {printf "%.2fx", a/b}')"
done
printf '\nSpans dropped (queue full or collector too slow): %s with sample_ratio = 1.\n' "$(spans 1.0)"
# Each run's ratio to the run of tracing off just before it (the scenarios take turns).
for kind in off2 0.0 1.0; do
  printf '%s, run by run: ' "$kind"
  for r in $(seq 1 "$RUNS"); do
    awk -v a="$(echo "${R["$kind,$r"]}" | cut -d' ' -f1)" -v b="$(echo "${R["off,$r"]}" | cut -d' ' -f1)" 'BEGIN {printf "%.2fx ", a/b}'
  done
  echo
done

# All four at once.
declare -A T
for run in $(seq 1 "$TOGETHER"); do
  say "all four at once, run $run/$TOGETHER ($DURATION, $CONNS connections each)"
  jobs=()
  for kind in off off2 0.0 1.0; do
    drive "${PORT[$kind]}" "$TMP/gw.body" "$TENANT_KEY" "$CONNS" "$DURATION" >"$TMP/together-$kind" &
    jobs+=($!)
  done
  wait "${jobs[@]}"
  for kind in off off2 0.0 1.0; do T["$kind,$run"]=$(cut -d' ' -f1 "$TMP/together-$kind"); done
done
printf '\n### All four at once: %s runs of %s, %s connections each (median of runs)\n\n' "$TOGETHER" "$DURATION" "$CONNS"
printf '| tracing | req/s | / off | / both off | run by run, / off |\n|---|---|---|---|---|\n'
tmed() { for r in $(seq 1 "$TOGETHER"); do echo "${T["$1,$r"]}"; done | median; }
base=$(tmed off); both=$(awk -v a="$base" -v b="$(tmed off2)" 'BEGIN {print (a+b)/2}')
for kind in off off2 0.0 1.0; do
  r=$(tmed "$kind")
  runs=$(for x in $(seq 1 "$TOGETHER"); do awk -v a="${T["$kind,$x"]}" -v b="${T["off,$x"]}" 'BEGIN {printf "%.2fx ", a/b}'; done)
  printf '| %s | %.0f | %s | %s | %s |\n' "$kind" "$r" "$(awk -v a="$r" -v b="$base" 'BEGIN {printf "%.2fx", a/b}')" "$(awk -v a="$r" -v b="$both" 'BEGIN {printf "%.2fx", a/b}')" "$runs"
done
