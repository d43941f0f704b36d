#!/usr/bin/env bash
# What `make test` needs beyond Rust and Node, installed when missing (one list, used by
# `make test` and, through it, by .ci/run). As root it installs what is missing; as any
# other user it prints the exact install line and stops with exit 1.
#   scripts/test-deps.sh          check, and install as root
#   scripts/test-deps.sh --check  only say what is missing (exit 1 if anything is)
set -euo pipefail

# Debian packages: the registry the integration tests start, FUSE, the peers the tests
# compare with (umoci, skopeo, GNU tar, nginx, curl; pzstd from zstd), openssl for the TLS tests, g++ for the
# fuzz build, systemd for systemd-analyze.
debs=(fuse3 docker-registry tar findutils umoci g++ openssl skopeo nginx-light curl zstd
  util-linux mount binutils ca-certificates systemd)
pip_pkg=kubernetes-validate==1.37.0
cargo_deb=cargo-deb@3.8.0

missing_debs=()
for pkg in "${debs[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing_debs+=("$pkg")
done
command -v node >/dev/null 2>&1 || missing_debs+=(nodejs)
# npm for the writable mount tests (NodeSource's nodejs ships it; Debian's is a package).
command -v npm >/dev/null 2>&1 || missing_debs+=(npm)
missing_components=()
cargo fmt --version >/dev/null 2>&1 || missing_components+=(rustfmt)
cargo clippy --version >/dev/null 2>&1 || missing_components+=(clippy)
need_pip=false
python3 -m kubernetes_validate --version >/dev/null 2>&1 || need_pip=true
need_deb=false
command -v cargo-deb >/dev/null 2>&1 || need_deb=true

# The Node toolchain the writable mount tests run, pinned by tests/toolchain/package-lock.json
# (installed from the npm registry here, in the set-up, so that the tests contact nothing).
root="$(cd "$(dirname "$0")/.." && pwd)"
toolchain="$root/tests/toolchain"
toolchain_stamp="$(sha256sum "$toolchain/package-lock.json" | cut -d' ' -f1)"
need_toolchain=false
[ "$(cat "$toolchain/node_modules/.jkmount-stamp" 2>/dev/null)" = "$toolchain_stamp" ] || need_toolchain=true

lines=()
[ "${#missing_debs[@]}" -gt 0 ] && lines+=("apt-get update && apt-get install -y --no-install-recommends ${missing_debs[*]}")
[ "${#missing_components[@]}" -gt 0 ] && lines+=("rustup component add ${missing_components[*]}")
$need_pip && lines+=("python3 -m pip install $pip_pkg")
$need_deb && lines+=("cargo install --locked $cargo_deb")
[ -e /dev/fuse ] || lines+=("modprobe fuse   # /dev/fuse is missing; the mount tests need it")
$need_toolchain && lines+=("npm ci --ignore-scripts --no-audit --no-fund --prefix $toolchain")

# Disk: a clean run grows target/ to about 2.4 GB, the fuzz targets included (docs/testing.md).
# Say so now, in one line, rather than fail with ENOSPC twenty minutes in.
need_mib=3072
# What earlier builds left counts as room (not target/bench, the benchmark's own trees).
held_mib=$(du -smc "$root"/target/{debug,release,*-linux-*} 2>/dev/null | awk 'END {print $1}' || true)
free_mib=$(df -Pm "$root" | awk 'NR == 2 {print $4}')
if [ $((free_mib + ${held_mib:-0})) -lt $need_mib ]; then
  echo "make test needs about $need_mib MiB for $root/target: $free_mib MiB free there and target/ holds ${held_mib:-0} MiB; free some space first" >&2
  exit 1
fi

if [ "${#lines[@]}" -eq 0 ]; then
  exit 0
fi
if [ "${1:-}" = --check ] || [ "$(id -u)" -ne 0 ]; then
  echo "make test needs these first (run as root, or run make test as root to have them installed):" >&2
  printf '  %s\n' "${lines[@]}" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
if [ "${#missing_debs[@]}" -gt 0 ]; then
  echo "== installing ${missing_debs[*]}"
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing_debs[@]}"
fi
[ "${#missing_components[@]}" -gt 0 ] && rustup component add "${missing_components[@]}"
$need_pip && python3 -m pip install -q "$pip_pkg"
$need_deb && cargo install -q --locked "$cargo_deb"
if $need_toolchain; then
  echo "== installing the Node toolchain of the writable mount tests into $toolchain"
  npm ci --ignore-scripts --no-audit --no-fund --loglevel=error --prefix "$toolchain"
  echo "$toolchain_stamp" > "$toolchain/node_modules/.jkmount-stamp"
fi
[ -e /dev/fuse ] || { echo "scripts/test-deps.sh: /dev/fuse is missing; the mount tests need it" >&2; exit 1; }
exit 0
