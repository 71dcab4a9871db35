"""Multi-controller start-up: `jax.distributed.initialize()` before any JAX computation.

Enabled by `config.distributed.enabled` or the environment variable BIPFT_DISTRIBUTED=1 (what the
launch scripts set). On TPU pods, SLURM and other clusters JAX detects the coordinator, process
count and id itself; `launch/local.sh` (and the multi-process test) pass them explicitly through
BIPFT_COORDINATOR, BIPFT_NUM_PROCESSES and BIPFT_PROCESS_ID, with gloo collectives on CPU.
Start-up also agrees on what `auto` measures per host (precision.choose): process 0's choice.
`StopSignals` is how a run learns, on one host or many, that it should save and stop; `leave_job`
how one process's failure ends the whole job at once.
"""
import atexit
import contextlib
import os
import signal
import sys
import threading
import time
import traceback
from typing import Callable, NoReturn, Optional

import jax
from jax.experimental import multihost_utils

from bipft_jax import console, errors, files, precision
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
  if several_processes():
    _watch_for_failures()
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


# A failed process posts its error line under this key of jax's coordination service; every process
# watches for it. (The service's client is not public API; orbax uses it the same way.)
_FAILURE_KEY = "bipft/failure"
# Held by the one thread that ends this process: its own failed main thread, or the watcher with the
# line of another process's failure (of which this process's own failure may be a consequence).
_ENDING = threading.Lock()


def _client():
  from jax._src import distributed as jax_distributed
  return getattr(jax_distributed.global_state, "client", None)


def _poster(posted: str) -> int:
  """The process that posted a failure ("CODE PROCESS LINE")."""
  return int(posted.split(" ", 2)[1])


def _end_with_posted(posted: str) -> NoReturn:
  """Ends this process with another process's posted failure: its line, naming it, and its exit code."""
  code, process, line = posted.split(" ", 2)
  print(f"{line} [on process {process}]", file=sys.stderr, flush=True)
  _exit(int(code))


def _watch_for_failures() -> None:
  """Starts a thread that ends this process, with the failed process's line and exit code, as soon as
  another process of the job posts one (`leave_job`)."""
  client, done = _client(), threading.Event()
  if client is None:
    return

  def watch():
    while not done.is_set():
      try:
        posted = client.blocking_key_value_get(_FAILURE_KEY, 1000)
      except Exception:  # not posted within the second, or the client is shutting down
        done.wait(0.1)
        continue
      if _poster(posted) == jax.process_index():
        return  # this process posted it and is leaving
      _ENDING.acquire()  # never released: the process ends
      _end_with_posted(posted)
  watcher = threading.Thread(target=watch, daemon=True, name="bipft-failure-watch")
  watcher.start()

  def stop():  # the thread must be out of the client's call when jax shuts the client down (an abort)
    done.set()
    watcher.join()
  atexit.register(stop)  # runs before jax's own exit handler, registered earlier


def leave_job(line: str, code: int, unexpected: Optional[BaseException] = None) -> NoReturn:
  """Prints `line` (after the traceback of an `unexpected` error) and ends this process
  of a multi-process job now, and, through the watchers, every other process with `line` naming this
  one. Leaving the usual way waited at jax's shutdown barrier for processes that wait in a collective
  for this one: a bad input on one host hung the whole job (5 min and more; a bare exit still left the
  others for the 100 s heartbeat timeout, then an abort). When another process failed first (this
  failure may be its consequence: a collective broken by its exit), its line is the job's."""
  _ENDING.acquire()  # held by the watcher if it is ending the process with another's line: wait here
  client = _client()
  try:
    posted = client.key_value_try_get(_FAILURE_KEY)
  except Exception:  # none posted yet
    posted = None
  if posted is not None and _poster(posted) != jax.process_index():
    _end_with_posted(posted)
  if unexpected is not None:
    traceback.print_exception(unexpected)
  print(line, file=sys.stderr, flush=True)
  try:
    client.key_value_set(_FAILURE_KEY, f"{code} {jax.process_index()} {line}")
  except Exception:  # another process posted at the same moment: both lines are printed
    pass
  _exit(code)


def _exit(code: int) -> NoReturn:
  """Leaves at once; process 0 hosts the coordination service, so it leaves 2 s after the others
  (gone first, it would abort those still on their way out)."""
  sys.stdout.flush()
  sys.stderr.flush()
  if is_primary():
    time.sleep(2)
  os._exit(code)


def several_processes() -> bool:
  """Whether this process is one of a multi-process job."""
  return jax.distributed.is_initialized() and jax.process_count() > 1


def workdir_lock(workdir: str, command: str):
  """`files.workdir_lock` for a job of one or many processes: process 0 holds the workdir (when it
  cannot, the CLI's `leave_job` ends the other processes with its line)."""
  return files.workdir_lock(workdir, command) if is_primary() else contextlib.nullcontext()


class StopSignals:
  """Whether a signal asks the run to save at a step and stop: a SIGTERM (a preemption, `scancel`,
  `kill`), a first Ctrl-C (SIGINT; a second one stops at once, without saving) or a hangup (SIGHUP,
  or a console whose reader is gone: console.py).

  One process: handlers of ours note the signal, and the step after it saves. A jax.distributed
  job: jax's preemption service, which `jax.distributed.initialize` starts and which handles SIGTERM
  itself, passes a signal that any host gets to all of them, and they agree on one step to save at;
  a Ctrl-C or hangup is handed to it as a SIGTERM of this process. A SIGTERM handler of ours would
  replace the service's and stop the signalled host alone, whose save then waits forever for hosts
  gone on to the next step's collectives (a job that hangs). Ctrl-C is left alone where the process
  was started ignoring it (a background job) or with a handler other than Python's, and SIGHUP where
  it is ignored (nohup)."""

  def __init__(self, say: Callable[[str], None]):
    self.synced = jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service
    self.say, self.received = say, []
    self.previous = {}
    if not self.synced:
      self.previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, lambda *_: self.received.append(signal.SIGTERM))
    if signal.getsignal(signal.SIGINT) in (signal.default_int_handler, errors.interrupt):
      self.previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._ctrl_c)
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
      self.previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._hangup)
    self.console = console.Guard(on_lost=self._hangup)
    # A signal during setup whose raise was dropped (errors.RECEIVED): the first step saves and stops.
    self.received += errors.RECEIVED
    errors.RECEIVED.clear()
    if self.synced and self.received:
      os.kill(os.getpid(), signal.SIGTERM)  # to jax's preemption service, as a Ctrl-C is

  def _ctrl_c(self, *_) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: KeyboardInterrupt
    self._note(signal.SIGINT)
    self.say("Ctrl-C: saving after this step, then stopping (Ctrl-C again stops at once, without saving)")

  def _hangup(self, *_) -> None:
    console.detach_lost()  # the save's lines, and the exit's flush, have somewhere to go
    self._note(signal.SIGHUP)
    self.say("hangup (SIGHUP, or the console's reader left): saving after this step, then stopping")

  def _note(self, signum: signal.Signals) -> None:
    self.received.append(signum)
    if self.synced:
      os.kill(os.getpid(), signal.SIGTERM)  # to jax's preemption service: every process saves one step

  def stop_at(self, step: int) -> Optional[signal.Signals]:
    """The signal that asks to save at `step` and stop, or None; every process asks at every step
    (the agreement needs it)."""
    if self.synced and not multihost_utils.reached_preemption_sync_point(step):
      return None
    if self.synced or self.received:
      return next((s for s in (signal.SIGINT, signal.SIGHUP) if s in self.received), signal.SIGTERM)
    return None

  def close(self) -> None:
    self.console.close()
    for signum, handler in self.previous.items():
      signal.signal(signum, handler)
