#!/usr/bin/env bash
# Runs a bipft command on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh --name bipft-v4-32 --zone us-central2-b --accelerator v4-32 \
#     --workdir gs://my-bucket/bipft/base -- pretrain --config configs/pretrain.py:base
#
# Steps: create the slice (or reuse it), copy this checkout to every worker, install the package
# with JAX for TPU (plus gcsfs and google-cloud-storage, for gs:// workdirs), then run the same
# `bipft` command on all workers at once (--worker=all).
# JAX's multi-controller runtime finds the pod's coordinator by itself (BIPFT_DISTRIBUTED=1).
# The command runs in the foreground of gcloud's ssh: if the connection drops, every worker's run
# saves the same step and stops (exit code 129 where the hangup was seen); the same command resumes it.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/tpu_pod.sh [options] -- BIPFT_COMMAND [ARGS...]

Options:
  --name NAME            TPU VM name (required)
  --zone ZONE            GCP zone, e.g. us-central2-b (required)
  --accelerator TYPE     accelerator type, e.g. v4-32, v5litepod-256 (default v4-32)
  --version VERSION      TPU software version (default tpu-ubuntu2204-base)
  --project PROJECT      GCP project (default: gcloud's configured project)
  --workdir PATH         run directory; gs:// paths work (orbax writes there) (required)
  --spot                 create the slice as a spot VM
  --no-create            fail instead of creating the slice when it does not exist
  --dry-run              print the commands instead of running them
  -h, --help             this help

Everything after -- is the bipft command, e.g.
  -- pretrain --config configs/pretrain.py:base,mesh=v4-32   (meshes: configs/meshes.py)
--workdir is appended to it.
USAGE
}

name="" zone="" accelerator="v4-32" version="tpu-ubuntu2204-base" project="" workdir=""
spot=0 create=1 dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --accelerator) accelerator="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --no-create) create=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
bipft_args=("$@")
for required in name zone workdir; do
  if [[ -z "${!required}" ]]; then
    echo "tpu_pod.sh: error: --${required} is required (see --help)" >&2; exit 2
  fi
done
if [[ ${#bipft_args[@]} -eq 0 ]]; then
  echo "tpu_pod.sh: error: give the bipft command after --, e.g. -- pretrain --config configs/pretrain.py:base" >&2
  exit 2
fi

common=(--zone="$zone")
[[ -n "$project" ]] && common+=(--project="$project")

run() {
  if [[ $dry_run -eq 1 ]]; then
    printf '%q ' "$@"; printf '\n'
  else
    "$@"
  fi
}

if ! { [[ $dry_run -eq 0 ]] && gcloud compute tpus tpu-vm describe "$name" "${common[@]}" >/dev/null 2>&1; }; then
  if [[ $create -eq 0 && $dry_run -eq 0 ]]; then
    echo "tpu_pod.sh: error: TPU VM $name does not exist in $zone and --no-create was given" >&2; exit 2
  fi
  create_cmd=(gcloud compute tpus tpu-vm create "$name" "${common[@]}"
              --accelerator-type="$accelerator" --version="$version")
  [[ $spot -eq 1 ]] && create_cmd+=(--spot)
  run "${create_cmd[@]}"
fi

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
archive=/tmp/bipft-jax-src.tar.gz
run tar -czf "$archive" -C "$repo_root" --exclude=.git --exclude=.venv --exclude=workdirs .
run gcloud compute tpus tpu-vm scp "$archive" "$name":bipft-jax-src.tar.gz --worker=all "${common[@]}"
setup='mkdir -p bipft-jax && tar -xzf bipft-jax-src.tar.gz -C bipft-jax && cd bipft-jax && python3 -m venv .venv && . .venv/bin/activate && pip install -q -e . "jax[tpu]" gcsfs google-cloud-storage'
run gcloud compute tpus tpu-vm ssh "$name" --worker=all "${common[@]}" --command="$setup"
remote_cmd="cd bipft-jax && . .venv/bin/activate && BIPFT_DISTRIBUTED=1 bipft $(printf '%q ' "${bipft_args[@]}")--workdir $(printf '%q' "$workdir")"
run gcloud compute tpus tpu-vm ssh "$name" --worker=all "${common[@]}" --command="$remote_cmd"
