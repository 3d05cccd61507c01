#!/usr/bin/env bash
# Set up, start mmad and run a demo transfer. With no GPU here, mmad runs the
# simulated 4-GPU box and says so; the figures are then the box's rates
# scaled down (x0.01), and every byte is still really copied and checked.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh build
export NCCL_NVLS_ENABLE=0
SOCK=${MMA_SOCKET:-/tmp/mma-demo-$$.sock}
export MMA_SOCKET=$SOCK
build/mmad --socket="$SOCK" --log=warn "$@" &
MMAD=$!
trap 'kill $MMAD 2>/dev/null; wait $MMAD 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.05; done
build/mmactl status | sed -n '/# Server/,/^$/p'
build/mma-demo
echo
echo "== mmactl paths (paths that carried traffic)"
build/mmactl paths | grep -v 'bytes=0,'
