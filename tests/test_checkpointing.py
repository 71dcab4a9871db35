"""Checkpoints move between device counts; bad checkpoints are one-line UserErrors."""
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from bipft_jax import checkpointing, model
from bipft_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh process with N CPU devices: writes params sharded over all devices, or restores
# a checkpoint onto them, and compares with the params rebuilt from the same seed.
_SCRIPT = textwrap.dedent("""
  import sys
  import jax, numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from bipft_jax import checkpointing, model
  action, path = sys.argv[1], sys.argv[2]
  config = model.BertConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2,
                            intermediate_size=32, max_position_embeddings=16, binary=True)
  params = model.init_params(model.build(config, "pretraining"), jax.random.key(7))
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
  assert "on 1 devices" in _run("read", str(tmp_path / "on8"), 1)
  assert "on 8 devices" in _run("read", str(tmp_path / "on1"), 8)


@pytest.fixture
def saved(tmp_path):
  config = model.BertConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2,
                            intermediate_size=32, max_position_embeddings=16)
  params = model.init_params(model.build(config, "encoder"), jax.random.key(1))
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
