"""`bipft evaluate` reproduces what the runs log: a finetune workdir's results.json and leaderboard
file, a pretraining run's held-out MLM accuracy; a packed export of a classifier predicts what the
classifier predicts on every kernel; bad checkpoints, splits and paths exit 2 in one line.
`bipft predict` labels texts of one's own as evaluate labels a split, with the softmax of the logits."""
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
import torch
import transformers

import glue_fixtures
from bipft_jax import checkpointing, cli, config_loading, losses, packed, packed_file, predict, pretraining, pytorch_io
from bipft_jax import saved_models, sharding
from bipft_jax import model as model_lib
from bipft_jax import model_params
from bipft_jax.data import sources
from bipft_jax.errors import UserError
from bipft_jax.glue import finetune, predictions, tasks

from test_convert import hf_bert
from test_glue_finetune import ROOT, glue_dir, tiny_config, vocab_dir  # noqa: F401  (fixtures)
from test_train import CONFIG as PRETRAIN_CONFIG
from test_train import files, tiny_overrides  # noqa: F401  (fixture)
from test_train import tiny_config as tiny_pretrain_config

GLUE_CONFIG = os.path.join(ROOT, "configs/glue.py")


@pytest.fixture(scope="module")
def finetuned(glue_dir, vocab_dir, tmp_path_factory):
  """A finished two-epoch sst2 workdir and its results.json."""
  workdir = tmp_path_factory.mktemp("sst2")
  results = finetune.finetune(tiny_config("sst2", glue_dir, vocab_dir, "epochs=2", "steps_per_epoch=2"),
                              str(workdir))
  return str(workdir), results


def _glue_args(glue_dir, vocab_dir, *extra):
  """The evaluation-relevant fields of tiny_config: data, tokenizer, max_length, eval batch size."""
  return [f"--config.data.path={glue_dir}", f"--config.data.tokenizer={vocab_dir}", "--config.max_length=16",
          "--config.eval_batch_size=8", *extra]


def test_glue_dev_metrics_equal_results_json(finetuned, glue_dir, vocab_dir, capsys):
  workdir, results = finetuned
  code = cli.main(["evaluate", "--config", f"{GLUE_CONFIG}:task=sst2", "--checkpoint", workdir, "--json"]
                  + _glue_args(glue_dir, vocab_dir))
  assert code == 0
  out = json.loads(capsys.readouterr().out)
  assert out["metrics"] == results["dev"]
  assert out["majority_rate"]["dev"] == results["dev_majority_rate"]
  assert out["step"] == results["best_epoch"] and out["checkpoint"].endswith("best")
  assert out["examples"] == {"dev": 16}


def test_glue_test_predictions_equal_the_submission_file(finetuned, glue_dir, vocab_dir, tmp_path, capsys):
  workdir, _ = finetuned
  target = tmp_path / "SST-2.tsv"
  code = cli.main(["evaluate", "--config", f"{GLUE_CONFIG}:task=sst2", "--checkpoint", os.path.join(workdir, "best"),
                   "--split", "test", "--predictions", str(target)] + _glue_args(glue_dir, vocab_dir))
  assert code == 0
  assert capsys.readouterr().out.strip() == f"sst2 test (16 examples): predictions written to {target}"
  assert target.read_text() == open(os.path.join(workdir, "submission", "SST-2.tsv")).read()
  assert os.listdir(tmp_path) == ["SST-2.tsv"]  # no temporary file left behind


def test_pretraining_accuracy_equals_the_runs_last_evaluation(files, tmp_path, capsys):
  overrides = [f"--config.{o}" for o in tiny_overrides(files)] + ["--config.total_steps=3"]
  workdir = str(tmp_path / "run")
  assert cli.main(["pretrain", "--config", f"{PRETRAIN_CONFIG}:tiny", "--workdir", workdir] + overrides) == 0
  logged = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  final = [r for r in logged if "eval_mlm_accuracy" in r][-1]
  assert final["step"] == 3
  # the tiny config's held-out file is its corpus: the run says so, and what it reads
  out, documents = capsys.readouterr().out, len(sources.TextFiles([files["corpus"]]))
  assert ("bipft pretrain: warning: data.eval_paths names 1 of the training files (corpus.txt): the held-out "
          "scores are on data the student trains on") in out
  assert re.search(rf"bipft pretrain: training data: 1 file \(\d+\.\d KB\), {documents} documents; held out: 1 file "
                   rf"\(\d+\.\d KB\), {documents} documents\n", out)
  assert cli.main(["evaluate", "--config", f"{PRETRAIN_CONFIG}:tiny", "--checkpoint", workdir, "--json"]
                  + overrides) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["step"] == 3
  assert out["eval_mlm_accuracy"] == final["eval_mlm_accuracy"]
  for key in ("eval_mlm_loss", "eval_rep_dist_loss", "eval_total_loss"):
    assert out[key] == final[key], key  # the same computation on the same devices
  assert 0 < out["eval_rep_dist_loss"] < out["eval_total_loss"]
  # Without data.eval_paths (it was an error) the run's are read; another eval_batches is named
  others = [o for o in overrides if not o.startswith(("--config.data.eval_paths=", "--config.tokenizer="))] + [
      "--config.eval_batches=1"]  # the run's tokenizer too: the tiny config's random teacher has none
  assert cli.main(["evaluate", "--config", f"{PRETRAIN_CONFIG}:tiny", "--checkpoint", workdir, "--json"]
                  + others) == 0
  out, err = capsys.readouterr()
  assert err.splitlines() == [
      f"bipft: note: data.eval_paths={files['corpus']} (the run's)",
      f"bipft: note: eval_batches is 1 here but was 2 in the run that wrote {workdir}: these held-out scores are "
      "not the run's"]
  assert json.loads(out)["step"] == 3


def test_a_held_out_set_too_small_for_its_batches_is_named(files, tmp_path, capsys):
  """Fewer held-out examples than eval_batches x eval_batch_size: the batches repeat some, and the run says so;
  a held-out file without sentence pairs is named as the held-out data."""
  mesh, rules = sharding.make_mesh({"data": 1}), sharding.rules_from_config({})
  tokenizer = pytorch_io.load_tokenizer(files["vocab"])
  small = tmp_path / "small.txt"
  small.write_text("The first sentence of the only document.\nIts second sentence.\n")
  for held_out, warned in ((files["corpus"], False), (str(small), True)):
    config = tiny_pretrain_config(files, **{"data.eval_paths": held_out, "eval_batches": 2, "eval_batch_size": 4})
    batches, held = pretraining.held_out_batches(config, tokenizer, sharding.batch_sharding(mesh, rules))
    rows = np.concatenate([jax.device_get(b["input_ids"]) for b in batches])
    assert held.startswith("1 file (") and len(rows) == 8
    assert (len(np.unique(rows, axis=0)) < len(rows)) == warned
    err = capsys.readouterr().err
    assert (f"bipft: warning: the held-out data ({held}) makes fewer examples than eval_batches x eval_batch_size "
            "(2 x 4): the evaluation counts some twice or more" in err) == warned, err
  small.write_text("\u200b\u200b\n")  # text that tokenizes to nothing
  config = tiny_pretrain_config(files, **{"data.eval_paths": str(small)})
  with pytest.raises(UserError, match=re.escape("the held-out data (1 file (0.0 KB), 1 document): the data source "
                                                "yields no examples")):
    pretraining.held_out_batches(config, tokenizer, sharding.batch_sharding(mesh, rules))


def test_held_out_mse_to_the_teacher_is_the_training_objectives(files):
  """The evaluator's hidden-state MSE is losses.hidden_mse over the held-out batches (0 for the teacher
  itself), and its total the distillation loss without dropout, with the run's loss switches."""
  config = tiny_pretrain_config(files, **{"model.binary": False, "loss.mask_padding_in_mse": True})
  mesh, rules = sharding.make_mesh({"data": 1}), sharding.rules_from_config(config.mesh.rules)
  teacher_config, teacher_params, _ = pretraining.load_teacher(config)
  student_cfg = pretraining.student_config(config, teacher_config)
  student, teacher = model_lib.build(student_cfg, "pretraining"), pretraining.teacher_module(config, teacher_config,
                                                                                             student_cfg)
  tokenizer = pytorch_io.load_tokenizer(files["vocab"])
  batches, _ = pretraining.held_out_batches(config, tokenizer, sharding.batch_sharding(mesh, rules))
  evaluate = pretraining.held_out_evaluator(student, teacher, config, batches, mesh, rules)
  params = model_params.init_params(student, jax.random.key(5))
  assert evaluate(teacher_params, teacher_params)["eval_rep_dist_loss"] == 0.0
  scores = evaluate(params, teacher_params)
  expected_rep, expected_total = [], []
  for batch in batches:
    batch = jax.device_get(batch)
    out = student.apply({"params": params}, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                        mlm_positions_BxN=batch["mlm_positions"])
    teacher_out = pretraining.teacher_outputs(teacher, teacher_params, batch, False, jax.random.key(0))
    mse, _ = losses.hidden_mse(out["hidden_states"], teacher_out["hidden_states"], batch["attention_mask"])
    total, _ = losses.distillation_loss(out, teacher_out, batch, mask_padding_in_mse=True,
                                        mlm_labels=batch["mlm_labels"])
    expected_rep.append(float(mse))
    expected_total.append(float(total))
  assert scores["eval_rep_dist_loss"] == pytest.approx(np.mean(expected_rep), rel=1e-5)
  assert scores["eval_total_loss"] == pytest.approx(np.mean(expected_total), rel=1e-5)


@pytest.fixture(scope="module")
def packed_classifier(finetuned, tmp_path_factory):
  """The finetuned classifier's packed file, FP remainder in float32 (no rounding of its own)."""
  path = str(tmp_path_factory.mktemp("packed") / "sst2.bipft.safetensors")
  assert cli.main(["export-packed", "--checkpoint", os.path.join(finetuned[0], "best"), "--out", path,
                   "--remainder", "float32"]) == 0
  return path


def _evaluate_json(checkpoint, glue_dir, vocab_dir, capsys, *extra) -> dict:
  capsys.readouterr()
  assert cli.main(["evaluate", "--config", f"{GLUE_CONFIG}:task=sst2", "--checkpoint", checkpoint, "--json",
                   *extra] + _glue_args(glue_dir, vocab_dir)) == 0
  return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("split", ["dev", "test"])
def test_packed_file_predicts_what_the_classifier_predicts(split, finetuned, packed_classifier, exact_kernels,
                                                            glue_dir, vocab_dir, tmp_path, capsys):
  simulated_tsv = tmp_path / "simulated.tsv"
  simulated = _evaluate_json(finetuned[0], glue_dir, vocab_dir, capsys, "--split", split,
                             "--predictions", str(simulated_tsv))
  for kernel in ("popcount", *exact_kernels):
    packed_tsv = tmp_path / f"{kernel}.tsv"
    ours = _evaluate_json(packed_classifier, glue_dir, vocab_dir, capsys, "--split", split, "--kernel", kernel,
                          "--predictions", str(packed_tsv))
    assert ours["kernel"] == kernel and ours["step"] is None and ours["checkpoint"] == packed_classifier
    assert ours["metrics"] == simulated["metrics"] and ours["examples"] == simulated["examples"] == {split: 16}
    assert packed_tsv.read_text() == simulated_tsv.read_text()  # every example's prediction


def test_precision_sets_how_checkpoint_and_packed_file_compute(finetuned, packed_classifier, glue_dir, vocab_dir,
                                                               tmp_path, capsys, monkeypatch):
  # Empty: the model's own (fp32 here); mixed: bf16 FP products in both, which then predict alike.
  real_step, real_forward = predictions.make_predict_step, packed.forward
  used = set()
  monkeypatch.setattr(predictions, "make_predict_step", lambda module: used.add(module.config.precision)
                      or real_step(module))
  monkeypatch.setattr(packed, "forward", lambda c, head, *args: (head == "classification" and used.add(c.precision))
                      or real_forward(c, head, *args))  # not the kernel probes' encoders
  for precision in ("", "mixed"):
    written = []
    for checkpoint in (finetuned[0], packed_classifier):
      used.clear()
      written.append(tmp_path / f"{len(written)}{precision}.tsv")
      _evaluate_json(checkpoint, glue_dir, vocab_dir, capsys, f"--config.precision={precision}",
                     "--predictions", str(written[-1]))
      assert used == {precision or "fp32"}, checkpoint
    assert written[0].read_text() == written[1].read_text()


def test_packed_file_line_names_the_kernel(packed_classifier, glue_dir, vocab_dir, capsys):
  assert cli.main(["evaluate", "--config", f"{GLUE_CONFIG}:task=sst2", "--checkpoint", packed_classifier,
                   "--kernel", "popcount"] + _glue_args(glue_dir, vocab_dir)) == 0
  assert capsys.readouterr().out.startswith("sst2 dev (16 examples, packed 1-bit on the popcount kernel): accuracy ")


@pytest.fixture(scope="module")
def pretraining_checkpoint(tmp_path_factory):
  config = model_lib.BertConfig.from_dict(dict(vocab_size=64, hidden_size=32, num_heads=2, intermediate_size=64,
                                               num_layers=1, max_position_embeddings=64, binary=True))
  path = str(tmp_path_factory.mktemp("pretrained"))
  params = model_params.init_params(model_lib.build(config, "pretraining"), jax.random.key(0))
  checkpointing.save_params(path, params, config, "pretraining")
  return path


def _corrupt(workdir, tmp_path) -> str:
  """A copy of the best/ checkpoint whose array files are truncated (its checksums catch it)."""
  copy = str(tmp_path / "corrupt")
  shutil.copytree(os.path.join(workdir, "best"), copy)
  for folder, _, names in os.walk(copy):
    if os.sep + "params" in folder:
      for name in names:
        if not name.startswith("_"):
          with open(os.path.join(folder, name), "r+b") as f:
            f.truncate(8)
  return copy


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("corrupt", "is corrupt: params/"),
    ("pretraining head", "holds a pretraining model, not a classification one"),
    ("num_labels", "was finetuned on sst2, not mnli"),  # its record names the task, before its shape
    ("split", "sst2 has no split 'validation'; choose one of train, dev, test"),
    ("test without predictions", "has no labels to score: pass --predictions"),
    ("unwritable", "cannot be a folder: "),
    ("classifier for MLM", "holds a classification model, not a pretraining one"),
    ("packed encoder", "holds a packed encoder, not a classifier"),
    ("packed for MLM", "a packed file holds no MLM head to score"),
    ("packed num_labels", "was finetuned on sst2, not mnli"),  # the export keeps the run's record
    ("unknown kernel", "unknown packed kernel 'fastest'; choose one of popcount, int8, native, auto"),
    ("kernel of a folder", "--kernel is for a packed file (`bipft export-packed`)"),
    ("not a packed file", "is not a readable safetensors file"),
])
def test_bad_input_exits_2_in_one_line(case, message, finetuned, pretraining_checkpoint, packed_classifier, glue_dir,
                                       vocab_dir, tmp_path, capsys):
  workdir, _ = finetuned
  task, checkpoint, extra = "sst2", workdir, []
  if case.startswith("packed") or case == "unknown kernel":
    checkpoint = packed_classifier
  if case == "packed encoder":
    checkpoint = str(tmp_path / "encoder.safetensors")
    packed_file.export(*checkpointing.restore_params(pretraining_checkpoint), checkpoint, remainder="float32")
  elif case == "packed num_labels":
    task = "mnli"
  elif case == "unknown kernel":
    extra = ["--kernel", "fastest"]
  elif case == "kernel of a folder":
    extra = ["--kernel", "popcount"]
  elif case == "not a packed file":
    checkpoint = os.path.join(workdir, "results.json")
  elif case == "missing":
    checkpoint = str(tmp_path / "nowhere")
  elif case == "corrupt":
    checkpoint = _corrupt(workdir, tmp_path)
  elif case == "pretraining head":
    checkpoint = pretraining_checkpoint
  elif case == "num_labels":
    task = "mnli"
  elif case == "split":
    extra = ["--split", "validation"]
  elif case == "test without predictions":
    extra = ["--split", "test"]
  elif case == "unwritable":
    extra = ["--split", "dev", "--predictions", os.path.join(workdir, "results.json", "dev.tsv")]
  config = [f"{GLUE_CONFIG}:task={task}"] + _glue_args(glue_dir, vocab_dir)
  if case in ("classifier for MLM", "packed for MLM"):
    config = [f"{PRETRAIN_CONFIG}:tiny"]
  code = cli.main(["evaluate", "--config", config[0], "--checkpoint", checkpoint] + extra + config[1:])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2
  assert len(err) == 1 and err[0].startswith("bipft evaluate: error: ") and message in err[0], err
  if case == "unwritable":
    assert not os.listdir(tmp_path)


# --- bipft predict ------------------------------------------------------------------

def _dev_sentences(glue_dir: str) -> list:
  rows = open(os.path.join(glue_dir, "SST-2", "dev.tsv"), encoding="utf-8").read().splitlines()
  return [row.split("\t")[0] for row in rows[1:]]


def _predict(checkpoint, texts_file, glue_dir, vocab_dir, capsys, *extra) -> list:
  capsys.readouterr()
  assert cli.main(["predict", "--config", f"{GLUE_CONFIG}:task=sst2", "--checkpoint", checkpoint,
                   "--input", str(texts_file), *extra] + _glue_args(glue_dir, vocab_dir)) == 0
  return capsys.readouterr().out.splitlines()


def test_predict_labels_texts_as_evaluate_does_with_their_probabilities(finetuned, packed_classifier, glue_dir,
                                                                        vocab_dir, tmp_path, capsys):
  texts = tmp_path / "texts.txt"
  texts.write_text("\n".join(_dev_sentences(glue_dir)) + "\n")
  expected = tmp_path / "dev.tsv"
  _evaluate_json(finetuned[0], glue_dir, vocab_dir, capsys, "--split", "dev", "--predictions", str(expected))
  labels = [row.split("\t")[1] for row in expected.read_text().splitlines()[1:]]
  tsv = _predict(finetuned[0], texts, glue_dir, vocab_dir, capsys)
  assert tsv[0] == "prediction\t0\t1" and len(tsv) == 17
  rows = [row.split("\t") for row in tsv[1:]]
  assert [r[0] for r in rows] == labels
  probabilities = np.array([[float(p) for p in r[1:]] for r in rows])
  np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=2e-6)
  assert [str(i) for i in probabilities.argmax(-1)] == labels
  # The probabilities are the softmax of the classifier's logits.
  config = config_loading.load_config(f"{GLUE_CONFIG}:task=sst2", [o[len("--config."):] for o in
                                                                     _glue_args(glue_dir, vocab_dir)])
  classifier = saved_models.load_classifier(config, tasks.get_task("sst2"), finetuned[0])
  sentences = _dev_sentences(glue_dir)
  data = tasks.encode(classifier.tokenizer, tasks.Split(sentences, None, None, list(range(len(sentences)))), 16)
  logits = predictions.predict_logits(classifier.predict_step, classifier.params, data, 8, tasks.length_buckets(16))
  np.testing.assert_allclose(probabilities, np.exp(logits) / np.exp(logits).sum(-1, keepdims=True), atol=1e-6)
  # --json: the same, one object per line; the packed file run 1-bit: the same labels.
  as_json = [json.loads(line) for line in _predict(finetuned[0], texts, glue_dir, vocab_dir, capsys, "--json")]
  assert [r["prediction"] for r in as_json] == labels
  np.testing.assert_allclose([[r["probabilities"][k] for k in ("0", "1")] for r in as_json], probabilities,
                             atol=1e-6)
  packed_rows = _predict(packed_classifier, texts, glue_dir, vocab_dir, capsys, "--kernel", "popcount")
  assert [r.split("\t")[0] for r in packed_rows] == [r.split("\t")[0] for r in tsv]


def test_predict_reads_standard_input_and_sentence_pairs(finetuned, glue_dir, vocab_dir, tmp_path, capsys,
                                                         monkeypatch):
  sentences = _dev_sentences(glue_dir)
  texts = tmp_path / "texts.txt"
  texts.write_text("\n".join(sentences[:3]) + "\n")
  from_file = _predict(finetuned[0], texts, glue_dir, vocab_dir, capsys)
  monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("\n".join(sentences[:3]).encode())))
  assert _predict(finetuned[0], "-", glue_dir, vocab_dir, capsys) == from_file
  # A named pipe (`--input <(zcat texts.gz)`) is read once: a second open would wait for a writer forever.
  fifo, done = tmp_path / "texts.fifo", threading.Event()
  os.mkfifo(fifo)

  def write_once():
    fifo.write_text("\n".join(sentences[:3]))
    if not done.wait(120):
      fifo.write_text("")  # lets a second open return (empty) rather than hang the test
  writer = threading.Thread(target=write_once)
  writer.start()
  try:
    assert _predict(finetuned[0], fifo, glue_dir, vocab_dir, capsys) == from_file
  finally:
    done.set()
    writer.join()
  # A sentence-pair task takes two tab-separated texts per line: the sst2 classifier's parameters, saved
  # without the record of their run (which names sst2), as a classifier of mrpc's two labels.
  pairs = tmp_path / "pairs.txt"
  pairs.write_text("".join(f"{a}\t{b}\n" for a, b in zip(sentences[:3], sentences[3:6])))
  unrecorded = str(tmp_path / "unrecorded")
  model_config, head, params = checkpointing.restore_params(os.path.join(finetuned[0], "best"))
  checkpointing.save_params(unrecorded, params, model_config, head)
  capsys.readouterr()
  assert cli.main(["predict", "--config", f"{GLUE_CONFIG}:task=mrpc", "--checkpoint", unrecorded,
                   "--input", str(pairs)] + _glue_args(glue_dir, vocab_dir)) == 0
  assert len(capsys.readouterr().out.splitlines()) == 4


class _TypedLines:
  """Standard input from a pipe whose writer records what stdout held when each line was asked for."""

  def __init__(self, lines, stdout):
    self.lines, self.stdout, self.seen = lines, stdout, []

  def isatty(self):
    return False

  @property
  def buffer(self):
    for line in self.lines:
      self.seen.append(len(self.stdout.getvalue().splitlines()))
      yield (line + "\n").encode()


def test_predict_prints_each_chunk_before_reading_the_next(finetuned, glue_dir, vocab_dir, monkeypatch):
  # It read its whole input before printing anything (until 2026-12-04): 17 GB of memory for 2 million
  # lines, and nothing printed in hours of predicting. Chunks of eval_batch_size x CHUNK_BATCHES lines.
  monkeypatch.setattr(predict, "CHUNK_BATCHES", 1)
  stdout = io.StringIO()
  monkeypatch.setattr("sys.stdout", stdout)
  sentences = _dev_sentences(glue_dir)[:5]
  stdin = _TypedLines(sentences, stdout)
  monkeypatch.setattr("sys.stdin", stdin)
  assert cli.main(["predict", "--config", f"{GLUE_CONFIG}:task=sst2", "--checkpoint", finetuned[0]]
                  + _glue_args(glue_dir, vocab_dir, "--config.eval_batch_size=2")) == 0
  # Lines 1-2 (the first chunk) are read before anything is printed, lines 3-4 after the header and their
  # rows, line 5 after the rows of lines 3-4.
  assert stdin.seen == [0, 0, 3, 3, 5]
  rows = stdout.getvalue().splitlines()
  assert len(rows) == 6
  monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(("\n".join(sentences) + "\n").encode())))
  stdout.truncate(0), stdout.seek(0)
  assert cli.main(["predict", "--config", f"{GLUE_CONFIG}:task=sst2", "--checkpoint", finetuned[0]]
                  + _glue_args(glue_dir, vocab_dir)) == 0
  in_one_chunk = [row.split("\t") for row in stdout.getvalue().splitlines()]  # 8 x 16 lines
  assert [row[0] for row in in_one_chunk] == [row.split("\t")[0] for row in rows]
  np.testing.assert_allclose(np.array([row[1:] for row in in_one_chunk[1:]], float),
                             np.array([row.split("\t")[1:] for row in rows[1:]], float), atol=2e-6)


def test_predict_stops_quietly_when_its_reader_leaves(finetuned, glue_dir, vocab_dir):
  # `bipft predict ... | head`: over a real pipe the first chunk's rows come out while standard input is
  # still open, and a reader that leaves ends the command with SIGPIPE's code, no traceback.
  script = shutil.which("bipft", path=os.path.dirname(sys.executable))
  chunk = "".join(f"{sentence}\n" for sentence in _dev_sentences(glue_dir)[:predict.CHUNK_BATCHES]).encode()
  command = subprocess.Popen([script, "predict", "--config", f"{GLUE_CONFIG}:task=sst2", "--checkpoint",
                              finetuned[0]] + _glue_args(glue_dir, vocab_dir, "--config.eval_batch_size=1"),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  watchdog = threading.Timer(300, command.kill)  # a command that waits for the end of its input hangs here
  watchdog.start()
  try:
    command.stdin.write(chunk)
    command.stdin.flush()
    rows = [command.stdout.readline() for _ in range(1 + predict.CHUNK_BATCHES)]
    command.stdout.close()
    command.stdin.write(chunk)
    command.stdin.close()
    err = command.stderr.read().decode()
    command.wait()
  finally:
    watchdog.cancel()
  assert rows[0] == b"prediction\t0\t1\n" and all(row.count(b"\t") == 2 for row in rows[1:]), rows
  assert command.returncode == 128 + signal.SIGPIPE and "Traceback" not in err, err


def test_predict_prints_scores_for_a_regression_task():
  logits = np.array([[6.25], [1.5], [-0.5]], np.float32)
  assert predict.tsv_header(tasks.get_task("stsb")) == "prediction"
  assert predict.output_rows(tasks.get_task("stsb"), logits, False) == ["5.000", "1.500", "0.000"]
  # A custom regression task keeps its own scale (it was clipped to STS-B's [0, 5] before 2026-12-04).
  custom = tasks.custom_task("", 3)
  assert predict.output_rows(custom, logits, False) == ["6.250", "1.500", "-0.500"]
  assert [json.loads(r) for r in predict.output_rows(custom, logits, True)] == [
      {"prediction": 6.25}, {"prediction": 1.5}, {"prediction": -0.5}]


def test_a_checkpoint_is_read_as_the_run_that_wrote_it(finetuned, packed_classifier, glue_dir, vocab_dir, tmp_path,
                                                       capsys):
  # Another task with as many labels would misread its outputs without a word (before 2026-12-04); the
  # packed file keeps the checkpoint's record of its run.
  (tmp_path / "pairs.txt").write_text("the film was good .\tthe film was bad .\n")
  assert packed_file.read_run_config(packed_classifier) == {  # how it reads text; not its data paths
      "task": "sst2", "max_length": 16, "data": {"labels": "", "text_fields": "sentence", "tokenizer": vocab_dir}}
  for checkpoint in (finetuned[0], packed_classifier):
    for command, extra in (("evaluate", []), ("predict", ["--input", str(tmp_path / "pairs.txt")])):
      code = cli.main([command, "--config", f"{GLUE_CONFIG}:task=rte", "--checkpoint", checkpoint, *extra]
                      + _glue_args(glue_dir, vocab_dir))
      err = capsys.readouterr().err.strip().splitlines()
      assert code == 2 and len(err) == 1, err
      assert "was finetuned on sst2, not rte: pass configs/glue.py:task=sst2" in err[0]
  # Another max_length: the texts are read otherwise than in the run, which the command says.
  _evaluate_json(finetuned[0], glue_dir, vocab_dir, capsys)  # as the run: no note
  assert cli.main(["evaluate", "--config", f"{GLUE_CONFIG}:task=sst2", "--checkpoint", finetuned[0]]
                  + _glue_args(glue_dir, vocab_dir) + ["--config.max_length=32"]) == 0
  err = capsys.readouterr().err
  assert "bipft: note: max_length is 32 here but was 16 in the run that wrote " in err
  assert "pass --config.max_length=16 to read texts as it did" in err


def test_predict_fills_masks_as_transformers_does(tmp_path, capsys):
  # A Hugging Face BERT with its MLM head, imported by `bipft convert from-pytorch`.
  original = hf_bert("BertForMaskedLM", tmp_path / "hf")
  vocab = glue_fixtures.SPECIAL + tuple(f"w{i}" for i in range(96))  # 101 tokens, as hf_bert's model
  (tmp_path / "hf" / "vocab.txt").write_text("\n".join(vocab) + "\n")
  assert cli.main(["convert", "from-pytorch", "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "work")]) == 0
  texts = ["w1 w2 [MASK] w3", "[MASK] w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 w16 w17 [MASK] w9", "w10 [MASK]"]
  (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
  capsys.readouterr()
  # The tokenizer the conversion keeps beside the steps is read (it needed --config.tokenizer).
  assert cli.main(["predict", "--config", f"{PRETRAIN_CONFIG}:tiny", "--checkpoint", str(tmp_path / "work"),
                   "--input", str(tmp_path / "texts.txt"), "--top_k", "4", "--json"]) == 0
  ours = [json.loads(line)["masks"] for line in capsys.readouterr().out.splitlines()]
  tokenizer = transformers.BertTokenizerFast.from_pretrained(str(tmp_path / "hf"))
  for text, masks in zip(texts, ours):
    inputs = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
      logits = original(**inputs).logits[0]
    at_masks = logits[inputs["input_ids"][0] == tokenizer.mask_token_id].softmax(-1)
    assert len(masks) == len(at_masks) == text.count("[MASK]")
    for guesses, probabilities in zip(masks, at_masks):
      best = probabilities.topk(4)
      assert [g["token"] for g in guesses] == tokenizer.convert_ids_to_tokens(best.indices.tolist())
      np.testing.assert_allclose([g["probability"] for g in guesses], best.values.numpy(), atol=2e-6)


MASKS = {"no mask", "top_k 0", "packed file for masks", "classifier for masks"}  # pretraining config cases


@pytest.mark.parametrize("case, content, message", [
    ("empty line", "the film was good .\n\nthe film was bad .\n", "line 2 is empty; give one example per line"),
    ("two texts", "the film was good .\tthe film was bad .\n", "line 1 holds 2 tab-separated texts; sst2 takes one"),
    ("one text of a pair", "the film was good .\n", "line 1 holds 1 text; mrpc takes two texts"),
    ("empty text of a pair", "the film was good .\t \n", "line 1 has an empty text"),
    ("not utf-8", "the film was good .\ncaf\xe9\n", "line 2 is not valid UTF-8 (byte 0xe9)"),
    ("nothing", "", "holds no text to predict"),
    ("missing", None, "does not exist"),
    ("folder", None, "is a folder; name a text file"),
    ("packed encoder", "the film was good .\n", "holds a packed encoder, not a classifier"),
    ("top_k of a classifier", "the film was good .\n", "--top_k is for filling masks with a pretraining config"),
    ("no mask", "the film was [MASK] .\nthe film was good .\n", "line 2 has no [MASK] token within its first 32"),
    ("top_k 0", "the film was [MASK] .\n", "--top_k must be >= 1, got 0"),
    ("packed file for masks", "the film was [MASK] .\n", "a packed file holds no MLM head to fill masks with"),
    ("classifier for masks", "the film was [MASK] .\n", "holds a classification model, not a pretraining one"),
])
def test_predict_bad_input_exits_2_in_one_line(case, content, message, finetuned, pretraining_checkpoint,
                                               packed_classifier, glue_dir, vocab_dir, tmp_path, capsys):
  texts = tmp_path / ("folder" if case == "folder" else "texts.txt")
  if content is not None:
    texts.write_bytes(content.encode("latin-1"))
  elif case == "folder":
    texts.mkdir()
  checkpoint = {"packed encoder": str(tmp_path / "encoder.safetensors"), "no mask": pretraining_checkpoint,
                "top_k 0": pretraining_checkpoint, "packed file for masks": packed_classifier}.get(case, finetuned[0])
  if case == "packed encoder":
    packed_file.export(*checkpointing.restore_params(pretraining_checkpoint), checkpoint, remainder="float32")
  if case in MASKS:
    config = [f"{PRETRAIN_CONFIG}:tiny", f"--config.tokenizer={vocab_dir}"]
  else:
    config = [f"{GLUE_CONFIG}:task={'mrpc' if 'pair' in case else 'sst2'}"] + _glue_args(glue_dir, vocab_dir)
  top_k = {"top_k of a classifier": ["--top_k", "3"], "top_k 0": ["--top_k", "0"]}.get(case, [])
  code = cli.main(["predict", "--config", config[0], "--checkpoint", checkpoint, "--input", str(texts)] + top_k
                  + config[1:])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2
  assert len(err) == 1 and err[0].startswith("bipft predict: error: ") and message in err[0], err
