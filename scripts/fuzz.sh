#!/usr/bin/env bash
# Runs each fuzz target (or the ones named) for FUZZ_SECONDS (default 600) with cargo-fuzz /
# libFuzzer and AddressSanitizer, from the checked-in seeds in fuzz/seeds/<target>.
#   scripts/fuzz.sh                  # all five targets, 10 minutes each
#   FUZZ_SECONDS=60 scripts/fuzz.sh jwt routes
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
seconds="${FUZZ_SECONDS:-600}"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(jwt login_body normalise routes config head)
# cargo-fuzz passes -Z flags; the machine's stable toolchain accepts them with RUSTC_BOOTSTRAP.
export RUSTC_BOOTSTRAP=1
for t in "${targets[@]}"; do
  mkdir -p "target/fuzz-corpus/$t"
  echo "fuzz: $t for ${seconds}s"
  cargo fuzz run "$t" "target/fuzz-corpus/$t" "fuzz/seeds/$t" -- \
    -max_total_time="$seconds" -print_final_stats=1 2>&1 | tee "target/fuzz-$t.log" | grep -E "^(#[0-9]+.*DONE|stat::number_of_executed_units|stat::peak_rss_mb|==[0-9]+==ERROR|SUMMARY)" || true
  if grep -qE "ERROR: (libFuzzer|AddressSanitizer)|panicked" "target/fuzz-$t.log"; then
    echo "fuzz: $t FOUND A CRASH, see target/fuzz-$t.log and fuzz/artifacts/$t" >&2
    exit 1
  fi
done
