#!/usr/bin/env bash
# Set up and pass the tests: a warnings-as-errors build and an ASan/UBSan
# build, each through ctest (Check prints its counts), then valgrind over the
# unit tests. GPU tests (ctest label gpu) skip, saying so, where no GPU exists.
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0

passed=0 failed=0 skipped=0
# Run ctest in a build folder; print Check's own count lines; add up.
run_ctest() {
  local dir=$1; shift
  local log rc=0
  log=$(mktemp)
  (cd "$dir" && env "$@" ctest --output-on-failure --timeout 300) 2>&1 | tee "$log" || rc=1
  echo "-- Check's counts ($dir):"
  grep -h "Checks:" "$dir/Testing/Temporary/LastTest.log" | sed 's/^/   /' || true
  local total fail skip
  total=$(sed -n 's/.*tests passed, \([0-9]*\) tests failed out of \([0-9]*\).*/\2/p' "$log")
  fail=$(sed -n 's/.*tests passed, \([0-9]*\) tests failed out of.*/\1/p' "$log")
  skip=$(grep -c '\*\*\*Skipped' "$log" || true)
  total=${total:-0} fail=${fail:-1}
  passed=$((passed + total - fail - skip)) failed=$((failed + fail)) skipped=$((skipped + skip))
  rm -f "$log"
  return $rc
}

scripts/setup.sh build -DMMA_WERROR=ON
echo "== tests (build/)"
status=0
run_ctest build NCCL_NVLS_ENABLE=0 || status=1

scripts/setup.sh build-asan -DMMA_WERROR=ON -DMMA_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug
echo "== tests under ASan/UBSan (build-asan/)"
run_ctest build-asan ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 || status=1

echo "== unit tests under valgrind"
for t in build/tests/test_status build/tests/test_wire build/tests/test_config build/tests/test_request build/tests/test_sched build/tests/test_engine; do
  [ -x "$t" ] || continue
  if CK_FORK=no valgrind -q --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite "$t" >"$t.valgrind.log" 2>&1; then
    echo "valgrind clean: $(basename "$t")"; passed=$((passed + 1))
  else
    echo "valgrind FAILED: $t"; cat "$t.valgrind.log"; status=1; failed=$((failed + 1))
  fi
done
echo "(skipped: the gpu tests, which need a CUDA GPU; they say so above)"
echo "summary: $passed passed, $failed failed, $skipped skipped"
exit $status
