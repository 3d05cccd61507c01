#!/usr/bin/env bash
# Where a copy's time goes, on a GPU box: for each mmad configuration, run
# mmad with --trace, the size sweep (native vs mma) from MIN to MAX in DIRS,
# stop mmad, and summarize its chunk trace (bench/trace_summary.py).
# Output under $OUT/trace/.
# BENCH_ARGS (e.g. "--gpu 3") go to mma-bench.
#   MIN=16M MAX=256M DIRS=h2d scripts/gpu-trace.sh [BUILD_DIR] "CONFIG 1" "CONFIG 2" ...
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
B=${1:-gpu-bin}
shift || true
OUT=${OUT:-/tmp/mma-out}
mkdir -p "$OUT/trace"
. scripts/gpu-lib.sh
[ $# -gt 0 ] || set -- ""
i=0
for cfg in "$@"; do
  i=$((i + 1))
  SOCK=/tmp/mma-trace-$$-$i.sock
  T="$OUT/trace/trace-$i.csv"
  # shellcheck disable=SC2086
  mmad_start "$OUT/trace/mmad-$i.log" "$SOCK" --trace="$T" $cfg || continue
  echo "### config $i: ${cfg:-(defaults)}" | tee "$OUT/trace/bench-$i.txt"
  for d in ${DIRS:-h2d d2h}; do
    # shellcheck disable=SC2086
    "$B/mma-bench" --socket "$SOCK" --sections sizes --dir "$d" --min "${MIN:-16M}" --max "${MAX:-256M}" --quick ${BENCH_ARGS:-} 2>&1 |
      tee -a "$OUT/trace/bench-$i.txt"
  done
  mmad_stop
  tail -3 "$OUT/trace/mmad-$i.log"
  /usr/bin/python3 bench/trace_summary.py "$T" | tee "$OUT/trace/summary-$i.txt"
  gzip -f "$T"
done
