#!/usr/bin/env bash
# Install what mma builds with (Debian/Ubuntu), then configure and build.
#   scripts/setup.sh [BUILD_DIR] [extra cmake args...]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
shift || true

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
PKGS="build-essential cmake pkg-config libuv1-dev libprotobuf-c-dev protobuf-c-compiler libhwloc-dev check libsubunit-dev libsystemd-dev valgrind"
missing=""
for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "== installing:$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

# CUDA Toolkit: nvcc and the runtime (no driver or GPU needed to build).
if ! command -v nvcc >/dev/null 2>&1; then
  for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
    [ -x "$d/nvcc" ] && export PATH="$d:$PATH" && break
  done
fi
if ! command -v nvcc >/dev/null 2>&1; then
  echo "== nvcc not found: trying Debian's nvidia-cuda-toolkit"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nvidia-cuda-toolkit >/dev/null || {
    echo "error: the CUDA Toolkit (nvcc) is needed to build mma; install it from NVIDIA's repository" >&2
    exit 1
  }
fi

echo "== configuring $BUILD"
cmake -S . -B "$BUILD" -DCMAKE_CUDA_COMPILER="$(command -v nvcc)" "$@" >"$BUILD.cmake.log" 2>&1 || {
  mkdir -p "$BUILD"; cat "$BUILD.cmake.log" >&2; exit 1; }
echo "== building $BUILD"
cmake --build "$BUILD" -j"$(nproc)"
