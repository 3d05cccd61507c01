#!/usr/bin/env bash
# mmad configurations against each other on a GPU box, copy by copy
# (bench/ab.c): one mmad per configuration, all at once on the same GPUs,
# each with --busy-gbps=0 --relay-kernel-busy-sm=0 (or each would keep off
# the links the others' copies use), then mma-ab in DIRS. Output under
# $OUT/ab/: ab-<dir>.txt and each mmad's log.
#   SIZES=8M,32M,64M,256M ROUNDS=15 DIRS="h2d d2h" PER_GPU=256M scripts/gpu-ab.sh [BUILD_DIR] "CONFIG 1" "CONFIG 2" ...
# PER_GPU: bytes each GPU copies in every round's box ceiling. GAP_US: a pause
# before every copy (sporadic copies; default 0). AS_USED=1: copies as a user
# gets them (libmma may run them natively). AB_BIN: another mma-ab binary
# (default BUILD_DIR/mma-ab).
# An empty CONFIG is mmad's defaults; one that begins with bin=PATH runs
# that mmad binary (an A/B of builds) with the options after it.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
B=${1:-gpu-bin}
shift || true
OUT=${OUT:-/tmp/mma-out}
mkdir -p "$OUT/ab"
. scripts/gpu-lib.sh
[ $# -gt 0 ] || set -- ""
socks=() pids=()
# Whatever ends this script (an mmad that did not come up, a timeout's
# TERM) stops the mmads it started.
stop_all() {
  [ -n "${ab_pid:-}" ] && kill "$ab_pid" 2>/dev/null
  for k in "${!pids[@]}"; do
    MMAD_PID=${pids[$k]} MMAD_LOG=$OUT/ab/mmad-$((k + 1)).log mmad_stop
  done
  pids=()
}
trap stop_all EXIT
trap 'exit 143' TERM INT
i=0
for cfg in "$@"; do
  i=$((i + 1))
  bin=$B/mmad
  if [[ $cfg == bin=* ]]; then
    bin=${cfg%% *} bin=${bin#bin=}
    [[ $cfg == *" "* ]] && cfg=${cfg#* } || cfg=""
  fi
  # shellcheck disable=SC2086
  MMAD_BIN=$bin mmad_start "$OUT/ab/mmad-$i.log" "/tmp/mma-ab-$$-$i.sock" --busy-gbps=0 --relay-kernel-busy-sm=0 $cfg
  started=$?
  pids+=("$MMAD_PID")
  [ $started -eq 0 ] || exit 1
  socks+=("$MMAD_SOCK")
  echo "config $i: $bin ${cfg:-(defaults)}" | tee -a "$OUT/ab/configs.txt"
done
rc=0
for d in ${DIRS:-h2d d2h}; do
  # in the background, so that a TERM (timeout) is handled at once
  "${AB_BIN:-$B/mma-ab}" --dir "$d" --sizes "${SIZES:-8M,32M,64M,256M}" --rounds "${ROUNDS:-15}" --per-gpu "${PER_GPU:-256M}" \
    --gap-us "${GAP_US:-0}" ${AS_USED:+--as-used} \
    "${socks[@]}" >"$OUT/ab/ab-$d.txt" 2>&1 &
  ab_pid=$!
  wait "$ab_pid" || rc=1
  ab_pid=
  cat "$OUT/ab/ab-$d.txt"
done
exit $rc
