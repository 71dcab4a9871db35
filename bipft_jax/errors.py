"""The exceptions the CLI reports in one `error: ...` line instead of a traceback, how a failed write
is recognised and described, and the exit code of a run a signal stopped.

`UserError`: bad user input (configs, data files, checkpoints, CLI arguments), exit code 2.
`WriteFailed`: the machine refused a write (disk full, quota, a read-only or failing file system),
exit code 1; what was written before it is intact. Any other exception that carries one of
`WRITE_REFUSED`'s error numbers is reported the same way.
`HostFailed`: the machine took away something a run needs (a data worker process killed), exit code 1.
An XLA error saying a device's memory ran out (`out_of_memory`) is reported in one line with what to
change, exit code 1.
A run that a SIGTERM, Ctrl-C or hangup stopped after saving exits with the shell's code for that
signal, 128 + its number (143, 130, 129): not 0, so that `bipft pretrain ... && bipft finetune ...`,
a job controller that restarts failed jobs, and `bipft study`/`track` do not take it for a finished
run.
"""
import errno
import re
import signal
from typing import Optional

# The file system refused a write: the machine's problem, not the input's or the code's. (EIO is left
# out: a read can fail with it too, and the line would then misname what failed.)
WRITE_REFUSED = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def signal_exit_code(signum: int) -> int:
  """The exit code of a command that signal `signum` stopped."""
  return 128 + signum


# The exit codes of a run a signal stopped, and what stopped it.
STOPPED = {signal_exit_code(signal.SIGINT): "Ctrl-C", signal_exit_code(signal.SIGTERM): "SIGTERM",
           signal_exit_code(signal.SIGHUP): "SIGHUP"}


class Stopped(Exception):
  """A command run inside another (`runs.run_command`) was stopped by a signal; `code` its exit code."""

  def __init__(self, code: int):
    super().__init__(STOPPED[code])
    self.code = code


# The signals the `bipft` command's handlers outside training loops raised for (cli.py), kept until the
# command handles them: a raise that lands in a garbage-collection callback (XLA's) is dropped, and the
# run's training loop then takes the signal from here (distributed.StopSignals).
RECEIVED: list = []


def interrupt(*_) -> None:
  """The `bipft` command's Ctrl-C handler outside training loops: Python's, noting the signal."""
  RECEIVED.append(signal.SIGINT)
  raise KeyboardInterrupt


class Terminated(BaseException):
  """A SIGTERM or SIGHUP (`signum`) outside a training loop (whose own handler saves first): the
  command unwinds like a Ctrl-C, its temporary files removed, and exits 143 or 129. A BaseException,
  so `except Exception` lets it by."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum


class UserError(Exception):
  """Bad input from the user; the message names the problem and what to do."""


class WriteFailed(Exception):
  """An output that could not be written; the message names it, the cause and what is intact."""


class HostFailed(Exception):
  """The machine took away something the run needs; the message names it and how to go on."""


def os_error_code(error: BaseException) -> Optional[int]:
  """The OS error number an exception carries: an OSError's, or one that a native library wrote
  into its message (tensorstore: "os_error_code='28'", safetensors: "(os error 28)")."""
  if isinstance(error, OSError) and error.errno is not None:
    return error.errno
  found = re.search(r"os_error_code='?(\d+)|\(os error (\d+)\)", str(error))
  return int(found.group(1) or found.group(2)) if found else None


def first_line(error: BaseException) -> str:
  """`Type: first line` of an error, at most 300 characters (tensorstore appends kilobytes of spec)."""
  detail = (str(error).splitlines() or [""])[0]
  return f"{type(error).__name__}: {detail if len(detail) <= 300 else detail[:300] + '...'}"


# What to change when a step does not fit in a device's memory.
OUT_OF_MEMORY_ADVICE = ("a device ran out of memory: lower batch_size, raise grad_accum_steps (the same batch in "
                        "smaller pieces), turn on remat (pretrain: model.remat, finetune: remat), or shard the "
                        "parameters over an fsdp mesh axis (configs/meshes.py); a rerun resumes training from its "
                        "newest checkpoint")


def out_of_memory(error: BaseException) -> bool:
  """An XLA runtime error (compiling or running a program) saying a device's memory ran out."""
  return type(error).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and str(error).startswith("RESOURCE_EXHAUSTED")
