#!/usr/bin/env bash
# Benchmarks (never part of the tests): builds release binaries and writes
# BENCHMARKS.md with ratios against a baseline taken in the same run.
#   scripts/bench.sh [--seconds N] [--rounds N] [--pods N]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cargo build --release --workspace --locked
exec target/release/cilium-bench --out BENCHMARKS.md "$@"
