#!/usr/bin/env bash
# The whole GPU check in one call, for a GPU machine where nothing can be
# installed: run over a build made elsewhere with -DMMA_STATIC_DEPS=ON
# (scripts/build-gpu.sh) and carried along. Writes everything under $OUT:
#   machine.txt  GPUs, topology, driver      gpu_test.log  the gpu test suite
#   gpu_test_via.log  the same with mmad --hop-side=via --relay-linger-us=0 (a launch per one-hop relay)
#   gpu_test_events.log  the same with mmad --completion=events
#   bench.txt    mma-bench's table           bench.csv     the same as CSV
#   mmad.log     the daemon's log            paths.txt     mmactl status + paths
#   scenarios.txt/.csv  contention, fairness and priority (mma-bench --scenarios)
#   trace_summary.txt   where the time of the bench's copies went inside
#                       mmad (mmad --trace, bench/trace_summary.py)
# MMAD_ARGS (e.g. "--plan-learn=2") go to the bench's mmad.
#   scripts/gpu-suite.sh [BUILD_DIR] [extra mma-bench args...]
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
B=${1:-build-gpu}
shift || true
OUT=${OUT:-/tmp/mma-out}
mkdir -p "$OUT"
. scripts/gpu-lib.sh

{
  date -u
  nvidia-smi --query-gpu=index,name,pci.bus_id,memory.total,driver_version --format=csv
  nvidia-smi topo -m
  echo "missing libraries:"; ldd "$B/mmad" "$B/mma-bench" "$B/tests/gpu/gpu_test" | grep "not found" || echo none
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

echo "== gpu tests"
"$B/tests/gpu/gpu_test" 2>&1 | tee "$OUT/gpu_test.log"
test_rc=${PIPESTATUS[0]}
echo "== gpu tests, relays' hops on the via GPU, a kernel launch per one-hop relay (--hop-side=via --relay-linger-us=0)"
MMAD_EXTRA="--hop-side=via --relay-linger-us=0" "$B/tests/gpu/gpu_test" 2>&1 | tee "$OUT/gpu_test_via.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || test_rc=1
echo "== gpu tests, chunks' ends seen through CUDA events (--completion=events)"
MMAD_EXTRA="--completion=events" "$B/tests/gpu/gpu_test" 2>&1 | tee "$OUT/gpu_test_events.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || test_rc=1

echo "== benchmark"
SOCK=/tmp/mma-bench-$$.sock
TRACE=/tmp/mma-trace-$$.csv
# shellcheck disable=SC2086
mmad_start "$OUT/mmad.log" "$SOCK" --trace="$TRACE" ${MMAD_ARGS:-} || exit 1
"$B/mma-bench" --socket "$SOCK" --csv "$OUT/bench.csv" "$@" 2>&1 | tee "$OUT/bench.txt"
bench_rc=${PIPESTATUS[0]}
echo "== scenarios"
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
if [ "$ngpu" -ge 2 ]; then
  "$B/mma-bench" --socket "$SOCK" --scenarios --csv "$OUT/scenarios.csv" 2>&1 | tee "$OUT/scenarios.txt"
  scen_rc=${PIPESTATUS[0]}
else
  echo "SKIPPED: the scenarios (contention, fairness, priority) need 2 or more GPUs; this machine has $ngpu" |
    tee "$OUT/scenarios.txt"
  scen_rc=0
fi
{ "$B/mmactl" --socket "$SOCK" status; echo; "$B/mmactl" --socket "$SOCK" paths; } >"$OUT/paths.txt" 2>&1
mmad_stop
python3 bench/trace_summary.py "$TRACE" >"$OUT/trace_summary.txt" 2>&1 || echo "no trace summary (python3?)"
rm -f "$TRACE"
grep -v 'bytes=0,' "$OUT/paths.txt"
echo "gpu tests rc=$test_rc, bench rc=$bench_rc, scenarios rc=$scen_rc"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$scen_rc" -eq 0 ]
