#!/usr/bin/env bash
# Issue 5's prediction: what the simulated boxes say about bandwidth vs the
# number of paths, next to a bottleneck model of the same rates.
#   bench/sim-predict.sh BUILD_DIR [SCALE] [MIB] [CHUNK_COST_US]
# CHUNK_COST_US: the engine time one chunk costs on the real box (8 measured
# on 4x H200, bench/results/2026-11-27-4xH200-engine-cost).
set -euo pipefail
B=${1:-build}
SCALE=${2:-0.002}
MIB=${3:-128}
COST=${4:-8}
for preset in 4gpu 8gpu-2socket; do
  SOCK=$(mktemp -u /tmp/mma-sim-XXXX.sock)
  "$B/mmad" --sim --sim-preset=$preset --sim-scale="$SCALE" --sim-chunk-cost-us="$COST" --log=warn --socket="$SOCK" &
  P=$!
  for _ in $(seq 200); do [ -S "$SOCK" ] && break; sleep 0.05; done
  echo "### preset $preset, sim-scale $SCALE, chunk cost $COST us, $MIB MiB copies into gpu0"
  "$B/mma-demo" --socket "$SOCK" --mib "$MIB" --reps 3 --sweep | sed -n '/over 1\.\./,$p'
  kill $P; wait $P 2>/dev/null || true
done
cat <<'MODEL'
### bottleneck model (same rates; host buffers on socket 0; relays in ring order 1,2,...)
# H2D = min(direct+socket-0 relays, 180) + min(socket-1 relays, 120 cross-socket, 180), each link 55.5
# paths:      1     2     3     4     5     6     7     8
# 4gpu H2D: 55.5 111.0 166.5 180.0
# 8gpu H2D: 55.5 111.0 166.5 180.0 235.5 291.0 300.0 300.0
# 4gpu D2H: 55.3 110.6 153.0 153.0
# 8gpu D2H: 55.3 110.6 153.0 153.0 208.3 263.6 273.0 273.0
MODEL
