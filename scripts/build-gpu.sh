#!/usr/bin/env bash
# Build for the GPU machines (nothing can be installed there): libuv,
# protobuf-c, Check and subunit linked statically; CUDA runtime static.
# Then gather what a GPU box runs into gpu-bin/ (a few MB to carry there):
# mmad, mmactl, mma-bench, mma-demo and tests/gpu/gpu_test, laid out as in
# the build folder, so scripts/gpu-suite.sh gpu-bin works on either.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh build-gpu -DMMA_STATIC_DEPS=ON -DCMAKE_BUILD_TYPE=Release -DMMA_WERROR=ON
rm -rf gpu-bin
mkdir -p gpu-bin/tests/gpu
cp build-gpu/mmad build-gpu/mmactl build-gpu/mma-bench build-gpu/mma-demo build-gpu/mma-callcost build-gpu/mma-hoplat build-gpu/mma-kcopy build-gpu/mma-access build-gpu/mma-hostread build-gpu/mma-kread build-gpu/mma-staged build-gpu/mma-ab build-gpu/mma-pairs gpu-bin/
cp build-gpu/tests/gpu/gpu_test gpu-bin/tests/gpu/
echo "gpu-bin/: $(du -sh gpu-bin | cut -f1)"
