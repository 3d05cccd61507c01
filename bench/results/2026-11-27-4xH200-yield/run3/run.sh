#!/usr/bin/env bash
set -uo pipefail
B=$(dirname "$0")
export NCCL_NVLS_ENABLE=0
i=0
for cfg in "--yield-frac=0.7|scen" "--yield-frac=0.75|scen" "--yield-frac=0.75|sizes"; do
  i=$((i + 1))
  opt=${cfg%|*}; what=${cfg#*|}
  SOCK=/tmp/mma-y2-$i.sock
  "$B/mmad" --backend=cuda --socket="$SOCK" --log=debug $opt > /tmp/mmad-$i.log 2>&1 &
  M=$!
  for _ in $(seq 600); do [ -S "$SOCK" ] && break; sleep 0.05; done
  {
  echo "### config $i: $opt ($what)"
  if [ "$what" = sizes ]; then
    timeout 120 "$B/mma-bench" --socket "$SOCK" --sections sizes --min 1M --max 1G --quick 2>&1
  else
    timeout 150 "$B/mma-bench" --socket "$SOCK" --scenarios --secs 1.5 2>&1 | sed -n '/^C0\./,/^D\./p'
  fi
  "$B/mmactl" --socket "$SOCK" paths 2>&1 | grep "^gpu0"
  } >> "$OUT/results.txt"
  kill "$M"; wait "$M"
  { echo "### config $i events:"; grep -cE "yields" /tmp/mmad-$i.log; grep -cE "resumes" /tmp/mmad-$i.log; grep -E "yields|resumes" /tmp/mmad-$i.log | head -30; } >> "$OUT/events.txt"
done
