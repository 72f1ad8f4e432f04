#!/usr/bin/env bash
# Runs each fuzz target (fuzz/fuzz_targets) for a bounded time. cargo-fuzz needs nightly
# flags; RUSTC_BOOTSTRAP lets the stable toolchain accept them. Usage: tests/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-30}
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for target in classify rewrite upstream_codec pipeline; do
  echo "fuzz: $target for ${seconds}s"
  if ! cargo fuzz run "$target" -- -max_total_time="$seconds" -max_len=2048 >"$log" 2>&1; then
    tail -60 "$log"
    echo "fuzz: $target FAILED (input saved under fuzz/artifacts/$target/)"
    exit 1
  fi
  grep -E "Done [0-9]+ runs" "$log"
done
