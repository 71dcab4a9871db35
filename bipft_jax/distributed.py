"""Multi-controller start-up: `jax.distributed.initialize()` before any JAX computation.

Enabled by `config.distributed.enabled` or the environment variable BIPFT_DISTRIBUTED=1 (what the
launch scripts set). On TPU pods, SLURM and other clusters JAX detects the coordinator, process
count and id itself; `launch/local.sh` (and the multi-process test) pass them explicitly through
BIPFT_COORDINATOR, BIPFT_NUM_PROCESSES and BIPFT_PROCESS_ID, with gloo collectives on CPU.
Start-up also agrees on what `auto` measures per host (precision.choose): process 0's choice.
`SigtermWatch` is how a run learns, on one host or many, that it should save and stop.
"""
import contextlib
import os
import signal
import threading
from typing import Iterator, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from bipft_jax import files, precision
from bipft_jax.errors import UserError


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  if value is None:
    return None
  try:
    return int(value)
  except ValueError:
    raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def requested(config=None) -> bool:
  """Whether this run should start the multi-controller runtime."""
  if os.environ.get("BIPFT_DISTRIBUTED", "") not in ("", "0"):
    return True
  distributed = getattr(config, "distributed", None) if config is not None else None
  return bool(distributed and distributed.get("enabled", False))


def initialize(config=None) -> None:
  """Calls jax.distributed.initialize once, if requested; a no-op otherwise."""
  if not requested(config) or jax.distributed.is_initialized():
    return
  explicit = {"coordinator_address": os.environ.get("BIPFT_COORDINATOR"),
              "num_processes": _env_int("BIPFT_NUM_PROCESSES"), "process_id": _env_int("BIPFT_PROCESS_ID")}
  # Cross-process collectives between CPU devices need gloo; it only affects the CPU backend.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**explicit)
  # `auto` sign products are measured on each host and the job takes process 0's choice. Agreeing is a
  # collective, which the model's traces (where the choice is asked) cannot run: it is made here.
  precision.sign_product_dtype("auto")


def is_primary() -> bool:
  """Process 0 writes logs, summaries and progress bars; every process writes its checkpoint shards."""
  return jax.process_index() == 0


def log(message: str) -> None:
  """Prints a line of the run's story from process 0 only (every host would repeat it)."""
  if is_primary():
    print(message, flush=True)


@contextlib.contextmanager
def workdir_lock(workdir: str, command: str) -> Iterator[None]:
  """`files.workdir_lock` for a job of one or many processes: process 0 holds the workdir, and every
  process learns whether it could (a refusal on process 0 alone left the others waiting in the job's
  first collective, and process 0 waiting for them at exit: a job that hung)."""
  with contextlib.ExitStack() as held:
    refusal = ""
    if is_primary():
      try:
        held.enter_context(files.workdir_lock(workdir, command))
      except UserError as e:
        refusal = str(e)
    if jax.process_count() > 1 and multihost_utils.broadcast_one_to_all(np.bool_(refusal)) and not refusal:
      refusal = f"{workdir} is in use by another run (process 0 found its lock)"
    if refusal:
      raise UserError(refusal)
    yield


class SigtermWatch:
  """Whether a SIGTERM (a preemption, `scancel`, `kill`) asks the run to save at a step and stop.

  One process: a handler of ours notes the signal, and the step after it saves. A jax.distributed
  job: jax's preemption service, which `jax.distributed.initialize` starts and which handles SIGTERM
  itself, passes a signal that any host gets to all of them, and they agree on one step to save at.
  A handler of ours would replace the service's and stop the signalled host alone, whose save then
  waits forever for hosts gone on to the next step's collectives (a job that hangs)."""

  def __init__(self):
    self.synced = jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service
    self.signalled = threading.Event()
    if not self.synced:
      self.previous = signal.signal(signal.SIGTERM, lambda *_: self.signalled.set())

  def stop_at(self, step: int) -> bool:
    """Whether to save at `step` and stop; every process asks at every step (the agreement needs it)."""
    if self.synced:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signalled.is_set()

  def close(self) -> None:
    if not self.synced:
      signal.signal(signal.SIGTERM, self.previous)
