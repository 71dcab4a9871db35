"""`bipft glue-report`: a markdown table of finetuning runs, and the GLUE leaderboard files.

  bipft glue-report --workdirs runs/cola runs/sst2 runs/mrpc ... [--submission_dir submission/]
  bipft glue-report --workdirs workdirs/study

Each finetuning workdir holds `results.json` (the reported dev numbers) and `submission/` (its
test predictions, already in the leaderboard's format: `index<TAB>prediction` with the label
strings GLUE expects). The report groups runs by their `model` name, one table row per model,
with two GLUE averages: the 8 tasks with MNLI-m only (as METHOD.md's table), and all 9 numbers
including MNLI-mm. WNLI is shown but, as in the paper's table, in neither average. Runs of other
tasks (rt_demo, custom) get a table of their own and have no leaderboard files. A `bipft study`
workdir prints the study's tables (study_results.py).
"""
import json
import os
import shutil
import sys

import numpy as np

from bipft_jax import checkpointing, files, study_results
from bipft_jax.errors import UserError
from bipft_jax.glue.predictions import SUBMISSION_FILES

# Table columns: (header, task, dev split). The score is the task's first metric.
COLUMNS = (("MNLI-m", "mnli", "dev_matched"), ("MNLI-mm", "mnli", "dev_mismatched"), ("QQP", "qqp", "dev"),
           ("QNLI", "qnli", "dev"), ("SST-2", "sst2", "dev"), ("CoLA", "cola", "dev"), ("STS-B", "stsb", "dev"),
           ("MRPC", "mrpc", "dev"), ("RTE", "rte", "dev"), ("WNLI", "wnli", "dev"))
GLUE_TASKS = frozenset(task for _, task, _ in COLUMNS)
AVERAGE_8 = ("MNLI-m", "QQP", "QNLI", "SST-2", "CoLA", "STS-B", "MRPC", "RTE")
AVERAGE_9 = AVERAGE_8 + ("MNLI-mm",)


def add_arguments(parser) -> None:
  parser.add_argument("--workdirs", nargs="+", required=True,
                      help="finetuning workdirs (bipft finetune), or a study's (bipft study: its tables)")
  parser.add_argument("--submission_dir", default=None,
                      help="collect the runs' leaderboard files (CoLA.tsv, ..., AX.tsv) into this folder")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace leaderboard files already in --submission_dir")


def run(args) -> int:
  if args.submission_dir:
    files.check_writable_dir(args.submission_dir, "--submission_dir")
  studies = [w for w in args.workdirs if study_results.is_study(w)]
  for workdir in studies:
    print(f"study {workdir}:\n\n{study_results.read(workdir)}")
  workdirs = list({os.path.realpath(w): w for w in args.workdirs if w not in studies}.values())  # each once
  runs = {w: read_results(w) for w in workdirs}
  glue_runs = {w: r for w, r in runs.items() if r["task"] in GLUE_TASKS}  # the only ones with leaderboard files
  models = sorted({r["model"] for r in glue_runs.values()})
  if args.submission_dir and len(models) > 1:
    raise UserError(f"--submission_dir takes the runs of one model, these are of {len(models)} ({', '.join(models)}): "
                    "pass one model's workdirs (or name the runs alike with --config.name)")
  for line in _shared_seeds(runs):
    print(f"bipft glue-report: warning: {line}", file=sys.stderr)
  if runs:
    print(markdown_table(list(runs.values())))
  if args.submission_dir:
    others = sorted({r["task"] for r in runs.values()} - GLUE_TASKS)
    if others:
      print(f"bipft: {', '.join(others)} runs have no GLUE leaderboard files (their test predictions stay in "
            "WORKDIR/submission/)", file=sys.stderr)
    if glue_runs:
      written = collect_submission(glue_runs, args.submission_dir, args.overwrite)
      missing = sorted(set(SUBMISSION_FILES.values()) - set(written))
      print(f"\nwrote {len(written)} leaderboard files to {args.submission_dir}"
            + (f"; missing: {', '.join(missing)}" if missing else ""))
  return 0


def read_results(workdir: str) -> dict:
  """results.json of a finetuning workdir; UserError unless it holds the task, the model name and,
  per dev split, numeric scores including the task's first metric."""
  path = os.path.join(workdir, "results.json")
  if not os.path.isfile(path):
    raise UserError(f"{workdir} has no results.json: is it a finished `bipft finetune` workdir?")
  try:
    with open(path) as f:
      results = json.load(f)
    task, dev, model = results["task"], results["dev"], results["model"]
  except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
    raise UserError(f"{path} is not a finetuning results file ({type(e).__name__}: {e})") from None
  problem = _results_problem(task, dev, model, results.get("dev_majority_rate", 0.0))
  if problem:
    raise UserError(f"{path} is not a finetuning results file: {problem}")
  if task == "custom":
    results["train_file"] = _train_file(workdir)
  return results


def _train_file(workdir: str) -> str:
  """A custom run's data.train_file ("" if not recorded), from its best/ checkpoint's record of the run:
  what tells runs of different custom tasks apart, which results.json does not."""
  best = os.path.join(workdir, "best")
  run = checkpointing.read_run_config(best) if os.path.isdir(best) else None
  return ((run or {}).get("data") or {}).get("train_file", "")


def _results_problem(task, dev, model, majority_rate) -> str:
  """What is wrong with the fields of a results.json ("" if nothing)."""
  from bipft_jax.glue import tasks
  is_score = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
  if not (isinstance(task, str) and isinstance(model, str)):
    return "task and model must be strings"
  if not isinstance(dev, dict) or not dev or not all(isinstance(scores, dict) for scores in dev.values()):
    return "dev must map each dev split to its scores"
  metric = tasks.TASKS[task].metrics[0] if task in tasks.TASKS else None
  if metric and any(metric not in scores for scores in dev.values()):
    return f"a dev split has no {metric} score"
  if not all(is_score(v) for scores in dev.values() for v in scores.values()) or not is_score(majority_rate):
    return "scores must be numbers"
  return ""


def _shared_seeds(runs: dict) -> list:
  """A line for each seed that several runs of one model and task share (a `--config.seed` given to
  every run of `launch/glue.sh --seeds`, say): the table averages them as if they were seeds."""
  groups = {}
  for workdir, results in runs.items():
    if results.get("seed") is not None:
      key = results["model"], results["task"], results.get("train_file", ""), results["seed"]
      groups.setdefault(key, []).append(workdir)
  return [f"{', '.join(workdirs)} are runs of {model} on {task} with the same seed, {seed}: the table's mean ± "
          "standard deviation over them is not a spread over seeds" for (model, task, _, seed), workdirs in
          groups.items() if len(workdirs) > 1]


def _cells(results: dict) -> list:
  """[(column header, score)] of a run's table cells (its task's first metric on each of its dev
  splits that has a column; none for a task outside GLUE)."""
  from bipft_jax.glue import tasks
  if results["task"] not in GLUE_TASKS:
    return []
  metric = tasks.get_task(results["task"]).metrics[0]
  return [(header, results["dev"][split][metric]) for header, task, split in COLUMNS
          if task == results["task"] and split in results["dev"]]


def _scores(runs: list) -> dict:
  """model -> {column header: [the score of each run]} (several runs of a model and task: seeds)."""
  table = {}
  for results in runs:
    for header, score in _cells(results):
      table.setdefault(results["model"], {}).setdefault(header, []).append(score)
  return table


def _cell(scores: list) -> str:
  if len(scores) == 1:
    return f"{scores[0]:.1f}"
  return f"{np.mean(scores):.1f} ± {np.std(scores, ddof=1):.1f} ({len(scores)})"


def _average(row: dict, headers) -> str:
  missing = [h for h in headers if h not in row]
  if missing:
    return f"n/a (missing {', '.join(missing)})" if len(missing) < len(headers) else "n/a"
  return f"{np.mean([np.mean(row[h]) for h in headers]):.1f}"


def markdown_table(runs: list) -> str:
  """One row per model; each cell the task's first metric (MRPC/QQP accuracy, STS-B mean of
  Pearson and Spearman, CoLA Matthews corr.) on dev, in percent; several runs of a model and task
  (seeds) are their mean ± standard deviation. Runs of other tasks (rt_demo, custom: named by its
  training file) follow in a second table, one row per model and task, with the majority-class rate."""
  sections = []
  table = _scores(runs)
  if table:
    headers = [c[0] for c in COLUMNS]
    lines = ["| model | " + " | ".join(headers) + " | avg (8, MNLI-m) | avg (9, +MNLI-mm) |",
             "|---" * (len(headers) + 3) + "|"]
    for model, row in table.items():
      cells = [_cell(row[h]) if h in row else "-" for h in headers]
      lines.append(f"| {model} | " + " | ".join(cells) + f" | {_average(row, AVERAGE_8)} | {_average(row, AVERAGE_9)} |")
    sections.append("\n".join(lines))
  others = {}
  for r in runs:
    if r["task"] not in GLUE_TASKS:
      task = f"custom ({r['train_file']})" if r.get("train_file") else r["task"]
      others.setdefault((r["model"], task), []).append(r)
  if others:
    lines = ["| model | task | dev | majority class |", "|---|---|---|---|"]
    for (model, task), group in others.items():
      scores = {}
      for r in group:
        for split, d in r["dev"].items():
          for metric, v in d.items():
            scores.setdefault((split, metric), []).append(v)
      rates = [r["dev_majority_rate"] for r in group if "dev_majority_rate" in r]
      majority = f"{np.mean(rates):.1f}" if rates else "-"
      dev = ", ".join(f"{metric} {_cell(v)}" for (_, metric), v in scores.items())
      lines.append(f"| {model} | {task} | {dev} | {majority} |")
    sections.append("\n".join(lines))
  several = [scores for row in table.values() for scores in row.values()] + list(others.values())
  if any(len(runs) > 1 for runs in several):
    sections.append("A cell of several runs of its model and task (seeds) is their mean ± standard deviation "
                    "(the number of runs); the averages are over the means.")
  return "\n\n".join(sections)


def collect_submission(runs: dict, directory: str, overwrite: bool = False) -> list:
  """Copies the leaderboard files of `runs` ({workdir: results}, one model's GLUE tasks) into `directory`, each
  from the run of its task with the best dev score (the table's) when there are several (seeds);
  returns the file names written. Files already there are replaced only with `overwrite` (else
  UserError before anything is copied)."""
  by_task = {}
  for workdir, results in runs.items():
    source = os.path.join(workdir, "submission")
    if not os.path.isdir(source):
      print(f"bipft: {workdir} has no test predictions (submission/)", file=sys.stderr)
      continue
    by_task.setdefault(results["task"], []).append((workdir, results))
  copies = []
  for task, candidates in by_task.items():
    chosen = max((_cells(results)[0][1], workdir) for workdir, results in candidates)[1]
    if len(candidates) > 1:
      print(f"bipft: {task}'s leaderboard files come from {chosen}, the best dev score of its {len(candidates)} runs",
            file=sys.stderr)
    source = os.path.join(chosen, "submission")
    copies += [(os.path.join(source, name), name) for name in sorted(os.listdir(source))
               if name in SUBMISSION_FILES.values()]
  existing = sorted({name for _, name in copies if os.path.exists(os.path.join(directory, name))})
  if existing and not overwrite:
    raise UserError(f"{directory} already holds {', '.join(existing)}; pass --overwrite to replace them")
  os.makedirs(directory, exist_ok=True)
  for source, name in copies:
    with files.atomic_path(os.path.join(directory, name)) as tmp:
      shutil.copyfile(source, tmp)
  return [name for _, name in copies]
