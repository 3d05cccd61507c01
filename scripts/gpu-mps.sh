#!/usr/bin/env bash
# mmad under MPS (CUDA's Multi-Process Service), for a GPU box: start an MPS
# control daemon of our own (a user-space server; no GPU setting changes:
# compute mode, clocks and MIG stay as they are), then run the gpu tests and a
# short mma-bench with every CUDA process (mmad, the tests' clients, the
# bench) a client of it, and stop it. With MPS, mmad's resident relay kernels
# share SMs with other processes' kernels instead of taking turns with them.
# Output under $OUT/mps/: machine.txt, gpu_test.log, bench.txt, mmad.log and
# the MPS daemon's own logs (control.log, server.log: which clients came).
#   scripts/gpu-mps.sh [BUILD_DIR]
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
B=${1:-gpu-bin}
OUT=${OUT:-/tmp/mma-out}
O=$OUT/mps
mkdir -p "$O"
. scripts/gpu-lib.sh
if ! command -v nvidia-cuda-mps-control >/dev/null; then
  echo "gpu-mps: no nvidia-cuda-mps-control on this machine: skipped" | tee "$O/skipped.txt"
  exit 77
fi
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mma-mps-pipe-$$ CUDA_MPS_LOG_DIRECTORY=/tmp/mma-mps-log-$$
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
nvidia-cuda-mps-control -d || { echo "gpu-mps: the MPS control daemon did not start"; exit 1; }
stop_mps() {
  echo quit | nvidia-cuda-mps-control
  sleep 1
  cp "$CUDA_MPS_LOG_DIRECTORY"/*.log "$O/" 2>/dev/null
  rm -rf "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
}
trap stop_mps EXIT
nvidia-smi --query-gpu=index,name,pci.bus_id,compute_mode --format=csv >"$O/machine.txt" 2>&1
cat "$O/machine.txt"

echo "== gpu tests under MPS"
"$B/tests/gpu/gpu_test" >"$O/gpu_test.log" 2>&1
test_rc=$?
tail -1 "$O/gpu_test.log"

echo "== mma-bench under MPS (sizes 1-64 MiB, quick)"
SOCK=/tmp/mma-mps-$$.sock
mmad_start "$O/mmad.log" "$SOCK" || exit 1
"$B/mma-bench" --socket "$SOCK" --sections sizes --min 1M --max 64M --quick >"$O/bench.txt" 2>&1
bench_rc=$?
# while MPS serves them, nvidia-smi lists the processes as MPS clients (type M+C)
nvidia-smi >"$O/nvidia-smi.txt" 2>&1
mmad_stop
grep -E "^ +[0-9]+M |break-even|at 8 MiB|MISMATCH" "$O/bench.txt"
echo "gpu tests rc=$test_rc, bench rc=$bench_rc"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
