#!/usr/bin/env bash
# Load benchmark: gateway vs a bare Pingora proxy, nginx and HAProxy, one table (see scripts/bench.py).
#   scripts/bench.sh                       # 10 s x 3 runs per cell
#   BENCH_SECONDS=5 BENCH_RUNS=1 scripts/bench.sh
#   BENCH_WORK_STEALING=false scripts/bench.sh  # both Pingora proxies on the no-steal runtime
#   BENCH_ALLOCATOR=system scripts/bench.sh      # both Pingora proxies on the system allocator
#   BENCH_TLS_PROVIDER=aws-lc scripts/bench.sh   # both Pingora proxies on AWS-LC instead of ring
#   BENCH_ONLY="TLS,HTTP/2" scripts/bench.sh     # only the scenarios whose names start so
#   BENCH_TLS=0 scripts/bench.sh                 # without the TLS and HTTP/2 scenarios
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || {
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get install -y -qq nginx-light >/dev/null || $sudo apt-get install -y -qq nginx >/dev/null
}
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || {
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get install -y -qq haproxy >/dev/null
}
# h2load (HTTP/2 load) and openssl (the bench certificate) for the TLS scenarios.
command -v h2load >/dev/null 2>&1 && command -v openssl >/dev/null 2>&1 || {
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get install -y -qq nghttp2-client openssl >/dev/null
}
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
# BENCH_ALLOCATOR=system builds both Pingora proxies without mimalloc (the default feature).
features=()
[ "${BENCH_ALLOCATOR:-mimalloc}" = mimalloc ] || features=(--no-default-features)
[ "${BENCH_TLS_PROVIDER:-ring}" = ring ] || features+=(--features aws-lc)
cargo build --release --locked "${features[@]}" --bin get2dial-gateway
cargo build --release --locked "${features[@]}" --example bare_proxy
BARE_PROXY_BIN=target/release/examples/bare_proxy
export BARE_PROXY_BIN
exec python3 scripts/bench.py
