#!/usr/bin/env bash
# Soak: the release gateway (demo mode: gateway + stand-in API in one process) under a steady mix
# of successes, rewritten errors, rejections, login failures and rate limiting for SOAK_SECONDS
# (default 600). Prints the RSS every 30 s and the growth; fails if RSS grows by more than
# SOAK_MAX_GROWTH_MIB (default 32) after the first minute (warm-up).
#   scripts/soak.sh                 # 10 minutes
#   SOAK_SECONDS=120 scripts/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
command -v wrk >/dev/null 2>&1 || { sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo; $sudo apt-get install -y -qq wrk >/dev/null; }
seconds="${SOAK_SECONDS:-600}"
max_growth_kib=$(( ${SOAK_MAX_GROWTH_MIB:-32} * 1024 ))
cargo build --release --locked --bin get2dial-gateway

dir=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
listen=$(port); admin=$(port); upstream=$(port)
sed -e "s/127.0.0.1:8080/127.0.0.1:$listen/" -e "s/127.0.0.1:9090/127.0.0.1:$admin/" \
    -e "s/127.0.0.1:8081/127.0.0.1:$upstream/" \
    -e 's/^level = "info"/level = "warn"/' -e 's/^access_log = true/access_log = false/' \
    config/gateway.toml > "$dir/gateway.toml"
export GATEWAY_JWT_SECRET="soak-secret-0123456789abcdef"
target/release/get2dial-gateway demo --config "$dir/gateway.toml" >/dev/null 2>"$dir/gateway.log" &
pid=$!
for _ in $(seq 100); do curl -s "127.0.0.1:$admin/healthz" >/dev/null && break; sleep 0.1; done
SOAK_TOKEN=$(curl -s -X POST "127.0.0.1:$listen/api/v1/auth/login" \
  -d '{"email":"demo@get2dial.com","password":"demo-password"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"]["token"])')
export SOAK_TOKEN

rss() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }
echo "soak: pid $pid, RSS at start $(rss) KiB, ${seconds}s of load"
wrk -t2 -c64 -d"${seconds}s" -s scripts/soak/mix.lua "http://127.0.0.1:$listen" > "$dir/wrk.txt" &
wrk_pid=$!
warm=""
elapsed=0
while kill -0 "$wrk_pid" 2>/dev/null; do
  sleep 30; elapsed=$((elapsed + 30))
  now=$(rss); echo "soak: ${elapsed}s RSS ${now} KiB"
  [ -z "$warm" ] && [ "$elapsed" -ge 60 ] && warm=$now
done
wait "$wrk_pid"
cat "$dir/wrk.txt"
end=$(rss)
warm=${warm:-$end}
echo "soak: RSS after warm-up ${warm} KiB, at the end ${end} KiB, growth $((end - warm)) KiB (bound ${max_growth_kib} KiB)"
curl -s "127.0.0.1:$admin/metrics" | grep -E '^gateway_(http_requests_total|login_attempts_total|lockouts_total|rate_limited_total)' | sort | head -40
kill -0 "$pid" || { echo "soak: the gateway died" >&2; exit 1; }
if grep -q "non-envelope" "$dir/wrk.txt"; then echo "soak: non-envelope error answers seen" >&2; exit 1; fi
[ $((end - warm)) -le "$max_growth_kib" ] || { echo "soak: RSS grew too much" >&2; exit 1; }
echo "soak: ok"
