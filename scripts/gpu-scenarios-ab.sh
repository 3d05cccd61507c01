#!/usr/bin/env bash
# mmad configurations against each other in mma-bench's contention
# scenarios, taken in turns: for each of REPS rounds, each configuration
# gets a fresh mmad and one `mma-bench --scenarios` run (A-E), so machine
# drift falls on both alike. Output under $OUT/scen/: scen-<round>-<config>.txt
# and each mmad's log, then a summary of scenario D (one multipath client
# per GPU) and C (natives beside one multipath client) per configuration.
#   REPS=2 SECS=1.5 scripts/gpu-scenarios-ab.sh [BUILD_DIR] "CONFIG 1" "CONFIG 2" ...
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
B=${1:-gpu-bin}
shift || true
OUT=${OUT:-/tmp/mma-out}
mkdir -p "$OUT/scen"
. scripts/gpu-lib.sh
[ $# -gt 0 ] || set -- ""
trap '[ -n "${MMAD_PID:-}" ] && mmad_stop' EXIT
rc=0
for r in $(seq "${REPS:-2}"); do
  i=0
  for cfg in "$@"; do
    i=$((i + 1))
    # shellcheck disable=SC2086
    mmad_start "$OUT/scen/mmad-$r-$i.log" "/tmp/mma-scen-$$.sock" $cfg || exit 1
    echo "### round $r, config $i: ${cfg:-(defaults)}" >"$OUT/scen/scen-$r-$i.txt"
    "$B/mma-bench" --socket "$MMAD_SOCK" --scenarios --secs "${SECS:-1.5}" >>"$OUT/scen/scen-$r-$i.txt" 2>&1 || rc=1
    mmad_stop
    MMAD_PID=
  done
done
i=0
for cfg in "$@"; do
  i=$((i + 1))
  echo "config $i: ${cfg:-(defaults)}"
  for r in $(seq "${REPS:-2}"); do
    f="$OUT/scen/scen-$r-$i.txt"
    echo "  round $r: B $(grep -E '^   all ' "$f" | awk '{print $2}') GB/s;" \
      "C $(grep -E '^worst native' "$f");" \
      "D $(grep -E '^aggregate .*native aggregate' "$f")"
  done
done
exit $rc
