"""`bipft eval-pytorch`: scores a PyTorch export on a GLUE task's dev splits.

  bipft convert to-pytorch --checkpoint runs/rte/best --out exports/rte
  bipft eval-pytorch --model exports/rte --config configs/glue.py:task=rte --config.data.path=glue_data

The data reading, tokenization, length-bucketed batching, prediction loop and metrics are the
JAX finetuning run's own (`bipft_jax.glue`); only the forward pass is PyTorch's: the model loads
with `AutoModelForSequenceClassification.from_pretrained(DIR, trust_remote_code=True)`, so any
export of `bipft convert to-pytorch` (or a plain Hugging Face BERT classifier) works.
"""
import argparse
import os

import numpy as np

from bipft_jax import config_checks, config_loading, files, pytorch_io
from bipft_jax import model as model_lib
from bipft_jax.errors import UserError
from bipft_jax.glue import predictions, splits, tasks
from bipft_jax.glue import metrics as metrics_lib

CONFIG_KINDS = ("glue",)  # config_loading.KINDS this command takes


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--model", required=True, help="a `bipft convert to-pytorch` folder (or any HF classifier)")
  config_loading.add_config_argument(parser, CONFIG_KINDS)
  parser.add_argument("--predictions", default=None,
                      help="also write every dev prediction here (JSON: split -> ids and predictions)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --predictions file")


def load_classifier(directory: str, task: tasks.Task, precision: str = ""):
  """The exported sequence classifier in eval mode, computing in `precision` (empty: its config.json's);
  UserError if it is missing or has the wrong head."""
  try:
    import torch  # noqa: F401
    import transformers
  except ImportError:
    raise UserError("eval-pytorch needs torch: pip install 'bipft-jax[torch]'") from None
  if not os.path.isfile(os.path.join(directory, "config.json")):
    raise UserError(f"{directory} has no config.json: pass a folder written by `bipft convert to-pytorch`")
  # Our readers first: one-line errors for a bad config.json or weights file, never pickled code.
  hf = pytorch_io.read_config(directory)
  pytorch_io.config_from_hf(hf)
  weights = pytorch_io.read_weights(directory)
  if not any(name.startswith("classifier.") for name in weights):
    raise UserError(f"{directory} has no classifier head (no classifier.* tensors), so it would score a "
                    "random one: export the checkpoint finetuned on the task")
  if hf.get("pooling", "cls") == "cls" and not any(name.startswith(pytorch_io.POOLER_PREFIXES) for name in weights):
    raise UserError(f"{directory} has no pooler (no pooler.* tensors), which its classifier reads the [CLS] token "
                    "through, so it would score a random one: export the checkpoint finetuned on the task")
  try:
    config = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=True)
    if config.num_labels != task.num_labels:
      raise UserError(f"{directory} has {config.num_labels} outputs but {task.name} needs {task.num_labels}: "
                      "export the checkpoint finetuned on this task")
    if precision and config.model_type != "bipft":
      raise UserError(f"{directory} is a {config.model_type} model, which computes in fp32 only: leave precision "
                      "empty (it is for `bipft convert to-pytorch` exports)")
    if precision:
      config.precision = precision
    model = transformers.AutoModelForSequenceClassification.from_pretrained(directory, config=config,
                                                                            trust_remote_code=True)
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f"{directory} does not load as a sequence classifier: {e}".splitlines()[0]) from None
  return model.eval()


def torch_predict_step(model):
  """A `predict_step(params, batch) -> logits` for `predictions.predict`, run by PyTorch."""
  import torch

  def predict_step(_, batch):
    inputs = {k: torch.from_numpy(np.asarray(batch[k], np.int64)) for k in model_lib.MODEL_INPUTS}
    with torch.no_grad():
      return model(**inputs).logits.float().numpy()
  return predict_step


def evaluate(config, model_dir: str) -> dict:
  """split -> {"metrics": {...}, "ids": [...], "predictions": array} for every dev split of the task."""
  task = tasks.get_task(config.task)
  model = load_classifier(model_dir, task, config.precision)
  splits.check_inputs(config, task, model.config)
  tokenizer = splits.load_tokenizer(config, model_dir, model.config)
  buckets = tasks.length_buckets(config.max_length, config.min_bucket)
  results = {}
  for name, split in tasks.read_splits(task, config.data, task.dev_splits).items():
    data = tasks.encode(tokenizer, split, config.max_length)
    with predictions.progress_bar(len(data), f"{task.name} {name}", disable=False) as progress:  # in logs too
      predicted = predictions.predict(predictions.counting(torch_predict_step(model), progress), None, data,
                                      config.eval_batch_size, buckets, task.is_regression)
    results[name] = {"metrics": metrics_lib.compute(task.metrics, data.labels, predicted),
                     "ids": list(data.ids), "predictions": predicted}
  return results


def run(args: argparse.Namespace) -> int:
  config = config_loading.load_config(args.config, args.config_overrides, kinds=CONFIG_KINDS)
  config_checks.check_glue(config)
  if args.predictions:
    files.check_output_file(args.predictions, "--predictions", args.overwrite)
  results = evaluate(config, args.model)
  for name, result in results.items():
    print(f"{config.task} {name}: " + ", ".join(f"{m} {v:.2f}" for m, v in result["metrics"].items()))
  if args.predictions:
    files.write_json(args.predictions, {
        name: {"ids": [str(i) for i in r["ids"]], "predictions": r["predictions"].tolist()}
        for name, r in results.items()}, indent=None)
  return 0
