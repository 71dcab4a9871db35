"""`bipft finetune` on tiny models and fixture data: learning, best-epoch selection, outputs, starts."""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import save_file

import glue_fixtures
from test_train import traced_steps
from bipft_jax import checkpointing, cli, config_loading, engine, losses, pytorch_io
from bipft_jax import model as model_lib
from bipft_jax import model_params
from bipft_jax.errors import UserError
from bipft_jax.glue import finetune, finetuning, metrics, predictions, splits, tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.vocab_size=64", "model.hidden_size=32", "model.num_heads=2", "model.intermediate_size=64",
        "model.num_layers=1", "model.max_position_embeddings=64"]


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
  return glue_fixtures.write_glue(tmp_path_factory.mktemp("glue_data"), n=16)


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
  return glue_fixtures.write_vocab(tmp_path_factory.mktemp("vocab"))


def tiny_overrides(glue_dir, vocab_dir, *extra) -> list:
  return TINY + ["init.kind=scratch", f"data.path={glue_dir}", f"data.tokenizer={vocab_dir}", "batch_size=4",
                 "eval_batch_size=8", "max_length=16", "optimizer.learning_rate=0.003",
                 "log_every=1", "mesh.shape.data=1"] + list(extra)


def tiny_config(task, glue_dir, vocab_dir, *extra):
  return config_loading.load_config(os.path.join(ROOT, f"configs/glue.py:task={task}"),
                                    tiny_overrides(glue_dir, vocab_dir, *extra))


def _start(config, task_name: str) -> tuple:
  """(model config, merged params, description) of the run's start, as the engine merges them."""
  start = finetuning.initial_model(config, tasks.get_task(task_name))
  module = model_lib.build(start.model_config, "classification")
  return start.model_config, model_params.merge_params(module, start.source, jax.random.key(0), start.complete), \
      start.description


def _fixed_batch(task_name, glue_dir, vocab_dir):
  task = tasks.get_task(task_name)
  split = tasks.read_splits(task, tiny_config(task_name, glue_dir, vocab_dir).data, ("train",))["train"]
  data = tasks.encode(pytorch_io.load_tokenizer(vocab_dir), split, 16)
  return task, tasks.make_batch(data, np.arange(len(data)), len(data), (16,))


@pytest.mark.parametrize("task_name", ["sst2"])
def test_a_few_steps_lower_the_loss(glue_dir, vocab_dir, task_name):
  task, batch = _fixed_batch(task_name, glue_dir, vocab_dir)
  config = model_lib.BertConfig.from_dict({**tiny_config(task_name, glue_dir, vocab_dir).model.to_dict(),
                                           "num_labels": task.num_labels, "hidden_dropout": 0.0,
                                           "attention_dropout": 0.0, "classifier_dropout": 0.0})
  assert config.binary
  module = model_lib.build(config, "classification")
  params = jax.jit(lambda r: model_params.init_params(module, r))(jax.random.key(0))
  params = jax.jit(lambda p, b: model_params.calibrate_alphas(module, p, b))(
      params, {k: batch[k] for k in model_lib.MODEL_INPUTS})
  optimizer = optax.adam(3e-3)
  state = {"params": params, "opt_state": optimizer.init(params)}
  train_step = jax.jit(engine.make_step(finetuning.make_loss_fn(module, task.is_regression), optimizer,
                                        lambda step: 3e-3, seed=0))
  predict_step = predictions.make_predict_step(module)
  device_batch = predictions.model_batch(batch)
  losses = []
  for i in range(25):
    state, metrics = train_step(state, None, device_batch, i)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.7 * losses[0], losses
  # The loss the step reports is the task loss of the model's predictions (no dropout here).
  logits = predict_step(state["params"], device_batch)
  labels = jnp.asarray(batch["labels"])
  expected = (jnp.mean((logits[:, 0] - labels) ** 2) if task.is_regression
              else -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(labels)), labels]))
  _, metrics = train_step(state, None, device_batch, 99)
  np.testing.assert_allclose(float(metrics["loss"]), float(expected), rtol=1e-4)


def test_task_loss_ignores_padding_rows():
  logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]])
  labels = jnp.array([0, 1, 1])
  padded = losses.task_loss(logits, labels, jnp.array([1.0, 1.0, 0.0]), regression=False)
  np.testing.assert_allclose(padded, -np.mean([jax.nn.log_softmax(logits[0])[0], jax.nn.log_softmax(logits[1])[1]]),
                             rtol=1e-6)
  mse = losses.task_loss(jnp.array([[1.0], [3.0], [9.0]]), jnp.array([2.0, 3.0, 0.0]),
                           jnp.array([1.0, 1.0, 0.0]), regression=True)
  np.testing.assert_allclose(mse, 0.5)


def test_best_epoch_selection_and_mnli_mismatched_from_last_epoch():
  history = [{"epoch": e, "dev": {"dev_matched": {"accuracy": m}, "dev_mismatched": {"accuracy": mm}}}
             for e, (m, mm) in enumerate([(60.0, 61.0), (70.0, 69.0), (70.0, 72.0), (65.0, 66.0)], start=1)]
  picked = finetuning.select_results(tasks.get_task("mnli"), history)
  assert picked["best_epoch"] == 2  # the first of the tied best
  assert picked["dev"] == {"dev_matched": {"accuracy": 70.0}, "dev_mismatched": {"accuracy": 66.0}}
  cola = [{"epoch": e, "dev": {"dev": {"matthews_corr": c, "accuracy": a}}}
          for e, (c, a) in enumerate([(10.0, 90.0), (30.0, 60.0), (20.0, 95.0)], start=1)]
  picked = finetuning.select_results(tasks.get_task("cola"), cola)  # selected by MCC, not accuracy
  assert picked["best_epoch"] == 2 and picked["dev"]["dev"]["accuracy"] == 60.0


def test_finetune_writes_metrics_best_checkpoint_submission_and_profile(glue_dir, vocab_dir, tmp_path):
  config = tiny_config("sst2", glue_dir, vocab_dir, "epochs=3", "pooling=mean", "profile.first_step=5",
                       "profile.steps=2")
  results = finetune.finetune(config, str(tmp_path))
  assert traced_steps(tmp_path, "finetune") == [5, 6]  # moved from the staging folder with the other outputs
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"epoch"' in l]
  assert [l["epoch"] for l in lines] == [1, 2, 3] and lines[-1]["step"] == 3 * 4
  scores = [l["dev"]["dev"]["accuracy"] for l in lines]
  assert results["best_epoch"] == 1 + int(np.argmax(scores))
  assert results["dev"]["dev"]["accuracy"] == max(scores)
  assert results["dev_majority_rate"] == 50.0
  assert json.loads((tmp_path / "results.json").read_text()) == results
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tensorboard"))
  # best/ holds the best epoch's parameters: they reproduce its dev accuracy.
  model_config, head, params = checkpointing.restore_params(str(tmp_path / "best"))
  assert head == "classification" and model_config.num_labels == 2 and model_config.binary
  assert model_config.pooling == "mean"
  task = tasks.get_task("sst2")
  dev = tasks.encode(pytorch_io.load_tokenizer(vocab_dir),
                     tasks.read_splits(task, config.data, ("dev",))["dev"], 16)
  predict_step = predictions.make_predict_step(model_lib.build(model_config, "classification"))
  predicted = predictions.predict(predict_step, jax.device_get(params), dev, 8, tasks.length_buckets(16), False)
  assert metrics.compute(("accuracy",), dev.labels, predicted)["accuracy"] == pytest.approx(max(scores))
  rows = (tmp_path / "submission" / "SST-2.tsv").read_text().splitlines()
  assert rows[0] == "index\tprediction" and len(rows) == 17
  assert [r.split("\t")[0] for r in rows[1:]] == [str(i) for i in range(16)]
  assert {r.split("\t")[1] for r in rows[1:]} <= {"0", "1"}
  # The same run again has nothing left to train; another is refused, naming what differs.
  assert finetune.finetune(config, str(tmp_path)) == json.loads((tmp_path / "results.json").read_text())
  config.epochs = 4
  with pytest.raises(UserError, match=r"already holds a finetuning run of other settings \(epochs 3 there, 4 now\)"):
    finetune.finetune(config, str(tmp_path))


def test_custom_task_predicts_its_test_file(vocab_dir, tmp_path, capsys):
  # A task of one's own: labels as written in the files, an unlabeled test file predicted at the end
  # (it was ignored before 2026-12-04) and by `bipft evaluate --split test`.
  for split, n in (("train", 8), ("dev", 8), ("test", 5)):
    with open(tmp_path / f"{split}.jsonl", "w") as f:
      for i in range(n):
        record = {"review": glue_fixtures.sentence(i, i % 2), "idx": f"r{i}"}
        f.write(json.dumps(record if split == "test" else {**record, "stars": ("neg", "pos")[i % 2]}) + "\n")
  data = [f"data.{split}_file={tmp_path / split}.jsonl" for split in ("train", "dev", "test")] + [
      "data.text_fields=review", "data.label_field=stars", "data.labels=neg,pos"]
  config = tiny_config("custom", "", vocab_dir, "epochs=1", "steps_per_epoch=2", *data)
  finetune.finetune(config, str(tmp_path / "run"))
  written = (tmp_path / "run" / "submission" / predictions.CUSTOM_TEST_FILE).read_text()
  rows = [row.split("\t") for row in written.splitlines()]
  assert rows[0] == ["index", "prediction"] and [r[0] for r in rows[1:]] == [f"r{i}" for i in range(5)]
  assert {r[1] for r in rows[1:]} <= {"neg", "pos"}
  target = tmp_path / "test.tsv"
  assert cli.main(["evaluate", "--config", os.path.join(ROOT, "configs/glue.py:task=custom"), "--checkpoint",
                   str(tmp_path / "run"), "--split", "test", "--predictions", str(target)]
                  + [f"--config.{o}" for o in tiny_overrides("", vocab_dir, *data)]) == 0
  assert target.read_text() == written
  assert capsys.readouterr().out.splitlines()[-1] == f"custom test (5 examples): predictions written to {target}"
  # The labels in another order would name every prediction wrongly: refused.
  swapped = [o.replace("labels=neg,pos", "labels=pos,neg") for o in data]
  assert cli.main(["evaluate", "--config", os.path.join(ROOT, "configs/glue.py:task=custom"), "--checkpoint",
                   str(tmp_path / "run")] + [f"--config.{o}" for o in tiny_overrides("", vocab_dir, *swapped)]) == 2
  assert "was finetuned with data.labels='neg,pos', not 'pos,neg'" in capsys.readouterr().err
  # None given: the run's (they were refused as '', a regression task's).
  unlabeled = [o for o in data if not o.startswith("data.labels=")]
  (tmp_path / "texts.txt").write_text("w1 w2\nw3\n")
  assert cli.main(["predict", "--config", os.path.join(ROOT, "configs/glue.py:task=custom"), "--checkpoint",
                   str(tmp_path / "run"), "--input", str(tmp_path / "texts.txt")]
                  + [f"--config.{o}" for o in tiny_overrides("", vocab_dir, *unlabeled)]) == 0
  out, err = capsys.readouterr()
  assert out.splitlines()[0] == "prediction\tneg\tpos" and len(out.splitlines()) == 3
  assert err == f"bipft: note: data.labels=neg,pos (the classes {tmp_path / 'run'} was finetuned with)\n"
  # A PyTorch export names the classes (Hugging Face's id2label) as the run did.
  assert cli.main(["convert", "to-pytorch", "--checkpoint", str(tmp_path / "run" / "best"), "--out",
                   str(tmp_path / "export")]) == 0
  exported = json.loads((tmp_path / "export" / "config.json").read_text())
  assert exported["id2label"] == {"0": "neg", "1": "pos"} and exported["label2id"] == {"neg": 0, "pos": 1}


def test_mnli_reports_both_dev_sets_and_writes_m_mm_and_ax(glue_dir, vocab_dir, tmp_path):
  results = finetune.finetune(tiny_config("mnli", glue_dir, vocab_dir, "epochs=2", "steps_per_epoch=1"), str(tmp_path))
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"epoch"' in l]
  assert results["dev"]["dev_mismatched"] == lines[-1]["dev"]["dev_mismatched"]
  assert results["dev"]["dev_matched"] == lines[results["best_epoch"] - 1]["dev"]["dev_matched"]
  assert sorted(os.listdir(tmp_path / "submission")) == ["AX.tsv", "MNLI-m.tsv", "MNLI-mm.tsv"]
  for name in ("AX.tsv", "MNLI-m.tsv"):
    rows = (tmp_path / "submission" / name).read_text().splitlines()
    assert len(rows) == 17 and {r.split("\t")[1] for r in rows[1:]} <= {"entailment", "neutral", "contradiction"}


def _tiny_model_config(**changes):
  values = dict(vocab_size=64, hidden_size=32, num_heads=2, intermediate_size=64, num_layers=1,
                max_position_embeddings=64)
  values.update(changes)
  return model_lib.BertConfig.from_dict(values)


def test_checkpoint_start_keeps_bert_and_a_fresh_classifier(glue_dir, vocab_dir, tmp_path):
  pretrained_config = _tiny_model_config(binary=True)
  pretrained = model_params.init_params(model_lib.build(pretrained_config, "pretraining"), jax.random.key(3))
  checkpointing.save_params(str(tmp_path / "pretrain"), pretrained, pretrained_config, "pretraining", step=7)
  config = tiny_config("rte", glue_dir, vocab_dir)
  config.init.kind, config.init.path = "checkpoint", str(tmp_path / "pretrain")
  model_config, params, description = _start(config, "rte")
  assert model_config.binary and model_config.num_labels == 2 and "checkpoint" in description
  jax.tree.map(np.testing.assert_array_equal, params["bert"], pretrained["bert"])
  assert set(params) == {"bert", "classifier"} and model_config.pooling == "cls"
  config.pooling = "mean"  # a finetuning choice, whatever the pretraining pooled
  assert finetuning.initial_model(config, tasks.get_task("rte")).model_config.pooling == "mean"
  # A checkpoint whose vocab is smaller than the tokenizer's: one clear line, exit code 2.
  small = _tiny_model_config(vocab_size=16, binary=True)
  checkpointing.save_params(str(tmp_path / "small"), model_params.init_params(model_lib.build(small, "encoder"),
                                                                           jax.random.key(0)), small, "encoder")
  code = cli.main(["finetune", "--config", os.path.join(ROOT, "configs/glue.py:task=rte"), "--workdir",
                   str(tmp_path / "run"), "--init_from", str(tmp_path / "small"), f"--config.data.path={glue_dir}",
                   f"--config.data.tokenizer={vocab_dir}"])
  assert code == 2
  with pytest.raises(UserError, match="tokens but the model's vocab_size is 16"):
    splits.load_tokenizer(config, "", small)


def test_precision_is_the_inits_unless_the_run_sets_it_remat_the_runs(glue_dir, vocab_dir, tmp_path):
  # --config.precision chooses it; empty keeps the init's. A checkpoint's own used to win over
  # --config.model.precision without a word: a run asked to be mixed trained in fp32.
  mixed = _tiny_model_config(binary=True, precision="mixed")
  pretrained = model_params.init_params(model_lib.build(mixed, "pretraining"), jax.random.key(3))
  checkpointing.save_params(str(tmp_path / "pretrain"), pretrained, mixed, "pretraining", step=7)
  _write_teacher(str(tmp_path / "teacher"), _tiny_model_config())
  starts = {"mixed": ["init.kind=checkpoint", f"init.path={tmp_path / 'pretrain'}"],
            "fp32": ["init.kind=teacher", f"init.path={tmp_path / 'teacher'}"]}
  task = tasks.get_task("rte")
  for inherited, extra in starts.items():
    for chosen in ("", "fp32", "mixed"):
      config = tiny_config("rte", glue_dir, vocab_dir, *extra, f"precision={chosen}")
      assert finetuning.initial_model(config, task).model_config.precision == (chosen or inherited)
    for remat in (False, True):  # the run's, whatever the start's (the pretraining saved False)
      config = tiny_config("rte", glue_dir, vocab_dir, *extra, f"remat={remat}")
      assert finetuning.initial_model(config, task).model_config.remat == remat
  config = tiny_config("rte", glue_dir, vocab_dir, "precision=mixed", "remat=True", "steps_per_epoch=1", "epochs=1")
  finetune.finetune(config, str(tmp_path / "run"))
  saved = checkpointing.restore_params(str(tmp_path / "run" / "best"))[0]
  assert saved.precision == "mixed" and saved.remat  # evaluation's


def test_a_model_override_the_start_ignores_is_refused(glue_dir, vocab_dir):
  check = finetuning.check_model_overrides
  config = tiny_config("rte", glue_dir, vocab_dir)
  check(config, ["model.hidden_size=32", "epochs=2"])  # scratch: the model section is its
  config.init.kind, config.init.binary = "teacher", True
  check(config, ["model.linear_binarizer=xnor", "model.estimator_rank=0"])  # binarizing the teacher
  with pytest.raises(UserError, match="model.hidden_size has no effect with init.kind=teacher"):
    check(config, ["model.linear_binarizer=xnor", "model.hidden_size=32"])
  config.init.kind = "checkpoint"
  with pytest.raises(UserError, match="model.linear_binarizer has no effect with init.kind=checkpoint"):
    check(config, ["pooling=mean", "model.linear_binarizer=xnor"])


def test_a_runs_tokenizer_travels_with_its_checkpoints(glue_dir, vocab_dir, tmp_path, capsys, monkeypatch):
  """Finetuning from a pretraining whose tokenizer is not MiniLM's (its record names it) reads texts with
  it, records it, and evaluate, export-packed and convert find it from any folder, given the finetune
  workdir itself: MiniLM's was taken for each (refused here for its size; a vocabulary as large would
  have been read without a word)."""
  pretrained_config = _tiny_model_config(binary=True)
  pretrained = model_params.init_params(model_lib.build(pretrained_config, "pretraining"), jax.random.key(3))
  checkpointing.save_params(str(tmp_path / "pretrain"), pretrained, pretrained_config, "pretraining", step=7,
                            run_config={"teacher": {"path": "minilm"}, "tokenizer": vocab_dir})
  glue = [f"--config.{o}" for o in tiny_overrides(glue_dir, vocab_dir, "data.tokenizer=", "epochs=1",
                                                  "steps_per_epoch=1") if not o.startswith("model.")]
  config = ["--config", os.path.join(ROOT, "configs/glue.py:task=sst2")]
  workdir = str(tmp_path / "run")
  assert cli.main(["finetune", *config, "--workdir", workdir, "--init_from", str(tmp_path / "pretrain"), *glue]) == 0
  scores = json.load(open(os.path.join(workdir, "results.json")))["dev"]
  assert checkpointing.read_run_config(os.path.join(workdir, "best"))["data"]["tokenizer"] == vocab_dir
  monkeypatch.chdir(tmp_path)
  capsys.readouterr()
  assert cli.main(["evaluate", *config, "--checkpoint", workdir, "--json", *glue]) == 0
  out, err = capsys.readouterr()
  assert json.loads(out)["metrics"] == scores and "tokenizer" not in err
  relative = f"--config.data.tokenizer={os.path.relpath(vocab_dir)}"  # the same folder: no note either
  assert cli.main(["evaluate", *config, "--checkpoint", workdir, *glue, relative]) == 0
  assert "tokenizer" not in capsys.readouterr().err
  assert cli.main(["convert", "to-pytorch", "--checkpoint", workdir, "--out", str(tmp_path / "export")]) == 0
  assert open(tmp_path / "export" / "vocab.txt").read() == open(os.path.join(vocab_dir, "vocab.txt")).read()
  packed = str(tmp_path / "run.bipft.safetensors")
  assert cli.main(["export-packed", "--checkpoint", workdir, "--out", packed]) == 0
  capsys.readouterr()
  assert cli.main(["evaluate", *config, "--checkpoint", packed, "--json", *glue]) == 0
  assert json.loads(capsys.readouterr().out)["metrics"] == scores
  # Back from PyTorch and packed again: the conversion's file keeps the tokenizer beside the converted steps
  assert cli.main(["convert", "from-pytorch", "--src", str(tmp_path / "export"), "--out", str(tmp_path / "back")]) == 0
  assert cli.main(["export-packed", "--checkpoint", str(tmp_path / "back"), "--out", packed, "--overwrite"]) == 0
  capsys.readouterr()
  assert cli.main(["evaluate", *config, "--checkpoint", packed, "--json", *glue]) == 0
  assert json.loads(capsys.readouterr().out)["metrics"] == scores
  os.remove(os.path.join(vocab_dir, "vocab.txt"))  # the recorded folder lost its tokenizer: named, not MiniLM's
  try:
    assert cli.main(["evaluate", *config, "--checkpoint", workdir, *glue]) == 2
    assert capsys.readouterr().err == (f"bipft evaluate: error: no tokenizer in {vocab_dir} (vocab.txt or "
                                       "tokenizer.json), the model's: pass --config.data.tokenizer=FOLDER with the "
                                       "vocabulary it was trained with\n")
  finally:
    glue_fixtures.write_vocab(vocab_dir)


def _write_teacher(folder, config):
  """A Hugging Face BERT folder (config.json + model.safetensors) of random FP weights."""
  params = model_params.init_params(model_lib.build(config, "encoder"), jax.random.key(5))
  os.makedirs(folder)
  hf = {"vocab_size": config.vocab_size, "hidden_size": config.hidden_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings, "hidden_act": "gelu", "model_type": "bert"}
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf, f)
  save_file(pytorch_io.to_torch_state(params), os.path.join(folder, "model.safetensors"))
  return params


def test_teacher_start_fp_baseline_and_binarized(glue_dir, vocab_dir, tmp_path):
  teacher = _write_teacher(str(tmp_path / "teacher"), _tiny_model_config())
  config = tiny_config("stsb", glue_dir, vocab_dir, "init.kind=teacher", f"init.path={tmp_path / 'teacher'}")
  start = finetuning.initial_model(config, tasks.get_task("stsb"))
  assert start.folder == str(tmp_path / "teacher")
  model_config, params, _ = _start(config, "stsb")
  assert not model_config.binary and model_config.num_labels == 1
  jax.tree.map(np.testing.assert_array_equal, params["bert"], teacher)
  config.init.binary = True
  model_config, params, _ = _start(config, "stsb")
  assert model_config.binary
  config.model.linear_binarizer = "nope"
  with pytest.raises(UserError, match="unknown linear binarizer 'nope'"):
    finetuning.initial_model(config, tasks.get_task("stsb"))
  config.model.linear_binarizer = "bipft"
  np.testing.assert_array_equal(params["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"],
                                teacher["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"])
  param_kinds = model_params.param_kinds(model_lib.build(model_config, "classification"))
  assert engine.needs_calibration(params, param_kinds)  # calibrated by finetune on the first batch
  config.steps_per_epoch, config.epochs = 1, 1
  results = finetune.finetune(config, str(tmp_path / "run"))
  assert set(results["dev"]["dev"]) == {"pearson_spearman", "pearson", "spearman"}
  _, _, trained = checkpointing.restore_params(str(tmp_path / "run" / "best"))
  assert not engine.needs_calibration(trained, param_kinds)


def test_cli_bad_inputs_exit_2(glue_dir, vocab_dir, tmp_path, capsys):
  config = os.path.join(ROOT, "configs/glue.py")
  base = ["--workdir", str(tmp_path / "w"), f"--config.data.tokenizer={vocab_dir}", "--config.init.kind=scratch"]
  assert cli.main(["finetune", "--config", f"{config}:task=nope"] + base) == 2
  assert "unknown task 'nope'" in capsys.readouterr().err
  assert cli.main(["finetune", "--config", f"{config}:task=rte"] + base) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["bipft finetune: error: set --config.data.path to the GLUE data folder (glue_data/ or RTE/), "
                 "or read TFDS with --config.data.format=tfds"]
  assert cli.main(["finetune", "--config", f"{config}:task=rte", "--workdir", str(tmp_path / "w2")]) == 2
  assert "no starting point: pass --init_from" in capsys.readouterr().err


def test_a_diverging_run_stops_in_one_line_without_best_or_results(glue_dir, vocab_dir, tmp_path, capsys):
  workdir = tmp_path / "run"
  overrides = tiny_overrides(glue_dir, vocab_dir, "optimizer.learning_rate=1e30")
  code = cli.main(["finetune", "--config", os.path.join(ROOT, "configs/glue.py:task=sst2"),
                   "--workdir", str(workdir)] + [f"--config.{o}" for o in overrides])
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if "bipft finetune: error: " in line]
  assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
  assert re.search(r"error: the (loss is (nan|inf)|update made the parameters non-finite) at step \d+"
                   r"; stopped without saving", errors[0]), errors[0]
  assert not os.path.exists(workdir / "best") and not os.path.exists(workdir / "results.json")


def test_a_diverging_overwrite_leaves_the_earlier_run_byte_identical(glue_dir, vocab_dir, tmp_path, capsys):
  workdir = tmp_path / "run"
  argv = (["finetune", "--config", os.path.join(ROOT, "configs/glue.py:task=sst2"), "--workdir", str(workdir)]
          + [f"--config.{o}" for o in tiny_overrides(glue_dir, vocab_dir, "epochs=1")])
  assert cli.main(argv) == 0
  earlier = {p.relative_to(workdir): p.read_bytes() for p in workdir.rglob("*")
             if p.is_file() and p.parts[len(workdir.parts)] in ("best", "results.json")}
  assert any(name.parts[0] == "best" for name in earlier)
  capsys.readouterr()
  assert cli.main(argv + ["--overwrite", "--config.optimizer.learning_rate=1e30"]) == 2
  assert "stopped without saving" in capsys.readouterr().err
  assert {name: (workdir / name).read_bytes() for name in earlier} == earlier
  assert {p.relative_to(workdir) for p in (workdir / "best").rglob("*") if p.is_file()} == {
      name for name in earlier if name.parts[0] == "best"}


def test_the_memory_line_is_the_longest_batches_whose_step_compiles_once(glue_dir, vocab_dir, tmp_path, capsys,
                                                                         caplog):
  # Length buckets give a run batches of several shapes: the memory a step takes is the longest's (a
  # first batch of 8 tokens said a quarter of it), compiled ahead and then reused, not compiled again.
  config = tiny_config("sst2", glue_dir, vocab_dir, "max_length=32", "min_bucket=4", "epochs=2")
  task = tasks.get_task("sst2")
  train = tasks.encode(pytorch_io.load_tokenizer(vocab_dir), tasks.read_splits(task, config.data, ("train",))["train"],
                       32)
  buckets = tasks.length_buckets(32, 4)
  trained = {next(b for b in buckets if b >= train.lengths[chosen].max())
             for epoch in (1, 2) for chosen in tasks.batch_plan(train, 4, buckets, shuffle_seed=config.seed + epoch)}
  assert len(trained) > 1
  with jax.log_compiles(), caplog.at_level("WARNING"):
    finetune.finetune(config, str(tmp_path))
  said = re.findall(r"a step on the longest batches, 4 x (\d+), takes [\d.]+ MiB a device", capsys.readouterr().out)
  assert said == [str(max(trained))]
  compiled = re.findall(r"Finished XLA compilation of jit\(train_step\)", caplog.text)
  assert len(compiled) == len(trained), (trained, caplog.text)
