#!/usr/bin/env bash
# App-token load harness: one gateway, cache off (every request a paid call to the zero-latency
# emulator), authenticated three ways in interleaved runs: a tenant key (the baseline), one app
# token reused by every request (verified once, then remembered), and a new token on every
# request (each verified from scratch: ES256 signature and claims). Reports throughput and
# latency as ratios to the tenant key. Loopback only; every run is bounded.
#
#   bash benches/load/tokens.sh          # 3 runs of 5 s per scenario, 16 connections
#   RUNS=5 DURATION=10s CONNS=16 bash benches/load/tokens.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-3}
DURATION=${DURATION:-5s}
CONNS=${CONNS:-16}
FRESH_TOKENS=${FRESH_TOKENS:-100000}
# shellcheck source=benches/load/lib.sh
source benches/load/lib.sh

install_missing wrk wrk cmake cmake

build_release

EMU=$(free_port); GW=$(free_port); GW_ADMIN=$(free_port)
ISS=https://auth.bench.invalid
say "a signing key, one token, and $FRESH_TOKENS fresh tokens"
"$BIN" tokens keygen --kid bench-1 --key-file "$TMP/signing.pem" >"$TMP/jwks.json"
mint() { "$BIN" tokens mint --key-file "$TMP/signing.pem" --kid bench-1 --iss "$ISS" --aud liveness-gateway --sub bench-user --ttl 55m "$@"; }
TOKEN=$(mint)
mint --count "$FRESH_TOKENS" >"$TMP/tokens.txt"

say "starting the emulator (zero latency) on $EMU"
LIVENESS_ORG_API_KEY=$ORG_KEY "$DEV" emulator --listen "127.0.0.1:$EMU" >"$TMP/emulator.log" 2>&1 &
PIDS+=($!)
wait_port "$EMU"

gateway_config() { # port admin_port (unused)
  gateway_base_config "$1" "$2"
  cat <<CFG
[cache]
enabled = false
[[auth.issuers]]
id = "bench"
issuer = "$ISS"
audiences = ["liveness-gateway"]
jwks_file = "$TMP/jwks.json"
algorithms = ["ES256"]
tenant = "bench"
[[tenants]]
id = "bench"
key_sha256 = ["$TENANT_DIGEST"]
CFG
}
start_gateway gw "$GW" "$GW_ADMIN" -

BOUNDARY=----loadboundary7MA4YWxkTrZu0gW
make_body tests/fixtures/face.jpg 0 "$TMP/gw.body"

# One run of a scenario: "rps p50_ms p99_ms requests".
scenario() { # kind conns duration
  case $1 in
    key) drive "$GW" "$TMP/gw.body" "$TENANT_KEY" "$2" "$3" ;;
    token) BEARER=$TOKEN drive "$GW" "$TMP/gw.body" "" "$2" "$3" ;;
    fresh) TOKENS_FILE="$TMP/tokens.txt" drive "$GW" "$TMP/gw.body" "" "$2" "$3" ;;
  esac
}
# Warm-up: connections, pools, and the one token's verification.
for kind in key token fresh; do scenario "$kind" 2 1s >/dev/null; done

declare -A R
for run in $(seq 1 "$RUNS"); do
  for kind in key token fresh; do
    say "$kind run $run/$RUNS ($DURATION, $CONNS connections)"
    R["$kind,$run"]=$(scenario "$kind" "$CONNS" "$DURATION")
  done
done
# Every request was a paid call: no refusal hides in the numbers (drive fails on any non-2xx).
verified=$(curl -s "127.0.0.1:$GW_ADMIN/metrics" | awk '/^liveness_gateway_auth_tokens_verified_total/ {s += $2} END {print s+0}')

med() { for r in $(seq 1 "$RUNS"); do echo "${R["$1,$r"]}" | cut -d' ' -f"$2"; done | median; }
printf '\n## App tokens: %s, %s, %s runs of %s per scenario, %s connections, 68 KB photo, cache off (median of runs)\n\n' "$(date -u +%Y-%m-%d)" "$(nproc) cores" "$RUNS" "$DURATION" "$CONNS"
printf '| credential | req/s | / tenant key | p50 ms | p99 ms |\n|---|---|---|---|---|\n'
kr=$(med key 1)
for kind in key token fresh; do
  r=$(med "$kind" 1)
  name=$(case $kind in key) echo "tenant key (X-Api-Key)" ;; token) echo "one app token, reused (remembered)" ;; fresh) echo "a new app token per request (verified cold, ES256)" ;; esac)
  printf '| %s | %.0f | %s | %.3f | %.3f |\n' "$name" "$r" "$(awk -v a="$r" -v b="$kr" 'BEGIN {printf "%.2fx", a/b}')" "$(med "$kind" 2)" "$(med "$kind" 3)"
done
printf '\nTokens accepted by the gateway over the whole run: %s.\n' "$verified"
