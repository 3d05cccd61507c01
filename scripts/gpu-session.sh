#!/usr/bin/env bash
# One GPU call for a session's figures: the whole suite on the build as it
# is (scripts/gpu-suite.sh, then the plots), then mmad's defaults and each
# mmad setting given copy by copy, every round against a box ceiling taken
# in it (scripts/gpu-ab.sh: SIZES, ROUNDS, PER_GPU, default 1 GiB a GPU), all
# under $OUT, packed into $OUT/all.tgz (a call brings back only a few files).
#   scripts/gpu-session.sh [BUILD_DIR] "SETTING 1" "SETTING 2" ...
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
B=${1:-gpu-bin}
shift || true
OUT=${OUT:-/tmp/mma-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0
OUT=$OUT/suite scripts/gpu-suite.sh "$B" >"$OUT/suite.log" 2>&1
echo "suite rc=$?" | tee -a "$OUT/suite.log"
python3 bench/plot.py "$OUT/suite" >>"$OUT/suite.log" 2>&1 || echo "no plots (python3/matplotlib?)"
# AB_S (default 240) bounds the A/B, so that the archive is made within a call's limit.
OUT=$OUT PER_GPU=${PER_GPU:-1G} SIZES=${SIZES:-8M,32M,64M,256M,1G} timeout "${AB_S:-240}" \
  scripts/gpu-ab.sh "$B" "" "$@" >"$OUT/ab.log" 2>&1
echo "ab rc=$?" >>"$OUT/ab.log"
tar czf "$OUT/all.tgz" -C "$OUT" suite suite.log $( [ -d "$OUT/ab" ] && echo ab ab.log)
grep -E "gpu tests|Checks|ceiling|break-even|at 8 MiB|CPU|rc=" "$OUT/suite.log" | head -30
grep -E "mma-ab|^ +[0-9]+M +1 |ceiling|bytes|rc=" "$OUT/ab.log" | head -30
