"""Trained models read back for scoring and prediction (`bipft evaluate`, `bipft predict`): the
checkpoint of a given head, a finetuned classifier from a checkpoint or a packed file, and the check
of a classifier against the record of the run that trained it.
"""
import dataclasses
import os
import sys
from typing import Callable

import jax

from bipft_jax import checkpointing, packed, packed_file
from bipft_jax import model as model_lib
from bipft_jax.errors import UserError
from bipft_jax.glue import predictions, splits, tasks


def _in_precision(model_config, precision: str):
  """The model computing in `precision` (config.precision), or in its own if that is empty."""
  return dataclasses.replace(model_config, precision=precision) if precision else model_config


@dataclasses.dataclass
class Classifier:
  """A finetuned classifier ready to predict, from a checkpoint or a packed file."""
  source: str             # the checkpoint folder or the packed file
  step: int | None        # the checkpoint's step; None for a packed file
  kernel: str | None      # a packed file's kernel; None for a checkpoint
  params: dict
  predict_step: Callable  # (params, batch) -> logits
  tokenizer: object


def load_classifier(config, task: tasks.Task, checkpoint: str, kernel: str | None = None) -> Classifier:
  """The classifier of `task` at `checkpoint` (a finetune workdir: its best/; a checkpoint folder; or a
  packed file, run on `kernel`), computing in config.precision (empty: its own), with the tokenizer
  config names (else the checkpoint's, else MiniLM's); UserError for a model of another shape."""
  fix = f"pass a `bipft finetune` workdir (or its best/) of {task.name}, or a packed file of one"
  if os.path.isfile(checkpoint):  # orbax checkpoints are folders
    run = packed_file.read_run_config(checkpoint)
    check_against_run(config, run, checkpoint)
    model_config, head, params = packed_file.load_packed(checkpoint, kernel or "auto")
    if head != "classification":
      raise UserError(f"{checkpoint} holds a packed {head}, not a classifier (an export of a pretraining run): "
                      f"{fix}")
    model_config = _in_precision(model_config, config.precision)
    logits = lambda p, batch: packed.forward(model_config, head, p, *(batch[k] for k in model_lib.MODEL_INPUTS))[
        "logits"]
    source, step, predict_step = checkpoint, None, packed.jit(logits)
    kernel, tokenizer_folder = packed.resolve_kernel(kernel or "auto"), splits.saved_tokenizer(
        os.path.dirname(os.path.abspath(checkpoint)), run)
  elif kernel:
    raise UserError(f"--kernel is for a packed file (`bipft export-packed`); {checkpoint} is not one")
  else:
    source, step, model_config = find_checkpoint(checkpoint, "classification", fix)
    run = checkpointing.read_run_config(source, step)
    check_against_run(config, run, source)
    model_config = _in_precision(model_config, config.precision)
    params = jax.device_get(checkpointing.restore_params(source, step)[2])  # one host copy, as finetune's
    predict_step = predictions.make_predict_step(model_lib.build(model_config, "classification"))
    tokenizer_folder = splits.saved_tokenizer(source, run)
  if model_config.num_labels != task.num_labels:
    raise UserError(f"{source} has {model_config.num_labels} outputs but {task.name} needs {task.num_labels}: "
                    "pass the checkpoint finetuned on this task")
  splits.check_inputs(config, task, model_config)
  tokenizer = splits.load_tokenizer(config, tokenizer_folder, model_config)
  return Classifier(source, step, kernel, params, predict_step, tokenizer)


# What turns a text into the model's inputs, beside the task: set otherwise than in the run that
# wrote the checkpoint, a text predicts otherwise than it did there.
INPUT_FIELDS = ("max_length", "data.tokenizer")


def reading_record(run: dict | None, tokenizer: str) -> dict | None:
  """What a packed file keeps of a run's config: the fields that say how the model reads text (those
  `check_against_run` reads, and a custom task's text fields), not its data or init paths and recipe;
  for another checkpoint (a conversion's) its `tokenizer` folder (`splits.saved_tokenizer`) alone; or None."""
  if not run or "task" not in run:
    return {"tokenizer": tokenizer} if tokenizer else None
  data = run.get("data", {})
  return {"task": run["task"], "max_length": run.get("max_length"),
          "data": {k: data.get(k) for k in ("labels", "text_fields")} | {"tokenizer": tokenizer}}


def take_recorded_labels(config, checkpoint: str) -> None:
  """A custom task given no data.labels takes the classes the classifier at `checkpoint` was finetuned with
  (its record), said on stderr: its outputs are those, and empty labels (regression) would be refused."""
  if config.task != "custom" or config.data.labels:
    return
  run = packed_file.read_run_config(checkpoint) if os.path.isfile(checkpoint) else \
      checkpointing.read_run_config(checkpoint)
  labels = ((run or {}).get("data") or {}).get("labels")
  if labels:
    config.data.labels = labels
    print(f"bipft: note: data.labels={labels} (the classes {checkpoint} was finetuned with)", file=sys.stderr)


def check_against_run(config, run: dict | None, source: str) -> None:
  """UserError if the classifier at `source` was finetuned on another task (or, a custom task, other
  labels) than config names; a note for each INPUT_FIELDS value other than the run's. `run`: the
  config recorded in the checkpoint (None, or a conversion's record: nothing to check)."""
  if not run or "task" not in run:
    return
  if run.get("task") != config.task:
    raise UserError(f"{source} was finetuned on {run.get('task')}, not {config.task}: pass "
                    f"configs/glue.py:task={run.get('task')}, or a checkpoint finetuned on {config.task}")
  labels = run.get("data", {}).get("labels")
  if config.task == "custom" and labels != config.data.labels:
    raise UserError(f"{source} was finetuned with data.labels={labels!r}, not {config.data.labels!r}: its outputs "
                    f"are those labels in that order; pass --config.data.labels={labels}")
  for field, ours, theirs in differing(config, run, INPUT_FIELDS):
    if field == "data.tokenizer" and (not ours or os.path.realpath(ours) == os.path.realpath(theirs)):
      continue  # the run's is read (splits.saved_tokenizer), or the same folder by another path
    print(f"bipft: note: {field} is {ours!r} here but was {theirs!r} in the run that wrote {source}; pass "
          f"--config.{field}={theirs} to read texts as it did", file=sys.stderr)


def differing(config, run: dict, fields) -> list:
  """(field, config's value, the run's) for each dotted field the run recorded otherwise."""
  found = []
  for field in fields:
    theirs, ours = run, config
    for key in field.split("."):
      theirs, ours = theirs.get(key) if isinstance(theirs, dict) else None, ours.get(key)
    if theirs is not None and theirs != ours:
      found.append((field, ours, theirs))
  return found


def find_checkpoint(path: str, head: str, fix: str) -> tuple:
  """(folder, step, BertConfig) of the checkpoint at `path` (a finetune workdir: its best/; a
  workdir: its latest step; or a step folder); UserError unless it has `head`."""
  manager, step, model_config, saved_head = checkpointing.read_model(path)
  manager.close()
  if saved_head != head:
    raise UserError(f"{manager.directory} holds a {saved_head} model, not a {head} one: {fix}")
  return str(manager.directory), step, model_config
