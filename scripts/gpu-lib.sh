# shellcheck shell=bash
# Shared by the scripts that run mmad on a GPU box (gpu-suite, gpu-tune, gpu-ab,
# gpu-trace): source it after setting B (the build folder).
#   mmad_start LOG SOCK [mmad options...]  start mmad, wait for its socket
#   mmad_stop                              stop it; its exit line goes to LOG
# MMAD_BACKEND (default cuda) picks the backend: sim tries a script here.
# MMAD_BIN (default $B/mmad) runs another mmad binary (an A/B of builds).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

mmad_start() {
  MMAD_LOG=$1 MMAD_SOCK=$2
  shift 2
  rm -f "$MMAD_SOCK"
  "${MMAD_BIN:-$B/mmad}" --backend="${MMAD_BACKEND:-cuda}" --socket="$MMAD_SOCK" "$@" >"$MMAD_LOG" 2>&1 &
  MMAD_PID=$!
  for _ in $(seq 600); do
    [ -S "$MMAD_SOCK" ] && return 0
    kill -0 "$MMAD_PID" 2>/dev/null || break
    sleep 0.05
  done
  echo "mmad did not come up on $MMAD_SOCK; its log:" >&2
  tail -20 "$MMAD_LOG" >&2
  return 1
}

mmad_stop() {
  kill "$MMAD_PID" 2>/dev/null
  wait "$MMAD_PID"
  echo "mmad exit: $?" >>"$MMAD_LOG"
}
