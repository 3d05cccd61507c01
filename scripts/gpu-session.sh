#!/usr/bin/env bash
# One GPU call for a session's figures: the whole suite on the build as it
# is (scripts/gpu-suite.sh, then the plots), then the size sweep under each
# mmad setting given (scripts/gpu-tune.sh), all under $OUT, packed into
# $OUT/all.tgz (a call brings back only a few files).
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
# TUNE_S (default 240) bounds the A/B, so that the archive is made within a call's limit.
[ $# -gt 0 ] && OUT=$OUT timeout "${TUNE_S:-240}" scripts/gpu-tune.sh "$B" "$@" >"$OUT/tune.log" 2>&1
tar czf "$OUT/all.tgz" -C "$OUT" suite suite.log $( [ -d "$OUT/tune" ] && echo tune tune.log)
grep -E "gpu tests|Checks|ceiling|break-even|at 8 MiB|CPU|rc=" "$OUT/suite.log" | head -30
