"""Which examples a GLUE run reads, and how: the test splits of the leaderboard, the training sample,
the tokenizer, the majority-class rate. Shared by `bipft finetune`, `bipft evaluate` and
`bipft eval-pytorch`, so the three see the same examples.
"""
import os

import numpy as np

from bipft_jax import pytorch_io
from bipft_jax.errors import UserError
from bipft_jax.glue import tasks


def leaderboard_splits(task: tasks.Task, data) -> tuple:
  """The unlabeled splits predicted for the GLUE leaderboard: the task's test splits, plus `ax` (the
  diagnostic set) for MNLI from GLUE or TFDS; a custom task's test file if it has one."""
  if task.name == "custom":
    return ("test",) if data.test_file else ()
  return task.test_splits + (("ax",) if task.name == "mnli" and data.format in ("glue", "tfds") else ())


def read_test_split(config, task: tasks.Task, split: str) -> tasks.Split:
  """One test split; `ax` is found beside the MNLI folder when data.path is the MNLI folder itself."""
  if split != "ax":
    return tasks.read_splits(task, config.data, (split,))[split]
  ax, data = tasks.get_task("ax"), config.data
  if data.format == "glue" and not os.path.isdir(os.path.join(data.path, ax.folder)):
    data = data.copy_and_resolve_references()
    data.path = os.path.join(os.path.dirname(os.path.abspath(config.data.path)), ax.folder)
  return tasks.read_splits(ax, data, ("test",))["test"]


def split_task(task: tasks.Task, split: str) -> tasks.Task:
  """The task whose labels `split` is written with: AX's for the diagnostic set, else `task`."""
  return tasks.get_task("ax") if split == "ax" else task


def training_sample(config, train: tasks.Split) -> tasks.Split:
  """The training examples the run uses: all, or `max_train_examples` of them shuffled by `seed`."""
  if config.max_train_examples <= 0:
    return train
  keep = np.random.default_rng(config.seed).permutation(len(train))[:config.max_train_examples]
  return tasks.Split([train.texts_a[i] for i in keep],
                     None if train.texts_b is None else [train.texts_b[i] for i in keep],
                     train.labels[keep], [train.ids[i] for i in keep])


def majority_rate(train_labels: np.ndarray, dev_labels: np.ndarray) -> float:
  """Dev accuracy (%) of always predicting the most frequent training label."""
  majority = np.bincount(train_labels).argmax()
  return 100.0 * float(np.mean(dev_labels == majority))


def recorded_tokenizer(run: dict | None) -> str:
  """The tokenizer folder a checkpoint's run record names: a finetuning run's data.tokenizer (the one it
  read texts with), a pretraining run's tokenizer, else its teacher's; "" for none or MiniLM's."""
  if not run:
    return ""
  if "task" in run:
    return (run.get("data") or {}).get("tokenizer") or ""
  teacher = (run.get("teacher") or {}).get("path") or ""
  return run.get("tokenizer") or ("" if teacher == "minilm" else teacher)


def saved_tokenizer(checkpoint: str, run: dict | None) -> str:
  """The tokenizer of a checkpoint (a workdir, a step folder or a packed file's folder): one beside its
  steps (`bipft convert from-pytorch` copies it there), else the one its run read texts with; "" for
  neither (MiniLM's, the default)."""
  checkpoint = os.path.abspath(checkpoint)
  workdir = os.path.dirname(checkpoint) if os.path.basename(checkpoint).isdigit() else checkpoint
  return workdir if pytorch_io.has_tokenizer(workdir) else recorded_tokenizer(run)


def tokenizer_folder(config, init_folder: str) -> str:
  """The folder of the tokenizer a run reads texts with: config.data.tokenizer, else the init folder ("":
  all-MiniLM-L6-v2's uncased vocab); UserError if that has none (MiniLM's was taken, a wrong vocabulary of
  the same size without a word)."""
  if config.data.tokenizer:
    return config.data.tokenizer
  if init_folder and not pytorch_io.has_tokenizer(init_folder):
    raise UserError(f"no tokenizer in {init_folder} (vocab.txt or tokenizer.json), the model's: pass "
                    "--config.data.tokenizer=FOLDER with the vocabulary it was trained with")
  return init_folder


def load_tokenizer(config, init_folder: str, model_config):
  """The tokenizer of `tokenizer_folder`, MiniLM's for none; UserError if its folder is gone."""
  folder = tokenizer_folder(config, init_folder)
  if not folder:
    from bipft_jax import assets
    folder = str(assets.minilm_dir())
  return pytorch_io.load_tokenizer(folder, model_config.vocab_size, fix="the checkpoint is of another size; "
                                   "set --config.data.tokenizer to the checkpoint's vocab")


def check_inputs(config, task: tasks.Task, model_config) -> None:
  """UserError if config.max_length exceeds the model's position embeddings, or the task's sentence pairs
  need a token type the model has no embedding for (a lookup past the table reads its last row)."""
  if config.max_length > model_config.max_position_embeddings:
    raise UserError(f"max_length {config.max_length} exceeds the model's {model_config.max_position_embeddings} "
                    "positions; lower --config.max_length")
  if tasks.texts_per_example(task, config.data) == 2 and model_config.type_vocab_size < 2:
    raise UserError(f"{task.name} gives sentence pairs, whose second texts have token type 1, but the model's "
                    f"type_vocab_size is {model_config.type_vocab_size}: start from a model with two token types")
