"""`bipft predict`: a finetuned classifier's predictions for texts of your own.

  # one text per line (a sentence-pair task: the two sentences on one line, separated by a tab)
  bipft predict --config configs/glue.py:task=rt_demo --checkpoint runs/rt --input reviews.txt
  echo "a gripping, funny film" | bipft predict --config configs/glue.py:task=rt_demo --checkpoint runs/rt
  # the same classifier run 1-bit: its `bipft export-packed` file, on this machine's fastest kernel
  bipft predict --config configs/glue.py:task=rt_demo --checkpoint rt.bipft.safetensors --input reviews.txt
  # a task of your own: its labels, as finetuned
  bipft predict --config configs/glue.py:task=custom --config.data.labels=neg,pos --checkpoint runs/mine

Output on stdout, one row per input line and in its order: a TSV with a header, the predicted label
and each class's probability (the softmax of the logits), or with `--json` one JSON object per line
({"prediction": "fresh", "probabilities": {"rotten": 0.21, "fresh": 0.79}}); a regression task
(STS-B, a custom task without labels) gives its score. The texts are tokenized, truncated to
config.max_length and batched as `bipft evaluate` does, so a text predicts here what it predicts in a
dev split: pass the config overrides of the run that wrote the checkpoint (max_length, precision,
data.tokenizer, custom: data.labels and data.text_fields). A malformed input (not UTF-8, an empty
line, a line with the wrong number of tab-separated texts) is refused before the model is read.
"""
import argparse
import json
import os
import sys

import numpy as np
from tqdm import tqdm

from bipft_jax import config_checks, config_loading, evaluate, packed
from bipft_jax.errors import UserError
from bipft_jax.glue import predictions, tasks


def add_arguments(parser: argparse.ArgumentParser) -> None:
  config_loading.add_config_argument(parser)
  parser.add_argument("--checkpoint", required=True,
                      help="a finetune workdir (its best/), a checkpoint folder, or a packed file of a classifier "
                           "(`bipft export-packed`: run 1-bit)")
  parser.add_argument("--input", default="-",
                      help="a UTF-8 text file, one example per line (a pair: two texts separated by a tab); "
                           "default -, standard input")
  parser.add_argument("--kernel", default=None, help=f"packed file: the kernel ({', '.join(packed.KERNELS)}; default "
                      "auto: this machine's fastest, measured once)")
  parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a TSV")


def run(args: argparse.Namespace) -> int:
  config = config_loading.load_config(args.config, args.config_overrides)
  if not evaluate.is_glue_config(config):
    raise UserError("bipft predict takes a GLUE config (configs/glue.py:task=NAME), the one the classifier was "
                    "finetuned with")
  config_checks.check_glue(config)
  task = tasks.task_from_config(config)
  examples = read_examples(args.input, tasks.texts_per_example(task, config.data), task.name)
  classifier = evaluate.load_classifier(config, task, args.checkpoint, args.kernel)
  data = tasks.encode(classifier.tokenizer, examples, config.max_length)
  buckets = tasks.length_buckets(config.max_length, config.min_bucket)
  with tqdm(total=-(-len(data) // config.eval_batch_size), desc=f"{task.name} predict", unit="batch",
            file=sys.stderr, dynamic_ncols=True, disable=None) as progress:
    logits = predictions.predict_logits(evaluate.counting(classifier.predict_step, progress), classifier.params,
                                        data, config.eval_batch_size, buckets)
  print("\n".join(output_rows(task, logits, args.json)))
  return 0


def read_examples(path: str, texts: int, task_name: str) -> tasks.Split:
  """The examples of `path` (- for standard input): one per line, `texts` tab-separated texts each."""
  where = "standard input" if path == "-" else path
  if path == "-":
    if sys.stdin.isatty():
      print("bipft predict: reading standard input, one example per line; end it with Ctrl-D", file=sys.stderr)
    text = tasks.decode_text(sys.stdin.buffer.read(), where)
  elif os.path.isdir(path):
    raise UserError(f"--input {path} is a folder; name a text file, one example per line")
  elif not os.path.exists(path):
    raise UserError(f"--input {path} does not exist")
  else:
    text = tasks.read_text(path)
  rows = []
  for number, line in enumerate(tasks.lines(text), start=1):
    fields = line.split("\t")
    if not line.strip():
      raise UserError(f"{where} line {number} is empty; give one example per line")
    if len(fields) != texts:
      shape = "one text per line" if texts == 1 else "two texts per line, separated by a tab"
      found = "1 text" if len(fields) == 1 else f"{len(fields)} tab-separated texts"
      raise UserError(f"{where} line {number} holds {found}; {task_name} takes {shape}")
    if not all(field.strip() for field in fields):
      raise UserError(f"{where} line {number} has an empty text")
    rows.append(fields)
  if not rows:
    raise UserError(f"{where} holds no text to predict")
  return tasks.Split([r[0] for r in rows], [r[1] for r in rows] if texts == 2 else None, None,
                     [str(i) for i in range(len(rows))])


def output_rows(task: tasks.Task, logits: np.ndarray, as_json: bool) -> list:
  """One row per example: the TSV's (after its header) or a JSON object's."""
  if task.is_regression:
    scores = [predictions.format_prediction(task, score) for score in logits[:, 0]]
    return [json.dumps({"prediction": float(s)}) for s in scores] if as_json else ["prediction"] + scores
  shifted = np.exp(logits - logits.max(-1, keepdims=True))
  probabilities = shifted / shifted.sum(-1, keepdims=True)
  labels = [task.labels[i] for i in logits.argmax(-1)]
  if as_json:
    return [json.dumps({"prediction": label, "probabilities": {name: round(float(p), 6) for name, p in
                                                                zip(task.labels, row)}})
            for label, row in zip(labels, probabilities)]
  return (["\t".join(("prediction",) + task.labels)]
          + ["\t".join([label] + [f"{p:.6f}" for p in row]) for label, row in zip(labels, probabilities)])
