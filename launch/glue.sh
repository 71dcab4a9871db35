#!/usr/bin/env bash
# The paper's GLUE table from one pretrained student: `bipft finetune` on each GLUE task (the
# release's recipe per task, configs/glue.py), then `bipft glue-report` over the runs, with the
# leaderboard files collected. A task whose workdir already holds results.json is skipped, so the
# same command run again after a failure or a kill finishes the rest (a killed task resumes where
# its last checkpoint left it).
#
#   launch/glue.sh --init_from runs/pretrain --data glue_data --out runs/glue
#   launch/glue.sh --init_from runs/pretrain --data glue_data --out runs/glue5 --seeds 1,2,3,4,5
#   launch/glue.sh --out runs/glue_fp --tasks rte,mrpc,stsb -- \
#     --config.init.kind=teacher --config.init.path=teachers/bert-base-uncased --config.data.path=glue_data
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/glue.sh --out DIR [options] [-- FINETUNE_ARGS...]

Runs `bipft finetune --config configs/glue.py:task=TASK --workdir DIR/TASK ... FINETUNE_ARGS` for
each task, then writes `bipft glue-report` of the finished ones to DIR/report.md (and prints it)
and their leaderboard files to DIR/submission/ (AX.tsv comes with mnli).

Options:
  --out DIR         one workdir per task under DIR (required)
  --init_from CKPT  the pretrained student: a `bipft pretrain` workdir or `bipft convert` output
  --data DIR        the GLUE distribution folder (glue_data/ with CoLA/, SST-2/, ...); for TFDS pass
                    --config.data.format=tfds --config.data.path=DATA_DIR after --
  --tasks LIST      comma-separated (default cola,sst2,mrpc,stsb,qqp,mnli,qnli,rte,wnli)
  --seeds LIST      comma-separated finetuning seeds: each task runs once a seed, in DIR/TASK-seedN; the
                    report gives each task's mean and standard deviation over them, and the leaderboard
                    files are the best dev run's (default: one run a task, in DIR/TASK, configs/glue.py's seed)
  --dry-run         print the commands instead of running them
  -h, --help        this help

Options after -- that glue.sh sets for each run itself (--workdir, --config, and --config.seed with
--seeds, --init_from with --init_from, --config.data.path with --data) are refused.

Exit code: 0 when every task finished; a task that fails (say, a diverging run) does not stop the
others, and the script then exits 1 naming it. A SIGTERM (to the script or its process group), a
Ctrl-C or the terminal's hangup makes the running task save and stop, and the script exits with its
code (143, 130, 129).
USAGE
}

all_tasks=(cola sst2 mrpc stsb qqp mnli qnli rte wnli)
out="" init_from="" data="" task_list="" seed_list="" dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --init_from) init_from="$2"; shift 2 ;;
    --data) data="$2"; shift 2 ;;
    --tasks) task_list="$2"; shift 2 ;;
    --seeds) seed_list="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "glue.sh: error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [[ -z "$out" ]]; then echo "glue.sh: error: give --out DIR, where the task workdirs go" >&2; exit 2; fi
tasks=("${all_tasks[@]}")
if [[ -n "$task_list" ]]; then IFS=, read -r -a tasks <<< "$task_list"; fi
for task in "${tasks[@]}"; do
  known=0
  for name in "${all_tasks[@]}"; do if [[ "$name" == "$task" ]]; then known=1; fi; done
  if [[ $known -eq 0 ]]; then
    echo "glue.sh: error: unknown GLUE task '$task'; choose from ${all_tasks[*]}" >&2
    exit 2
  fi
done

seeds=("")  # "": configs/glue.py's seed, in DIR/TASK
if [[ -n "$seed_list" ]]; then IFS=, read -r -a seeds <<< "$seed_list"; fi
for seed in "${seeds[@]}"; do
  if [[ -n "$seed_list" && ! "$seed" =~ ^[0-9]+$ ]]; then
    echo "glue.sh: error: --seeds takes comma-separated integers >= 0, got '$seed_list'" >&2
    exit 2
  fi
done

# The finetune options after -- go to every run as given: one that would replace what this script
# sets for each run is refused (a --config.seed there gave every --seeds run the same seed, and the
# report then took their spread for a spread over seeds).
for option in "$@"; do
  name="${option%%=*}" set_by=""
  case "$name" in
    --workdir|--config) set_by="--out and --tasks" ;;
    --config.seed) [[ -n "$seed_list" ]] && set_by="--seeds" ;;
    --init_from|--config.init.path|--config.init.kind) [[ -n "$init_from" ]] && set_by="--init_from" ;;
    --config.data.path) [[ -n "$data" ]] && set_by="--data" ;;
  esac
  if [[ -n "$set_by" ]]; then
    echo "glue.sh: error: $name after -- would override what glue.sh sets for each run from $set_by: give it there" >&2
    exit 2
  fi
done

config="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/configs/glue.py"

# The running task gets the signals that stop this script, to save and stop: a SIGTERM to the script
# alone (`kill PID`) is passed on to it; a Ctrl-C reaches it from the terminal, which signals both
# (its SIGINT is restored: bash starts a background command with SIGINT ignored), as does a terminal's
# hangup (SIGHUP), which is not passed on: a second one would end the task at once. The script then
# waits for the task's save and exits with its code. A signal is also remembered (`stop`), so that one
# arriving while no task holds it (between two tasks, or as a task starts) still stops the script.
child=0 stop=0 forwarded=0
trap 'stop=143; if [[ $child -ne 0 && $forwarded -eq 0 ]]; then forwarded=1; kill -TERM "$child" 2>/dev/null || true; fi' TERM
trap 'stop=130' INT
trap 'stop=129' HUP
run() {
  if [[ $dry_run -eq 1 ]]; then printf '%q ' "$@"; printf '\n'; return 0; fi
  env --default-signal=INT "$@" &
  child=$! forwarded=0
  if [[ $stop -eq 143 && $forwarded -eq 0 ]]; then forwarded=1; kill -TERM "$child" 2>/dev/null || true; fi
  local status=0 again=0
  while kill -0 "$child" 2>/dev/null; do  # a trapped signal ends a wait before the task does
    wait "$child" && status=0 || status=$?
  done
  # Once more: bash usually keeps a finished background command's status (the last wait above may
  # have been cut short by a trapped signal), but not always: a task reaped while a trap ran can
  # report a bogus -1 or 127, and then the last wait's code stands.
  wait "$child" 2>/dev/null || again=$?
  if [[ $again -ge 0 && $again -le 255 && $again -ne 127 ]]; then status=$again; fi
  child=0
  return "$status"
}

stop_if_asked() {
  if [[ $stop -ne 0 ]]; then
    echo "glue.sh: stopped $1; run the same command again to resume" >&2
    exit "$stop"
  fi
}

failed=() finished=()
for task in "${tasks[@]}"; do
  for seed in "${seeds[@]}"; do
    run_name="$task${seed:+-seed$seed}"
    workdir="$out/$run_name"
    if [[ -f "$workdir/results.json" ]]; then
      echo "glue.sh: $run_name already finished ($workdir/results.json): skipped" >&2
      finished+=("$workdir")
      continue
    fi
    command=(bipft finetune --config "$config:task=$task" --workdir "$workdir")
    if [[ -n "$init_from" ]]; then command+=(--init_from "$init_from"); fi
    if [[ -n "$data" ]]; then command+=("--config.data.path=$data"); fi
    if [[ -n "$seed" ]]; then command+=("--config.seed=$seed"); fi
    stop_if_asked "before $run_name"
    status=0
    run "${command[@]}" "$@" || status=$?
    if [[ $status -eq 129 || $status -eq 130 || $status -eq 143 ]]; then
      echo "glue.sh: stopped during $run_name; run the same command again to resume" >&2
      exit "$status"
    elif [[ $status -ne 0 ]]; then
      failed+=("$run_name")
    else
      finished+=("$workdir")
    fi
  done
done
stop_if_asked "before the report"

if [[ ${#finished[@]} -gt 0 ]]; then
  report=(bipft glue-report --workdirs "${finished[@]}" --submission_dir "$out/submission" --overwrite)
  if [[ $dry_run -eq 1 ]]; then
    run "${report[@]}"
  else
    status=0
    run "${report[@]}" > "$out/report.md.tmp" || status=$?
    if [[ $status -ne 0 ]]; then rm -f "$out/report.md.tmp"; exit "$status"; fi
    mv "$out/report.md.tmp" "$out/report.md"
    cat "$out/report.md"
  fi
fi
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "glue.sh: ${failed[*]} did not finish (their errors above); run the same command again to retry them" >&2
  exit 1
fi
