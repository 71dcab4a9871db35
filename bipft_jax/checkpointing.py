"""Orbax checkpoints of training runs and of bare parameters.

A checkpoint is one step folder of an orbax `CheckpointManager` workdir (`WORKDIR/<step>/`) with
the items `params`, `opt_state` (absent in params-only checkpoints), `data` (the data iterator's
state, JSON) and `config` (JSON: the model config dict, the head, and the full run config).
Arrays are written with their shardings' layout but restored onto whatever devices exist now,
so a checkpoint written on 8 devices restores on 1 and vice versa. Orbax writes to a temporary
folder and renames it when complete: a run killed mid-save leaves the previous step intact.

Checkpoints are what they claim. Before that rename, process 0 seals the step: `checksums.json`
lists the sha256 of every file of its items. Every read verifies the files of the items it reads
and refuses a step whose files differ, are missing or are extra (`CorruptCheckpoint`), and one
whose restored arrays hold a NaN or Inf. A step without `checksums.json` (written before sealing
existed, or by other tools) is read unverified; its arrays must still be finite.
"""
import collections
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import sys
import traceback
import warnings
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from bipft_jax import model as model_lib
from bipft_jax import errors
from bipft_jax.errors import UserError, WriteFailed

ARRAY_ITEMS = ("params", "opt_state")
JSON_ITEMS = ("data", "config")
CHECKSUMS = "checksums.json"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's folder for a step until its rename (not public in 0.12.8)


class CorruptCheckpoint(UserError):
  """A step whose files fail their checksums or whose arrays are not finite."""

  def __init__(self, directory, step: int, reason: str):
    super().__init__(f"checkpoint step {step} in {directory} is corrupt: {reason}")
    self.step, self.reason = step, reason


def saved_steps(directory: str) -> list:
  """The steps saved in a local `directory` (its folders named by a number), without an orbax manager."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def config_record(model_config: model_lib.BertConfig, head: str, run_config: Optional[dict] = None) -> dict:
  """The `config` item: enough to rebuild the model (and, for runs, the whole job) from the checkpoint."""
  return {"model": dataclasses.asdict(model_config), "head": head, "run": run_config}


# Model fields a resumed run may change: how exactly it computes (choices equal bit for bit, the
# precision policy, rematerialization) and its dropout. The others say what the parameters mean.
RESUMABLE_MODEL_CHANGES = frozenset({"hidden_dropout", "attention_dropout", "classifier_dropout",
                                     "matmul_precision", "binary_matmul_dtype", "precision", "remat"})


def check_same_model(manager: ocp.CheckpointManager, step: int, model_config: model_lib.BertConfig) -> None:
  """UserError if the run saved at `step` trained another model than `model_config`. Without it a
  resume either fails in orbax with advice that does not apply (shapes, tree structure) or, where the
  parameters agree (an activation, layer_norm_eps), goes on silently training another model. A step
  whose config cannot be read is left to the restore, which sets it aside or refuses it."""
  try:
    saved = read_config(manager, step)["model"]
    saved = {name: value for name, value in saved.items() if name not in RESUMABLE_MODEL_CHANGES}
  except (UserError, KeyError, TypeError, AttributeError):
    return
  now = dataclasses.asdict(model_config)
  differ = [f"{name} {value!r} there, {now[name]!r} now" for name, value in saved.items()
            if name in now and value != now[name]]
  if differ:
    raise UserError(f"{manager.directory} holds a run of another model (step {step}: {'; '.join(differ)}); "
                    "rerun with that run's model config to resume it, or choose another --workdir")


def changed_settings(manager: ocp.CheckpointManager, step: int, run_config: dict) -> tuple:
  """(the run config saved at `step`, [(field, then, now)] for each field `run_config` sets otherwise,
  nested fields dotted; fields one side lacks, which a code change added or dropped, are not listed);
  (None, []) when the step has no readable record of its run."""
  try:
    saved = read_config(manager, step)["run"]
  except (UserError, KeyError, TypeError):
    return None, []
  if not isinstance(saved, dict):
    return None, []
  return saved, setting_changes(saved, run_config)


def setting_changes(saved: dict, run_config: dict) -> list:
  """[(field, then, now)] for each field `run_config` sets otherwise than the `saved` run record,
  nested fields dotted; fields one side lacks, which a code change added or dropped, are not listed."""
  then, now = _dotted(saved), _dotted(json.loads(json.dumps(run_config)))  # as the record stores it
  return [(name, then[name], now[name]) for name in sorted(then.keys() & now.keys()) if then[name] != now[name]]


def _dotted(tree: dict, prefix: str = "") -> dict:
  out = {}
  for name, value in tree.items():
    out.update(_dotted(value, f"{prefix}{name}.") if isinstance(value, dict) else {f"{prefix}{name}": value})
  return out


class SealingManager(ocp.CheckpointManager):
  """orbax's asynchronous CheckpointManager that seals every step it saves with `checksums.json`.

  orbax calls `post_finalization_callback` on process 0 once every process has written its files
  and before the step's temporary folder is renamed into place: the manifest commits with the step.

  A step that cannot be written (a full disk, a quota, a failing file system), in the foreground
  or in orbax's background threads, raises `WriteFailed` naming that step, the cause and the newest
  complete step, when the manager next waits or saves; its temporary folder is never renamed into
  place, and the next save or resume replaces it.
  """

  def __init__(self, directory: str, *, item_handlers: dict, options: ocp.CheckpointManagerOptions):
    self._unsealed = collections.deque()  # steps saved, in order, whose callback has not run yet
    self._writing = None  # the step being written in the background
    options.async_options = ocp.AsyncOptions(post_finalization_callback=self._seal)
    super().__init__(directory, item_handlers=item_handlers, options=options)

  def save(self, step: int, *args, **kwargs) -> bool:
    self.wait_until_finished()  # orbax waits too; here a failure is reported as the earlier step's
    if jax.process_index() == 0:  # orbax's primary host, the only one that runs the callback
      self._unsealed.append(step)
    try:
      saved = super().save(step, *args, **kwargs)
    except BaseException as e:
      self._unsealed.clear()  # a failed save runs no callback: forget it (and any before it)
      if isinstance(e, Exception):
        raise self._not_written(step, e) from e
      raise
    if saved:
      self._writing = step
    elif self._unsealed:
      self._unsealed.pop()
    return saved

  def wait_until_finished(self) -> None:
    step, self._writing = self._writing, None
    try:
      super().wait_until_finished()
    except Exception as e:
      self._unsealed.clear()
      raise self._not_written(step, e) from e

  def _not_written(self, step: Optional[int], error: Exception) -> WriteFailed:
    self.reload()  # the failed step is not among the steps on disk
    newest = self.latest_step()
    intact = (f"the newest complete checkpoint there is step {newest}: once the cause is fixed, rerun the "
              "same command to resume from it" if newest is not None else
              "no checkpoint there is complete: once the cause is fixed, rerun the same command")
    return WriteFailed(f"checkpoint step {step} could not be written to {self.directory} ({_cause(error)}); "
                       f"{intact}")

  def _seal(self) -> None:
    step = self._unsealed.popleft()
    step_dir = epath.Path(self.directory) / str(step)
    uncommitted = epath.Path(self.directory) / f"{step}{TMP_SUFFIX}"
    write_checksums(uncommitted if uncommitted.exists() else step_dir)  # object stores write in place


def make_manager(workdir: str, *, max_to_keep: Optional[int] = 3, keep_period: Optional[int] = None,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager over `workdir` holding the items above: an asynchronous `SealingManager`,
  or with `read_only` a plain one that never creates or writes anything. It keeps the newest
  `max_to_keep` steps and every multiple of `keep_period`."""
  _drop_abandoned_io()  # reports that may come, during a failed read or write and after it
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, keep_period=keep_period, create=not read_only,
                                         enable_async_checkpointing=not read_only)
  handlers = {name: ocp.StandardCheckpointHandler() for name in ARRAY_ITEMS}
  handlers.update({name: ocp.JsonCheckpointHandler() for name in JSON_ITEMS})
  manager_class = ocp.CheckpointManager if read_only else SealingManager
  return manager_class(_absolute(workdir), item_handlers=handlers, options=options)


def _item_files(step_dir: epath.Path, items) -> list:
  """Paths (relative, '/'-separated) of every file inside the item folders `items` of a step."""
  files, folders = [], [step_dir / item for item in items if (step_dir / item).is_dir()]
  while folders:  # epath's rglob refuses object stores
    for entry in folders.pop().iterdir():
      if entry.is_dir():
        folders.append(entry)
      else:
        files.append(str(entry.relative_to(step_dir)))
  return sorted(files)


def _sha256(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()


def write_checksums(step_dir: epath.Path) -> None:
  """`checksums.json`: the sha256 of every file in the step's item folders, written atomically."""
  items = [d.name for d in step_dir.iterdir() if d.is_dir()]
  listed = {name: _sha256(step_dir / name) for name in _item_files(step_dir, items)}
  partial = step_dir / (CHECKSUMS + ".partial")
  partial.write_text(json.dumps({"sha256": listed}, indent=1))
  partial.rename(step_dir / CHECKSUMS)


def verify(manager: ocp.CheckpointManager, step: int, items) -> None:
  """Raises CorruptCheckpoint unless the files of `items` in `step` are exactly those sealed at
  save time; a step without checksums.json passes unverified."""
  step_dir = epath.Path(manager.directory) / str(step)
  if not (step_dir / CHECKSUMS).exists():
    if removed := _removed_while_read(manager.directory, step):
      raise removed
    return
  try:
    listed = json.loads((step_dir / CHECKSUMS).read_text())["sha256"]
  except (ValueError, TypeError, KeyError):  # truncated or reshaped: the manifest itself is damaged
    listed = None
  if not (isinstance(listed, dict) and all(isinstance(digest, str) for digest in listed.values())):
    raise CorruptCheckpoint(manager.directory, step, f"its {CHECKSUMS} is unreadable")
  listed = {name: digest for name, digest in listed.items() if name.split("/")[0] in items}
  present = _item_files(step_dir, items)
  missing = sorted(set(listed) - set(present))
  if missing:
    raise (_removed_while_read(manager.directory, step)
           or CorruptCheckpoint(manager.directory, step, f"{missing[0]} is missing"))
  for name in present:
    if name not in listed:
      raise CorruptCheckpoint(manager.directory, step, f"{name} was not written by the save")
    if _sha256(step_dir / name) != listed[name]:
      raise CorruptCheckpoint(manager.directory, step, f"{name} fails its sha256 check")


def _removed_while_read(directory, step: int) -> Optional[UserError]:
  """The error for a step folder gone since this read chose it: a run writing to the workdir keeps only
  its newest `keep_checkpoints` steps. Not a corrupt step; None while the folder is there."""
  if (epath.Path(directory) / str(step)).exists():
    return None
  return UserError(f"checkpoint step {step} was removed from {directory} while it was being read (a run "
                   "writing there keeps only its newest keep_checkpoints steps); run the command again")


def all_finite(tree) -> jax.Array:
  """True when no floating-point leaf of `tree` holds a NaN or Inf (traceable, for jitted steps).

  A NaN or an Inf makes any sum it enters non-finite, so one sum of every leaf screens for them,
  each leaf read once. Only when that sum is not finite (a NaN, an Inf, or finite values whose sum
  overflows) does the exact test run, under a `lax.cond` the common case never enters: per leaf a
  sum of 0 * x, 0 if x is finite and NaN if not. As the only check, that exact test cost the
  BERT-base mixed step about 5% (XLA:CPU reads each leaf beside a materialized zero array); the
  screen costs about what no check does (docs/performance.md, "The mixed step's bound on the AMD host")."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return jnp.array(True)
  exact = lambda: jnp.isfinite(_sum_of_all([jnp.multiply(x, 0) for x in leaves]))
  return jax.lax.cond(jnp.isfinite(_sum_of_all(leaves)), lambda: jnp.array(True), exact)


def _sum_of_all(leaves: list) -> jax.Array:
  return sum(jnp.sum(x, dtype=jnp.promote_types(x.dtype, jnp.float32)) for x in leaves)


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
  """(manager, step) for a workdir (latest step by default), a step folder inside one, or a `bipft
  finetune` workdir (its best/: the classifier of its best epoch)."""
  path = _absolute(path)
  if not epath.Path(path).is_dir():
    raise UserError(f"checkpoint {path} does not exist")
  if step is None and os.path.basename(path).isdigit() and epath.Path(path, "config").is_dir():
    path, step = os.path.dirname(path), int(os.path.basename(path))
  manager = make_manager(path, max_to_keep=None, read_only=True)
  steps = manager.all_steps()
  if not steps and epath.Path(path, "best").is_dir():
    manager.close()
    return _resolve(os.path.join(path, "best"), step)
  if not steps:
    raise UserError(f"no checkpoint in {path}: it has no completed step folder")
  if step is None:
    step = max(steps)
  elif step not in steps:
    removed = " (a run writing there keeps only its newest steps)" if step < min(steps) else ""
    raise UserError(f"no step {step} in {path}; steps there: {sorted(steps)}{removed}")
  return manager, step


def read_config(manager: ocp.CheckpointManager, step: int) -> dict:
  """The `config` item of `step`, verified against the step's checksums."""
  verify(manager, step, ("config",))
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
  """Restores array items onto the shardings in `abstract` (item -> tree of ShapeDtypeStruct), plus
  the JSON items; CorruptCheckpoint if their files fail the step's checksums or an array is not finite."""
  step_dir = epath.Path(manager.directory) / str(step)
  json_items = tuple(name for name in JSON_ITEMS if (step_dir / name).is_dir())
  verify(manager, step, tuple(abstract) + json_items)
  return _restore(manager, step, abstract, json_items)


def _restore(manager: ocp.CheckpointManager, step: int, abstract: dict, json_items: tuple) -> dict:
  items = {name: ocp.args.StandardRestore(tree) for name, tree in abstract.items()}
  items.update({name: ocp.args.JsonRestore() for name in json_items})
  try:
    restored = dict(manager.restore(step, args=ocp.args.Composite(**items)))
  except Exception as e:
    raise _unreadable(manager, step, e) from None
  if abstract and not bool(jax.jit(all_finite)({name: restored[name] for name in abstract})):
    raise CorruptCheckpoint(manager.directory, step, f"its {' and '.join(abstract)} hold NaN or Inf values")
  return restored


def restore_newest_intact(manager: ocp.CheckpointManager, abstract: dict) -> Optional[tuple]:
  """(step, items, skipped) of the newest step `restore_items` accepts, or None without steps.

  `skipped` are the CorruptCheckpoint errors of the newer steps, each set aside as `STEP.corrupt`
  (its `moved_to`); UserError, moving nothing, when no
  step is intact. Every process must call this (the finiteness check is a collective)."""
  skipped = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = restore_items(manager, step, abstract)
    except CorruptCheckpoint as e:
      skipped.append(e)
      continue
    for error in skipped:
      error.moved_to = set_aside(manager, error.step, "corrupt")
    return step, restored, skipped
  if skipped:
    raise UserError(f"no intact checkpoint in {manager.directory}: "
                    + "; ".join(f"step {e.step}: {e.reason}" for e in skipped)
                    + ". Move the step folders away to start afresh")
  return None


def set_aside(manager: ocp.CheckpointManager, step: int, label: str) -> str:
  """Renames the folder of `step` to `STEP.LABEL` (`STEP.LABEL.2`, ... if taken), a name orbax does not
  take for a step, so nothing is deleted and the run may write that step again; returns the new path."""
  step_dir = epath.Path(manager.directory) / str(step)
  target, n = step_dir.with_name(f"{step}.{label}"), 1
  while target.exists():
    n += 1
    target = step_dir.with_name(f"{step}.{label}.{n}")
  if jax.process_index() == 0:
    step_dir.rename(target)
  multihost_utils.sync_global_devices(f"bipft set aside step {step}")
  manager.reload()
  return str(target)


def _drop_abandoned_io() -> None:
  """Installs (once) an unraisable hook, an asyncio log filter and a warnings filter that drop what
  the reads of a failed restore, or the writes of a failed save, leave behind.

  orbax abandons its other array reads or writes when one fails; as tensorstore completes them or
  the interpreter collects them, at once, later or at exit, each may report "Event loop is closed",
  an exception raised while its coroutine was being closed ("Exception ignored in: <coroutine
  object _read_array_index_and_device_put>", or `write_fragment`), that it was never awaited, or
  through asyncio's log that its exception was never retrieved: a full disk gave a hundred
  tracebacks around our one line. Those, and only those, are dropped."""
  if getattr(sys.unraisablehook, "drops_abandoned_io", False):
    return
  previous, orbax_dir = sys.unraisablehook, os.path.dirname(ocp.__file__)

  # Everything the hook uses is bound now: at exit, when most of these reports come, module globals
  # may already be gone.
  def hook(unraisable, previous=previous, orbax_dir=orbax_dir, iscoroutine=inspect.iscoroutine) -> None:
    exc, source = unraisable.exc_value, unraisable.object
    closed_loop = isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
    orbax_io = iscoroutine(source) and source.cr_code.co_filename.startswith(orbax_dir)
    if not (closed_loop or orbax_io):
      previous(unraisable)

  def keep_log(record: logging.LogRecord, orbax_dir=orbax_dir, extract_tb=traceback.extract_tb) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    frames = extract_tb(error.__traceback__) if error is not None else ()
    from_orbax = any(frame.filename.startswith(orbax_dir) for frame in frames)
    return not ("never retrieved" in record.getMessage() and from_orbax)

  hook.drops_abandoned_io = True
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(keep_log)
  warnings.filterwarnings("ignore", r"coroutine '(async_serialize_from_host\.<locals>\.write_fragment|"
                          r"_read_array_index_and_device_put)' was never awaited", RuntimeWarning)


def _cause(error: Exception) -> str:
  """Why a write failed: the OS's reason where the error carries one, else its first line."""
  code = errors.os_error_code(error)
  return os.strerror(code) if code else errors.first_line(error)


def _unreadable(manager: ocp.CheckpointManager, step: int, error: Exception) -> UserError:
  """The one-line error for arrays orbax could not read (and nothing printed after it)."""
  return _removed_while_read(manager.directory, step) or UserError(
      f"checkpoint step {step} in {manager.directory} could not be restored ({errors.first_line(error)}); it may "
      "be corrupt or from a different model")


def save_params(directory: str, params, config: model_lib.BertConfig, head: str, step: int = 0,
                run_config: Optional[dict] = None) -> None:
  """Writes `params` as a params-only checkpoint that `restore_params` and `--init_from` accept
  (UserError, nothing written, if any of them is NaN or Inf); `run_config`: the job's config, kept
  beside the model's."""
  if not bool(jax.jit(all_finite)(params)):
    raise UserError("the parameters hold NaN or Inf values; refusing to save them as a checkpoint")
  manager = make_manager(directory, max_to_keep=None)
  save(manager, step, params=params, config=config_record(config, head, run_config))
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


def read_run_config(path: str, step: Optional[int] = None) -> Optional[dict]:
  """The config of the job that wrote a checkpoint, or None where it was not recorded (a converted or
  hand-made checkpoint, a finetuned best/ from before 2026-12-04)."""
  manager, step = _resolve(path, step)
  record = read_config(manager, step)
  manager.close()
  return record.get("run") if isinstance(record, dict) else None


def restore_params(path: str, step: Optional[int] = None, shardings=None) -> tuple:
  """(BertConfig, head, params) of a checkpoint: a workdir (latest step by default) or a step folder.

  `shardings` (one sharding or a tree matching the params) defaults to a full copy on every device.
  """
  manager, step, config, head = read_model(path, step)
  verify(manager, step, ("params",))  # before orbax reads the arrays' metadata
  abstract = _abstract(manager, step, "params", shardings or replicated_sharding())
  params = _restore(manager, step, {"params": abstract}, ())["params"]
  manager.close()
  return config, head, params
