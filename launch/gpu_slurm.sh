#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per GPU, JAX reads the SLURM environment
# (SLURM_NTASKS, SLURM_PROCID, the node list) to find its coordinator (BIPFT_DISTRIBUTED=1).
#
#   launch/gpu_slurm.sh --nodes 4 --gpus-per-node 8 --partition gpu \
#     --workdir /shared/runs/bipft-base -- pretrain --config configs/pretrain.py:base
#
# Submits an sbatch job (or, with --dry-run, prints the batch script it would submit).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/gpu_slurm.sh [options] -- BIPFT_COMMAND [ARGS...]

Options:
  --nodes N              number of nodes (default 1)
  --gpus-per-node N      GPUs (= processes) per node (default 8)
  --partition NAME       SLURM partition (optional)
  --time HH:MM:SS        time limit (default 48:00:00)
  --job-name NAME        job name (default bipft)
  --venv PATH            virtualenv to activate on every node (default ./.venv)
  --workdir PATH         run directory on a filesystem every node sees (required)
  --dry-run              print the batch script instead of submitting it
  -h, --help             this help
Everything after -- is the bipft command; --workdir is appended to it.
USAGE
}

nodes=1 gpus=8 partition="" time_limit="48:00:00" job_name="bipft" venv=".venv" workdir="" dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes="$2"; shift 2 ;;
    --gpus-per-node) gpus="$2"; shift 2 ;;
    --partition) partition="$2"; shift 2 ;;
    --time) time_limit="$2"; shift 2 ;;
    --job-name) job_name="$2"; shift 2 ;;
    --venv) venv="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "gpu_slurm.sh: error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [[ -z "$workdir" ]]; then echo "gpu_slurm.sh: error: --workdir is required (see --help)" >&2; exit 2; fi
if [[ $# -eq 0 ]]; then echo "gpu_slurm.sh: error: give the bipft command after --" >&2; exit 2; fi
for n in "$nodes" "$gpus"; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "gpu_slurm.sh: error: node and GPU counts must be positive integers, got $n" >&2; exit 2; }
done

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
partition_line=""
[[ -n "$partition" ]] && partition_line="#SBATCH --partition=$partition"
script=$(cat <<SBATCH
#!/usr/bin/env bash
#SBATCH --job-name=$job_name
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=$gpus
#SBATCH --gpus-per-node=$gpus
#SBATCH --time=$time_limit
$partition_line
set -euo pipefail
cd $(printf '%q' "$repo_root")
. $(printf '%q' "$venv")/bin/activate
export BIPFT_DISTRIBUTED=1
srun --kill-on-bad-exit=1 bipft $(printf '%q ' "$@")--workdir $(printf '%q' "$workdir")
SBATCH
)
if [[ $dry_run -eq 1 ]]; then
  printf '%s\n' "$script"
else
  printf '%s\n' "$script" | sbatch
fi
