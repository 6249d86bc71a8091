# Shared by the load harnesses (run.sh, fleet.sh): ports, request bodies, and one wrk run.
# Expects BOUNDARY and ORG_KEY to be set by the caller before make_body is used.

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
