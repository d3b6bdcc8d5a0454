#!/usr/bin/env bash
# Fashion-MNIST's idx files for the labelled accuracy benchmark (benchmarks/fashion_data.py), from Debian's
# dataset-fashion-mnist. Idempotent; benchmarks only (make test never needs them).
#  - already in /usr/share/datasets/fashion-mnist: nothing to do;
#  - as root: apt-get install -y dataset-fashion-mnist;
#  - otherwise: apt-get download + dpkg-deb -x into benchmarks/work/apt-root (no root), where the loader also looks.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
APT_ROOT="$ROOT/benchmarks/work/apt-root"
PKG=dataset-fashion-mnist
FILE=usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz

say() { echo "install_fashion_mnist: $*"; }

if [ -f "/$FILE" ] || [ -f "$APT_ROOT/$FILE" ]; then say "already there"; exit 0; fi
if ! command -v apt-get >/dev/null; then say "no apt-get: the Fashion-MNIST rows will be skipped"; exit 0; fi
if [ "$(id -u)" = 0 ]; then
  apt-get update -qq && apt-get install -y -qq "$PKG" >/dev/null && { say "installed $PKG"; exit 0; }
  say "apt-get install $PKG failed: trying apt-get download"
fi
command -v dpkg-deb >/dev/null || { say "no dpkg-deb: the Fashion-MNIST rows will be skipped"; exit 0; }
mkdir -p "$APT_ROOT/.debs"
(cd "$APT_ROOT/.debs" && apt-get download -q "$PKG" >/dev/null 2>&1) || { say "apt-get download $PKG failed"; exit 0; }
dpkg-deb -x "$(ls "$APT_ROOT/.debs/${PKG}"_*.deb | head -1)" "$APT_ROOT"
rm -f "$APT_ROOT/.debs/${PKG}"_*.deb
say "unpacked into $APT_ROOT"
