"""Bad and adversarial inputs to every subcommand: exit code 2, one `error:` line, no traceback, and
every file that existed before the command byte-identical (contents and mode) after it.

The cases run in-process through `bipft_jax.cli.main`; nearly all fail during validation, before any
compile. The fixtures (tiny checkpoints, corpora, GLUE folders, PyTorch exports) are built once.
"""
import gzip
import hashlib
import json
import os
import shutil
import stat
import traceback
from typing import Callable, NamedTuple

import jax
import numpy as np
import pytest
import torch
import zstandard
from safetensors.numpy import load_file, save_file

import glue_fixtures
from bipft_jax import checkpointing, cli, convert, files
from bipft_jax import model as model_lib
from bipft_jax import model_params
from bipft_jax.config_loading import KINDS
from bipft_jax.errors import UserError
from bipft_jax.glue import finetune, predictions, tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(ROOT, "configs", "pretrain.py")
GLUE = os.path.join(ROOT, "configs", "glue.py")
MODEL = os.path.join(ROOT, "configs", "model.py")
TRACK = os.path.join(ROOT, "configs", "track.py")
STUDY = os.path.join(ROOT, "configs", "study.py")
WORDS = [f"w{i}" for i in range(60)]
TINY = dict(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
            max_position_embeddings=64, binary=True, mlm_transform_act="relu")
GLUE_TINY = ["model.vocab_size=64", "model.hidden_size=32", "model.num_heads=2", "model.intermediate_size=64",
             "model.num_layers=1", "model.max_position_embeddings=64", "init.kind=scratch", "batch_size=4", "mesh.shape.data=1",
             "eval_batch_size=8", "max_length=16", "steps_per_epoch=1", "epochs=1"]


# --- fixtures ---------------------------------------------------------------------

def _checkpoint(folder: str, head: str, **changes) -> str:
  config = model_lib.BertConfig(**{**TINY, **changes})
  params = model_params.init_params(model_lib.build(config, head), jax.random.key(0))
  checkpointing.save_params(folder, jax.device_get(params), config, head)
  glue_fixtures.write_vocab(folder)  # a workdir keeps its tokenizer beside the steps
  return folder


def _results(task="sst2", dev=None, model="bipft") -> dict:
  return {"task": task, "model": model, "best_epoch": 1, "epochs": 1,
          "dev": {"dev": {"accuracy": 50.0}} if dev is None else dev}


def _write_finished_finetune(workdir: str, classifier: str) -> str:
  """A finetune workdir as a finished run leaves it: results.json, best/, metrics, submission/."""
  shutil.copytree(classifier, os.path.join(workdir, "best"))
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(_results(), f)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"epoch": 1, "dev": {"dev": {"accuracy": 50.0}}}) + "\n")
  predictions.write_submission(os.path.join(workdir, "submission"), tasks.get_task("sst2"), "test", ["0", "1"],
                          [0, 1])
  return workdir


def _torch_dir(folder: str, config_json, weights=None, bin_object=None) -> str:
  """A PyTorch checkpoint folder: config.json (any JSON), model.safetensors or a pytorch_model.bin."""
  os.makedirs(folder)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config_json, f)
  if weights is not None:
    save_file(weights, os.path.join(folder, "model.safetensors"))
  if bin_object is not None:
    torch.save(bin_object, os.path.join(folder, "pytorch_model.bin"))
  return folder


class Pickled:
  """An object a weights_only load refuses: unpickling it would call print."""

  def __reduce__(self):
    return (print, ("pickled code ran",))


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
  """Every input the cases use, under one folder (snapshotted by every case)."""
  root = str(tmp_path_factory.mktemp("bad_inputs"))
  p = lambda *parts: os.path.join(root, *parts)
  rng = np.random.default_rng(0)
  corpus = "\n\n".join("\n".join(" ".join(["The"] + list(rng.choice(WORDS, 8))) + "." for _ in range(6))
                       for _ in range(12)) + "\n"
  with open(p("corpus.txt"), "w") as f:
    f.write(corpus)
  with open(p("corpus.txt.gz"), "wb") as f:
    f.write(gzip.compress(corpus.encode())[:-40])  # truncated
  with open(p("corpus.txt.zst"), "wb") as f:
    f.write(zstandard.ZstdCompressor().compress(corpus.encode())[:-40])  # truncated
  os.makedirs(p("vocab"))
  with open(p("vocab", "vocab.txt"), "w") as f:
    f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "."] + WORDS) + "\n")
  glue = glue_fixtures.write_glue(p("glue_data"), n=8)
  with open(p("arrays.jsonl"), "w") as f:
    f.write('["the film was good .", "1"]\n["the film was bad .", "0"]\n')
  with open(p("a_file"), "w") as f:
    f.write("a regular file\n")
  with open(p("texts_blank_line.txt"), "w") as f:
    f.write("the film was good .\n\nthe film was bad .\n")
  os.makedirs(p("readonly"))

  classifier = _checkpoint(p("classifier"), "classification")
  encoder = _checkpoint(p("encoder"), "encoder")
  _checkpoint(p("teacher"), "classification", binary=False, mlm_transform_act="gelu")
  # a `bipft pretrain` workdir with two checkpoints (params-only steps are enough to be lost)
  pretrained = _checkpoint(p("pretrain_wd"), "pretraining")
  config = model_lib.BertConfig(**TINY)
  params = jax.device_get(checkpointing.restore_params(pretrained)[2])
  checkpointing.save_params(pretrained, params, config, "pretraining", step=5)
  finished = _write_finished_finetune(p("finished"), classifier)

  convert.to_pytorch(classifier, p("export"))
  convert.to_pytorch(encoder, p("export_encoder"))
  with open(p("export", "config.json")) as f:
    export_config = json.load(f)
  hf = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 64}
  tensor = {"embeddings.word_embeddings.weight": np.zeros((64, 32), np.float32)}
  safetensors_bytes = open(p("export", "model.safetensors"), "rb").read()
  torch_dirs = {
      "config_list": _torch_dir(p("pt", "config_list"), [hf], weights=tensor),
      "hidden_size_text": _torch_dir(p("pt", "hidden_size_text"), {**hf, "hidden_size": "thirty-two"},
                                     weights=tensor),
      "zero_heads": _torch_dir(p("pt", "zero_heads"), {**hf, "num_attention_heads": 0}, weights=tensor),
      "bad_id2label": _torch_dir(p("pt", "bad_id2label"), {**hf, "id2label": 3}, weights=tensor),
      "bare_tensor": _torch_dir(p("pt", "bare_tensor"), hf, bin_object=torch.zeros(3)),
      "non_tensor_values": _torch_dir(p("pt", "non_tensor_values"), hf,
                                      bin_object={"a": torch.zeros(2), "b": 3}),
      "pickled": _torch_dir(p("pt", "pickled"), hf, bin_object={"a": Pickled()}),
      "truncated_bin": _torch_dir(p("pt", "truncated_bin"), hf),
      "truncated_safetensors": _torch_dir(p("pt", "truncated_safetensors"), hf),
      # checkpoints we would misread: another architecture, another head, a decoder, a ReLU FFN
      "roberta": _torch_dir(p("pt", "roberta"), {**hf, "model_type": "roberta"}, weights=tensor),
      "qa": _torch_dir(p("pt", "qa"), {**hf, "architectures": ["BertForQuestionAnswering"]}, weights=tensor),
      "qa_tensors": _torch_dir(p("pt", "qa_tensors"), hf, weights={
          "bert.embeddings.word_embeddings.weight": np.zeros((64, 32), np.float32),
          "qa_outputs.weight": np.zeros((2, 32), np.float32)}),
      "decoder": _torch_dir(p("pt", "decoder"), {**hf, "is_decoder": True}, weights=tensor),
      "relu_ffn": _torch_dir(p("pt", "relu_ffn"), {**hf, "hidden_act": "relu"}, weights=tensor),
      # exports for eval-pytorch: the classifier's config with broken weights or config
      "export_pickled": _torch_dir(p("pt", "export_pickled"), export_config, bin_object={"a": Pickled()}),
      "export_truncated": _torch_dir(p("pt", "export_truncated"), export_config),
      "export_config_list": _torch_dir(p("pt", "export_config_list"), [export_config]),
      "export_zero_heads": _torch_dir(p("pt", "export_zero_heads"),
                                      {**export_config, "num_attention_heads": 0}),
      "export_no_pooler": _torch_dir(p("pt", "export_no_pooler"), export_config, weights={
          k: v for k, v in load_file(p("export", "model.safetensors")).items() if ".pooler." not in k}),
  }
  torch.save({"a": torch.zeros(2)}, p("pt", "truncated_bin", "pytorch_model.bin"))
  with open(p("pt", "truncated_bin", "pytorch_model.bin"), "r+b") as f:
    f.truncate(100)
  for name in ("truncated_safetensors", "export_truncated"):
    with open(p("pt", name, "model.safetensors"), "wb") as f:
      f.write(safetensors_bytes[:len(safetensors_bytes) // 2])
  for name in ("export_config_list", "export_zero_heads"):
    shutil.copy(p("export", "model.safetensors"), p("pt", name, "model.safetensors"))

  for name, results in {"no_metric": _results(dev={"dev": {"f1": 50.0}}),
                        "string_metric": _results(dev={"dev": {"accuracy": "fifty"}}),
                        "dev_list": _results(dev=[{"accuracy": 50.0}]),
                        "results_list": [_results()]}.items():
    os.makedirs(p("runs", name))
    with open(p("runs", name, "results.json"), "w") as f:
      json.dump(results, f)
  os.makedirs(p("submission_out"))
  with open(p("submission_out", "SST-2.tsv"), "w") as f:
    f.write("index\tprediction\n0\t1\n")
  with open(p("predictions.tsv"), "w") as f:
    f.write("index\tprediction\n")
  return {"root": root, "p": p, "glue": glue, "classifier": classifier, "encoder": encoder,
          "pretrain_wd": pretrained, "finished": finished, "torch": torch_dirs}


# --- the checks every case makes ----------------------------------------------------

def snapshot(*roots: str) -> dict:
  """path -> (sha256 of the contents, mode) of every file and folder under `roots`."""
  seen = {}
  for root in roots:
    for folder, dirs, names in os.walk(root):
      seen[folder] = ("dir", stat.S_IMODE(os.stat(folder).st_mode))
      for name in names:
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
          seen[path] = (hashlib.sha256(f.read()).hexdigest(), stat.S_IMODE(os.stat(path).st_mode))
  return seen


def assert_refused(argv: list, capsys, *roots: str) -> str:
  """Runs `bipft ARGV`: exit 2, one `error:` line and nothing else on stderr, every earlier file kept.
  Returns the error line."""
  before = snapshot(*roots)
  capsys.readouterr()
  try:
    code = cli.main([str(a) for a in argv])
  except BaseException:  # an escaped exception is the traceback a user would see
    pytest.fail(f"bipft {' '.join(map(str, argv))} raised:\n{traceback.format_exc()}")
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert code == 2, err
  assert "Traceback" not in err, err
  assert len(lines) == 1 and "error:" in lines[0], err
  after = snapshot(*roots)
  changed = sorted(path for path in before if after.get(path) != before[path])
  assert not changed, f"changed or removed: {changed}"
  return lines[0]


def _read_only(monkeypatch, folder: str) -> None:
  """Makes `folder` read-only as os.access reports it (these tests run as root, who may write anywhere)."""
  access = os.access
  folder = os.path.abspath(folder)
  monkeypatch.setattr(os, "access", lambda path, mode, **kw: (
      False if os.path.abspath(path).startswith(folder) and mode & os.W_OK else access(path, mode, **kw)))


# --- the table ---------------------------------------------------------------------

class Case(NamedTuple):
  name: str
  argv: Callable    # (fx, tmp) -> argv
  expect: str       # a piece of the error line
  read_only: str = ""  # a fixture path to make read-only (via os.access)


def _paths(items, fx, tmp) -> list:
  """Arguments as given, or computed from the fixtures: a callable (fx, tmp) -> path."""
  return [item(fx, tmp) if callable(item) else item for item in items]


def _overrides(items) -> list:
  return [f"--config.{item}" for item in items]


def pretrain(*overrides, workdir=lambda fx, tmp: tmp / "wd"):
  def argv(fx, tmp):
    corpus = fx["p"]("corpus.txt")
    base = [f"data.paths={corpus}", f"data.eval_paths={corpus}", f"tokenizer={fx['p']('vocab')}",
            "model.vocab_size=128", "model.num_layers=1"]
    return (["pretrain", "--config", f"{PRETRAIN}:tiny", "--workdir", workdir(fx, tmp)]
            + _overrides(base + list(overrides)))
  return argv


def finetune_argv(*overrides, workdir=lambda fx, tmp: tmp / "ft", task="sst2"):
  def argv(fx, tmp):
    base = GLUE_TINY + [f"data.path={fx['glue']}", f"data.tokenizer={fx['classifier']}"]
    return (["finetune", "--config", f"{GLUE}:task={task}", "--workdir", workdir(fx, tmp)]
            + _overrides(base + list(overrides)))
  return argv


def evaluate_argv(*overrides, checkpoint="classifier", extra=(), pretraining=False):
  def argv(fx, tmp):
    corpus = fx["p"]("corpus.txt")
    base = [f"data.path={fx['glue']}", "max_length=16", "eval_batch_size=8"]
    if pretraining:
      base = [f"data.paths={corpus}", f"data.eval_paths={corpus}", f"tokenizer={fx['p']('vocab')}"]
    config = f"{PRETRAIN}:tiny" if pretraining else f"{GLUE}:task=sst2"
    return (["evaluate", "--config", config, "--checkpoint", fx["p"](checkpoint)]
            + _overrides(base + list(overrides)) + _paths(extra, fx, tmp))
  return argv


def summary_argv(*overrides, extra=()):
  return lambda fx, tmp: ["summary", "--config", f"{MODEL}:tiny,binary"] + _overrides(overrides) + list(extra)


def from_pytorch(src, out=lambda fx, tmp: tmp / "imported"):
  def argv(fx, tmp):
    return ["convert", "from-pytorch", "--src", fx["torch"].get(src) or fx["p"](src), "--out", out(fx, tmp)]
  return argv


def to_pytorch(checkpoint="classifier", out=lambda fx, tmp: tmp / "exported", extra=()):
  return lambda fx, tmp: ["convert", "to-pytorch", "--checkpoint", fx["p"](checkpoint), "--out", out(fx, tmp),
                          *extra]


def export_packed(out, checkpoint="classifier", extra=()):
  return lambda fx, tmp: ["export-packed", "--checkpoint", fx["p"](checkpoint), "--out", out(fx, tmp), *extra]


def eval_pytorch(model="export", *overrides, extra=()):
  def argv(fx, tmp):
    folder = fx["torch"].get(model) or fx["p"](model)
    return (["eval-pytorch", "--model", folder, "--config", f"{GLUE}:task=sst2"]
            + _overrides([f"data.path={fx['glue']}", "max_length=16", *overrides]) + _paths(extra, fx, tmp))
  return argv


def predict_argv(texts, *overrides, checkpoint="classifier", task="sst2"):
  return lambda fx, tmp: (["predict", "--config", f"{GLUE}:task={task}", "--checkpoint", fx["p"](checkpoint),
                           "--input", fx["p"](texts)] + _overrides(["max_length=16", *overrides]))


def wrong_kind(command: str, config: str):
  """`command` with a config of a kind it does not take, and what else it needs."""
  extra = {"pretrain": ["--workdir"], "finetune": ["--workdir"], "track": ["--workdir"], "study": ["--workdir"],
           "evaluate": ["--checkpoint"], "predict": ["--checkpoint"], "eval-pytorch": ["--model"]}.get(command, [])
  return lambda fx, tmp: [command, "--config", config, *[a for flag in extra for a in (flag, tmp / "out")]]


def glue_report(*workdirs, submission=None):
  return lambda fx, tmp: (["glue-report", "--workdirs", *[fx["p"](w) for w in workdirs]]
                          + (["--submission_dir", submission(fx, tmp)] if submission else []))


under_file = lambda fx, tmp: os.path.join(fx["p"]("a_file"), "sub")
fixture = lambda *parts: (lambda fx, tmp: fx["p"](*parts))
MUST_BE_1 = "must be an integer >= 1"

CASES = [
    # pretrain: every *_every, batch size, eval_batches, keep_checkpoints, model fields, optimizer, data
    Case("pretrain log_every=0", pretrain("log_every=0"), "log_every " + MUST_BE_1),
    Case("pretrain one token type", pretrain("model.type_vocab_size=1"),
         "pretraining makes sentence pairs, whose second segments have token type 1, but the model's type_vocab_size"),
    Case("pretrain data.paths with a source that reads none", pretrain("data.source=wikitext2"),
         "data.paths and data.eval_paths are set, but data.source='wikitext2' reads no files"),
    Case("pretrain checkpoint_every=0", pretrain("checkpoint_every=0"), "checkpoint_every " + MUST_BE_1),
    Case("pretrain eval_every=0", pretrain("eval_every=0"), "eval_every " + MUST_BE_1),
    Case("pretrain batch_size=0", pretrain("batch_size=0"), "batch_size " + MUST_BE_1),
    Case("pretrain batch_size=None", pretrain("batch_size=None"), "batch_size " + MUST_BE_1),
    Case("pretrain eval_batches=0", pretrain("eval_batches=0"), "eval_batches " + MUST_BE_1),
    Case("pretrain eval_batch_size=0", pretrain("eval_batch_size=0"), "eval_batch_size " + MUST_BE_1),
    Case("pretrain grad_accum_steps=0", pretrain("grad_accum_steps=0"), "grad_accum_steps " + MUST_BE_1),
    Case("pretrain total_steps=0", pretrain("total_steps=0"), "total_steps " + MUST_BE_1),
    Case("pretrain keep_checkpoints=0 new workdir", pretrain("keep_checkpoints=0"),
         "keep_checkpoints " + MUST_BE_1),
    Case("pretrain keep_checkpoints=-2", pretrain("keep_checkpoints=-2"), "keep_checkpoints " + MUST_BE_1),
    Case("pretrain seed=-1", pretrain("seed=-1"), "seed must be an integer >= 0"),
    Case("pretrain data.shards=-1", pretrain("data.shards=-1"), "data.shards must be an integer >= 0"),
    Case("pretrain model.num_heads=0", pretrain("model.num_heads=0"), "num_heads=0 out of range"),
    Case("pretrain model.num_heads=3", pretrain("model.num_heads=3"), "not a multiple of num_heads 3"),
    Case("pretrain model.num_layers=0", pretrain("model.num_layers=0"), "num_layers=0 out of range"),
    Case("pretrain model.weight_binarizer=foo", pretrain("model.weight_binarizer=foo"),
         "unknown weight binarizer"),
    Case("pretrain model.activation_binarizer=foo", pretrain("model.activation_binarizer=foo"),
         "unknown activation binarizer"),
    Case("pretrain model.pooling=max", pretrain("model.pooling=max"), "unknown pooling 'max'"),
    Case("pretrain model.hidden_size=thirty-two", pretrain("model.hidden_size=thirty-two"),
         "model.hidden_size"),
    Case("pretrain model.hidden_dropout=1.5", pretrain("model.hidden_dropout=1.5"),
         "dropouts must be in [0, 1)"),
    Case("pretrain model.matmul_precision=fast", pretrain("model.matmul_precision=fast"),
         "unknown matmul_precision"),
    Case("pretrain learning_rate=inf", pretrain("optimizer.learning_rate=1e999"), "optimizer.learning_rate"),
    Case("pretrain learning_rate=-1", pretrain("optimizer.learning_rate=-1.0"), "optimizer.learning_rate"),
    Case("pretrain optimizer.b1=1", pretrain("optimizer.b1=1.0"), "optimizer.b1"),
    Case("pretrain optimizer.max_grad_norm=-1", pretrain("optimizer.max_grad_norm=-1.0"), "optimizer.max_grad_norm"),
    Case("pretrain optimizer.schedule=cosine", pretrain("optimizer.schedule=cosine"), "optimizer.schedule"),
    Case("pretrain data.mask_prob=0", pretrain("data.mask_prob=0.0"), "data.mask_prob"),
    Case("pretrain data.max_seq_length=4", pretrain("data.max_seq_length=4"), "data.max_seq_length"),
    Case("pretrain data.masking=foo", pretrain("data.masking=foo"), "data.masking"),
    Case("pretrain data.source=foo", pretrain("data.source=foo"), "data.source"),
    Case("pretrain NSP distillation from a teacher without heads", pretrain("teacher.path={bare_teacher}"),
         "has no NSP head (cls.seq_relationship), which loss.nsp_distill=True distils: set "
         "--config.loss.nsp_distill=False"),
    Case("pretrain whole-word masking without WordPiece pieces", pretrain("data.whole_word_masking=True"),
         "data.whole_word_masking needs a WordPiece tokenizer, whose pieces inside a word start with '##'"),
    Case("pretrain data.whole_word_masking=yes", pretrain("data.whole_word_masking=yes"),
         "data.whole_word_masking"),
    Case("pretrain truncated .txt.gz corpus", pretrain("data.paths={gz}"), "cannot read text file"),
    Case("pretrain truncated .txt.zst corpus", pretrain("data.paths={zst}"),
         "corpus.txt.zst: it ends inside a zstd frame (truncated)"),
    Case("pretrain no corpus files", pretrain("data.paths=/nonexistent/*.txt"), "no file matches '/nonexistent/*.txt'"),
    Case("pretrain jsonl source on a text corpus", pretrain("data.source=jsonl"),
         "corpus.txt: line 1 is not JSON (Expecting value at column 1)"),
    Case("pretrain jsonl corpus of arrays", pretrain("data.source=jsonl", "data.paths={arrays}", "data.eval_paths={arrays}"),
         "arrays.jsonl: line 1 is a JSON array, not an object with a 'text' field"),
    Case("pretrain data.shard_by=lines", pretrain("data.shard_by=lines"), "unknown data.shard_by 'lines'"),
    Case("pretrain files shard_by without files", pretrain("data.shard_by=files", "data.source=wikitext2"),
         "data.shard_by=files deals files to the data shards: data.source 'wikitext2' has none"),
    Case("pretrain more file shards than files", pretrain("data.shard_by=files", "data.shards=2"),
         "deals whole files to the 2 data shards, but data.paths matches 1 file: give every shard a file"),
    Case("pretrain workdir under a file", pretrain(workdir=under_file), "is a file"),
    Case("pretrain read-only workdir", pretrain(workdir=fixture("readonly", "wd")), "read-only", "readonly"),
    Case("pretrain in a finetuning workdir", pretrain(workdir=fixture("finished")),
         "holds a finetuning run (results.json, best, submission); choose another --workdir"),
    # finetune
    Case("finetune min_bucket=0", finetune_argv("min_bucket=0"), "min_bucket " + MUST_BE_1),
    Case("finetune max_length=1", finetune_argv("max_length=1"), "max_length must be an integer >= 3"),
    Case("finetune pooling=max", finetune_argv("pooling=max"), "unknown pooling 'max'"),
    Case("finetune precision=bf16", finetune_argv("precision=bf16"),
         "unknown precision 'bf16'; choose one of fp32, mixed"),
    Case("finetune log_every=0", finetune_argv("log_every=0"), "log_every " + MUST_BE_1),
    Case("finetune early_stop_patience=-1", finetune_argv("early_stop_patience=-1"),
         "early_stop_patience must be an integer >= 0"),
    Case("finetune early_stop_min_delta=-0.5", finetune_argv("early_stop_min_delta=-0.5"),
         "early_stop_min_delta must be a finite number in [0, inf]"),
    Case("finetune batch_size=0", finetune_argv("batch_size=0"), "batch_size " + MUST_BE_1),
    Case("finetune eval_batch_size=0", finetune_argv("eval_batch_size=0"), "eval_batch_size " + MUST_BE_1),
    Case("finetune epochs=0", finetune_argv("epochs=0"), "epochs " + MUST_BE_1),
    Case("finetune steps_per_epoch=-1", finetune_argv("steps_per_epoch=-1"), "steps_per_epoch"),
    Case("finetune dropout=1.5", finetune_argv("dropout=1.5"), "config field dropout"),
    Case("finetune learning_rate=inf", finetune_argv("optimizer.learning_rate=1e999"),
         "optimizer.learning_rate"),
    Case("finetune model.num_heads=0", finetune_argv("model.num_heads=0"), "num_heads=0 out of range"),
    Case("finetune model.weight_binarizer=foo", finetune_argv("model.weight_binarizer=foo"),
         "weight binarizer"),
    Case("finetune init.kind=foo", finetune_argv("init.kind=foo"), "init.kind"),
    Case("finetune model field with a checkpoint start", finetune_argv("init.kind=checkpoint", "init.path=/x"),
         "--config.model.vocab_size has no effect with init.kind=checkpoint: the checkpoint brings its own model"),
    Case("finetune model field with a teacher start", finetune_argv("init.kind=teacher"),
         "--config.model.vocab_size has no effect with init.kind=teacher: the teacher brings its own architecture"),
    Case("finetune data.split_seed=-1", finetune_argv("data.split_seed=-1"), "data.split_seed"),
    Case("finetune sentence pairs with one token type", finetune_argv("model.type_vocab_size=1", task="rte"),
         "rte gives sentence pairs, whose second texts have token type 1, but the model's type_vocab_size is 1"),
    Case("finetune one custom label", finetune_argv("data.labels=pos", task="custom"), "name one class"),
    Case("finetune a custom label twice", finetune_argv("data.labels=neg,pos,neg", task="custom"),
         "name 'neg' twice"),
    Case("finetune data.format=foo", finetune_argv("data.format=foo"), "data.format"),
    Case("finetune JSONL rows are arrays", finetune_argv("data.format=jsonl", "data.train_file={arrays}",
                                                         "data.dev_file={arrays}"), "is a JSON list"),
    Case("finetune max_length over the positions", finetune_argv("max_length=100"), "exceeds the model's 64"),
    Case("finetune existing run without --overwrite", finetune_argv(workdir=fixture("finished")),
         "already holds a finetuning run"),
    Case("finetune workdir under a file", finetune_argv(workdir=under_file), "is a file"),
    Case("finetune --overwrite in a pretraining workdir",
         lambda fx, tmp: finetune_argv(workdir=fixture("pretrain_wd"))(fx, tmp) + ["--overwrite"],
         "holds a pretraining run (checkpoint steps 0, 5); to finetune from it, pass --init_from"),
    Case("finetune read-only workdir", finetune_argv(workdir=fixture("readonly", "ft")),
         "read-only", "readonly"),
    # evaluate
    Case("evaluate eval_batch_size=0", evaluate_argv("eval_batch_size=0"), "eval_batch_size " + MUST_BE_1),
    Case("evaluate min_bucket=0", evaluate_argv("min_bucket=0"), "min_bucket " + MUST_BE_1),
    Case("evaluate max_length=2", evaluate_argv("max_length=2"), "max_length must be an integer >= 3"),
    Case("evaluate pooling=max", evaluate_argv("pooling=max"), "unknown pooling 'max'"),
    Case("evaluate --predictions a folder",
         evaluate_argv(extra=["--split", "test", "--predictions", fixture("glue_data")]),
         "is a folder"),
    Case("evaluate --predictions existing file", evaluate_argv(
        extra=["--split", "test", "--predictions", fixture("predictions.tsv")]), "already exists"),
    Case("evaluate --predictions under a file", evaluate_argv(
        extra=["--split", "test", "--predictions", lambda fx, tmp: os.path.join(under_file(fx, tmp), "p")]),
        "is a file"),
    Case("evaluate --predictions read-only folder", evaluate_argv(
        extra=["--split", "test", "--predictions", fixture("readonly", "p.tsv")]), "read-only", "readonly"),
    Case("evaluate pretraining eval_batches=0", evaluate_argv("eval_batches=0", checkpoint="pretrain_wd",
                                                              pretraining=True), "eval_batches " + MUST_BE_1),
    Case("evaluate pretraining model.num_heads=0",
         evaluate_argv("model.num_heads=0", checkpoint="pretrain_wd", pretraining=True), "num_heads=0"),
    Case("evaluate missing checkpoint", evaluate_argv(checkpoint="nowhere"), "does not exist"),
    Case("evaluate encoder checkpoint as classifier", evaluate_argv(checkpoint="encoder"),
         "not a classification"),
    # summary
    Case("summary num_layers=-1", summary_argv("num_layers=-1"), "num_layers=-1 out of range"),
    Case("summary num_heads=0", summary_argv("num_heads=0"), "num_heads=0 out of range"),
    Case("summary num_heads=3", summary_argv("num_heads=3"), "not a multiple of num_heads 3"),
    Case("summary weight_binarizer=foo", summary_argv("weight_binarizer=foo"), "unknown weight binarizer"),
    Case("summary pooling=max", summary_argv("pooling=max"), "unknown pooling"),
    Case("summary mlm_transform_act=tanh", summary_argv("mlm_transform_act=tanh"),
         "unknown mlm_transform_act"),
    Case("summary vocab_size=0", summary_argv("vocab_size=0"), "vocab_size=0 out of range"),
    Case("summary --seq-len 0", summary_argv(extra=["--seq-len", "0"]), "--seq-len 0"),
    # convert from-pytorch
    Case("from-pytorch config.json is a list", from_pytorch("config_list"), "holds a JSON list"),
    Case("from-pytorch hidden_size thirty-two", from_pytorch("hidden_size_text"), "hidden_size must be int"),
    Case("from-pytorch num_attention_heads 0", from_pytorch("zero_heads"), "num_heads=0 out of range"),
    Case("from-pytorch RoBERTa", from_pytorch("roberta"), "config.json describes a roberta model"),
    Case("from-pytorch question answering", from_pytorch("qa"),
         "describes a BertForQuestionAnswering, whose head bipft does not compute"),
    Case("from-pytorch a head's tensors without architectures", from_pytorch("qa_tensors"),
         "unexpected tensor qa_outputs.weight"),
    Case("from-pytorch decoder", from_pytorch("decoder"), "sets is_decoder=true (a BERT decoder)"),
    Case("from-pytorch FP model with a ReLU FFN", from_pytorch("relu_ffn"),
         "hidden_act 'relu' is not supported: the FFN computes GELU"),
    Case("from-pytorch id2label not a mapping", from_pytorch("bad_id2label"),
         "does not describe a supported"),
    Case("from-pytorch .bin bare tensor", from_pytorch("bare_tensor"), "holds a Tensor, not a state dict"),
    Case("from-pytorch .bin non-tensor values", from_pytorch("non_tensor_values"), "not a state dict"),
    Case("from-pytorch .bin refused by weights_only", from_pytorch("pickled"), "would run pickled code"),
    Case("from-pytorch truncated .bin", from_pytorch("truncated_bin"), "not a readable PyTorch file"),
    Case("from-pytorch truncated safetensors", from_pytorch("truncated_safetensors"),
         "not a readable safetensors"),
    Case("from-pytorch --out existing", from_pytorch("export", out=fixture("classifier")), "already exists"),
    Case("from-pytorch --out under a file", from_pytorch("export", out=under_file), "is a file"),
    Case("from-pytorch --out read-only", from_pytorch("export", out=fixture("readonly", "o")), "read-only",
         "readonly"),
    # convert to-pytorch
    Case("to-pytorch --out existing", to_pytorch(out=fixture("export")), "already exists"),
    Case("to-pytorch --out inside a step", to_pytorch(checkpoint="pretrain_wd", out=fixture("pretrain_wd", "5", "hf")),
         "is inside checkpoint step"),
    Case("export-packed --out inside a step", export_packed(fixture("pretrain_wd", "5", "m.safetensors"),
                                                            checkpoint="pretrain_wd"), "is inside checkpoint step"),
    Case("pretrain workdir inside a step", pretrain(workdir=fixture("pretrain_wd", "0", "wd")),
         "is inside checkpoint step"),
    Case("to-pytorch --out under a file", to_pytorch(out=under_file), "is a file"),
    Case("to-pytorch missing checkpoint", to_pytorch(checkpoint="nowhere"), "does not exist"),
    Case("to-pytorch missing step", to_pytorch(extra=["--step", "7"]), "no step 7"),
    # export-packed
    Case("export-packed --out existing file", export_packed(fixture("a_file")), "already exists"),
    Case("export-packed --out a folder", export_packed(fixture("export")), "is a folder"),
    Case("export-packed --out under a file",
         export_packed(lambda fx, tmp: os.path.join(under_file(fx, tmp), "m")),
         "is a file"),
    Case("export-packed --out read-only", export_packed(fixture("readonly", "m.safetensors")), "read-only",
         "readonly"),
    Case("export-packed missing checkpoint", export_packed(lambda fx, tmp: tmp / "m", checkpoint="nowhere"),
         "does not exist"),
    Case("export-packed FP checkpoint", export_packed(lambda fx, tmp: tmp / "m", checkpoint="teacher"),
         "full-precision"),
    # eval-pytorch
    Case("eval-pytorch export without classifier", eval_pytorch("export_encoder"), "no classifier head"),
    Case("eval-pytorch export without pooler", eval_pytorch("export_no_pooler"), "has no pooler (no pooler.* tensors)"),
    Case("eval-pytorch truncated safetensors", eval_pytorch("export_truncated"),
         "not a readable safetensors"),
    Case("eval-pytorch .bin refused by weights_only", eval_pytorch("export_pickled"),
         "would run pickled code"),
    Case("eval-pytorch config.json a list", eval_pytorch("export_config_list"), "holds a JSON list"),
    Case("eval-pytorch num_attention_heads 0", eval_pytorch("export_zero_heads"), "num_heads=0 out of range"),
    Case("eval-pytorch no config.json", eval_pytorch("classifier"), "has no config.json"),
    Case("eval-pytorch min_bucket=0", eval_pytorch("export", "min_bucket=0"), "min_bucket " + MUST_BE_1),
    Case("eval-pytorch max_length=1", eval_pytorch("export", "max_length=1"),
         "max_length must be an integer >= 3"),
    Case("eval-pytorch --predictions a folder", eval_pytorch(extra=["--predictions", fixture("export")]),
         "is a folder"),
    Case("eval-pytorch --predictions existing",
         eval_pytorch(extra=["--predictions", fixture("predictions.tsv")]),
         "already exists"),
    # predict
    Case("predict a blank line", predict_argv("texts_blank_line.txt"), "line 2 is empty"),
    Case("predict one text for a pair task", predict_argv("a_file", task="mrpc"), "mrpc takes two texts per line"),
    Case("predict missing input", predict_argv("nowhere.txt"), "does not exist"),
    Case("predict encoder checkpoint", predict_argv("a_file", checkpoint="encoder"), "not a classification one"),
    Case("predict num_labels", predict_argv("a_file", "data.labels=neg,neutral,pos", task="custom"),
         "has 2 outputs but custom needs 3"),
    Case("predict max_length beyond positions", predict_argv("a_file", "max_length=65"),
         "max_length 65 exceeds the model's 64 positions"),
    # glue-report
    Case("glue-report results without the metric", glue_report("runs/no_metric"), "no accuracy score"),
    Case("glue-report string metric", glue_report("runs/string_metric"), "scores must be numbers"),
    Case("glue-report dev as a list", glue_report("runs/dev_list"), "dev must map"),
    Case("glue-report results.json a list", glue_report("runs/results_list"),
         "not a finetuning results file"),
    Case("glue-report no results.json", glue_report("glue_data"), "has no results.json"),
    Case("glue-report --submission_dir a file", glue_report("finished", submission=fixture("a_file")),
         "is a file"),
    Case("glue-report --submission_dir existing file",
         glue_report("finished", submission=fixture("submission_out")),
         "already holds SST-2.tsv"),
    Case("glue-report --submission_dir read-only",
         glue_report("finished", submission=fixture("readonly", "s")),
         "read-only", "readonly"),
    # a config of another kind: named, with the kind the command takes (it was a KeyError traceback)
    *[Case(f"{command} given {kind}", wrong_kind(command, config), f"is {KINDS[kind]}; this command takes {takes}")
      for command, config, kind, takes in [
          ("pretrain", f"{GLUE}:task=sst2", "glue", KINDS["pretrain"]),
          ("pretrain", f"{MODEL}:tiny", "model", KINDS["pretrain"]),
          ("finetune", f"{PRETRAIN}:tiny", "pretrain", KINDS["glue"]),
          ("evaluate", f"{MODEL}:tiny", "model", f"{KINDS['glue']} or {KINDS['pretrain']}"),
          ("eval-pytorch", f"{PRETRAIN}:demo", "pretrain", KINDS["glue"]),
          ("predict", f"{TRACK}:quick", "track", f"{KINDS['glue']} or {KINDS['pretrain']}"),
          ("summary", f"{GLUE}:task=rte", "glue", f"{KINDS['model']} or {KINDS['pretrain']}"),
          ("track", f"{STUDY}:quick", "study", KINDS["track"]),
          ("study", f"{PRETRAIN}:demo", "pretrain", KINDS["study"])]],
]


def _expand(value, fx):
  """`{gz}`, `{zst}`, `{arrays}` and `{bare_teacher}` (a BertModel export, no heads) in overrides name
  fixture files."""
  return value.format(gz=fx["p"]("corpus.txt.gz"), zst=fx["p"]("corpus.txt.zst"), arrays=fx["p"]("arrays.jsonl"),
                      bare_teacher=fx["p"]("export_encoder"))


def test_there_are_enough_cases():
  assert len(CASES) >= 80
  assert {c.name.split()[0] for c in CASES} == {
      "pretrain", "finetune", "evaluate", "summary", "from-pytorch", "to-pytorch", "export-packed",
      "eval-pytorch", "predict", "glue-report", "track", "study"}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, fx, tmp_path, capsys, monkeypatch):
  if case.read_only:
    _read_only(monkeypatch, fx["p"](case.read_only))
  argv = [_expand(str(a), fx) for a in case.argv(fx, tmp_path)]
  line = assert_refused(argv, capsys, fx["root"], str(tmp_path))
  assert case.expect in line, line


# --- each data-loss case as its own test -----------------------------------------------

def test_keep_checkpoints_zero_keeps_every_checkpoint(fx, tmp_path, capsys):
  steps = sorted(os.listdir(fx["pretrain_wd"]))
  argv = pretrain("keep_checkpoints=0", workdir=fixture("pretrain_wd"))(fx, tmp_path)
  assert "keep_checkpoints must be an integer >= 1" in assert_refused(argv, capsys, fx["root"])
  assert sorted(os.listdir(fx["pretrain_wd"])) == steps and {"0", "5"} <= set(steps)


@pytest.mark.parametrize("bad", [["--config.log_every=0"], ["--config.data.path=/nowhere"],
                                 ["--init_from", "/nowhere", "--config.init.kind=checkpoint"],
                                 ["--config.max_length=1"], ["--config.min_bucket=0"]],
                         ids=["log_every=0", "bad data", "bad init", "max_length=1", "min_bucket=0"])
def test_finetune_overwrite_with_a_bad_input_keeps_the_earlier_run(fx, tmp_path, capsys, bad):
  argv = finetune_argv(workdir=fixture("finished"))(fx, tmp_path) + ["--overwrite"] + bad
  assert_refused(argv, capsys, fx["root"])
  assert sorted(os.listdir(fx["finished"])) == ["best", "metrics.jsonl", "results.json", "submission"]


def test_finetune_overwrite_that_crashes_mid_run_keeps_the_earlier_run(fx, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  shutil.copytree(fx["finished"], workdir)
  before = snapshot(workdir)
  staged = []

  def crash(*args, **kwargs):  # the first training batch: the run's outputs are already being written
    staged.extend(os.listdir(os.path.join(workdir, finetune.STAGING)))
    raise RuntimeError("disk full")
  monkeypatch.setattr(tasks, "make_batch", crash)
  argv = finetune_argv("model.binary=False", workdir=lambda fx, tmp: workdir)(fx, tmp_path)  # no calibration
  with pytest.raises(RuntimeError, match="disk full"):
    cli.main([str(a) for a in argv] + ["--overwrite"])
  assert "checkpoints" in staged  # the run had started writing its outputs
  after = snapshot(workdir)
  assert {p: v for p, v in after.items() if finetune.STAGING not in p} == before


@pytest.mark.parametrize("command", ["pretrain", "finetune", "study", "track"])
def test_a_workdir_another_run_is_writing_is_refused(fx, tmp_path, capsys, command):
  workdir = tmp_path / "busy"
  # The other run's log (a finetuning run's staged before its first checkpoint): a second run would
  # cut it back or clear it away.
  written = workdir / (f"{finetune.STAGING}/metrics.jsonl" if command == "finetune" else "metrics.jsonl")
  written.parent.mkdir(parents=True)
  written.write_text('{"step": 1}\n')
  argv = {"pretrain": pretrain(workdir=lambda fx, tmp: workdir),
          "finetune": finetune_argv(workdir=lambda fx, tmp: workdir),
          "study": lambda fx, tmp: ["study", "--config", os.path.join(ROOT, "configs", "study.py:quick"),
                                    "--workdir", workdir],
          "track": lambda fx, tmp: ["track", "--config", os.path.join(ROOT, "configs", "track.py:quick"),
                                    "--workdir", workdir]}[command](fx, tmp_path)
  with files.workdir_lock(str(workdir), "finetune"):  # as the other run holds it
    line = assert_refused(argv, capsys, fx["root"], str(tmp_path))
  assert f"{workdir} is in use by another run: bipft finetune, pid {os.getpid()} on " in line
  assert written.read_text() == '{"step": 1}\n'
  assert sorted(os.listdir(workdir)) == [written.relative_to(workdir).parts[0]]  # the lock's file left with it


def test_a_workdir_the_run_created_and_left_empty_is_removed(tmp_path):
  """An error after the lock made the workdir (data without examples, say) left an empty folder behind;
  one that existed before, or that the run wrote to, stays."""
  created = tmp_path / "new" / "run"
  with pytest.raises(UserError, match="no examples"), files.workdir_lock(str(created), "pretrain"):
    raise UserError("the data source yields no examples")
  assert not created.exists() and (tmp_path / "new").exists()
  with files.workdir_lock(str(created), "pretrain"):
    (created / "metrics.jsonl").write_text("{}\n")
  assert os.listdir(created) == ["metrics.jsonl"]
  existing = tmp_path / "existing"
  existing.mkdir()
  with files.workdir_lock(str(existing), "pretrain"):
    pass
  assert existing.is_dir() and not os.listdir(existing)


def test_export_packed_keeps_an_existing_file_unless_overwrite(fx, tmp_path, capsys):
  out = tmp_path / "model.safetensors"
  out.write_bytes(b"an earlier export")
  line = assert_refused(export_packed(lambda fx, tmp: out)(fx, tmp_path), capsys, fx["root"], str(tmp_path))
  assert "pass --overwrite" in line
  umask = os.umask(0o022)
  try:
    code = cli.main(export_packed(lambda fx, tmp: str(out), extra=["--overwrite", "--remainder", "float32"])(
        fx, tmp_path))
  finally:
    os.umask(umask)
  assert code == 0 and out.read_bytes()[:8] != b"an earli"
  assert stat.S_IMODE(out.stat().st_mode) == 0o644  # a plain file's mode, not mkstemp's 0600
  assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]  # no temporary file left


def test_eval_pytorch_refuses_an_export_without_classifier(fx, tmp_path, capsys):
  line = assert_refused(eval_pytorch("export_encoder")(fx, tmp_path), capsys, fx["root"])
  assert "no classifier head" in line


def test_weights_only_refusal_is_one_line_without_torchs_advice(fx, tmp_path, capsys):
  line = assert_refused(from_pytorch("pickled")(fx, tmp_path), capsys, fx["root"], str(tmp_path))
  assert "pickled code" in line and "weights_only=False" not in line  # torch's advice, wrong here


# --- hangs ---------------------------------------------------------------------------

def test_a_2mb_single_line_corpus_trains_two_steps(fx, tmp_path, capsys):
  rng = np.random.default_rng(1)
  line = " ".join(rng.choice(WORDS, 700_000))[:2_300_000]
  (tmp_path / "one_line.txt").write_text(line + "\n")
  workdir = tmp_path / "wd"
  argv = pretrain(f"data.paths={tmp_path / 'one_line.txt'}", f"data.eval_paths={tmp_path / 'one_line.txt'}",
                  "total_steps=2", "optimizer.warmup_steps=1", "eval_batches=1", "checkpoint_every=2",
                  workdir=lambda fx, tmp: workdir)(fx, tmp_path)
  assert cli.main([str(a) for a in argv]) == 0, capsys.readouterr().err
  assert "2" in os.listdir(workdir)

