#!/usr/bin/env bash
# The whole policy conformance suite with real traffic in the lab (the test
# suite runs the engine on every case, and the lab on the cases marked lab: true).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cargo build --workspace --locked
CILIUM_CONFORMANCE_ALL=1 cargo test --locked -p cilium-privileged-tests --test conformance -- --nocapture
