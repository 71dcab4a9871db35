"""The pretraining loop: masked-position MLM, sharded == single device, exact resume, NaN stop, CLI errors."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from bipft_jax import checkpointing, cli, config_loading, losses, sharding, train
from bipft_jax import model as model_lib
from bipft_jax.data import pipeline, sources

from test_data import NUM_DOCS, WORDS, write_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "pretrain.py")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A corpus and a WordPiece vocabulary for it."""
  directory = tmp_path_factory.mktemp("pretrain")
  corpus = write_corpus(directory)
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "."] + WORDS + [f"d{i}" for i in range(NUM_DOCS)]
  (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
  return {"corpus": corpus, "vocab": str(directory), "cache": str(directory / "jax_cache")}


def tiny_overrides(files, **extra) -> list:
  values = {"data.paths": files["corpus"], "data.eval_paths": files["corpus"], "tokenizer": files["vocab"],
            "model.vocab_size": 128, "model.num_layers": 1, **extra}
  return [f"{k}={v}" for k, v in values.items()]


def tiny_config(files, **extra):
  return config_loading.load_config(f"{CONFIG}:tiny", tiny_overrides(files, **extra))


def first_batch(config, files) -> dict:
  tokenizer = train.pytorch_io.load_tokenizer(files["vocab"])
  data = pipeline.PretrainingData(sources.open_source(config.data, "train"), tokenizer, config.data,
                                  batch_size=config.batch_size, seed=0)
  return next(data)


def test_mlm_at_masked_positions_equals_all_positions(files):
  config = tiny_config(files)
  student_config = train.student_config(config)
  student = model_lib.build(student_config, "pretraining")
  params = model_lib.init_params(student, jax.random.key(0))
  batch = first_batch(config, files)
  args = (batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])

  def mlm_loss(params, gathered):
    if gathered:
      out = student.apply({"params": params}, *args, mlm_positions_BxN=batch["mlm_positions"])
      return losses.cross_entropy(out["mlm_logits"], batch["mlm_labels"])
    out = student.apply({"params": params}, *args)
    return losses.cross_entropy(out["mlm_logits"], batch["labels"])

  (gathered, grads_g), (full, grads_f) = (jax.jit(jax.value_and_grad(mlm_loss), static_argnums=1)(params, g)
                                          for g in (True, False))
  assert batch["mlm_positions"].shape[1] < batch["input_ids"].shape[1]  # the gather really drops positions
  np.testing.assert_allclose(gathered, full, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_g), jax.tree.leaves(grads_f)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def _two_steps(config, teacher_config, teacher_params, mesh, batches):
  trainer = train.make_trainer(config, teacher_config, mesh)
  teacher = train.put_global(teacher_params, trainer.teacher_shardings)
  global_batches = [train.global_batch(b, trainer.batch_sharding) for b in batches]
  state = trainer.init_state(teacher, global_batches[0])
  losses_ = []
  for step, batch in enumerate(global_batches):
    state, metrics = trainer.train_step(state, teacher, batch, step)
    losses_.append(float(metrics["total_loss"]))
  return jax.device_get(state["params"]), losses_, state


@pytest.mark.parametrize("accum, shape", [(1, {"data": -1}), (2, {"data": 2, "fsdp": 2, "tensor": 2})])
def test_sharded_step_equals_single_device(files, accum, shape):
  config = tiny_config(files, grad_accum_steps=accum)
  teacher_config, teacher_params, _ = train.load_teacher(config)
  batch = first_batch(config, files)
  batches = [batch, jax.tree.map(lambda x: np.roll(x, 1, axis=0), batch)]
  single, single_losses, _ = _two_steps(config, teacher_config, teacher_params,
                                        sharding.make_mesh({"data": 1}, jax.devices()[:1]), batches)
  config.mesh.shape = shape
  sharded, sharded_losses, state = _two_steps(config, teacher_config, teacher_params, sharding.make_mesh(shape),
                                              batches)
  assert len(jax.tree.leaves(state["params"])[0].sharding.device_set) == 8
  np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# A real SIGKILL, delivered right after the run starts its second (asynchronous) checkpoint.
_KILLED_RUN = textwrap.dedent("""
  import os, signal, sys
  from bipft_jax import checkpointing, cli
  save, calls = checkpointing.save, []
  def save_then_die(*args, **kwargs):
    save(*args, **kwargs)
    calls.append(1)
    if len(calls) == 2:
      os.kill(os.getpid(), signal.SIGKILL)
  checkpointing.save = save_then_die
  sys.exit(cli.main(sys.argv[1:]))
""")


def _pretrain(files, workdir, *extra, script=None, **popen):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=files["cache"],
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  command = ["pretrain", "--config", f"{CONFIG}:tiny", "--workdir", str(workdir), *extra]
  command += [f"--config.{o}" for o in tiny_overrides(files)]
  prefix = [sys.executable, "-c", script] if script else [sys.executable, "-m", "bipft_jax.cli"]
  if popen:
    return subprocess.Popen(prefix + command, env=env, cwd=REPO, **popen)
  return subprocess.run(prefix + command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_sigkill_and_resume_is_bit_identical(files, tmp_path):
  steps = ["--config.total_steps=6", "--config.checkpoint_every=2"]
  whole = _pretrain(files, tmp_path / "whole", *steps)
  assert whole.returncode == 0, whole.stderr[-2000:]
  killed = _pretrain(files, tmp_path / "killed", *steps, script=_KILLED_RUN)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  resumed = _pretrain(files, tmp_path / "killed", *steps)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resuming" in resumed.stdout and "from step 6" not in resumed.stdout
  _, _, expected = checkpointing.restore_params(str(tmp_path / "whole"))
  _, _, got = checkpointing.restore_params(str(tmp_path / "killed"))
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  logged = [json.loads(line) for line in open(tmp_path / "whole" / "metrics.jsonl")]
  assert [r["step"] for r in logged if "total_loss" in r] == [1, 2, 3, 4, 5, 6]
  assert os.listdir(tmp_path / "whole" / "tensorboard")


def test_sigterm_saves_and_exits(files, tmp_path):
  run = _pretrain(files, tmp_path / "run", "--config.total_steps=100000", "--config.checkpoint_every=100000",
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / "run" / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and run.poll() is None:
    if metrics.exists() and sum(1 for _ in open(metrics)) >= 3:  # accuracy at step 0, then steps 1, 2
      break
    time.sleep(0.5)
  run.send_signal(signal.SIGTERM)
  out, err = run.communicate(timeout=120)
  assert run.returncode == 0, err[-2000:]
  assert "SIGTERM: saved step" in err + out
  manager = checkpointing.make_manager(str(tmp_path / "run"), read_only=True)
  assert 2 <= manager.latest_step() < 100000


def test_nan_loss_stops_with_one_line_and_keeps_last_checkpoint(files, tmp_path, capsys):
  code = cli.main(["pretrain", "--config", f"{CONFIG}:tiny", "--workdir", str(tmp_path / "run")]
                  + [f"--config.{o}" for o in tiny_overrides(files)]
                  + ["--config.optimizer.learning_rate=1e30", "--config.optimizer.schedule=constant",
                     "--config.optimizer.warmup_steps=0", "--config.checkpoint_every=1"])
  error = capsys.readouterr().err.strip().splitlines()[-1]
  assert code == 2
  assert "the loss is nan at step" in error or "the loss is inf at step" in error
  step = int(error.split(" at step ")[1].split(";")[0])
  _, _, params = checkpointing.restore_params(str(tmp_path / "run"))
  assert checkpointing.make_manager(str(tmp_path / "run"), read_only=True).latest_step() == step
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


@pytest.mark.parametrize("args, message", [
    (["--config", f"{CONFIG}:huge"], "unknown pretrain variant"),
    (["--config.batch_size=6"], "batch_size 6 must be a multiple"),
    (["--config.data.masking=sometimes"], "unknown data.masking"),
    (["--config.model.num_heads=3"], "bad model config: hidden_size 128 is not a multiple"),
    (["--config.no_such_field=1"], "unknown config field"),
])
def test_bad_configs_exit_2(files, tmp_path, capsys, args, message):
  base = ["pretrain", "--config", f"{CONFIG}:tiny", "--workdir", str(tmp_path / "run")]
  base += [f"--config.{o}" for o in tiny_overrides(files)]
  if args[0] == "--config":
    base[2] = args[1]
    args = []
  assert cli.main(base + args) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  assert re.search(message, err), err
