#!/usr/bin/env bash
# The whole test suite, as CI runs it (as root):
#   1. unit tests (no root needed: policy, identity, IPAM, CNI parsing, the
#      agent against a fake datapath, the BPF/Rust ABI check against BTF)
#   2. privileged tests: the datapath through BPF_PROG_RUN on crafted packets,
#      end-to-end lab traffic, CNI interop with containerd
#   3. a short run of every fuzz target
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

echo "== build"
cargo build --workspace --locked

echo "== unit tests"
cargo test --locked

echo "== privileged tests (BPF_PROG_RUN, lab end-to-end, CNI interop)"
cargo test --locked -p cilium-privileged-tests -- --test-threads=2

echo "== fuzz smoke"
scripts/fuzz.sh "${FUZZ_SECONDS:-15}"

echo "== all tests passed"
