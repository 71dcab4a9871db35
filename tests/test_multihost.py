"""Two JAX processes on this machine train as one 4-device job (jax.distributed, localhost coordinator,
gloo collectives): the same losses as one process with 4 devices, one consistent checkpoint; and they
stop as one: a SIGTERM or Ctrl-C to either saves one step on both, a failure on either ends both with its line."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import flax
import jax
import numpy as np

import pytest

from bipft_jax import checkpointing, config_loading, distributed, precision
from bipft_jax import files as bipft_files  # `files` is test_train's fixture here
from bipft_jax.data import hosts, pipeline
from bipft_jax.errors import UserError
from test_data import corpus, data_config, tokenizer  # noqa: F401  (fixtures)
from test_train import CONFIG, REPO, files, tiny_overrides  # noqa: F401  (files: the corpus fixture)

STEPS = 4
TIMEOUT_S = 600  # for the whole job; a normal run takes a small fraction of it

# One process of the job: what `bipft pretrain` runs, plus the final parameters gathered to process 0.
_PROCESS = textwrap.dedent("""
  import sys
  import flax, jax, numpy as np
  from jax.experimental import multihost_utils
  from bipft_jax import config_loading, distributed, train
  spec, workdir, out, *overrides = sys.argv[1:]
  config = config_loading.load_config(spec, overrides)
  distributed.initialize(config)
  print(f"devices {jax.device_count()} local {jax.local_device_count()} processes {jax.process_count()}",
        flush=True)
  result = train.train_and_evaluate(config, workdir)
  params = multihost_utils.process_allgather(result["params"], tiled=True)
  if distributed.is_primary():
    np.savez(out, **flax.traverse_util.flatten_dict(jax.device_get(params), sep="/"))
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(tmp_path, name: str, command: list, devices: int, **env) -> tuple:
  """Starts one process in its own process group, output to files (a full pipe would stall the job)."""
  base_env = {k: v for k, v in os.environ.items() if not k.startswith("BIPFT_")}
  base_env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                  **env)
  stdout, stderr = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
  process = subprocess.Popen(command, env=base_env, cwd=REPO, stdout=open(stdout, "w"), stderr=open(stderr, "w"),
                             start_new_session=True)
  return process, stdout, stderr


def _start(files, tmp_path, name: str, devices: int, **env) -> tuple:
  """One process of the training job (`name`: run_index)."""
  overrides = tiny_overrides(files, **{"data.shards": 2, "total_steps": STEPS, "checkpoint_every": 2,
                                       "eval_every": 1000, "eval_batches": 1})
  run = name.split("_")[0]
  command = [sys.executable, "-c", _PROCESS, f"{CONFIG}:tiny,mesh=local-2x2", str(tmp_path / run),
             str(tmp_path / f"{run}.npz"), *overrides]
  return _launch(tmp_path, name, command, devices, **env)


def _multi_env(processes: int = 2) -> dict:
  return {"BIPFT_DISTRIBUTED": "1", "BIPFT_COORDINATOR": f"localhost:{_free_port()}",
          "BIPFT_NUM_PROCESSES": str(processes)}


def _finish(started: list, expected=0) -> list:
  """Waits for every process until one deadline, each to exit with `expected` (one code, or one per
  process); kills every group on a failure or the deadline."""
  deadline = time.monotonic() + TIMEOUT_S
  codes = expected if isinstance(expected, list) else [expected] * len(started)
  try:
    for (process, _, stderr), want in zip(started, codes):
      try:
        code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        raise AssertionError(f"{stderr.name}: still running after {TIMEOUT_S} s; killed") from None
      assert code == want, f"{stderr.name} exited {code}:\n{stderr.read_text()[-3000:]}"
  finally:
    for process, _, _ in started:
      if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
  return [(stdout.read_text(), stderr.read_text()) for _, stdout, stderr in started]


def _losses(workdir) -> list:
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  steps = [r["step"] for r in records if "total_loss" in r]
  assert steps == list(range(1, STEPS + 1)), steps  # once each: process 0 alone writes metrics
  return [r["total_loss"] for r in records if "total_loss" in r]


def _cache_choosing(tmp_path, name: str, choices: dict, devices: int, monkeypatch) -> str:
  """A cache folder holding `choices` ({kind: (choice, candidates)}) for a process with `devices` CPU
  devices, written by the package's own cache writer."""
  folder = tmp_path / name
  folder.mkdir()
  with monkeypatch.context() as patch:
    patch.setenv("BIPFT_CACHE", str(folder))
    patch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count={devices}")
    key = precision.host_key()  # what that process computes: its XLA_FLAGS are part of it
    for kind, (choice, candidates) in choices.items():
      precision._write_cache(key, kind, {"choice": choice, "seconds": {}, "candidates": sorted(candidates)})
  return str(folder)


# Two hosts whose caches disagree (why that matters: precision._agreed) print what they chose.
_CHOICES = textwrap.dedent("""
  import jax
  from bipft_jax import distributed, precision
  distributed.initialize()
  probes = {name: (lambda: jax.numpy.zeros(2)) for name in ("first", "second")}
  print("chose", precision.sign_product_dtype("auto"), precision.choose("probe", probes), flush=True)
""")


def test_every_process_takes_process_0s_measured_choices(tmp_path, monkeypatch):
  multi, started = _multi_env(), []
  for i, (dtype, probe) in enumerate((("bfloat16", "first"), ("int8", "second"))):
    cache = _cache_choosing(tmp_path, f"cache_{i}", {"sign_matmul": (dtype, precision.SIGN_DTYPES),
                                                     "probe": (probe, ("first", "second"))}, 1, monkeypatch)
    started.append(_launch(tmp_path, f"process_{i}", [sys.executable, "-c", _CHOICES], 1,
                           BIPFT_PROCESS_ID=str(i), BIPFT_CACHE=cache, **multi))
  (out0, _), (out1, _) = _finish(started)
  assert "chose bfloat16 first" in out0 and "chose bfloat16 first" in out1, (out0, out1)


def test_a_choice_asked_first_inside_a_trace_names_the_start_up_to_use(tmp_path):
  """Started by jax.distributed.initialize alone, nothing agreed before the model's trace asks."""
  multi, script = _multi_env(), textwrap.dedent("""
    import sys
    import jax
    from bipft_jax import precision
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    try:
      jax.jit(lambda x: x * 0 + len(precision.sign_product_dtype("auto")))(1.0)
    except RuntimeError as e:
      print("error:", e, flush=True)
  """)
  started = [_launch(tmp_path, f"process_{i}", [sys.executable, "-c", script, multi["BIPFT_COORDINATOR"], str(i)], 1)
             for i in range(2)]
  for out, _ in _finish(started):
    assert "must agree on `auto`'s choices before tracing" in out and "bipft_jax.distributed.initialize()" in out


def test_two_processes_train_like_one_and_write_one_checkpoint(files, tmp_path, monkeypatch):
  multi = _multi_env()
  caches = [_cache_choosing(tmp_path, f"cache_{i}", {"sign_matmul": (dtype, precision.SIGN_DTYPES)}, 2, monkeypatch)
            for i, dtype in enumerate(("bfloat16", "int8"))]  # disagreeing hosts (above)
  started = [_start(files, tmp_path, f"multi_{i}", 2, BIPFT_PROCESS_ID=str(i), BIPFT_CACHE=caches[i], **multi)
             for i in range(2)]
  started.append(_start(files, tmp_path, "single", 4))
  (out0, err0), (out1, err1), (out_single, _) = _finish(started)

  assert "devices 4 local 2 processes 2" in out0 and "devices 4 local 2 processes 2" in out1
  assert "devices 4 local 4 processes 1" in out_single
  # Only process 0 reports: the held-out accuracy lines, the progress bar, one TensorBoard file.
  assert "held-out MLM accuracy at step 0" in out0 and "held-out MLM accuracy" not in out1
  progress = re.compile(r"pretrain: +\d+%")
  assert progress.search(err0) and not progress.search(err1)
  assert len(os.listdir(tmp_path / "multi" / "tensorboard")) == 1

  multi_losses, single_losses = _losses(tmp_path / "multi"), _losses(tmp_path / "single")
  print(f"losses: two processes {multi_losses}, one process {single_losses}")
  np.testing.assert_allclose(multi_losses, single_losses, rtol=1e-6)

  # One checkpoint from both processes, restored here on one device: the trained parameters exactly.
  trained = dict(np.load(tmp_path / "multi.npz"))
  device = jax.devices()[0]
  _, head, restored = checkpointing.restore_params(str(tmp_path / "multi"),
                                                   shardings=jax.sharding.SingleDeviceSharding(device))
  restored = flax.traverse_util.flatten_dict(restored, sep="/")
  assert head == "pretraining" and restored.keys() == trained.keys()
  for name, value in restored.items():
    assert value.sharding.device_set == {device}
    np.testing.assert_array_equal(np.asarray(value), trained[name], err_msg=name)
  # Process 0 sealed the step with both processes' files (the restore above verified them all).
  listed = json.loads((tmp_path / "multi" / str(STEPS) / "checksums.json").read_text())["sha256"]
  assert {name.split("/")[1] for name in listed if name.startswith("params/ocdbt.")} == {"ocdbt.process_0",
                                                                                         "ocdbt.process_1"}
  single = dict(np.load(tmp_path / "single.npz"))
  for name, value in trained.items():
    np.testing.assert_allclose(value, single[name], rtol=1e-5, atol=1e-6, err_msg=name)

  # The data state holds both hosts' shards (process 0 writes JSON items): the one-process run's.
  def data_state(workdir):
    manager = checkpointing.make_manager(str(workdir), read_only=True)
    assert sorted(manager.all_steps()) == [2, STEPS]
    return checkpointing.restore_items(manager, STEPS, {})["data"]
  state = data_state(tmp_path / "multi")
  assert len(state["shards"]) == 2 and state["shards"][0] != state["shards"][1]
  assert state == data_state(tmp_path / "single")


def _start_pretrain(files, tmp_path, workdir, script=None, **env) -> list:
  """The two processes of a `bipft pretrain` job that trains until it is stopped (through `script`,
  given the command's arguments, if given)."""
  multi = _multi_env()
  overrides = tiny_overrides(files, **{"data.shards": 2, "total_steps": 100000, "checkpoint_every": 100000,
                                       "eval_every": 100000, "eval_batches": 1})
  prefix = [sys.executable, "-c", script] if script else [sys.executable, "-m", "bipft_jax.cli"]
  command = [*prefix, "pretrain", "--config", f"{CONFIG}:tiny,mesh=local-2x2", "--workdir", str(workdir),
             *[f"--config.{o}" for o in overrides]]
  return [_launch(tmp_path, f"p{i}", command, 2, BIPFT_PROCESS_ID=str(i), **multi, **env) for i in range(2)]


# Process `FAIL` alone meets a bad input (a path this host cannot read) after the job has started.
_ONE_HOST_FAILS = textwrap.dedent("""
  import os, sys
  from bipft_jax import cli, errors, pretraining
  def unreadable(config):
    raise errors.UserError("teacher.path /shared/teacher does not exist")
  if os.environ["BIPFT_PROCESS_ID"] == os.environ["FAIL"]:
    pretraining.load_teacher = unreadable
  sys.exit(cli.main(sys.argv[1:]))
""")


@pytest.mark.parametrize("failing", [0, 1])
def test_a_bad_input_on_one_host_ends_every_process_with_its_line(files, tmp_path, failing):
  # The others wait for it in a collective, and it waited for them at jax's shutdown: the job hung.
  started = _start_pretrain(files, tmp_path, tmp_path / "run", script=_ONE_HOST_FAILS, FAIL=str(failing))
  errors = [err.strip().splitlines()[-1] for _, err in _finish(started, expected=2)]
  line = "bipft pretrain: error: teacher.path /shared/teacher does not exist"
  assert errors[failing] == line
  assert errors[1 - failing] == f"{line} [on process {failing}]"


def test_a_workdir_another_run_holds_stops_every_process(files, tmp_path):
  workdir = tmp_path / "run"
  with bipft_files.workdir_lock(str(workdir), "pretrain"):
    outputs = _finish(_start_pretrain(files, tmp_path, workdir), expected=2)
  errors = [err.strip().splitlines()[-1] for _, err in outputs]
  assert errors[0].startswith(f"bipft pretrain: error: {workdir} is in use by another run: bipft pretrain, pid ")
  assert errors[1] == f"{errors[0]} [on process 0]"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_to_one_host_saves_the_whole_job_at_one_step(files, tmp_path, signum):
  # A preempted host gets its SIGTERM alone or first, a Ctrl-C reaches one host's terminal, one host's
  # ssh connection drops (SIGHUP): every process must save the same step and stop (a handler of our
  # own on that host alone left the job hanging in its save), each with a signal's exit code, not 0
  # (the run has not finished).
  workdir = tmp_path / "run"
  started = _start_pretrain(files, tmp_path, workdir)
  deadline = time.monotonic() + TIMEOUT_S
  metrics = workdir / "metrics.jsonl"
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):  # accuracy at 0, steps 1, 2
    assert time.monotonic() < deadline and all(p.poll() is None for p, _, _ in started), "the job did not train"
    time.sleep(0.5)
  started[1][0].send_signal(signum)
  (out0, _), (out1, _) = _finish(started, expected=[143, 128 + signum])  # 130, 129: what process 1 saw
  saved = int(re.search(r"SIGTERM: saved step (\d+) to ", out0).group(1))
  assert "saved step" not in out1  # process 0 alone tells the story
  assert ("Ctrl-C: saving after this step" in out1) == (signum == signal.SIGINT)
  assert ("hangup (SIGHUP, or the console's reader left): saving after this step" in out1) == (signum == signal.SIGHUP)
  manager = checkpointing.make_manager(str(workdir), read_only=True)
  assert manager.all_steps() == [saved] and saved >= 2
  _, _, params = checkpointing.restore_params(str(workdir))  # both processes' files, checksums verified
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_host_data_is_its_shards_side_by_side_and_resumes_exactly(corpus, tokenizer):
  config = data_config(shards=2)
  data = hosts.HostData(corpus, tokenizer, config, global_batch_size=8, seed=3)
  streams = [pipeline.PretrainingData(corpus, tokenizer, config, batch_size=4, seed=3, process_index=i,
                                      process_count=2) for i in range(2)]
  for _ in range(3):
    batch, parts = next(data), [next(stream) for stream in streams]
    for key in batch:  # shard 0's rows, then shard 1's: what two hosts put into a global batch
      np.testing.assert_array_equal(batch[key], np.concatenate([p[key] for p in parts]))
  state = hosts.global_state(data.state())
  assert len(state["shards"]) == 2 and state["shards"][0] != state["shards"][1]
  expected = [next(data) for _ in range(2)]
  resumed = hosts.HostData(corpus, tokenizer, config, global_batch_size=8, seed=3)
  resumed.restore(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.parametrize("shards, batch, state, message", [
    (3, 8, None, "batch_size 8 must be a multiple of data.shards (3)"),
    (-1, 8, None, "data.shards -1 must be a positive multiple of the 1 hosts"),
    (4, 8, {"shards": [{}, {}]}, "has 2 shards, this run 4; set --config.data.shards=2"),
])
def test_host_data_errors(corpus, tokenizer, shards, batch, state, message):
  with pytest.raises(UserError, match=re.escape(message)):
    data = hosts.HostData(corpus, tokenizer, data_config(shards=shards), global_batch_size=batch, seed=0)
    data.restore(state)


def test_distributed_switch_and_bad_environment(monkeypatch):
  config = config_loading.load_config(f"{CONFIG}:tiny")
  monkeypatch.delenv("BIPFT_DISTRIBUTED", raising=False)
  assert not distributed.requested(config) and not distributed.requested(None)
  config.distributed.enabled = True
  assert distributed.requested(config)
  monkeypatch.setenv("BIPFT_DISTRIBUTED", "0")
  assert not distributed.requested(None)
  monkeypatch.setenv("BIPFT_DISTRIBUTED", "1")
  assert distributed.requested(None)
  monkeypatch.setenv("BIPFT_NUM_PROCESSES", "two")
  with pytest.raises(UserError, match="BIPFT_NUM_PROCESSES='two' is not an integer"):
    distributed.initialize(config)
  assert not jax.distributed.is_initialized()
