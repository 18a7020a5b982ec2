#!/usr/bin/env bash
# The gateway on 127.0.0.1:8080 in front of a built-in stand-in of the Get2Dial API on :8081,
# admin (metrics) on 127.0.0.1:9090. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# A throwaway signing secret for the demo only; set your own for anything else.
export GATEWAY_JWT_SECRET="${GATEWAY_JWT_SECRET:-demo-only-secret-not-for-production}"
exec cargo run --locked -- demo --config config/gateway.toml "$@"
