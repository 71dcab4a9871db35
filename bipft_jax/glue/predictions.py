"""A classifier's predictions over an encoded split, and the files they are written to (GLUE
leaderboard TSVs). The prediction loop is shared by finetuning's evaluator, `bipft evaluate` and
`bipft eval-pytorch` (which plugs in a PyTorch forward), so all three score the same batches.
"""
import os
import sys
from typing import Callable

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from bipft_jax import engine, files, sharding
from bipft_jax import model as model_lib
from bipft_jax.errors import UserError
from bipft_jax.glue import tasks

# (task, split) -> the leaderboard's file name.
SUBMISSION_FILES = {
    ("cola", "test"): "CoLA.tsv", ("sst2", "test"): "SST-2.tsv", ("mrpc", "test"): "MRPC.tsv",
    ("stsb", "test"): "STS-B.tsv", ("qqp", "test"): "QQP.tsv", ("mnli", "test_matched"): "MNLI-m.tsv",
    ("mnli", "test_mismatched"): "MNLI-mm.tsv", ("qnli", "test"): "QNLI.tsv", ("rte", "test"): "RTE.tsv",
    ("wnli", "test"): "WNLI.tsv", ("ax", "test"): "AX.tsv",
}
CUSTOM_TEST_FILE = "test_predictions.tsv"  # a custom task's data.test_file, predicted


def model_batch(batch: dict) -> dict:
  """The fields of a `tasks.make_batch` batch that go to the device."""
  return {k: batch[k] for k in model_lib.MODEL_INPUTS + ("labels", "weights")}


def _logits(module: nn.Module) -> Callable:
  """(params, batch) -> the classifier's logits, without dropout."""
  def logits(params, batch):
    return module.apply({"params": params}, *(batch[k] for k in model_lib.MODEL_INPUTS),
                        deterministic=True)["logits"]
  return logits


def make_predict_step(module: nn.Module) -> Callable:
  """predict_step(params, batch) -> logits, jitted, on one device."""
  return jax.jit(_logits(module))


def sharded_predict_step(module: nn.Module, mesh, rules, params_shardings) -> Callable:
  """predict_step(params, batch) -> logits on `mesh`: every host passes the whole batch (the same on
  all hosts), each contributes its rows, the logits come back whole everywhere."""
  batch_sh = sharding.batch_sharding(mesh, rules)
  step = jax.jit(_logits(module), in_shardings=(params_shardings, batch_sh),
                 out_shardings=NamedSharding(mesh, PartitionSpec()))

  def predict_step(params, batch):
    with sharding.on_mesh(mesh, rules):
      return step(params, engine.global_batch(engine.host_rows(batch), batch_sh))
  return predict_step


def predict_logits(predict_step: Callable, params, data: tasks.Encoded, batch_size: int, buckets) -> np.ndarray:
  """The logits [N, num_labels] of every example of `data`, in order."""
  out = np.zeros((0, 1), np.float32)  # no examples, no batches
  for batch in tasks.batches(data, batch_size, buckets, sort_by_length=True):
    logits = np.asarray(jax.device_get(predict_step(params, model_batch(batch))), np.float32)
    if not len(out):
      out = np.zeros((len(data), logits.shape[-1]), np.float32)
    keep = batch["positions"] >= 0
    out[batch["positions"][keep]] = logits[keep]
  return out


def predict(predict_step: Callable, params, data: tasks.Encoded, batch_size: int, buckets,
            regression: bool) -> np.ndarray:
  """Predicted class ids (or scores) of every example of `data`, in order."""
  logits = predict_logits(predict_step, params, data, batch_size, buckets)
  return logits[:, 0] if regression else logits.argmax(-1)


def progress_bar(total: int | None, description: str, disable: bool | None = None) -> tqdm:
  """A progress bar on stderr over `total` examples (None: unknown), shown only where stderr is a
  terminal unless `disable` says otherwise."""
  return tqdm(total=total, desc=description, unit="example", file=sys.stderr, dynamic_ncols=True,
              disable=disable)


def counting(predict_step, progress):
  """`predict_step` advancing `progress` by the examples of each batch (not its padding rows)."""
  def step(params, batch):
    logits = predict_step(params, batch)
    progress.update(int(np.count_nonzero(batch["weights"])))
    return logits
  return step


def format_prediction(task: tasks.Task, prediction) -> str:
  """The leaderboard's spelling: a label string, or a score (STS-B's clipped to its range, [0, 5])."""
  if task.is_regression:
    return f"{float(np.clip(prediction, 0.0, 5.0) if task.name == 'stsb' else prediction):.3f}"
  return task.labels[int(prediction)]


def write_submission(directory: str, task: tasks.Task, split: str, ids, predictions) -> str:
  """Writes `index<TAB>prediction` rows for a test split under its leaderboard name (a custom task's:
  CUSTOM_TEST_FILE, which `bipft glue-report` does not collect); returns the path."""
  name = CUSTOM_TEST_FILE if task.name == "custom" else SUBMISSION_FILES.get((task.name, split))
  if name is None:
    raise UserError(f"{task.name} {split} has no GLUE leaderboard file")
  os.makedirs(directory, exist_ok=True)
  return write_predictions(os.path.join(directory, name), task, ids, predictions)


def write_predictions(path: str, task: tasks.Task, ids, predictions) -> str:
  """`index<TAB>prediction` rows in the leaderboard's spelling, written atomically; returns the path."""
  with files.atomic_write(path) as f:
    f.write("index\tprediction\n")
    for index, prediction in zip(ids, predictions):
      f.write(f"{index}\t{format_prediction(task, prediction)}\n")
  return path
