#!/usr/bin/env bash
# Installs what building and testing the gateway needs and a fresh machine may lack.
# Safe to run again: it installs only what is missing.
set -euo pipefail

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)        # building pingora
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)  # tests start their own
command -v promtool >/dev/null 2>&1 || need+=(prometheus)      # promtool checks the rules and a scrape
command -v chromium >/dev/null 2>&1 || need+=(chromium)        # the browser CORS test
command -v curl >/dev/null 2>&1 || need+=(curl)                # HTTP/2 over TLS with curl
command -v wrk >/dev/null 2>&1 || need+=(wrk)                  # soak and load benchmarks
command -v go >/dev/null 2>&1 || need+=(golang-go)             # a net/http upstream, as the control plane is
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)  # a real DNS server whose answers tests change

if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

command -v cargo >/dev/null 2>&1 || { echo "setup: cargo (Rust toolchain) is required" >&2; exit 1; }
