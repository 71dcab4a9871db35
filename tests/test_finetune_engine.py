"""Finetuning on the run engine: exact resume after a SIGKILL or a stop (Ctrl-C) mid-epoch, 8 devices == 1
device, and downstream distillation (its terms by hand; a distilled run lowers them)."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import flax
import jax
import numpy as np
import optax
import pytest

from bipft_jax import checkpointing, cli, config_loading, distributed, engine, losses, train
from bipft_jax.glue import finetune, finetuning
from test_glue_finetune import ROOT, glue_dir, tiny_overrides, vocab_dir  # noqa: F401  (fixtures)
from test_train import CONFIG as TRAIN_CONFIG
from test_train import files as train_files  # noqa: F401  (a fixture)
from test_train import tiny_overrides as train_overrides

CONFIG = os.path.join(ROOT, "configs/glue.py:task=sst2")

# A real SIGKILL once the run's checkpoint of step KILL_AT (mid-epoch) is committed.
_KILLED_RUN = textwrap.dedent("""
  import os, signal, sys
  from bipft_jax import checkpointing, cli
  save, kill_at = checkpointing.save, int(sys.argv[1])
  def save_then_die(manager, step, **kwargs):
    save(manager, step, **kwargs)
    if str(manager.directory).endswith("checkpoints") and step == kill_at:
      manager.wait_until_finished()
      os.kill(os.getpid(), signal.SIGKILL)
  checkpointing.save = save_then_die
  sys.exit(cli.main(sys.argv[2:]))
""")


# A real SIGKILL at one point of a finished run's end: writing its outputs (best/ renamed in the staging
# folder, the test predictions under way), moving them into the workdir (best/ moved), or removing the
# published staging folder.
_KILLED_AT_THE_END = textwrap.dedent("""
  import os, signal, sys
  from bipft_jax import cli, files
  from bipft_jax.glue import finetune, predictions
  die = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
  point = sys.argv[1]
  if point == "outputs":
    predictions.write_submission = die
  elif point == "publication":
    replace = files.replace_tree
    def replace_then_die(source, target):
      replace(source, target)
      if os.path.basename(target) == "best":
        die()
    files.replace_tree = replace_then_die
  else:
    finetune._remove = die
  sys.exit(cli.main(sys.argv[2:]))
""")


def _argv(glue_dir, vocab_dir, workdir, *extra) -> list:
  return (["finetune", "--config", CONFIG, "--workdir", str(workdir)]
          + [f"--config.{o}" for o in tiny_overrides(glue_dir, vocab_dir, *extra)])


def _losses(workdir) -> dict:
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r["loss"] for r in records if "loss" in r}


def _best_params(workdir) -> dict:
  _, _, params = checkpointing.restore_params(os.path.join(workdir, "best"))
  return flax.traverse_util.flatten_dict(jax.device_get(params), sep="/")


def _results(workdir) -> dict:
  results = json.load(open(os.path.join(workdir, "results.json")))
  results.pop("seconds")
  return results


def test_finetune_killed_or_stopped_mid_epoch_resumes_bit_identically(glue_dir, vocab_dir, tmp_path, monkeypatch,
                                                                      capsys):
  extra = ("epochs=2", "checkpoint_every=3")  # 16 examples, batch 4: 4 steps an epoch, saves 3, 4, 6, 8
  whole, killed = tmp_path / "whole", tmp_path / "killed"
  assert cli.main(_argv(glue_dir, vocab_dir, whole, *extra)) == 0
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, "-c", _KILLED_RUN, "3", *_argv(glue_dir, vocab_dir, killed, *extra)],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
  steps = os.listdir(killed / ".finetune-staging" / "checkpoints")
  assert "3" in steps and "4" not in steps and not (killed / "results.json").exists()
  assert cli.main(_argv(glue_dir, vocab_dir, killed, *extra)) == 0  # the same command resumes
  # A Ctrl-C (or SIGTERM) noticed at step 5: saved there, exit 130, nothing published; the rerun resumes.
  stopped = tmp_path / "stopped"
  monkeypatch.setattr(distributed.StopSignals, "stop_at", lambda self, step: signal.SIGINT if step == 5 else None)
  assert cli.main(_argv(glue_dir, vocab_dir, stopped, *extra)) == 130
  assert f"Ctrl-C: saved step 5 to {stopped / '.finetune-staging'}" in capsys.readouterr().out
  assert max(checkpointing.saved_steps(str(stopped / ".finetune-staging" / "checkpoints"))) == 5
  assert sorted(os.listdir(stopped)) == [".finetune-staging"]
  monkeypatch.undo()
  assert cli.main(_argv(glue_dir, vocab_dir, stopped, *extra)) == 0
  whole_params = _best_params(whole)
  for run in (killed, stopped):
    assert not (run / ".finetune-staging").exists()
    assert _losses(run) == _losses(whole) and len(_losses(whole)) == 8
    assert _results(run) == _results(whole)
    run_params = _best_params(run)
    assert whole_params.keys() == run_params.keys()
    for name, value in whole_params.items():
      np.testing.assert_array_equal(run_params[name], value, err_msg=f"{run.name}: {name}")


@pytest.mark.parametrize("point", ["outputs", "publication", "staging removal"])
def test_a_run_killed_at_its_end_is_completed_by_the_same_command(glue_dir, vocab_dir, tmp_path, point, capsys):
  # Before, a kill after best/ was renamed left a workdir the same command could never finish (a
  # FileNotFoundError each rerun), and a kill mid-way through the move had the rerun refuse the workdir.
  extra = ("epochs=2",)
  whole, killed = tmp_path / "whole", tmp_path / "killed"
  assert cli.main(_argv(glue_dir, vocab_dir, whole, *extra)) == 0
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, "-c", _KILLED_AT_THE_END, point, *_argv(glue_dir, vocab_dir, killed, *extra)],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
  capsys.readouterr()
  if point == "staging removal":
    # The run is published: the same command has nothing left to train and exits 0, as a finished
    # pretraining does (it was refused, exit 2: a script rerun after a later step failed stopped here);
    # other settings are refused, naming them; --overwrite starts afresh.
    published = (killed / "results.json").read_bytes()
    assert cli.main(_argv(glue_dir, vocab_dir, killed, *extra)) == 0
    out = capsys.readouterr().out
    assert f"{killed} holds this run, finished earlier" in out and "nothing left to train" in out
    assert out.splitlines()[-1] == finetune.summary_line(_results(whole))
    assert cli.main(_argv(glue_dir, vocab_dir, killed, *extra, "seed=3")) == 2
    assert ("already holds a finetuning run of other settings (seed 42 there, 3 now); choose another --workdir "
            "or pass --overwrite") in capsys.readouterr().err
    assert (killed / "results.json").read_bytes() == published
    assert _results(killed) == _results(whole)
    assert cli.main(_argv(glue_dir, vocab_dir, killed, *extra) + ["--overwrite"]) == 0
    assert "resuming" not in capsys.readouterr().out
  else:
    assert cli.main(_argv(glue_dir, vocab_dir, killed, *extra)) == 0
    if point == "publication":
      assert "(they were being moved when it stopped)" in capsys.readouterr().out
  assert sorted(os.listdir(killed)) == sorted(os.listdir(whole))  # no staging folder left, nothing missing
  assert _losses(killed) == _losses(whole)
  assert _results(killed) == _results(whole)
  whole_params, killed_params = _best_params(whole), _best_params(killed)
  for name, value in whole_params.items():
    np.testing.assert_array_equal(killed_params[name], value, err_msg=name)
  for name in os.listdir(whole / "submission"):
    assert (killed / "submission" / name).read_text() == (whole / "submission" / name).read_text()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "fp"])
def test_finetune_on_eight_devices_equals_one_device(glue_dir, vocab_dir, tmp_path, binary):
  # Equal up to summation order: a batch of 8 and its 8 one-example shards sum in other orders, 1-2 ulp
  # apart (XLA:CPU rounds a LayerNorm's rows by the shape it reduces; the calibrated activation scales
  # are sums across devices). In the binary model such an ulp could still flip an activation sitting
  # at a binarization threshold; none does in these steps. (The word embeddings' row scales, reduced
  # over the looked-up rows after i15, differed with the batch shape: the losses were 0.6% apart.)
  extra = ("epochs=2", "batch_size=8", "eval_batch_size=8", "optimizer.learning_rate=1e-4",
           f"model.binary={binary}")
  assert cli.main(_argv(glue_dir, vocab_dir, tmp_path / "one", *extra)) == 0
  assert cli.main(_argv(glue_dir, vocab_dir, tmp_path / "eight", *extra, "mesh.shape.data=-1")) == 0
  one, eight = _losses(tmp_path / "one"), _losses(tmp_path / "eight")
  assert one.keys() == eight.keys() and len(one) == 4
  np.testing.assert_allclose([eight[s] for s in sorted(eight)], [one[s] for s in sorted(one)], rtol=1e-5)
  assert _results(tmp_path / "eight")["dev"] == _results(tmp_path / "one")["dev"]
  one_params, eight_params = _best_params(tmp_path / "one"), _best_params(tmp_path / "eight")
  # Adam divides each gradient by its own running size: in the FP model the key biases, which softmax
  # ignores (their gradient is rounding alone), move by a fraction of the learning rate either way.
  noise = set() if binary else {"bert/encoder/layer/0/attention/self/key/bias"}
  differ = {name: float(np.max(np.abs(eight_params[name] - value))) for name, value in one_params.items()
            if not np.allclose(eight_params[name], value, rtol=1e-4, atol=1e-6)}
  assert set(differ) <= noise, differ


def _outputs(rng, batch, layers, classes, length=3, width=4, heads=2) -> dict:
  return {"logits": rng.normal(size=(batch, classes)).astype(np.float32),
          "hidden_states": [rng.normal(size=(batch, length, width)).astype(np.float32) for _ in range(layers + 1)],
          "attentions": [rng.dirichlet(np.ones(length), size=(batch, heads, length)).astype(np.float32)
                         for _ in range(layers)]}


@pytest.mark.parametrize("classes", [3, 1])
def test_distillation_terms_equal_a_hand_computation(classes):
  rng = np.random.default_rng(0)
  student, teacher = _outputs(rng, 4, 2, classes), _outputs(rng, 4, 4, classes)  # layer k learns from 2k
  weights = np.array([1.0, 1.0, 1.0, 0.0], np.float32)  # the last row is padding
  total, terms = losses.task_distillation(student, teacher, weights, temperature=2.0, logit_weight=0.5,
                                          hidden_weight=2.0, attention_weight=3.0)
  real = slice(0, 3)
  s, t = student["logits"][real], teacher["logits"][real]
  if classes == 1:
    logit = np.mean((s - t) ** 2)
  else:
    log_q = s / 2 - np.log(np.sum(np.exp(s / 2), -1, keepdims=True))
    p = np.exp(t / 2) / np.sum(np.exp(t / 2), -1, keepdims=True)
    logit = np.mean(np.mean(-p * log_q, -1))
  mse = lambda a, b: np.mean((a[real] - b[real]) ** 2)
  hidden = sum(mse(student["hidden_states"][k], teacher["hidden_states"][2 * k]) for k in range(3))
  attention = sum(mse(student["attentions"][k - 1], teacher["attentions"][2 * k - 1]) for k in (1, 2))
  np.testing.assert_allclose([terms["logit_distill_loss"], terms["hidden_distill_loss"],
                              terms["attention_distill_loss"]], [logit, hidden, attention], rtol=1e-5)
  np.testing.assert_allclose(total, 0.5 * logit + 2.0 * hidden + 3.0 * attention, rtol=1e-5)
  with pytest.raises(ValueError, match="not a multiple"):
    losses.task_distillation(student, _outputs(rng, 4, 3, classes), weights, temperature=1.0, logit_weight=1.0,
                             hidden_weight=1.0, attention_weight=0.0)


def test_a_distilled_finetune_lowers_the_distillation_loss(glue_dir, vocab_dir, tmp_path, capsys):
  teacher = tmp_path / "teacher"  # the FP classifier, finetuned on the task first
  assert cli.main(_argv(glue_dir, vocab_dir, teacher, "model.binary=False", "epochs=2")) == 0
  student = tmp_path / "student"
  assert cli.main(_argv(glue_dir, vocab_dir, student, "epochs=4", f"distill.teacher={teacher}")) == 0
  records = [json.loads(line) for line in open(student / "metrics.jsonl")]
  steps = [r for r in records if "logit_distill_loss" in r]
  assert len(steps) == 16
  for r in steps:  # the defaults (BiT's): no label term, logits and hidden states
    assert r["loss"] == pytest.approx(r["logit_distill_loss"] + r["hidden_distill_loss"], rel=1e-5)
  first, last = steps[:4], steps[-4:]
  mean = lambda records, term: np.mean([r[term] for r in records])
  assert mean(last, "hidden_distill_loss") < 0.8 * mean(first, "hidden_distill_loss")
  # The tiny teacher is nearly uniform, its soft cross entropy near its floor (ln 2 / 2): that term may
  # only not rise, so the sum falls by less.
  assert mean(last, "logit_distill_loss") <= mean(first, "logit_distill_loss") + 1e-4
  assert mean(last, "loss") < 0.9 * mean(first, "loss")
  capsys.readouterr()
  bad = _argv(glue_dir, vocab_dir, tmp_path / "bad", f"distill.teacher={tmp_path / 'nowhere'}")
  assert cli.main(bad) == 2
  assert "nowhere does not exist" in capsys.readouterr().err


def test_a_batch_the_mesh_cannot_split_is_one_line(glue_dir, vocab_dir, tmp_path, capsys):
  argv = _argv(glue_dir, vocab_dir, tmp_path / "run", "mesh.shape.data=-1")  # batch 4 over 8 devices
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1] == ("bipft finetune: error: batch_size 4 must be a multiple of the 8 batch shards of the mesh, "
                     "and of the 1 hosts; change it or --config.mesh.shape")
  assert not (tmp_path / "run" / ".finetune-staging").exists()


def test_max_grad_norm_clips_as_optax_does_and_keeps_the_optimizer_state():
  x, y = jax.random.normal(jax.random.key(0), (8, 3)), jax.random.normal(jax.random.key(1), (8, 4))
  params = {"w": jax.random.normal(jax.random.key(2), (3, 4)), "b": jax.numpy.ones(4)}

  def loss_fn(params, frozen, batch, key):
    loss = jax.numpy.mean((batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2)
    return loss, {"loss": loss}

  batch = {"x": x, "y": y}
  norm = float(optax.tree.norm(jax.grad(lambda p: loss_fn(p, None, batch, None)[0])(params)))

  def stepped(tx, max_grad_norm, accum=1):
    step = jax.jit(engine.make_step(loss_fn, tx, lambda s: 0.1, seed=0, accum=accum, max_grad_norm=max_grad_norm))
    return step({"params": params, "opt_state": tx.init(params)}, None, batch, 0)

  sgd = optax.sgd(0.1)
  for limit in (norm / 4, 2 * norm):
    for accum in (1, 2):
      (state, metrics), (unclipped, _) = stepped(sgd, limit, accum), stepped(sgd, 0.0, accum)
      reference = optax.chain(optax.clip_by_global_norm(limit), sgd)
      grads = jax.tree.map(lambda new, old: (old - new) / 0.1, unclipped["params"], params)
      updates, _ = reference.update(grads, reference.init(params), params)
      for name in params:
        np.testing.assert_allclose(state["params"][name], params[name] + updates[name], rtol=1e-5, atol=1e-6)
      assert float(metrics["grad_norm"]) == pytest.approx(norm, rel=1e-5)  # the norm before clipping
      if limit > norm:  # under the limit: the unclipped step, bit for bit
        jax.tree.map(np.testing.assert_array_equal, state["params"], unclipped["params"])
  adam = optax.adamw(0.1)
  assert jax.tree.structure(stepped(adam, norm / 4)[0]) == jax.tree.structure(stepped(adam, 0.0)[0])


class _Built(Exception):
  pass


def test_max_grad_norm_reaches_the_step_of_both_jobs(glue_dir, vocab_dir, train_files, tmp_path, monkeypatch):
  def built(*args, **kwargs):
    raise _Built(kwargs.get("max_grad_norm", args[5] if len(args) > 5 else None))
  monkeypatch.setattr(engine, "make_step", built)
  glue_config = config_loading.load_config(CONFIG, tiny_overrides(glue_dir, vocab_dir, "optimizer.max_grad_norm=0.5"))
  with pytest.raises(_Built, match="^0.5$"):
    finetune.finetune(glue_config, str(tmp_path / "ft"))
  pretrain_config = config_loading.load_config(f"{TRAIN_CONFIG}:tiny",
                                               train_overrides(train_files, **{"optimizer.max_grad_norm": 2.0}))
  with pytest.raises(_Built, match="^2.0$"):
    train.train_and_evaluate(pretrain_config, str(tmp_path / "pt"))


class _KilledAtTheEnd(Exception):
  pass


def test_early_stopping_ends_after_patience_epochs_and_a_rerun_trains_no_more(glue_dir, vocab_dir, tmp_path,
                                                                              capsys, monkeypatch):
  # Dev accuracy by epoch: the best is epoch 2's, so with a patience of 2 the run ends after epoch 4 of 6.
  # Killed as it writes its outputs, the same command completes it without training further.
  scores = iter([50.0, 60.0, 55.0, 58.0, 99.0, 99.0])
  monkeypatch.setattr(finetuning.metrics_lib, "compute", lambda metrics, labels, predicted: {"accuracy": next(scores)})
  config = config_loading.load_config(CONFIG, tiny_overrides(glue_dir, vocab_dir, "epochs=6", "early_stop_patience=2"))
  write_outputs = finetuning.Finetuning.write_outputs

  def killed(self):
    raise _KilledAtTheEnd

  monkeypatch.setattr(finetuning.Finetuning, "write_outputs", killed)
  with pytest.raises(_KilledAtTheEnd):
    finetune.finetune(config, str(tmp_path))
  assert ("stopping after epoch 4 of 6: no better dev accuracy than epoch 2's in the 2 epochs since "
          "(early_stop_patience=2)") in capsys.readouterr().out
  monkeypatch.setattr(finetuning.Finetuning, "write_outputs", write_outputs)
  results = finetune.finetune(config, str(tmp_path))
  assert "stopped early at step 16: nothing left to train" in capsys.readouterr().out
  assert results["epochs"] == 4 and results["best_epoch"] == 2 and results["stopped_early"] == "after epoch 4 of 6"
  assert results["dev"]["dev"]["accuracy"] == 60.0 and next(scores) == 99.0  # evaluated 4 times, not again
  assert max(_losses(tmp_path)) == 16 == results["steps"]  # no step trained after the stop, and it says so (24 before)
  assert json.loads((tmp_path / "results.json").read_text())["stopped_early"] == "after epoch 4 of 6"


def test_early_stopping_with_a_min_delta_waits_on_gains_above_it(glue_dir, vocab_dir, tmp_path, capsys, monkeypatch):
  # Epochs 3 and 4 gain 0.5 and 0.3 points over epoch 2: under a min_delta of 1 they do not count, so a
  # patience of 2 ends the run after epoch 4, whose score is still the one reported (the best).
  scores = iter([50.0, 60.0, 60.5, 60.8, 99.0, 99.0])
  monkeypatch.setattr(finetuning.metrics_lib, "compute", lambda metrics, labels, predicted: {"accuracy": next(scores)})
  config = config_loading.load_config(CONFIG, tiny_overrides(glue_dir, vocab_dir, "epochs=6", "early_stop_patience=2",
                                                             "early_stop_min_delta=1"))
  results = finetune.finetune(config, str(tmp_path))
  assert ("stopping after epoch 4 of 6: no better dev accuracy by more than 1 than epoch 2's in the 2 epochs since "
          "(early_stop_patience=2, early_stop_min_delta=1)") in capsys.readouterr().out
  assert results["stopped_early"] == "after epoch 4 of 6" and results["best_epoch"] == 4
  assert results["dev"]["dev"]["accuracy"] == 60.8


def test_a_custom_test_file_without_examples_is_refused_before_training(vocab_dir, tmp_path, capsys):
  # It was only noted on stderr: the run trained, wrote no submission/ and exited 0, where
  # `bipft evaluate --split test` refuses the file.
  for split in ("train", "dev"):
    (tmp_path / f"{split}.csv").write_text("review,stars\nthe film was good .,pos\nthe film was bad .,neg\n")
  (tmp_path / "test.csv").write_text("review\n")
  data = [f"data.{split}_file={tmp_path / split}.csv" for split in ("train", "dev", "test")] + [
      "data.format=csv", "data.text_fields=review", "data.label_field=stars", "data.labels=neg,pos"]
  argv = ["finetune", "--config", os.path.join(ROOT, "configs/glue.py:task=custom"), "--workdir", str(tmp_path / "run")]
  assert cli.main(argv + [f"--config.{o}" for o in tiny_overrides("", vocab_dir, "epochs=1", *data)]) == 2
  assert capsys.readouterr().err.strip() == f"bipft finetune: error: {tmp_path / 'test.csv'} has no examples"
  assert not (tmp_path / "run").exists()
