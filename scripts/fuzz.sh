#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60). The targets live in
# fuzz/ and need cargo-fuzz; stable Rust builds them with RUSTC_BOOTSTRAP=1.
# A crash fails the run and leaves its input in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install --locked cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1
targets=$(cd fuzz && cargo fuzz list)
cd fuzz
cargo fuzz build -O
for t in $targets; do
  mkdir -p "corpus/$t"
  echo "fuzz: $t for ${seconds}s"
  seeds=(); [ -d "seeds/$t" ] && seeds=("seeds/$t")   # committed starting inputs
  cargo fuzz run -O "$t" "corpus/$t" "${seeds[@]}" -- -max_total_time="$seconds" -print_final_stats=0 2>&1 | grep -E "Done|ERROR|panicked|SUMMARY|crash" || true
  if [ -n "$(ls "artifacts/$t" 2>/dev/null)" ]; then
    echo "fuzz: $t found a failing input: fuzz/artifacts/$t" >&2
    exit 1
  fi
done
