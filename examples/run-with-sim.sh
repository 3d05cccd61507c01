#!/usr/bin/env bash
# Run a program against a private mmad on the simulated box:
#   run-with-sim.sh MMAD PROGRAM [ARGS...]
set -euo pipefail
MMAD=$1
shift
DIR=$(mktemp -d)
export MMA_SOCKET=$DIR/mmad.sock
"$MMAD" --sim --sim-scale=0.05 --log=warn --socket="$MMA_SOCKET" &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$DIR"' EXIT
for _ in $(seq 200); do [ -S "$MMA_SOCKET" ] && break; sleep 0.05; done
"$@"
