#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per GPU, JAX reads the SLURM environment
# (SLURM_NTASKS, SLURM_PROCID, the node list) to find its coordinator (BIPFT_DISTRIBUTED=1).
#
#   launch/gpu_slurm.sh --nodes 4 --gpus-per-node 8 --partition gpu --requeue \
#     --workdir /shared/runs/bipft-base -- pretrain --config configs/pretrain.py:base
#
# Submits an sbatch job (or, with --dry-run, prints the batch script it would submit). Before the
# time limit the job asks the run to stop (SIGTERM: it saves its step and exits 143); with --requeue
# it then requeues itself, and the same command resumes from that step, until training ends.
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
  --stop-before SECONDS  SIGTERM the run this long before the time limit, so that it saves its step
                         and stops (default 300; 0: only SLURM's own SIGTERM at the limit, KillWait
                         seconds, 30 by default, before the SIGKILL: too short for a large save)
  --requeue              when the run stopped for the time limit, requeue the job (scontrol requeue):
                         it resumes from the saved step; a run that ends, fails or is scancel-ed is not
  --dry-run              print the batch script instead of submitting it
  -h, --help             this help
Everything after -- is the bipft command; --workdir is appended to it.
USAGE
}

nodes=1 gpus=8 partition="" time_limit="48:00:00" job_name="bipft" venv=".venv" workdir="" dry_run=0
stop_before=300 requeue=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes="$2"; shift 2 ;;
    --gpus-per-node) gpus="$2"; shift 2 ;;
    --partition) partition="$2"; shift 2 ;;
    --time) time_limit="$2"; shift 2 ;;
    --job-name) job_name="$2"; shift 2 ;;
    --venv) venv="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --stop-before) stop_before="$2"; shift 2 ;;
    --requeue) requeue=1; shift ;;
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
if [[ ! "$stop_before" =~ ^[0-9]+$ ]]; then
  echo "gpu_slurm.sh: error: --stop-before takes seconds >= 0, got $stop_before" >&2
  exit 2
fi
if [[ $requeue -eq 1 && $stop_before -eq 0 ]]; then
  echo "gpu_slurm.sh: error: --requeue needs --stop-before > 0 (the signal that tells a time limit from a scancel)" >&2
  exit 2
fi

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
sbatch_lines=("#SBATCH --job-name=$job_name" "#SBATCH --nodes=$nodes" "#SBATCH --ntasks-per-node=$gpus"
              "#SBATCH --gpus-per-node=$gpus" "#SBATCH --time=$time_limit")
[[ -n "$partition" ]] && sbatch_lines+=("#SBATCH --partition=$partition")
# SIGUSR1 to the batch shell alone (B:) before the limit; the shell passes a SIGTERM to the run.
[[ $stop_before -gt 0 ]] && sbatch_lines+=("#SBATCH --signal=B:USR1@$stop_before")
[[ $requeue -eq 1 ]] && sbatch_lines+=("#SBATCH --requeue" "#SBATCH --open-mode=append")
command="srun --kill-on-bad-exit=1 bipft $(printf '%q ' "$@")--workdir $(printf '%q' "$workdir")"
if [[ $stop_before -eq 0 ]]; then
  run_lines="$command"
else
  # srun runs in the background so that the shell's trap runs when the signal comes (a trapped signal
  # ends `wait` early: wait again until srun has ended, then once more for its exit code, which bash
  # keeps, unless srun was reaped while the trap ran: a bogus -1 or 127, and the last wait's code
  # stands; launch/glue.sh does the same); srun passes the SIGTERM on to every task.
  run_lines=$(cat <<RUN
srun_pid="" time_limit=0
stop_for_time_limit() {
  time_limit=1
  echo "gpu_slurm.sh: the time limit is $stop_before s away: SIGTERM to the run, which saves its step and stops" >&2
  if [[ -n "\$srun_pid" ]]; then kill -TERM "\$srun_pid" 2>/dev/null || true; fi
}
trap stop_for_time_limit USR1
$command &
srun_pid=\$!
code=0 again=0
while kill -0 "\$srun_pid" 2>/dev/null; do
  wait "\$srun_pid" && code=0 || code=\$?
done
wait "\$srun_pid" 2>/dev/null || again=\$?
if [[ \$again -ge 0 && \$again -le 255 && \$again -ne 127 ]]; then code=\$again; fi
RUN
)
  if [[ $requeue -eq 1 ]]; then
    run_lines+=$(cat <<RUN

if [[ \$time_limit -eq 1 && \$code -eq 143 ]]; then
  echo "gpu_slurm.sh: the run saved and stopped for the time limit: requeueing job \$SLURM_JOB_ID to resume it" >&2
  scontrol requeue "\$SLURM_JOB_ID"
fi
RUN
)
  fi
  run_lines+=$'\nexit "$code"'
fi
script=$(cat <<SBATCH
#!/usr/bin/env bash
$(printf '%s\n' "${sbatch_lines[@]}")
set -euo pipefail
cd $(printf '%q' "$repo_root")
. $(printf '%q' "$venv")/bin/activate
export BIPFT_DISTRIBUTED=1
$run_lines
SBATCH
)
if [[ $dry_run -eq 1 ]]; then
  printf '%s\n' "$script"
else
  printf '%s\n' "$script" | sbatch
fi
