#!/usr/bin/env bash
# Install what hago needs to cross-compile for Raspberry Pi (aarch64) and run the
# result under qemu here. Idempotent: each step is skipped when its output exists.
#
#  1. Debian cross toolchain + qemu-user (apt, only if aarch64-linux-gnu-g++ or
#     qemu-aarch64 is missing; needs root).
#  2. libtvm_runtime.so + libtvm_ffi.so for aarch64, taken from the aarch64
#     manylinux wheels of the pinned apache-tvm / apache-tvm-ffi, into
#     $HAGO_ARM_SYSROOT/lib (default .hago_cache/aarch64/lib); headers for step 3
#     into $HAGO_ARM_SYSROOT/include.
#  3. tools/run_vm.cc cross-built into $HAGO_ARM_SYSROOT/bin/hago_run_vm.
#
# Usage: tools/install_arm.sh            (PYTHON=.venv/bin/python by default)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SYSROOT="${HAGO_ARM_SYSROOT:-$ROOT/.hago_cache/aarch64}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
TVM_PIN="apache-tvm==0.27.0.post1"
FFI_PIN="apache-tvm-ffi==0.1.14.post1"
CXX=aarch64-linux-gnu-g++

say() { echo "install_arm: $*"; }

# 1. toolchain and emulator
if ! command -v "$CXX" >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
  if [ "$(id -u)" != 0 ] && ! command -v sudo >/dev/null; then
    say "need root to apt-get install the aarch64 toolchain and qemu-user" >&2; exit 1
  fi
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  say "apt-get install gcc/g++-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user"
  LOG="$(mktemp)"
  if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
      --no-install-recommends gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user; \
      } >"$LOG" 2>&1; then
    tail -5 "$LOG" >&2; say "apt-get failed (full log: $LOG)" >&2; exit 1
  fi
  rm -f "$LOG"
fi

# 2. aarch64 TVM runtime libraries (+ the FFI headers the driver compiles against)
LIB="$SYSROOT/lib"; INC="$SYSROOT/include"
if [ ! -s "$LIB/libtvm_runtime.so" ] || [ ! -s "$LIB/libtvm_ffi.so" ] || [ ! -d "$INC/tvm/ffi" ]; then
  WHEELS="$SYSROOT/wheels"
  mkdir -p "$WHEELS" "$LIB" "$INC"
  say "downloading aarch64 wheels of $TVM_PIN and $FFI_PIN"
  for plat in manylinux_2_28_aarch64 manylinux_2_27_aarch64 manylinux_2_24_aarch64; do
    if "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        --platform "$plat" --python-version 3.11 -d "$WHEELS" "$TVM_PIN" "$FFI_PIN" 2>/dev/null; then
      break
    fi
  done
  "$PYTHON" - "$WHEELS" "$LIB" "$INC" <<'EOF'
import sys, zipfile
from pathlib import Path
wheels, lib, inc = (Path(p) for p in sys.argv[1:])
want = {"tvm/lib/libtvm_runtime.so": lib, "tvm_ffi/lib/libtvm_ffi.so": lib}
found = set()
for whl in sorted(wheels.glob("*aarch64*.whl")):
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            if name in want:
                (want[name] / Path(name).name).write_bytes(z.read(name))
                found.add(name)
            elif name.startswith("tvm_ffi/include/") and name.endswith(".h"):
                dst = inc / name[len("tvm_ffi/include/"):]
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(z.read(name))
missing = set(want) - found
if missing:
    sys.exit(f"install_arm: the aarch64 wheels lack {', '.join(sorted(missing))}")
EOF
  rm -rf "$WHEELS"   # ~100 MB of wheels; only the two libraries are kept
fi

# 3. the driver
BIN="$SYSROOT/bin/hago_run_vm"
if [ ! -x "$BIN" ] || [ "$ROOT/tools/run_vm.cc" -nt "$BIN" ]; then
  mkdir -p "$SYSROOT/bin"
  say "building $BIN"
  "$CXX" -std=c++17 -O2 -o "$BIN" "$ROOT/tools/run_vm.cc" -I"$INC" -L"$LIB" \
    -Wl,--no-as-needed -ltvm_runtime -ltvm_ffi -Wl,-rpath,'$ORIGIN/../lib'
fi
say "ready: $BIN (runtime libs in $LIB)"
