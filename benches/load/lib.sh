# Shared by the load harnesses (run.sh, fleet.sh): packages, the run's folder and keys, ports,
# the gateways under test, request bodies, and one wrk run.
# Expects BOUNDARY and ORG_KEY to be set by the caller before make_body is used, and a
# gateway_config function (port admin_port arg) before start_gateway is.

say() { printf '\033[1m[load]\033[0m %s\n' "$*" >&2; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 1 200); do (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "port $1 never opened" >&2; exit 1
}

make_body() { # image with_org_key out
  python3 - "$1" "$2" "$3" "$BOUNDARY" "$ORG_KEY" <<'PY'
import sys
img, with_key, out, b, key = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4], sys.argv[5]
body = b""
if with_key:
    body += f'--{b}\r\nContent-Disposition: form-data; name="api_key"\r\n\r\n{key}\r\n'.encode()
body += f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="face.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'.encode()
body += open(img, "rb").read() + f'\r\n--{b}--\r\n'.encode()
open(out, "wb").write(body)
PY
}

# wrk → "rps p50_ms p99_ms"
to_ms() { awk '{v=$1; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; printf "%.3f", v}'; }
drive() { # port body api_key conns duration [distinct] [delay_ms]
  local out
  out=$(BODY_FILE=$2 CONTENT_TYPE="multipart/form-data; boundary=$BOUNDARY" API_KEY=$3 BOUNDARY=$BOUNDARY DISTINCT=${6:-0} DELAY_MS=${7:-0} \
        wrk -t"$([ "$4" -ge 2 ] && echo 2 || echo 1)" -c"$4" -d"$5" --latency -s benches/load/post.lua "http://127.0.0.1:$1" 2>&1)
  if echo "$out" | grep -q "Non-2xx"; then echo "non-2xx answers in a run:" >&2; echo "$out" >&2; exit 1; fi
  local rps p50 p99 n
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1=="50%" {print $2}' | to_ms)
  p99=$(echo "$out" | awk '$1=="99%" {print $2}' | to_ms)
  n=$(echo "$out" | awk '/requests in/ {print $1}')
  echo "$rps $p50 $p99 $n"
}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# Install the Debian packages of missing commands, given as pairs: command package ...
install_missing() {
  local need=()
  while [ $# -ge 2 ]; do
    command -v "$1" >/dev/null 2>&1 || need+=("$2")
    shift 2
  done
  if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
}

# The run's folder, the processes it stops when it ends, and the keys it uses.
TMP=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT INT TERM
ORG_KEY="bench-org-key-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
TENANT_KEY=bench-key
TENANT_DIGEST=$(printf '%s' "$TENANT_KEY" | sha256sum | cut -d' ' -f1)

# The part of a gateway config every run shares: listeners, the emulator at $EMU, limits that
# never bite. The caller's gateway_config adds its own tables.
gateway_base_config() { # port admin_port
  cat <<CFG
[server]
listen = "127.0.0.1:$1"
admin_listen = "127.0.0.1:$2"
threads = 2
log_format = "json"
[upstream]
url = "http://127.0.0.1:$EMU"
api_key_env = "LIVENESS_ORG_API_KEY"
[limits]
default_rate_per_second = 1000000
default_burst = 1000000
max_concurrent_upstream = 512
CFG
}

# Start a gateway on the caller's gateway_config; its pid in <name>_PID.
start_gateway() { # name port admin arg
  gateway_config "$2" "$3" "$4" >"$TMP/$1.toml"
  LIVENESS_ORG_API_KEY=$ORG_KEY "$BIN" serve -c "$TMP/$1.toml" --upgrade-sock "$TMP/$1.sock" --pid-file "$TMP/$1.pid" >"$TMP/$1.log" 2>&1 &
  PIDS+=($!)
  eval "${1}_PID=$!"
  wait_port "$2"
}

# Build the gateway and the emulator in release (with any further targets given, such as
# `--example pingora_floor`) in one build, so the gateway's library is compiled once (with
# hyper's server, which only the emulator calls): BIN and DEV name them.
build_release() {
  say "building release"
  cargo build --release -q -p liveness-gateway -p liveness-gateway-dev --bin liveness-gateway --bin liveness-gateway-dev "$@"
  BIN=target/release/liveness-gateway
  DEV=target/release/liveness-gateway-dev
}

# A gateway's CPU time so far, in clock ticks (user and system, every thread), and the process
# of a gateway start_gateway named gw_<name> (dots in the name read as underscores).
TICK_US=$((1000000 / $(getconf CLK_TCK)))
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# A process's CPU time so far in nanoseconds, every thread's (the scheduler's own account,
# /proc/PID/task/TID/schedstat: exact, where clock ticks are 10 ms each), and the part of the
# thread named $2 when given: "all named".
cpu_ns() {
  local all=0 named=0 ns t
  for t in /proc/"$1"/task/*; do
    read -r ns _ <"$t/schedstat" 2>/dev/null || continue
    all=$((all + ns))
    if [ -n "${2:-}" ] && [ "$(cat "$t/comm" 2>/dev/null)" = "$2" ]; then named=$((named + ns)); fi
  done
  echo "$all $named"
}
pid_of() { local v="gw_${1//./_}_PID"; echo "${!v}"; }
