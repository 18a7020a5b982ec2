#!/usr/bin/env bash
# The whole test suite: installs what is missing, then unit and end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Each criterion bench runs once as a smoke test; the test run comes last so its summary closes the log.
cargo test --locked --benches -q
exec cargo test --locked "$@"
