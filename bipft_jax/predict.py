"""`bipft predict`: label texts of your own with a finetuned classifier, or fill their [MASK]s.

  # one text per line (a sentence-pair task: the two sentences on one line, separated by a tab)
  bipft predict --config configs/glue.py:task=rt_demo --checkpoint runs/rt --input reviews.txt
  echo "a gripping, funny film" | bipft predict --config configs/glue.py:task=rt_demo --checkpoint runs/rt
  # the same classifier run 1-bit: its `bipft export-packed` file, on this machine's fastest kernel
  bipft predict --config configs/glue.py:task=rt_demo --checkpoint rt.bipft.safetensors --input reviews.txt
  # a task of your own: its labels, as finetuned
  bipft predict --config configs/glue.py:task=custom --config.data.labels=neg,pos --checkpoint runs/mine
  # a pretraining checkpoint (a `bipft pretrain` workdir, or `bipft convert from-pytorch` of a BERT with
  # its MLM head): the --top_k likeliest tokens for every [MASK]
  echo "the capital of france is [MASK] ." | bipft predict --config configs/pretrain.py:demo --checkpoint workdirs/demo

Output on stdout, one row per input line and in its order: a TSV with a header, the predicted label
and each class's probability (the softmax of the logits), or with `--json` one JSON object per line
({"prediction": "fresh", "probabilities": {"rotten": 0.21, "fresh": 0.79}}); a regression task
(STS-B, a custom task without labels) gives its score. The texts are tokenized, truncated to
config.max_length and batched as `bipft evaluate` does, so a text predicts here what it predicts in a
dev split: pass the config overrides of the run that wrote the checkpoint (max_length, precision,
data.tokenizer, custom: data.labels and data.text_fields).

The input is read, predicted and printed a chunk at a time (eval_batch_size x 16 lines; at a
terminal, line by line), so any number of lines fits in memory and rows come out as they are
predicted: a run stopped early (Ctrl-C, a closed pipe) has printed the rows of its finished chunks.
A malformed line (not UTF-8, empty, with the wrong number of tab-separated texts) is refused in one
line: in a file before the model is read (the file is checked whole first), on standard input when
it is reached, after the rows of the lines before it.

A pretraining config (configs/pretrain.py) fills masks instead, with the tokenizer `bipft evaluate`
scores the checkpoint with (`tokenizer`, else the teacher's) and data.max_seq_length: one TSV row
per guess (line, mask, rank, token, probability: the MLM head's softmax), or with `--json` one
object per input line ({"masks": [[{"token": "paris", "probability": 0.41}, ...], ...]}); a line
without a [MASK] token (within its first data.max_seq_length tokens) is refused.
"""
import argparse
import itertools
import json
import os
import signal
import sys
from typing import Iterator, NamedTuple, Optional

import jax
import numpy as np

from bipft_jax import checkpointing, config_checks, config_loading, packed, pretraining, pytorch_io
from bipft_jax import saved_models
from bipft_jax import model as model_lib
from bipft_jax.errors import UserError
from bipft_jax.glue import predictions, splits, tasks

CONFIG_KINDS = ("glue", "pretrain")  # config_loading.KINDS this command takes

CHUNK_BATCHES = 16  # lines read, predicted and printed at a time: eval_batch_size x this


def add_arguments(parser: argparse.ArgumentParser) -> None:
  config_loading.add_config_argument(parser, CONFIG_KINDS)
  parser.add_argument("--checkpoint", required=True,
                      help="a finetune workdir (its best/), a checkpoint folder, or a packed file of a classifier "
                           "(`bipft export-packed`: run 1-bit); with a pretraining config, a pretrain workdir")
  parser.add_argument("--input", default="-",
                      help="a UTF-8 text file, one example per line (a pair: two texts separated by a tab); "
                           "default -, standard input")
  parser.add_argument("--kernel", default=None, help=f"packed file: the kernel ({', '.join(packed.KERNELS)}; default "
                      "auto: this machine's fastest, measured once)")
  parser.add_argument("--top_k", type=int, default=None,
                      help="pretraining config: how many guesses to print for each [MASK] (default 5)")
  parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a TSV")


def run(args: argparse.Namespace) -> int:
  config = config_loading.load_config(args.config, args.config_overrides, kinds=CONFIG_KINDS)
  if config_loading.config_kind(config) == "glue":
    if args.top_k is not None:
      raise UserError("--top_k is for filling masks with a pretraining config (configs/pretrain.py)")
    config_checks.check_glue(config)
    saved_models.take_recorded_labels(config, args.checkpoint)
    task = tasks.task_from_config(config)
    lines = read_chunks(args.input, tasks.texts_per_example(task, config.data), task.name, config.eval_batch_size)
    header, rows_of = classifier_rows(config, task, args.checkpoint, args.kernel, args.json)
  elif args.kernel or os.path.isfile(args.checkpoint):
    raise UserError("a packed file holds no MLM head to fill masks with (export-packed keeps the encoder): pass a "
                    "`bipft pretrain` workdir as --checkpoint, or a packed classifier with a GLUE config")
  else:
    config_checks.check_pretrain(config)
    top_k = 5 if args.top_k is None else args.top_k
    if top_k < 1:
      raise UserError(f"--top_k must be >= 1, got {top_k}")
    lines = read_chunks(args.input, 1, "filling masks", config.eval_batch_size)
    header, rows_of = mask_rows(config, args.checkpoint, top_k, args.json, _where(args.input))
  try:
    with predictions.progress_bar(lines.total, "predict", disable=True if lines.interactive else None) as progress:
      for chunk in lines.chunks:
        rows = rows_of(chunk, progress)
        print("\n".join([header] + rows if header else rows), flush=True)
        header = None
  except BrokenPipeError:  # the reader left (`| head`): stop quietly, as other filters do
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush has nowhere to fail
    return 128 + signal.SIGPIPE
  return 0


# --- reading the input --------------------------------------------------------------

class Chunk(NamedTuple):
  first_line: int  # the input's line number of its first example
  examples: tasks.Split


class Lines(NamedTuple):
  total: Optional[int]  # the number of examples, when known before reading them (a file)
  chunks: Iterator[Chunk]
  interactive: bool  # typed at a terminal


def read_chunks(path: str, texts: int, task_name: str, batch_size: int) -> Lines:
  """The examples of `path` (- for standard input), `texts` tab-separated texts a line, in chunks of
  batch_size x CHUNK_BATCHES lines (one at a terminal). A regular file is checked whole here; standard
  input or a pipe line by line as it is read, its first chunk here."""
  where, size = _where(path), batch_size * CHUNK_BATCHES
  interactive = path == "-" and sys.stdin.isatty()
  if path == "-":
    if interactive:
      print("bipft predict: reading standard input, one example per line; end it with Ctrl-D", file=sys.stderr)
      size = 1
    total, raw_lines = None, sys.stdin.buffer
  elif os.path.isdir(path):
    raise UserError(f"--input {path} is a folder; name a text file, one example per line")
  elif not os.path.exists(path):
    raise UserError(f"--input {path} does not exist")
  elif not os.path.isfile(path):  # a pipe (`--input <(zcat texts.gz)`) is read once, as standard input is
    total, raw_lines = None, _file_lines(path)
  else:
    total = sum(1 for _ in _examples(_file_lines(path), where, texts, task_name))
    raw_lines = _file_lines(path)
  chunks = _chunks(_examples(raw_lines, where, texts, task_name), size)
  first = next(chunks, None)
  if first is None:
    raise UserError(f"{where} holds no text to predict")
  return Lines(total, itertools.chain([first], chunks), interactive)


def _file_lines(path: str) -> Iterator[bytes]:
  try:
    with open(path, "rb") as f:
      yield from f
  except OSError as e:
    raise UserError(f"cannot read {path}: {e.strerror}") from None


def _examples(raw_lines, where: str, texts: int, task_name: str) -> Iterator[list]:
  """Each line's texts, split at line feeds only and checked (as tasks.lines reads a file)."""
  for number, raw in enumerate(raw_lines, start=1):
    line = tasks.decode_text(raw, where, first_line=number).removesuffix("\n").removesuffix("\r")
    fields = line.split("\t")
    if not line.strip():
      raise UserError(f"{where} line {number} is empty; give one example per line")
    if len(fields) != texts:
      shape = "one text per line" if texts == 1 else "two texts per line, separated by a tab"
      found = "1 text" if len(fields) == 1 else f"{len(fields)} tab-separated texts"
      raise UserError(f"{where} line {number} holds {found}; {task_name} takes {shape}")
    if not all(field.strip() for field in fields):
      raise UserError(f"{where} line {number} has an empty text")
    yield fields


def _chunks(examples: Iterator[list], size: int) -> Iterator[Chunk]:
  for first_line in itertools.count(1, size):
    rows = list(itertools.islice(examples, size))
    if not rows:
      return
    yield Chunk(first_line, tasks.Split([r[0] for r in rows], [r[1] for r in rows] if len(rows[0]) == 2 else None,
                                        None, [str(first_line + i) for i in range(len(rows))]))


def _where(path: str) -> str:
  return "standard input" if path == "-" else path


# --- classifying --------------------------------------------------------------------

def classifier_rows(config, task: tasks.Task, checkpoint: str, kernel: str | None, as_json: bool):
  """The TSV header (None for JSON) and chunk -> output rows of the classifier at `checkpoint`."""
  classifier = saved_models.load_classifier(config, task, checkpoint, kernel)
  buckets = tasks.length_buckets(config.max_length, config.min_bucket)

  def rows_of(chunk: Chunk, progress) -> list:
    data = tasks.encode(classifier.tokenizer, chunk.examples, config.max_length)
    logits = predictions.predict_logits(predictions.counting(classifier.predict_step, progress), classifier.params,
                                        data, config.eval_batch_size, buckets)
    return output_rows(task, logits, as_json)
  return None if as_json else tsv_header(task), rows_of


def tsv_header(task: tasks.Task) -> str:
  return "\t".join(("prediction",) + (() if task.is_regression else task.labels))


def output_rows(task: tasks.Task, logits: np.ndarray, as_json: bool) -> list:
  """One row per example: the TSV's (under tsv_header) or a JSON object's."""
  if task.is_regression:
    scores = [predictions.format_prediction(task, score) for score in logits[:, 0]]
    return [json.dumps({"prediction": float(s)}) for s in scores] if as_json else scores
  probabilities = softmax(logits)
  labels = [task.labels[i] for i in logits.argmax(-1)]
  if as_json:
    return [json.dumps({"prediction": label, "probabilities": {name: round(float(p), 6) for name, p in
                                                                zip(task.labels, row)}})
            for label, row in zip(labels, probabilities)]
  return ["\t".join([label] + [f"{p:.6f}" for p in row]) for label, row in zip(labels, probabilities)]


def softmax(logits: np.ndarray) -> np.ndarray:
  shifted = np.exp(logits - logits.max(-1, keepdims=True))
  return shifted / shifted.sum(-1, keepdims=True)


# --- filling masks ------------------------------------------------------------------

def mask_rows(config, checkpoint: str, top_k: int, as_json: bool, where: str):
  """The TSV header (None for JSON) and chunk -> output rows of the pretraining model at `checkpoint`:
  the top_k guesses for every [MASK]."""
  directory, step, model_config = saved_models.find_checkpoint(
      checkpoint, "pretraining", "pass a `bipft pretrain` workdir or one of its step folders")
  # The config's, else the checkpoint's (a converted workdir's, a pretraining's record), else its teacher's.
  folder = config.tokenizer or splits.saved_tokenizer(directory, checkpointing.read_run_config(directory, step))
  tokenizer = pytorch_io.load_tokenizer(folder or pretraining.tokenizer_folder(config), model_config.vocab_size,
                                        fix="set --config.tokenizer to the vocabulary the model was trained with")
  max_length = min(config.data.max_seq_length, model_config.max_position_embeddings)
  module = model_lib.build(model_config, "pretraining")
  params = jax.device_get(checkpointing.restore_params(directory, step)[2])
  mlm_logits = jax.jit(lambda p, inputs, positions: module.apply(
      {"params": p}, *(inputs[k] for k in model_lib.MODEL_INPUTS), mlm_positions_BxN=positions,
      deterministic=True)["mlm_logits"])

  def rows_of(chunk: Chunk, progress) -> list:
    data = tasks.encode(tokenizer, chunk.examples, max_length)
    masks = [np.flatnonzero(data.tokens(i) == tokenizer.mask_token_id) for i in range(len(data))]
    for number, found in enumerate(masks, start=chunk.first_line):
      if not len(found):
        raise UserError(f"{where} line {number} has no {tokenizer.mask_token} token within its first {max_length} "
                        "tokens (data.max_seq_length)")
    guesses = [None] * len(masks)  # per line: per mask, [(token id, probability)] best first
    for batch in tasks.batches(data, config.eval_batch_size, tasks.length_buckets(max_length), sort_by_length=True):
      lines = [line for line in batch["positions"] if line >= 0]
      # The decoder runs at the masks only (a vocabulary of logits per token would not fit), their
      # count padded to a power of two so that few shapes compile.
      positions_BxN = np.zeros((len(batch["positions"]), 1 << (max(len(masks[i]) for i in lines) - 1).bit_length()),
                               np.int32)
      for row, line in enumerate(lines):
        positions_BxN[row, :len(masks[line])] = masks[line]
      logits_BxNxV = np.asarray(mlm_logits(params, predictions.model_batch(batch), positions_BxN), np.float64)
      for row, line in enumerate(lines):
        guesses[line] = [_top(logits_V, top_k) for logits_V in logits_BxNxV[row, :len(masks[line])]]
      progress.update(len(lines))
    return guess_rows(tokenizer, guesses, as_json, chunk.first_line)
  return None if as_json else "line\tmask\trank\ttoken\tprobability", rows_of


def _top(logits_V: np.ndarray, k: int) -> list:
  """The k likeliest (token id, probability) under softmax(logits_V), likeliest first."""
  probabilities = softmax(logits_V)
  best = np.argsort(-probabilities, kind="stable")[:k]
  return [(int(i), float(probabilities[i])) for i in best]


def guess_rows(tokenizer, guesses: list, as_json: bool, first_line: int) -> list:
  """One TSV row per guess, or one JSON object per line; `guesses` are those of lines first_line, ...."""
  if as_json:
    return [json.dumps({"masks": [[{"token": tokenizer.convert_ids_to_tokens(i), "probability": round(p, 6)}
                                   for i, p in mask] for mask in line]}) for line in guesses]
  rows = []
  for number, line in enumerate(guesses, start=first_line):
    for mask_number, mask in enumerate(line, start=1):
      rows += [f"{number}\t{mask_number}\t{rank}\t{tokenizer.convert_ids_to_tokens(i)}\t{p:.6f}"
               for rank, (i, p) in enumerate(mask, start=1)]
  return rows
