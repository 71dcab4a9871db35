"""The pretraining loop: masked-position MLM, sharded == single device, exact resume, NaN stop, a full
disk, CLI errors."""
import errno
import gzip
import io
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import pytest

from bipft_jax import checkpointing, cli, config_loading, console, engine, losses, pretraining, pytorch_io, sharding
from bipft_jax import model as model_lib
from bipft_jax import files as bipft_files  # the `files` fixture takes the name
from bipft_jax import model_params, optim
from bipft_jax.data import pipeline, sources
from bipft_jax.errors import UserError
from bipft_jax.metrics_writer import MetricsWriter

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
  tokenizer = pytorch_io.load_tokenizer(files["vocab"])
  data = pipeline.PretrainingData(sources.open_source(config.data, "train"), tokenizer, config.data,
                                  batch_size=config.batch_size, seed=0)
  return next(data)


def test_mlm_at_masked_positions_equals_all_positions(files):
  config = tiny_config(files)
  student_config = pretraining.student_config(config)
  student = model_lib.build(student_config, "pretraining")
  params = model_params.init_params(student, jax.random.key(0))
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


def _two_steps(config, mesh, batches):
  rules = sharding.rules_from_config(config.mesh.rules)
  job = pretraining.distillation_job(config, mesh, rules)
  run = engine.Engine(job, mesh, rules, seed=config.seed, grad_accum_steps=config.grad_accum_steps)
  teacher = run.place_frozen()
  global_batches = [run.global_batch(b) for b in batches]
  state = run.new_state(job.source(), global_batches[0])
  memory = run.memory_report(state, teacher, global_batches[0])
  losses_ = []
  for step, batch in enumerate(global_batches):
    state, metrics = run.train_step(state, teacher, batch, step)
    losses_.append(float(metrics["total_loss"]))
  return jax.device_get(state["params"]), losses_, state, memory


def _held_bytes(memory: str) -> float:
  """The parameters, optimizer state, frozen weights and batch a memory report says a device holds."""
  size, unit = re.search(r"XLA's account: ([\d.]+) (MiB|GiB) of parameters", memory).groups()
  return float(size) * 2 ** (20 if unit == "MiB" else 30)


@pytest.mark.parametrize("accum, shape", [(1, {"data": -1}), (2, {"data": 2, "fsdp": 2, "tensor": 2})])
def test_sharded_step_equals_single_device(files, accum, shape):
  config = tiny_config(files, grad_accum_steps=accum)
  batch = first_batch(config, files)
  batches = [batch, jax.tree.map(lambda x: np.roll(x, 1, axis=0), batch)]
  single, single_losses, _, single_memory = _two_steps(config, sharding.make_mesh({"data": 1}, jax.devices()[:1]),
                                                      batches)
  config.mesh.shape = shape
  sharded, sharded_losses, state, sharded_memory = _two_steps(config, sharding.make_mesh(shape), batches)
  assert len(jax.tree.leaves(state["params"])[0].sharding.device_set) == 8
  # What a step takes of a device: the batches' shape, the micro-batches, less held where fsdp and
  # tensor shard the parameters and optimizer state.
  micro = f" in {accum} micro-batches" if accum > 1 else ""
  assert single_memory.startswith(f"a step on batches of 8 x 32{micro} takes ") and sharded_memory.startswith(
      f"a step on batches of 8 x 32{micro} takes ")
  if "fsdp" in shape:
    assert _held_bytes(sharded_memory) < 0.5 * _held_bytes(single_memory)
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


def _assert_same_params(expected_workdir, workdir) -> None:
  """The latest checkpoints of two runs hold the same parameters, bit for bit."""
  _, _, expected = checkpointing.restore_params(str(expected_workdir))
  _, _, got = checkpointing.restore_params(str(workdir))
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _pretrain(files, workdir, *extra, script=None, **popen):
  """`bipft pretrain` of the tiny config in a process of its own."""
  command = ["pretrain", "--config", f"{CONFIG}:tiny", "--workdir", str(workdir), *extra]
  return _run(files, command + [f"--config.{o}" for o in tiny_overrides(files)], script, **popen)


def _run(files, command: list, script=None, **popen):
  """A `bipft` command in a process of its own, through `script` if given (Popen with `popen`)."""
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=files["cache"],
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  prefix = [sys.executable, "-c", script] if script else [sys.executable, "-m", "bipft_jax.cli"]
  if popen:
    return subprocess.Popen(prefix + command, env=env, cwd=REPO, **popen)
  return subprocess.run(prefix + command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_sigkill_and_resume_is_bit_identical(files, tmp_path):
  # The interrupted run makes its examples in worker processes, the whole one in its data thread.
  steps = ["--config.total_steps=6", "--config.checkpoint_every=2"]
  whole = _pretrain(files, tmp_path / "whole", *steps, "--config.data.workers=0")
  assert whole.returncode == 0, whole.stderr[-2000:]
  killed = _pretrain(files, tmp_path / "killed", *steps, "--config.data.workers=2", script=_KILLED_RUN)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  assert (tmp_path / "killed" / bipft_files.LOCK_FILE).exists()  # the killed run's, whose lock died with it
  resumed = _pretrain(files, tmp_path / "killed", *steps, "--config.data.workers=2")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  resumed_from = int(re.search(r"resuming \S+ from step (\d+)", resumed.stdout).group(1))
  assert resumed_from in (2, 4)
  _assert_same_params(tmp_path / "whole", tmp_path / "killed")
  assert not (tmp_path / "killed" / bipft_files.LOCK_FILE).exists()
  # Each step's metrics once: the killed run's steps after the checkpoint gave way to the resumed run's,
  # in metrics.jsonl and in TensorBoard (the resumed run's events hide the killed run's from there on).
  for run in ("whole", "killed"):
    logged = [json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")]
    assert [r["step"] for r in logged if "total_loss" in r] == [1, 2, 3, 4, 5, 6], run
  assert os.listdir(tmp_path / "whole" / "tensorboard")
  newest = max((tmp_path / "killed" / "tensorboard").iterdir(), key=lambda p: p.stat().st_mtime)
  assert [e.step for e in _tensorboard_events(newest) if e.HasField("session_log")] == [resumed_from + 1]


def test_a_resumed_runs_metrics_drop_what_the_killed_run_wrote_after_the_checkpoint(tmp_path):
  lines = [json.dumps({"step": step, "loss": 1.0 / (step + 1)}) + "\n" for step in range(6)]
  not_records = '{"step": "2"}\n{"step": null}\n[2]\n'  # hand-edited lines: not ours, dropped
  (tmp_path / "metrics.jsonl").write_text("".join(lines[:3]) + not_records + "".join(lines[3:])
                                          + '{"step": 6, "lo')  # the kill cut the last one short
  writer = MetricsWriter(str(tmp_path), start_step=3)
  writer.write(4, {"loss": 0.5})
  writer.close()
  assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines[:4]) + '{"step": 4, "loss": 0.5}\n'
  (event_file,) = (tmp_path / "tensorboard").iterdir()
  events = _tensorboard_events(event_file)
  assert [e.step for e in events if e.HasField("session_log")] == [4]  # TensorBoard hides older steps >= 4
  assert [(e.step, e.summary.value[0].simple_value) for e in events if e.HasField("summary")] == [(4, 0.5)]


def test_a_rerun_or_resume_at_an_evaluated_step_logs_its_evaluation_once(files, tmp_path, capsys):
  """A run evaluates at its start: rerunning a finished run, or resuming at a step it evaluated, wrote
  that step's evaluation a second time (a third on the next rerun)."""
  args = _pretrain_args(files, tmp_path / "run", "--config.total_steps=2", "--config.checkpoint_every=2",
                        "--config.eval_every=2", "--config.optimizer.warmup_steps=1")
  for extra in ([], [], ["--config.total_steps=4"]):  # the run, a rerun of it, an extension
    assert cli.main(args + extra) == 0
  logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert [r["step"] for r in logged if "eval_mlm_accuracy" in r] == [0, 2, 4]
  assert [r["step"] for r in logged if "total_loss" in r] == [1, 2, 3, 4]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_whose_raise_setup_dropped_still_stops_the_run_after_a_saved_step(files, tmp_path, capsys, signum):
  """A SIGTERM or Ctrl-C while the run set up raises from its handler; raised inside XLA's garbage-
  collection callback, Python drops the exception, and the run trained to its end and exited 0. The
  handlers note the signal (errors.RECEIVED), as they do when the raise is dropped, and the loop stops."""
  from bipft_jax import errors
  errors.RECEIVED.append(signum)
  try:
    code = cli.main(_pretrain_args(files, tmp_path / "run", "--config.total_steps=6"))
  finally:
    errors.RECEIVED.clear()
  assert code == errors.signal_exit_code(signum)
  assert f"{errors.STOPPED[code]}: saved step 1 to " in capsys.readouterr().out
  assert checkpointing.restore_params(str(tmp_path / "run"))[2] is not None
  assert sorted(int(p.name) for p in (tmp_path / "run").iterdir() if p.name.isdigit()) == [1]


def _tensorboard_events(path) -> list:
  """The events of a TensorBoard file (TFRecord framing: length, its CRC, the record, its CRC)."""
  from tensorboardX.proto import event_pb2
  data, events, at = path.read_bytes(), [], 0
  while at < len(data):
    (length,) = struct.unpack("<Q", data[at:at + 8])
    events.append(event_pb2.Event.FromString(data[at + 12:at + 12 + length]))
    at += 12 + length + 4
  return events


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_sigterm_or_ctrl_c_saves_and_exits_with_its_code(files, tmp_path, capsys, signum):
  # Not exit code 0: `bipft pretrain ... && bipft finetune ...` and job controllers would take the
  # stopped run for a finished one.
  # Its examples made by a worker process: the signal goes to the whole process group, as a Ctrl-C at a
  # terminal or launch/glue.sh's SIGTERM does; the worker leaves it to the run, which saves first.
  run = _pretrain(files, tmp_path / "run", *_UNTIL_STOPPED, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                  text=True, start_new_session=True)
  _wait_for_two_steps(run, tmp_path / "run")
  # The same command again while the run trains (a requeued job, a second terminal) is turned away.
  assert cli.main(_pretrain_args(files, tmp_path / "run", *_UNTIL_STOPPED)) == 2
  assert (f"is in use by another run: bipft pretrain, pid {run.pid} on "
          in _error_line(capsys.readouterr().err, "pretrain"))
  assert run.poll() is None
  os.killpg(run.pid, signum)
  out, err = run.communicate(timeout=120)
  assert run.returncode == 128 + signum, err[-2000:]
  what = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C"}[signum]
  assert f"{what}: saved step" in out and "Traceback" not in err
  assert "bipft pretrain: examples made by 1 worker process a host (data.workers)" in out
  _assert_saved_when_stopped(tmp_path / "run")


# A run that only a signal ends (no checkpoint before it), its examples made by a worker process.
_UNTIL_STOPPED = ["--config.total_steps=100000", "--config.checkpoint_every=100000", "--config.data.workers=1"]


def _wait_for_two_steps(run, workdir) -> None:
  metrics, deadline = workdir / "metrics.jsonl", time.time() + 240
  while time.time() < deadline and run.poll() is None:
    if metrics.exists() and sum(1 for _ in open(metrics)) >= 3:  # accuracy at step 0, then steps 1, 2
      return
    time.sleep(0.5)


def _assert_saved_when_stopped(workdir) -> None:
  """The run saved the step it stopped at (its only checkpoint) and let go of its workdir."""
  manager = checkpointing.make_manager(str(workdir), read_only=True)
  assert 2 <= manager.latest_step() < 100000
  assert not (workdir / bipft_files.LOCK_FILE).exists()


# The `bipft` command with the terminal on its stdin as its session's controlling terminal, as ssh gives.
_ON_ITS_TERMINAL = textwrap.dedent("""
  import fcntl, sys, termios
  from bipft_jax import cli
  fcntl.ioctl(0, termios.TIOCSCTTY, 0)
  sys.argv[0] = "bipft"
  sys.exit(cli.main())
""")


def test_a_hangup_of_the_runs_terminal_saves_and_exits_129(files, tmp_path):
  """An ssh connection that drops hangs up the run's terminal: the kernel sends the session leader a
  SIGHUP, its shell passes one to the job's process group, and every write to the terminal fails with
  EIO. The SIGHUP's default action killed the run with its steps since the last checkpoint."""
  master, terminal = pty.openpty()
  run = _pretrain(files, tmp_path / "run", *_UNTIL_STOPPED, script=_ON_ITS_TERMINAL, stdin=terminal, stdout=terminal,
                  stderr=terminal, start_new_session=True)
  os.close(terminal)
  shown, connected = [], threading.Event()
  connected.set()

  def show():  # what the user's ssh client reads, until the connection drops
    while connected.is_set():
      if select.select([master], [], [], 0.1)[0]:
        try:
          shown.append(os.read(master, 1 << 16))
        except OSError:
          return
  reader = threading.Thread(target=show)
  reader.start()
  _wait_for_two_steps(run, tmp_path / "run")
  connected.clear()
  reader.join()
  os.close(master)  # the connection drops: the terminal hangs up
  os.killpg(run.pid, signal.SIGHUP)  # the login shell's SIGHUP to its job
  run.wait(timeout=120)
  assert run.returncode == 129, b"".join(shown)[-3000:].decode(errors="replace")
  _assert_saved_when_stopped(tmp_path / "run")


class _FailingStream(io.StringIO):
  def __init__(self, error_number: int):
    super().__init__()
    self.error_number = error_number

  def write(self, text: str) -> int:
    raise OSError(self.error_number, os.strerror(self.error_number))


@pytest.mark.parametrize("error_number", [errno.EPIPE, errno.EIO])
def test_a_console_guard_takes_a_lost_reader_once_and_lets_other_write_errors_through(monkeypatch, error_number):
  hangups = []
  monkeypatch.setattr(sys, "stdout", _FailingStream(error_number))
  guard = console.Guard(on_lost=lambda: hangups.append(1))
  try:
    print("a line with nowhere to go")
    print("and another")
  finally:
    guard.close()
  assert hangups == [1] and isinstance(sys.stdout, _FailingStream)
  monkeypatch.setattr(sys, "stdout", _FailingStream(errno.ENOSPC))  # a log file on a full disk: not a hangup
  guard = console.Guard(on_lost=lambda: hangups.append(1))
  try:
    with pytest.raises(OSError, match="No space left"):
      print("a line")
  finally:
    guard.close()
  assert hangups == [1]


def test_a_console_whose_reader_left_is_taken_for_a_hangup(files, tmp_path):
  """Without a terminal (`ssh host cmd`, `gcloud ... ssh --command`), a dropped connection leaves the
  run's output a pipe without a reader: the next progress-bar write raised BrokenPipeError, and the run
  died with its steps since the last checkpoint."""
  run = _pretrain(files, tmp_path / "run", *_UNTIL_STOPPED, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                  start_new_session=True)
  _wait_for_two_steps(run, tmp_path / "run")
  run.stdout.close()
  run.stderr.close()
  run.wait(timeout=120)
  assert run.returncode == 129
  _assert_saved_when_stopped(tmp_path / "run")


def test_a_ctrl_c_outside_the_training_loop_is_one_line(files, tmp_path, capsys, monkeypatch):
  def interrupted(*args, **kwargs):  # a Ctrl-C while the job is being set up (or a second Ctrl-C)
    raise KeyboardInterrupt
  monkeypatch.setattr(pretraining, "distillation_job", interrupted)
  assert cli.main(_pretrain_args(files, tmp_path / "run")) == 130
  assert capsys.readouterr().err.splitlines() == ["bipft pretrain: stopped by Ctrl-C"]
  assert not (tmp_path / "run").exists()


def _pretrain_args(files, workdir, *extra) -> list:
  return (["pretrain", "--config", f"{CONFIG}:tiny", "--workdir", str(workdir)]
          + [f"--config.{o}" for o in tiny_overrides(files)] + list(extra))


def _error_line(err: str, command: str) -> str:
  """The one error line of a failed command (stderr holds progress bars too, but no traceback)."""
  errors = [line for line in err.splitlines() if f"bipft {command}: error: " in line]
  assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
  return errors[0]


def _all_finite(params) -> bool:
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_resuming_another_model_is_refused_and_a_dropout_remat_or_clipping_change_resumes(files, tmp_path, capsys):
  workdir, steps = tmp_path / "run", ("--config.total_steps=4", "--config.optimizer.warmup_steps=1")
  assert cli.main(_pretrain_args(files, workdir, "--config.total_steps=2", "--config.optimizer.warmup_steps=1",
                                 "--config.checkpoint_every=2")) == 0
  # Its first lines say what a step takes of a device: the parameters and AdamW's two moments, the
  # teacher (at most the student's size) and the batch held, besides the activations.
  said = re.search(r"bipft pretrain: a step on batches of 8 x 32 takes ([\d.]+) MiB a device \(XLA's account: "
                   r"([\d.]+) MiB of parameters, optimizer state, frozen weights and batch; ([\d.]+) MiB of "
                   r"activations and workspace\)\n", capsys.readouterr().out)
  total, held, work = (float(said.group(i)) * 2**20 for i in (1, 2, 3))
  params = sum(x.nbytes for x in jax.tree.leaves(checkpointing.restore_params(str(workdir))[2]))
  assert 3 * params <= held + 2**19 and held <= 4 * params + 2**19 and work > 0
  assert total == pytest.approx(held + work, abs=2**19)
  written = {path: path.read_bytes() for path in workdir.rglob("*") if path.is_file()}
  for change, named in (("model.mlm_transform_act=gelu", "mlm_transform_act 'relu' there, 'gelu' now"),
                        ("model.intermediate_size=48", "intermediate_size 512 there, 48 now")):
    capsys.readouterr()
    assert cli.main(_pretrain_args(files, workdir, *steps, f"--config.{change}")) == 2
    error = _error_line(capsys.readouterr().err, "pretrain")
    assert f"{workdir} holds a run of another model (step 2: {named}); rerun with that run's model" in error
    assert {path: path.read_bytes() for path in workdir.rglob("*") if path.is_file()} == written
  assert cli.main(_pretrain_args(files, workdir, *steps, "--config.model.hidden_dropout=0.0",
                                 "--config.model.remat=True", "--config.optimizer.max_grad_norm=1.0")) == 0
  out = capsys.readouterr().out
  assert f"resuming {workdir} from step 2" in out
  # What the resume changes is said, with the learning rate the longer schedule now gives step 2 (a
  # decaying schedule was at 0 there).
  note = re.search(r"settings changed since step 2 was saved: (.*) \(learning rate at step 2: (\S+), (\S+) in the "
                   r"saved run's schedule\)\n", out)
  assert note, out
  assert note.group(1) == ("checkpoint_every 2 -> 5; model.hidden_dropout 0.1 -> 0.0; model.remat False -> True; "
                           "optimizer.max_grad_norm 0.0 -> 1.0; optimizer.total_steps 2 -> 4; total_steps 2 -> 4")
  config = config_loading.load_config(f"{CONFIG}:tiny", [o[len("--config."):] for o in _pretrain_args(
      files, workdir, *steps) if o.startswith("--config.")])
  assert float(note.group(2)) == pytest.approx(float(optim.learning_rate_schedule(config.optimizer)(2)), rel=1e-3)
  assert float(note.group(3)) == 0.0


def test_diverging_run_saves_only_finite_checkpoints(files, tmp_path, capsys):
  workdir = tmp_path / "run"
  code = cli.main(_pretrain_args(files, workdir, "--config.optimizer.learning_rate=1e30",
                                 "--config.total_steps=20", "--config.optimizer.warmup_steps=4",
                                 "--config.checkpoint_every=1", "--config.keep_checkpoints=20"))
  error = _error_line(capsys.readouterr().err, "pretrain")
  assert code == 2
  match = re.search(r"the loss is (nan|inf) at step (\d+); stopped without saving \(step \2, whose "
                    r"parameters gave this loss, moved to (\S+)\)\. The newest finite checkpoint is "
                    r"step (\d+) in ", error)
  assert match, error
  diverged_at, moved, newest = int(match.group(2)), match.group(3), int(match.group(4))
  assert moved == str(workdir / f"{diverged_at}.diverged") and os.path.isdir(moved)
  manager = checkpointing.make_manager(str(workdir), read_only=True)
  assert manager.latest_step() == newest == diverged_at - 1 and newest >= 1
  for step in manager.all_steps():  # restore_params refuses non-finite arrays; checked here again
    assert _all_finite(checkpointing.restore_params(str(workdir), step)[2])


FOUR_STEPS = ("--config.total_steps=4", "--config.checkpoint_every=2")


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory):
  """A tiny run's workdir with checkpoints at steps 2 and 4."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  assert cli.main(_pretrain_args(files, workdir, *FOUR_STEPS)) == 0
  return workdir


def test_a_rerun_past_total_steps_says_there_is_nothing_to_train(files, trained, tmp_path, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  assert cli.main(_pretrain_args(files, workdir, "--config.total_steps=3")) == 0
  assert f"bipft pretrain: {workdir} is at step 4, total_steps is 3: nothing left to train" in capsys.readouterr().out
  assert checkpointing.saved_steps(str(workdir)) == [2, 4]


def test_steps_waiting_for_data_are_measured_and_said(files, tmp_path, capsys, monkeypatch):
  # A data pipeline slower than the steps (0.5 s a batch here, against milliseconds of a tiny step)
  # shows in metrics.jsonl and is said once.
  real_next = pipeline.PretrainingData.__next__

  def slow_next(self):
    time.sleep(0.5)
    return real_next(self)
  monkeypatch.setattr(pipeline.PretrainingData, "__next__", slow_next)
  monkeypatch.setattr(engine, "INPUT_BOUND_SECONDS", 0.2)  # a real run's logs are seconds apart
  workdir = tmp_path / "run"
  assert cli.main(_pretrain_args(files, workdir, "--config.total_steps=10", "--config.log_every=1",
                                 "--config.checkpoint_every=10", "--config.eval_every=10")) == 0
  waits = [r["input_wait_fraction"] for r in map(json.loads, open(workdir / "metrics.jsonl")) if "loss" in r
           or "total_loss" in r]
  # The first steps take the batches made while the first compiled; the later ones wait for each (but
  # one, which a step slowed by a loaded machine may have found ready: seen once in a CI run).
  assert len(waits) == 10 and all(0 <= w <= 1 for w in waits) and sorted(waits[-5:])[1] > 0.5, waits
  said = [line for line in capsys.readouterr().out.splitlines() if "waited for data" in line]
  assert len(said) == 1 and "is the bottleneck" in said[0], said


def test_a_data_error_mid_run_saves_the_steps_trained_first(files, tmp_path, capsys, monkeypatch):
  # A corpus cut short under a run (sources.py) stopped it in one line, and the steps since the newest
  # checkpoint were lost. One process saves them first; the rerun, once the data is back, resumes there.
  real_next, served = pipeline.PretrainingData.__next__, []

  def failing_next(self):
    served.append(1)
    if len(served) > 6:
      raise UserError("corpus.txt was cut short while the run read it")
    return real_next(self)
  monkeypatch.setattr(pipeline.PretrainingData, "__next__", failing_next)
  workdir = tmp_path / "run"
  assert cli.main(_pretrain_args(files, workdir, "--config.total_steps=50", "--config.checkpoint_every=50")) == 2
  saved = checkpointing.make_manager(str(workdir), read_only=True).all_steps()
  assert len(saved) == 1 and 2 <= saved[0] <= 6, saved
  assert _error_line(capsys.readouterr().err, "pretrain").endswith(
      f"corpus.txt was cut short while the run read it (step {saved[0]} saved first)")
  monkeypatch.setattr(pipeline.PretrainingData, "__next__", real_next)
  assert cli.main(_pretrain_args(files, workdir, "--config.total_steps=8", "--config.checkpoint_every=50")) == 0
  assert f"resuming {workdir} from step {saved[0]}" in capsys.readouterr().out


def traced_steps(workdir, job: str) -> list:
  """The step numbers annotated in the one profile in `workdir` (its Chrome-format trace)."""
  (run,) = (workdir / "profile" / "plugins" / "profile").iterdir()
  (trace,) = run.glob("*.trace.json.gz")
  assert list(run.glob("*.xplane.pb"))  # what TensorBoard's profile plugin reads
  events = json.load(gzip.open(trace))["traceEvents"]
  return sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == job and "step_num" in e.get("args", {}))


def test_a_profile_traces_the_chosen_steps(files, tmp_path, capsys):
  workdir = tmp_path / "run"
  assert cli.main(_pretrain_args(files, workdir, "--config.total_steps=5", "--config.profile.first_step=2",
                                 "--config.profile.steps=2")) == 0
  (run,) = (workdir / "profile" / "plugins" / "profile").iterdir()
  assert f"bipft pretrain: profile of steps 2-3 written to {run}" in capsys.readouterr().out
  assert traced_steps(workdir, "pretrain") == [2, 3]


def test_keep_every_keeps_milestone_steps_beyond_the_newest(files, tmp_path, capsys):
  workdir = tmp_path / "run"
  assert cli.main(_pretrain_args(files, workdir, "--config.total_steps=5", "--config.checkpoint_every=1",
                                 "--config.keep_checkpoints=1", "--config.keep_every=2")) == 0
  assert checkpointing.saved_steps(str(workdir)) == [2, 4, 5]
  assert checkpointing.restore_params(str(workdir), 2)[2]  # a milestone is whole and readable
  # Extended without keep_every, the first save deleted the milestones: refused, nothing touched.
  extend = _pretrain_args(files, workdir, "--config.total_steps=7", "--config.checkpoint_every=1",
                          "--config.keep_checkpoints=1")
  assert cli.main(extend) == 2
  assert _error_line(capsys.readouterr().err, "pretrain").endswith(
      "keeps steps 2, 4 beyond its newest 1, which this run would delete (keep_checkpoints=1, keep_every=0): pass "
      "the settings that kept them (keep_every, keep_checkpoints), or move those steps out of the workdir")
  assert checkpointing.saved_steps(str(workdir)) == [2, 4, 5]
  assert cli.main(extend + ["--config.keep_every=2"]) == 0
  assert checkpointing.saved_steps(str(workdir)) == [2, 4, 6, 7]


def _flip_a_bit(step_dir) -> str:
  """Flips one bit in the middle of the step's largest parameter file; returns its path in the step."""
  arrays = [os.path.join(folder, name) for folder, _, names in os.walk(os.path.join(step_dir, "params"))
            for name in names if os.sep + "d" in folder]
  path = max(arrays, key=os.path.getsize)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)[0]
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte ^ 0x08]))
  return os.path.relpath(path, step_dir)


def _snapshot(folder) -> dict:
  return {os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
          for root, _, names in os.walk(folder) for name in names}


def test_resume_skips_a_bit_flipped_latest_step(files, trained, tmp_path, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  flipped = _flip_a_bit(workdir / "4")
  assert cli.main(_pretrain_args(files, workdir, *FOUR_STEPS)) == 0
  out = capsys.readouterr().out
  assert (f"bipft pretrain: skipped step 4, {flipped} fails its sha256 check; moved it to "
          f"{workdir}/4.corrupt\nbipft pretrain: resuming {workdir} from step 2\n") in out
  assert sorted(os.listdir(workdir / "4.corrupt")) == sorted(os.listdir(trained / "4"))  # kept, not deleted
  _assert_same_params(trained, workdir)  # steps 3 and 4, trained again, equal the uncorrupted run


# A file system that refuses every file above 64 KiB (RLIMIT_FSIZE; Python ignores SIGXFSZ, so the
# write fails with EFBIG): the tiny run's metrics and TensorBoard files fit, its checkpoint's arrays do
# not. The compilation cache is off: its entries would fail too, each with jax's warning.
_SMALL_FILES_ONLY = textwrap.dedent("""
  import resource, sys
  import jax
  resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
  jax.config.update("jax_enable_compilation_cache", False)
  from bipft_jax import cli
  sys.exit(cli.main())  # as the `bipft` command
""")


def test_a_checkpoint_the_file_system_refuses_stops_the_run_in_one_line(files, tmp_path):
  workdir = tmp_path / "run"
  run = _pretrain(files, workdir, *FOUR_STEPS, script=_SMALL_FILES_ONLY)
  assert run.returncode == 1, run.stderr[-3000:]
  # Step 2 fails in orbax's background threads; the run stops at the next save, naming step 2 (orbax's
  # own error logs come before the line).
  assert run.stderr.rstrip().splitlines()[-1] == (
      f"bipft pretrain: error: checkpoint step 2 could not be written to {workdir} (File too large); no "
      "checkpoint there is complete: once the cause is fixed, rerun the same command"), run.stderr[-3000:]
  assert "Event loop is closed" not in run.stderr  # the abandoned writes' reports, dropped
  assert not checkpointing.saved_steps(workdir)  # no step passed off as written


def test_a_last_checkpoint_lost_to_a_full_disk_is_reported_and_the_rerun_resumes(files, trained, tmp_path,
                                                                                  capsys, monkeypatch):
  workdir = tmp_path / "run"
  seal = checkpointing.write_checksums

  def disk_full_at_step_4(step_dir):  # in orbax's background thread, before the step is renamed into place
    if step_dir.name.split(".")[0] == "4":
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(step_dir))
    seal(step_dir)
  monkeypatch.setattr(checkpointing, "write_checksums", disk_full_at_step_4)
  assert cli.main(_pretrain_args(files, workdir, *FOUR_STEPS)) == 1
  assert capsys.readouterr().err.rstrip().splitlines()[-1] == (
      f"bipft pretrain: error: checkpoint step 4 could not be written to {workdir} (No space left on device); "
      "the newest complete checkpoint there is step 2: once the cause is fixed, rerun the same command to "
      "resume from it")
  assert checkpointing.make_manager(str(workdir), read_only=True).all_steps() == [2]
  monkeypatch.undo()
  assert cli.main(_pretrain_args(files, workdir, *FOUR_STEPS)) == 0
  assert f"bipft pretrain: resuming {workdir} from step 2\n" in capsys.readouterr().out
  _assert_same_params(trained, workdir)  # steps 3 and 4, trained again, equal the run that lost none


def test_an_export_the_file_system_refuses_leaves_the_earlier_file_in_one_line(files, trained, tmp_path):
  out = tmp_path / "model.safetensors"
  out.write_bytes(b"an earlier export")
  run = _run(files, ["export-packed", "--checkpoint", str(trained), "--out", str(out), "--overwrite"],
             _SMALL_FILES_ONLY)
  assert run.returncode == 1, run.stderr[-3000:]
  lines = run.stderr.strip().splitlines()
  # safetensors' error, which carries the OS's error number in its message
  assert len(lines) == 1 and lines[0].startswith("bipft export-packed: error: the file system refused a write: "), lines
  assert "File too large" in lines[0]
  assert os.listdir(tmp_path) == ["model.safetensors"] and out.read_bytes() == b"an earlier export"


@pytest.mark.parametrize("command", ["convert", "evaluate", "export-packed"])
def test_a_bit_flipped_step_is_refused_in_one_line(files, trained, tmp_path, capsys, command):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  flipped = _flip_a_bit(workdir / "4")
  before = _snapshot(tmp_path)
  argv = {"convert": ["convert", "to-pytorch", "--checkpoint", str(workdir), "--out", str(tmp_path / "hf")],
          "evaluate": ["evaluate", "--config", f"{CONFIG}:tiny", "--checkpoint", str(workdir)]
                      + [f"--config.{o}" for o in tiny_overrides(files)],
          "export-packed": ["export-packed", "--checkpoint", str(workdir), "--out", str(tmp_path / "m.bin")]}
  assert cli.main(argv[command]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"bipft {command}: error: checkpoint step 4 in {workdir} is corrupt: {flipped} fails its "
                 "sha256 check"], err
  assert _snapshot(tmp_path) == before  # nothing written, nothing moved


@pytest.mark.parametrize("args, message", [
    (["--config", f"{CONFIG}:huge"], "unknown pretrain variant"),
    (["--config.batch_size=6"], "batch_size 6 must be a multiple"),
    (["--config.data.masking=sometimes"], "unknown data.masking"),
    (["--config.data.workers=-2"], "data.workers must be an integer >= -1, got -2"),
    (["--config.profile.steps=0"], "profile.steps must be an integer >= 1, got 0"),
    (["--config.profile.first_step=11"], "profile.first_step 11 is after the run's last step, 10"),
    (["--config.model.num_heads=3"], "bad model config: hidden_size 128 is not a multiple"),
    (["--config.no_such_field=1"], "unknown config field"),
    (["--config.checkpoint_every=2", "--config.keep_every=3"], r"keep_every \(3\) must be a multiple of "
                                                                r"checkpoint_every \(2\)"),
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
