"""Finetuning's parts (METHOD.md section 7): the starting model, the task's batches, the task loss
and downstream distillation, the GLUE evaluator with best-epoch selection, and the run's outputs
(best/, submission/, results.json). `bipft finetune` hands them to the run engine (engine.py).
"""
import dataclasses
import os
import shutil
import sys
import time
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from bipft_jax import checkpointing, distributed, engine, files, losses, optim, pytorch_io, sharding
from bipft_jax import model as model_lib
from bipft_jax import model_params
from bipft_jax.errors import UserError
from bipft_jax.glue import metrics as metrics_lib
from bipft_jax.glue import predictions, splits, tasks

BEST = "best"
PRETRAINING_HEADS = "cls."  # torch names of the MLM and NSP heads (BertForPreTraining)


# --- the starting model ---------------------------------------------------------

@dataclasses.dataclass
class Start:
  """What a finetuning run starts from: the model (with the task's head) and the parameters merged
  into it (`model_params.merge_params`; `complete`: the subtrees they must fill whole)."""
  model_config: model_lib.BertConfig
  source: dict
  complete: tuple
  folder: str          # its tokenizer's folder, if it has one ("": MiniLM's)
  description: str


# The model section's fields that a teacher start binarized (init.binary=True) takes.
BINARIZED_TEACHER_FIELDS = ("estimator_rank", "weight_binarizer", "activation_binarizer", "linear_binarizer",
                            "attention_prob_binarizer", "mlm_transform_act", "matmul_precision")


def check_init(config) -> None:
  """Fails fast, before any data is read, on a config without a valid starting point."""
  if config.init.kind not in ("checkpoint", "teacher", "scratch"):
    raise UserError(f"unknown init.kind {config.init.kind!r}; use checkpoint, teacher or scratch")
  if config.init.kind == "checkpoint" and not config.init.path:
    raise UserError("no starting point: pass --init_from CHECKPOINT, or --config.init.kind=teacher "
                    "(the FP baseline) or scratch")


def check_model_overrides(config, overrides) -> None:
  """A `--config.model.FIELD` override that the run's start ignores is an error, not a silent no-op:
  a checkpoint brings its own model, a teacher its architecture (binarized, it takes the
  BINARIZED_TEACHER_FIELDS); the model section is scratch's."""
  kind = config.init.kind
  for item in overrides:
    key = item.partition("=")[0]
    field = key[len("model."):] if key.startswith("model.") else None
    if field is None or kind == "scratch" or (kind == "teacher" and config.init.binary
                                             and field in BINARIZED_TEACHER_FIELDS):
      continue
    brings = ("the checkpoint brings its own model" if kind == "checkpoint" else
              "the teacher brings its own architecture (binarized with init.binary=True, it takes "
              f"{', '.join(BINARIZED_TEACHER_FIELDS)})")
    raise UserError(f"--config.model.{field} has no effect with init.kind={kind}: {brings}; a run sets "
                    "its own dropout, pooling, precision and remat")


def _model_config(values: dict) -> model_lib.BertConfig:
  try:
    return model_lib.BertConfig.from_dict(values)
  except (TypeError, ValueError) as e:
    raise UserError(f"bad config.model: {e}") from None


def initial_model(config, task: tasks.Task) -> Start:
  """A pretrained checkpoint (its `bert` kept, a fresh classifier), a PyTorch teacher folder (the FP
  baseline, or binarized with init.binary=True) or random weights (config.init.kind)."""
  overrides = dict(num_labels=task.num_labels, pooling=config.pooling, hidden_dropout=config.dropout,
                   attention_dropout=config.dropout, classifier_dropout=config.dropout, remat=config.remat)
  if config.precision:
    overrides["precision"] = config.precision
  check_init(config)
  kind, path = config.init.kind, config.init.path
  if kind == "checkpoint":
    step = None if config.init.step < 0 else config.init.step
    saved_config, head, saved = checkpointing.restore_params(path, step)
    source = jax.device_get(saved)  # host copies: the engine places them
    bert = source if head == "encoder" else source.get("bert", source)
    # The pretraining's tokenizer: MiniLM's was taken for any checkpoint without one beside its steps.
    folder = splits.saved_tokenizer(path, checkpointing.read_run_config(path, step))
    return Start(dataclasses.replace(saved_config, **overrides), bert, ("bert",), folder, f"checkpoint {path}")
  if kind == "teacher":
    from bipft_jax import assets
    # A BertForPreTraining folder (bert-base-uncased's) also holds the MLM/NSP heads: not a classifier's.
    fp_config, teacher = pytorch_io.load_pretrained(path or str(assets.minilm_dir()), "classification",
                                                    allow_missing=("classifier",), drop=(PRETRAINING_HEADS,),
                                                    **overrides)
    name = path or "all-MiniLM-L6-v2"
    if not config.init.binary:
      return Start(fp_config, teacher, (), path, f"FP teacher {name}")
    binary_fields = {k: config.model[k] for k in BINARIZED_TEACHER_FIELDS}
    model_config = _model_config({**dataclasses.asdict(fp_config), "binary": True, **binary_fields})
    return Start(model_config, teacher, (), path, f"binarized teacher {name}")
  return Start(_model_config({**config.model.to_dict(), **overrides}), {}, (), "", "scratch")


def load_task_teacher(path: str, task: tasks.Task) -> tuple:
  """(config, params) of a finetuned classifier to distil from: a `bipft finetune` workdir (its best/),
  an orbax checkpoint, or a Hugging Face classifier folder (config.json + weights)."""
  if os.path.isfile(os.path.join(path, "config.json")):
    teacher_config, params = pytorch_io.load_pretrained(path, "classification")
  else:
    teacher_config, head, params = checkpointing.restore_params(path)  # a finetune workdir: its best/
    if head != "classification":
      raise UserError(f"distill.teacher {path} holds a {head} model: pass a finetuned classifier")
    params = jax.device_get(params)
  if teacher_config.num_labels != task.num_labels:
    raise UserError(f"distill.teacher {path} has {teacher_config.num_labels} outputs but {task.name} needs "
                    f"{task.num_labels}")
  return dataclasses.replace(teacher_config, hidden_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0), params


# --- the loss -------------------------------------------------------------------

def make_loss_fn(module, regression: bool, teacher=None, distill=None):
  """loss_fn(params, teacher_params, batch, key) -> (loss, metrics) for the engine's step: the task
  loss, or with a `teacher` module `distill.label_weight` times it plus `losses.task_distillation`."""
  def loss_fn(params, teacher_params, batch, key):
    inputs = [batch[k] for k in model_lib.MODEL_INPUTS]
    out = module.apply({"params": params}, *inputs, deterministic=False, rngs={"dropout": key})
    label_loss = losses.task_loss(out["logits"], batch["labels"], batch["weights"], regression)
    if teacher is None:
      return label_loss, {"loss": label_loss}
    teacher_out = teacher.apply({"params": teacher_params}, *inputs, deterministic=True)
    distilled, terms = losses.task_distillation(
        out, teacher_out, batch["weights"], temperature=distill.temperature, logit_weight=distill.logit_weight,
        hidden_weight=distill.hidden_weight, attention_weight=distill.attention_weight)
    loss = distill.label_weight * label_loss + distilled
    return loss, {"loss": loss, "label_loss": label_loss, **terms}
  return loss_fn


# --- evaluation -----------------------------------------------------------------

def selection_split(task: tasks.Task) -> str:
  """The dev split the best epoch is chosen on: the task's first."""
  return (task.dev_splits or ("dev",))[0]


def select_results(task: tasks.Task, history: list) -> dict:
  """The reported dev numbers: each dev split at the best epoch (by the task's first metric on the
  first dev split), except MNLI-mm, reported from the last epoch as the release does."""
  selection, metric = selection_split(task), task.metrics[0]
  best = max(history, key=lambda r: (r["dev"][selection][metric], -r["epoch"]))
  reported = dict(best["dev"])
  if "dev_mismatched" in reported:
    reported["dev_mismatched"] = history[-1]["dev"]["dev_mismatched"]
  return {"best_epoch": best["epoch"], "epochs": len(history), "dev": reported}


def describe(step: int, record: dict) -> str:
  return f"epoch {record['epoch']} (step {step}): " + ", ".join(
      f"{n} {m} {v:.2f}" for n, d in record["dev"].items() for m, v in d.items())


# --- the job --------------------------------------------------------------------

class Finetuning:
  """One finetuning run's parts for the engine (`self.job`), its epoch history and its outputs."""

  def __init__(self, config, task: tasks.Task, mesh, rules, staging: str):
    self.config, self.task, self.staging, self.started = config, task, staging, time.time()
    self.train, devs, self.tests = read_data(config, task)
    self.start = initial_model(config, task)
    folder = splits.tokenizer_folder(config, self.start.folder)
    self.tokenizer = splits.load_tokenizer(config, self.start.folder, self.start.model_config)
    # Recorded in the run's checkpoints, where evaluate, predict and convert find it ("": MiniLM's).
    config.data.tokenizer = os.path.abspath(folder) if folder else ""
    splits.check_inputs(config, task, self.start.model_config)
    self.train_data = self._encode(self.train)
    self.dev_data = {name: self._encode(split) for name, split in devs.items()}
    self.buckets = tasks.length_buckets(config.max_length, config.min_bucket)
    self.steps_per_epoch = len(self._plan(1))
    if config.steps_per_epoch > 0:
      self.steps_per_epoch = min(self.steps_per_epoch, config.steps_per_epoch)
    config.optimizer.total_steps = self.steps_per_epoch * config.epochs
    for name in ("batch_size", "eval_batch_size"):
      engine.check_batch_size(name, config[name], sharding.batch_divisor(mesh, rules))
    self.module = model_lib.build(self.start.model_config, "classification")
    self.history = []
    teacher_module, teacher_params = self._teacher()
    self.params_shardings = engine.param_shardings(self.module, mesh, rules)
    self.predict_step = predictions.sharded_predict_step(self.module, mesh, rules, self.params_shardings)
    self.job = engine.Job(
        name="finetune", module=self.module, model_config=self.start.model_config, head="classification",
        tx=optim.make_optimizer(config.optimizer, model_params.param_kinds(self.module)),
        schedule=optim.learning_rate_schedule(config.optimizer),
        loss_fn=make_loss_fn(self.module, task.is_regression, teacher_module, config.distill), loss_key="loss",
        batches=self._batches, source=lambda: self.start.source, evaluate=self._evaluate,
        run_config=config.to_dict(), frozen=teacher_params, frozen_module=teacher_module,
        merge_complete=self.start.complete, after_evaluation=self._keep_best,
        checkpoint_state=lambda _: {"history": self.history}, describe=describe, largest_batch=self._longest_batch,
        finished=self._stopped_early)
    self.schedule = engine.Schedule(
        total_steps=config.optimizer.total_steps, log_every=config.log_every, eval_every=self.steps_per_epoch,
        checkpoint_every=config.checkpoint_every if config.checkpoint_every > 0 else self.steps_per_epoch,
        keep_checkpoints=2, evaluate_at_start=False, profile_first_step=config.profile.first_step,
        profile_steps=config.profile.steps)

  def _encode(self, split: tasks.Split) -> tasks.Encoded:
    return tasks.encode(self.tokenizer, split, self.config.max_length)

  def _plan(self, epoch: int) -> list:
    return tasks.batch_plan(self.train_data, self.config.batch_size, self.buckets,
                            shuffle_seed=self.config.seed + epoch)

  def _teacher(self) -> tuple:
    if not self.config.distill.teacher:
      return None, None
    teacher_config, params = load_task_teacher(self.config.distill.teacher, self.task)
    return model_lib.build(teacher_config, "classification"), params

  def _batches(self, step: int, data_state: Optional[dict]):
    """The training batches from `step` on (each epoch's shuffled plan, cut to steps_per_epoch); the
    position is the step itself, the saved state the evaluations so far."""
    if data_state is not None:
      self.history = list(data_state["history"])

    def from_step():
      epoch, plan = None, None
      for s in range(step, self.schedule.total_steps):
        if epoch != s // self.steps_per_epoch + 1:
          epoch = s // self.steps_per_epoch + 1
          plan = self._plan(epoch)
        chosen = plan[s % self.steps_per_epoch]
        batch = tasks.make_batch(self.train_data, chosen, self.config.batch_size, self.buckets)
        yield engine.host_rows(predictions.model_batch(batch)), None
    return from_step()

  def _longest_batch(self) -> dict:
    """This host's rows of the run's batch of the longest bucket (the step compiled for it, ahead,
    is the one its batches then run)."""
    epochs = range(1, self.config.epochs + 1)
    batches = (chosen for epoch in epochs for chosen in self._plan(epoch)[:self.steps_per_epoch])
    longest = max(batches, key=lambda chosen: int(self.train_data.lengths[chosen].max()))
    return engine.host_rows(predictions.model_batch(
        tasks.make_batch(self.train_data, longest, self.config.batch_size, self.buckets)))

  def predict(self, params, data: tasks.Encoded) -> np.ndarray:
    return predictions.predict(self.predict_step, params, data, self.config.eval_batch_size, self.buckets,
                               self.task.is_regression)

  def _evaluate(self, params, frozen) -> dict:
    """The dev scores (`frozen`, a task-distillation teacher, plays no part)."""
    dev = {name: metrics_lib.compute(self.task.metrics, data.labels, self.predict(params, data))
           for name, data in self.dev_data.items()}
    return {"epoch": len(self.history) + 1, "dev": dev}

  def _keep_best(self, step: int, params, record: dict) -> None:
    """Appends the epoch's record; a new best epoch's parameters go to `best.EPOCH` in the staging
    folder (the previous best's removed), before the epoch's checkpoint names it."""
    self.history.append({**record, "step": step})
    best = select_results(self.task, self.history)["best_epoch"]
    if best == record["epoch"]:
      checkpointing.save_params(os.path.join(self.staging, f"{BEST}.{best}"), params, self.start.model_config,
                                "classification", step=best, run_config=self.config.to_dict())
      self._remove_best(keep=best)
    if self._stopped_early():
      improved, delta = self._last_improvement(), self.config.early_stop_min_delta
      by = f" by more than {delta:g}" if delta else ""
      settings = f"early_stop_patience={self.config.early_stop_patience}" + (
          f", early_stop_min_delta={delta:g}" if delta else "")
      distributed.log(f"bipft finetune: stopping after epoch {record['epoch']} of {self.config.epochs}: no better "
                      f"dev {self.task.metrics[0]}{by} than epoch {improved}'s in the {record['epoch'] - improved} "
                      f"epochs since ({settings})")

  def _last_improvement(self) -> int:
    """The last epoch whose dev score beat every earlier epoch's by more than `early_stop_min_delta`
    (the first epoch counts): what early stopping waits on. With 0, the best epoch."""
    selection, metric = selection_split(self.task), self.task.metrics[0]
    improved, reference = 1, self.history[0]["dev"][selection][metric]
    for record in self.history[1:]:
      if record["dev"][selection][metric] > reference + self.config.early_stop_min_delta:
        improved, reference = record["epoch"], record["dev"][selection][metric]
    return improved

  def _stopped_early(self) -> bool:
    """Whether `early_stop_patience` epochs in a row have not bettered the dev score (`_last_improvement`)."""
    patience = self.config.early_stop_patience
    return bool(patience and self.history and len(self.history) < self.config.epochs
                and len(self.history) - self._last_improvement() >= patience)

  def _remove_best(self, keep: int) -> None:
    if distributed.is_primary():
      for name in os.listdir(self.staging):
        if name.startswith(f"{BEST}.") and name != f"{BEST}.{keep}":
          shutil.rmtree(os.path.join(self.staging, name))

  def write_outputs(self) -> dict:
    """best/, submission/ and results.json in the staging folder, from the finished run's history."""
    results = select_results(self.task, self.history)
    self._remove_best(keep=results["best_epoch"])
    best_dir = os.path.join(self.staging, BEST)
    if distributed.is_primary() and not os.path.isdir(best_dir):  # else renamed before a kill
      os.replace(os.path.join(self.staging, f"{BEST}.{results['best_epoch']}"), best_dir)
    multihost_utils.sync_global_devices("bipft finetune best")
    _, _, best_params = checkpointing.restore_params(best_dir, shardings=self.params_shardings)
    for split, examples in self.tests.items():
      data = self._encode(examples)
      predicted = self.predict(best_params, data)
      if distributed.is_primary():
        predictions.write_submission(os.path.join(self.staging, "submission"), splits.split_task(self.task, split),
                                     "test" if split == "ax" else split, data.ids, predicted)
    selection = selection_split(self.task)
    results.update(model=self.config.name or self.start.description, init=self.start.description,
                   task=self.task.name, seed=self.config.seed, selection=f"{selection} {self.task.metrics[0]}",
                   steps=self.history[-1]["step"], seconds=round(time.time() - self.started, 1))
    if self._stopped_early():
      results["stopped_early"] = f"after epoch {len(self.history)} of {self.config.epochs}"
    if not self.task.is_regression:
      results["dev_majority_rate"] = splits.majority_rate(self.train.labels, self.dev_data[selection].labels)
    if distributed.is_primary():
      files.write_json(os.path.join(self.staging, "results.json"), results)
    return results


def read_data(config, task: tasks.Task) -> tuple:
  """(train, dev splits, test splits present). A GLUE task's test splits are optional: missing ones are
  skipped; a custom task's test file, which the run names, must be read (before any training)."""
  read = tasks.read_splits(task, config.data, ("train",) + task.dev_splits)
  tests = {}
  for split in splits.leaderboard_splits(task, config.data):
    try:
      tests[split] = splits.read_test_split(config, task, split)
    except UserError as e:
      if task.name == "custom":  # a header-only test file was skipped with this note, and no submission/
        raise
      print(f"bipft: no {task.name} {split} predictions: {e}", file=sys.stderr)
  return splits.training_sample(config, read.pop("train")), read, tests
