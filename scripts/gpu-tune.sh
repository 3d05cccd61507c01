#!/usr/bin/env bash
# Try mmad configurations on a GPU box: for each, the size sweep (native vs
# mma, both directions), the daemon's CPU and its engine cost per chunk.
# Output under $OUT/tune/. SECTIONS (default ceiling,sizes) and MIN
# (default 1M) pass to mma-bench.
#   scripts/gpu-tune.sh [BUILD_DIR] "CONFIG 1" "CONFIG 2" ...
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
B=${1:-gpu-bin}
shift || true
OUT=${OUT:-/tmp/mma-out}
mkdir -p "$OUT/tune"
. scripts/gpu-lib.sh
i=0
for cfg in "$@"; do
  i=$((i + 1))
  SOCK=/tmp/mma-tune-$$-$i.sock
  # shellcheck disable=SC2086
  mmad_start "$OUT/tune/mmad-$i.log" "$SOCK" $cfg || continue
  echo "### config $i: $cfg" | tee "$OUT/tune/bench-$i.txt"
  "$B/mma-bench" --socket "$SOCK" --sections "${SECTIONS:-ceiling,sizes}" --min "${MIN:-1M}" --max "${MAX:-1G}" --quick 2>&1 | tee -a "$OUT/tune/bench-$i.txt"
  "$B/mmactl" --socket "$SOCK" status 2>&1 | sed -n '/# Engine/,$p' | tee -a "$OUT/tune/bench-$i.txt"
  mmad_stop
done
