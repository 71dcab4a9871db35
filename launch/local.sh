#!/usr/bin/env bash
# Several JAX processes on this machine, as on a multi-host cluster: a localhost coordinator,
# N CPU devices per process, gloo collectives. For trying multi-host code paths without a pod.
#
#   launch/local.sh --processes 2 --devices-per-process 2 -- \
#     pretrain --config configs/pretrain.py:tiny --workdir /tmp/bipft-local
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/local.sh [options] -- BIPFT_COMMAND [ARGS...]

Options:
  --processes N            processes to start (default 2)
  --devices-per-process N  CPU devices each process sees (default 2)
  --port PORT              coordinator port on localhost (default 12355)
  --dry-run                print the commands instead of running them
  -h, --help               this help
USAGE
}

processes=2 devices=2 port=12355 dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --processes) processes="$2"; shift 2 ;;
    --devices-per-process) devices="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "local.sh: error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [[ $# -eq 0 ]]; then echo "local.sh: error: give the bipft command after --" >&2; exit 2; fi
for n in "$processes" "$devices" "$port"; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "local.sh: error: expected a positive integer, got $n" >&2; exit 2; }
done

pids=()
# shellcheck disable=SC2317,SC2329  # invoked by the trap
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM
for ((i = 0; i < processes; i++)); do
  env_args=(BIPFT_DISTRIBUTED=1 "BIPFT_COORDINATOR=localhost:$port" "BIPFT_NUM_PROCESSES=$processes"
            "BIPFT_PROCESS_ID=$i" "XLA_FLAGS=--xla_force_host_platform_device_count=$devices")
  if [[ $dry_run -eq 1 ]]; then
    printf '%q ' env "${env_args[@]}" bipft "$@"; printf '&\n'
  else
    env "${env_args[@]}" bipft "$@" &
    pids+=("$!")
  fi
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
pids=()
exit "$status"
