#!/usr/bin/env bash
# Installs what the build, the demo and the tests need, once (idempotent).
# Needs root: it uses apt and mounts bpffs.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "run as root: the datapath loads BPF programs and the lab creates network namespaces" >&2
  exit 1
fi

packages=(
  clang-19 llvm-19 libbpf-dev bpftool   # compiling and inspecting the C datapath
  make gcc                              # jemalloc, the agent's allocator, is built from C
  iproute2 curl iperf3                  # the lab, the demo, the benchmarks
  python3-minimal                       # a test's UDP client (one socket, two services)
  iptables nftables                     # the kube-proxy rulesets the service benchmark compares with
  dnsmasq-base bind9-dnsutils           # DNS through a ClusterIP (tests)
  prometheus                            # scrapes the agent's and Hubble's metrics (tests)
  etcd-server                           # the kvstore (tests, `cilium lab up --kvstore`)
  nginx dnsperf wrk                     # the L7 benchmark: reverse-proxy anchor, DNS and HTTP load
  containerd crun busybox-static        # CNI interop test (ctr run --cni)
)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || true
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust with rustup" >&2; exit 1; }

# bpffs and tracefs are not mounted at boot on this machine kind
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
mkdir -p /var/run/netns
