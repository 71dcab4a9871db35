"""Checkpoints move between device counts; bad checkpoints are one-line UserErrors."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bipft_jax import checkpointing, model, model_params
from bipft_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh process with N CPU devices: writes params sharded over all devices, or restores
# a checkpoint onto them, and compares with the params rebuilt from the same seed.
_SCRIPT = textwrap.dedent("""
  import sys
  import jax, numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from bipft_jax import checkpointing, model, model_params
  action, path = sys.argv[1], sys.argv[2]
  config = model.BertConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2,
                            intermediate_size=32, max_position_embeddings=16, binary=True)
  params = model_params.init_params(model.build(config, "pretraining"), jax.random.key(7))
  mesh = Mesh(np.array(jax.devices()), ("d",))
  def spread(x):  # split the first axis over all devices where it divides
    n = len(jax.devices())
    return NamedSharding(mesh, P("d") if x.ndim and x.shape[0] % n == 0 else P())
  shardings = jax.tree.map(spread, params)
  if action == "write":
    params = jax.device_put(params, shardings)
    checkpointing.save_params(path, params, config, "pretraining", step=5)
  else:
    restored_config, head, restored = checkpointing.restore_params(path, shardings=shardings)
    assert restored_config == config and head == "pretraining"
    for a, b, s in zip(jax.tree.leaves(params), jax.tree.leaves(restored), jax.tree.leaves(shardings)):
      assert b.sharding == s, (b.sharding, s)
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    print("restored", len(jax.tree.leaves(restored)), "arrays on", len(jax.devices()), "devices")
""")


def _run(action: str, path: str, devices: int) -> str:
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  result = subprocess.run([sys.executable, "-c", _SCRIPT, action, path], env=env, capture_output=True,
                          text=True, timeout=240)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_checkpoint_moves_between_8_devices_and_1(tmp_path):
  _run("write", str(tmp_path / "on8"), 8)
  _run("write", str(tmp_path / "on1"), 1)
  for path in (tmp_path / "on8", tmp_path / "on1"):  # sealed, and verified by every read below
    assert json.loads((path / "5" / "checksums.json").read_text())["sha256"]
  assert "on 1 devices" in _run("read", str(tmp_path / "on8"), 1)
  assert "on 8 devices" in _run("read", str(tmp_path / "on1"), 8)


@pytest.fixture
def saved(tmp_path):
  config = model.BertConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2,
                            intermediate_size=32, max_position_embeddings=16)
  params = model_params.init_params(model.build(config, "encoder"), jax.random.key(1))
  checkpointing.save_params(str(tmp_path / "run"), params, config, "encoder", step=2)
  return tmp_path / "run", config, params


def test_restore_params_by_workdir_and_step_folder(saved):
  workdir, config, params = saved
  for path in (workdir, workdir / "2"):
    restored_config, head, restored = checkpointing.restore_params(str(path))
    assert (restored_config, head) == (config, "encoder")
    jax.tree.map(np.testing.assert_array_equal, params, restored)


def test_bad_checkpoints_are_user_errors(saved, tmp_path):
  workdir, _, _ = saved
  with pytest.raises(UserError, match="does not exist"):
    checkpointing.restore_params(str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="no checkpoint"):
    checkpointing.restore_params(str(tmp_path / "empty"))
  with pytest.raises(UserError, match="no step 9"):
    checkpointing.restore_params(str(workdir), step=9)
  shutil.rmtree(workdir / "2" / "params")
  with pytest.raises(UserError, match="params"):
    checkpointing.restore_params(str(workdir))


@pytest.mark.parametrize("checksums", [True, False])
def test_a_step_removed_while_it_is_read_is_not_called_corrupt(saved, monkeypatch, checksums):
  # A run still writing to the workdir removes its older steps as it saves (keep_checkpoints): a read
  # that chose the newest step can find it gone, which is not a damaged checkpoint.
  workdir, _, params = saved
  if not checksums:
    (workdir / "2" / "checksums.json").unlink()
  read_config = checkpointing.read_config

  def rotated_away_after_the_config(manager, step):
    record = read_config(manager, step)
    shutil.rmtree(workdir / str(step))
    return record
  monkeypatch.setattr(checkpointing, "read_config", rotated_away_after_the_config)
  with pytest.raises(UserError) as error:
    checkpointing.restore_params(str(workdir))
  assert not isinstance(error.value, checkpointing.CorruptCheckpoint)
  assert str(error.value) == (f"checkpoint step 2 was removed from {workdir} while it was being read (a run "
                              "writing there keeps only its newest keep_checkpoints steps); run the command again")
  monkeypatch.undo()
  checkpointing.save_params(str(workdir), params, saved[1], "encoder", step=4)
  with pytest.raises(UserError, match=r"no step 2 in .*; steps there: \[4\] \(a run writing there keeps only"):
    checkpointing.restore_params(str(workdir), step=2)


def _step_files(step_dir) -> list:
  return sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file())


def test_checksums_list_every_item_file_and_catch_each_change(saved):
  workdir, _, params = saved
  step_dir = workdir / "2"
  listed = json.loads((step_dir / "checksums.json").read_text())["sha256"]
  assert sorted(listed) == [f for f in _step_files(step_dir) if "/" in f]  # every file of every item
  array = max((step_dir / name for name in listed if "/d/" in name), key=lambda p: p.stat().st_size)
  original = array.read_bytes()
  name = str(array.relative_to(step_dir))
  array.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])
  with pytest.raises(checkpointing.CorruptCheckpoint,
                     match=f"step 2 in {workdir} is corrupt: {name} fails its sha256"):
    checkpointing.restore_params(str(workdir))
  array.unlink()
  with pytest.raises(checkpointing.CorruptCheckpoint, match=f"{name} is missing"):
    checkpointing.restore_params(str(workdir))
  array.write_bytes(original)
  (step_dir / "params" / "stray").write_bytes(b"x")
  with pytest.raises(checkpointing.CorruptCheckpoint, match="params/stray was not written by the save"):
    checkpointing.restore_params(str(workdir))
  (step_dir / "params" / "stray").unlink()
  (step_dir / "config" / "metadata").write_text("{}")
  with pytest.raises(checkpointing.CorruptCheckpoint, match="config/metadata fails its sha256 check"):
    checkpointing.read_model(str(workdir))
  (step_dir / "checksums.json").write_text('{"sha256": [')
  with pytest.raises(checkpointing.CorruptCheckpoint, match="its checksums.json is unreadable"):
    checkpointing.read_model(str(workdir))


def test_a_step_without_checksums_is_read_unverified(saved):
  workdir, config, params = saved
  (workdir / "2" / "checksums.json").unlink()  # as written before checksums existed
  restored_config, _, restored = checkpointing.restore_params(str(workdir))
  assert restored_config == config
  jax.tree.map(np.testing.assert_array_equal, params, restored)


def test_non_finite_parameters_are_neither_saved_nor_restored(saved, tmp_path):
  _, config, params = saved
  poisoned = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(np.nan), params)
  with pytest.raises(UserError, match="the parameters hold NaN or Inf values; refusing to save them"):
    checkpointing.save_params(str(tmp_path / "refused"), poisoned, config, "encoder")
  assert not (tmp_path / "refused").exists()
  manager = checkpointing.make_manager(str(tmp_path / "nan"))  # as a run before this check could write
  checkpointing.save(manager, 3, params=poisoned, config=checkpointing.config_record(config, "encoder"))
  checkpointing.wait(manager)
  with pytest.raises(checkpointing.CorruptCheckpoint, match="step 3 .* is corrupt: its params hold NaN"):
    checkpointing.restore_params(str(tmp_path / "nan"))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite_finds_any_non_finite_value_jitted_and_not(bad):
  tree = {"w": np.full((3, 5), 3e38, np.float32), "step": np.int32(7), "m": {"v": np.ones(4, jnp.bfloat16)}}
  for check in (checkpointing.all_finite, jax.jit(checkpointing.all_finite)):
    assert bool(check(tree))  # large finite values (their sum would overflow) are finite
    for path in (("w",), ("m", "v")):
      broken = jax.tree.map(np.array, tree)
      leaf = broken[path[0]] if len(path) == 1 else broken[path[0]][path[1]]
      leaf[-1] = bad
      assert not bool(check(broken)), (path, bad)
  assert bool(checkpointing.all_finite({"step": np.int32(1)}))


def test_what_a_failed_read_leaves_behind_is_not_printed(monkeypatch):
  from orbax.checkpoint._src.serialization import serialization
  printed = []
  monkeypatch.setattr(sys, "unraisablehook", printed.append)
  checkpointing._drop_abandoned_io()
  hook = sys.unraisablehook
  checkpointing._drop_abandoned_io()
  assert sys.unraisablehook is hook  # installed once, however many reads fail

  async def ours():
    pass

  # What orbax's abandoned reads report as they are collected (after our one error line) ...
  orbax_read = serialization._read_array_index_and_device_put(
      None, (), None, global_shape=(), new_shard_shape=(), dtype=None, byte_limiter=None, strict=True,
      dll=None, memory_kind=None)
  unrelated = ours()
  report = lambda exc, source: types.SimpleNamespace(exc_type=type(exc), exc_value=exc, exc_traceback=None,
                                                     err_msg=None, object=source)
  hook(report(Exception("Encountered error while reading array index: ()"), orbax_read))
  hook(report(RuntimeError("Event loop is closed"), None))
  assert printed == []
  # ... and anything else, which still reaches the previous hook.
  hook(report(Exception("Encountered error"), unrelated))
  hook(report(RuntimeError("another"), None))
  assert len(printed) == 2
  orbax_read.close()
  unrelated.close()


def test_the_newest_intact_step_is_restored_and_newer_ones_set_aside(saved, tmp_path):
  _, config, params = saved
  poisoned = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(np.inf), params)
  manager = checkpointing.make_manager(str(tmp_path / "steps"), max_to_keep=None)
  for step, tree in ((1, params), (3, params), (5, poisoned)):
    checkpointing.save(manager, step, params=tree, config=checkpointing.config_record(config, "encoder"))
  checkpointing.wait(manager)
  flipped = tmp_path / "steps" / "3" / "config" / "metadata"
  flipped.write_text(flipped.read_text().replace('"encoder"', '"encoded"'))
  abstract = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=checkpointing.replicated_sharding()), params)}
  step, restored, skipped = checkpointing.restore_newest_intact(manager, abstract)
  assert step == 1 and manager.all_steps() == [1]
  jax.tree.map(np.testing.assert_array_equal, params, restored["params"])
  assert [(e.step, e.reason, e.moved_to) for e in skipped] == [
      (5, "its params hold NaN or Inf values", str(tmp_path / "steps" / "5.corrupt")),
      (3, "config/metadata fails its sha256 check", str(tmp_path / "steps" / "3.corrupt"))]
  # With no intact step left, nothing is moved and the error names each step's problem.
  (tmp_path / "steps" / "1" / "params" / "_METADATA").write_text("{}")
  before = sorted(os.listdir(tmp_path / "steps"))
  with pytest.raises(UserError, match=r"no intact checkpoint in .*: step 1: params/_METADATA fails its "
                                      r"sha256 check\. Move the step folders away"):
    checkpointing.restore_newest_intact(manager, abstract)
  assert sorted(os.listdir(tmp_path / "steps")) == before
  manager.close()
