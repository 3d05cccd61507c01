#!/usr/bin/env bash
# Build for the GPU machines (nothing can be installed there): libuv,
# protobuf-c, Check and subunit linked statically; CUDA runtime static.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh build-gpu -DMMA_STATIC_DEPS=ON -DCMAKE_BUILD_TYPE=Release -DMMA_WERROR=ON
