#!/usr/bin/env bash
# Set up and pass the tests: a warnings-as-errors build and an ASan/UBSan
# build, each through ctest (Check prints its counts), then valgrind over the
# unit tests. GPU tests (ctest label gpu) skip, saying so, where no GPU exists.
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0

scripts/setup.sh build -DMMA_WERROR=ON
echo "== tests (build/)"
(cd build && ctest --output-on-failure --timeout 300)

scripts/setup.sh build-asan -DMMA_WERROR=ON -DMMA_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug
echo "== tests under ASan/UBSan (build-asan/)"
(cd build-asan && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  ctest --output-on-failure --timeout 300 -LE valgrind-only)

echo "== unit tests under valgrind"
status=0
for t in build/tests/test_status build/tests/test_wire build/tests/test_config build/tests/test_request build/tests/test_sched; do
  [ -x "$t" ] || continue
  if CK_FORK=no valgrind -q --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite "$t" >"$t.valgrind.log" 2>&1; then
    echo "valgrind clean: $(basename "$t")"
  else
    echo "valgrind FAILED: $t"; cat "$t.valgrind.log"; status=1
  fi
done
exit $status
