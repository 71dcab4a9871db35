"""Orbax checkpoints of training runs and of bare parameters.

A checkpoint is one step folder of an orbax `CheckpointManager` workdir (`WORKDIR/<step>/`) with
the items `params`, `opt_state` (absent in params-only checkpoints), `data` (the data iterator's
state, JSON) and `config` (JSON: the model config dict, the head, and the full run config).
Arrays are written with their shardings' layout but restored onto whatever devices exist now,
so a checkpoint written on 8 devices restores on 1 and vice versa. Orbax writes to a temporary
folder and renames it when complete: a run killed mid-save leaves the previous step intact.
"""
import dataclasses
import os
import sys
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from bipft_jax import model as model_lib
from bipft_jax.errors import UserError

ARRAY_ITEMS = ("params", "opt_state")
JSON_ITEMS = ("data", "config")


def config_record(model_config: model_lib.BertConfig, head: str, run_config: Optional[dict] = None) -> dict:
  """The `config` item: enough to rebuild the model (and, for runs, the whole job) from the checkpoint."""
  return {"model": dataclasses.asdict(model_config), "head": head, "run": run_config}


def make_manager(workdir: str, *, max_to_keep: Optional[int] = 3, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager over `workdir` holding the items above (`read_only`: never creates it)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                         enable_async_checkpointing=async_save)
  handlers = {name: ocp.StandardCheckpointHandler() for name in ARRAY_ITEMS}
  handlers.update({name: ocp.JsonCheckpointHandler() for name in JSON_ITEMS})
  return ocp.CheckpointManager(_absolute(workdir), item_handlers=handlers, options=options)


def _absolute(path: str) -> str:
  """A local path made absolute; a URL (gs://BUCKET/...) as it is."""
  return path if "://" in path else os.path.abspath(path)


def save(manager: ocp.CheckpointManager, step: int, *, params, config: dict, opt_state=None,
         data_state: Optional[dict] = None) -> None:
  """Starts writing step `step` (asynchronously if the manager is async; `wait` to finish)."""
  items = {"params": ocp.args.StandardSave(params), "config": ocp.args.JsonSave(config)}
  if opt_state is not None:
    items["opt_state"] = ocp.args.StandardSave(opt_state)
  if data_state is not None:
    items["data"] = ocp.args.JsonSave(data_state)
  manager.save(step, args=ocp.args.Composite(**items), force=True)


def wait(manager: ocp.CheckpointManager) -> None:
  """Blocks until any asynchronous save has been committed."""
  manager.wait_until_finished()


def _resolve(path: str, step: Optional[int]) -> tuple:
  """(manager, step) for a workdir (latest step by default) or a step folder inside one."""
  path = _absolute(path)
  if not epath.Path(path).is_dir():
    raise UserError(f"checkpoint {path} does not exist; pass a workdir written by `bipft pretrain` "
                    "or by checkpointing.save_params")
  if step is None and os.path.basename(path).isdigit() and epath.Path(path, "config").is_dir():
    path, step = os.path.dirname(path), int(os.path.basename(path))
  manager = make_manager(path, max_to_keep=None, async_save=False, read_only=True)
  steps = manager.all_steps()
  if not steps:
    raise UserError(f"no checkpoint in {path}: it has no completed step folder")
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise UserError(f"no step {step} in {path}; steps there: {sorted(steps)}")
  return manager, step


def read_config(manager: ocp.CheckpointManager, step: int) -> dict:
  """The `config` item of `step`."""
  try:
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  except Exception as e:  # orbax raises several types for missing/corrupt items
    raise UserError(f"checkpoint step {step} in {manager.directory} has no readable config: "
                    f"{type(e).__name__}: {e}") from None


def _abstract(manager: ocp.CheckpointManager, step: int, item: str, shardings) -> Any:
  """ShapeDtypeStructs of a saved item placed on `shardings` (one sharding or a matching tree)."""
  try:
    metadata = manager.item_metadata(step).get(item)
  except Exception as e:  # tensorstore raises ValueError for truncated or missing array files
    raise _unreadable(manager, step, e) from None
  if metadata is None:
    raise UserError(f"checkpoint step {step} in {manager.directory} has no {item!r}")
  metadata = getattr(metadata, "tree", metadata)
  if not isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), metadata, shardings)
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=shardings), metadata)


def replicated_sharding() -> jax.sharding.Sharding:
  """Every array whole on every device: the default placement of restored parameters."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("replica",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def restore_items(manager: ocp.CheckpointManager, step: int, abstract: dict) -> dict:
  """Restores array items onto the shardings in `abstract` (item -> tree of ShapeDtypeStruct),
  plus the JSON items."""
  items = {name: ocp.args.StandardRestore(tree) for name, tree in abstract.items()}
  step_dir = os.path.join(str(manager.directory), str(step))
  items.update({name: ocp.args.JsonRestore() for name in JSON_ITEMS if epath.Path(step_dir, name).is_dir()})
  try:
    return dict(manager.restore(step, args=ocp.args.Composite(**items)))
  except Exception as e:
    raise _unreadable(manager, step, e) from None


_default_unraisablehook = sys.unraisablehook


def _drop_closed_loop_noise(unraisable) -> None:
  if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
    _default_unraisablehook(unraisable)


def _unreadable(manager: ocp.CheckpointManager, step: int, error: Exception) -> UserError:
  """The one-line error for arrays orbax could not read.

  A failed read leaves tensorstore reads running; as each completes it finds orbax's event loop
  closed and would print an "Event loop is closed" traceback after our line. Those, and only
  those, are dropped from now on (the filter is installed once, however many reads fail)."""
  global _default_unraisablehook
  if sys.unraisablehook is not _drop_closed_loop_noise:
    _default_unraisablehook = sys.unraisablehook
    sys.unraisablehook = _drop_closed_loop_noise
  detail = (str(error).splitlines() or [""])[0]
  detail = detail if len(detail) <= 300 else detail[:300] + "..."  # tensorstore appends kilobytes of spec
  return UserError(f"checkpoint step {step} in {manager.directory} could not be restored "
                   f"({type(error).__name__}: {detail}); it may be corrupt or from a different model")


def save_params(directory: str, params, config: model_lib.BertConfig, head: str, step: int = 0) -> None:
  """Writes `params` as a params-only checkpoint that `restore_params` and `--init_from` accept."""
  manager = make_manager(directory, max_to_keep=None, async_save=False)
  save(manager, step, params=params, config=config_record(config, head))
  wait(manager)
  manager.close()


def read_model(path: str, step: Optional[int] = None) -> tuple:
  """(manager, step, BertConfig, head) of a checkpoint (a workdir, latest step by default, or a step
  folder), without reading its arrays; close the manager when done."""
  manager, step = _resolve(path, step)
  record = read_config(manager, step)
  try:
    config = model_lib.BertConfig.from_dict(record["model"])
    head = record["head"]
  except (KeyError, TypeError, ValueError) as e:
    raise UserError(f"checkpoint step {step} in {manager.directory} has a bad config item: {e}") from None
  return manager, step, config, head


def restore_params(path: str, step: Optional[int] = None, shardings=None) -> tuple:
  """(BertConfig, head, params) of a checkpoint: a workdir (latest step by default) or a step folder.

  `shardings` (one sharding or a tree matching the params) defaults to a full copy on every device.
  """
  manager, step, config, head = read_model(path, step)
  abstract = _abstract(manager, step, "params", shardings or replicated_sharding())
  params = restore_items(manager, step, {"params": abstract})["params"]
  manager.close()
  return config, head, params
