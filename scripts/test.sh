#!/usr/bin/env bash
# The whole test suite: installs what is missing, then unit and end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec cargo test --locked --all-targets "$@"
