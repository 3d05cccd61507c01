#!/usr/bin/env bash
# Yielding on GPUs: scenarios (contention) and the size sweep, yield off vs on.
set -uo pipefail
B=$(dirname "$0")
export NCCL_NVLS_ENABLE=0
nvidia-smi -L > "$OUT/machine.txt" 2>&1
i=0
for cfg in "--yield-frac=0" "--yield-frac=0.6"; do
  i=$((i + 1))
  SOCK=/tmp/mma-y-$i.sock
  "$B/mmad" --backend=cuda --socket="$SOCK" --log=debug $cfg > "$OUT/mmad-$i.full.log" 2>&1 &
  M=$!
  for _ in $(seq 600); do [ -S "$SOCK" ] && break; sleep 0.05; done
  echo "### config $i: $cfg" | tee "$OUT/scen-$i.txt"
  timeout 150 "$B/mma-bench" --socket "$SOCK" --scenarios --secs 1.5 >> "$OUT/scen-$i.txt" 2>&1
  "$B/mmactl" --socket "$SOCK" paths > "$OUT/paths-scen-$i.txt" 2>&1
  echo "### config $i: $cfg" | tee "$OUT/sizes-$i.txt"
  timeout 120 "$B/mma-bench" --socket "$SOCK" --sections sizes --min 1M --max 1G --quick >> "$OUT/sizes-$i.txt" 2>&1
  "$B/mmactl" --socket "$SOCK" paths > "$OUT/paths-sizes-$i.txt" 2>&1
  kill "$M"; wait "$M"
  grep -E "yields|resumes" "$OUT/mmad-$i.full.log" > "$OUT/yield-events-$i.txt"
  grep -vE "debug" "$OUT/mmad-$i.full.log" | tail -40 > "$OUT/mmad-$i.log"
  rm -f "$OUT/mmad-$i.full.log"
done
