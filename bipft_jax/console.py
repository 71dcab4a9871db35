"""A console that goes away under a running command: an ssh connection that drops hangs up its
terminal (a SIGHUP, then EIO on every write to it) or, without a terminal (`ssh host cmd`,
`gcloud ... ssh --command`), leaves its output a pipe without a reader (EPIPE on the next write).

Training loops take either as a hangup: they save at the step and stop with exit code 129, as on a
SIGTERM (distributed.StopSignals), instead of dying on their next progress-bar write and losing the
steps since their last checkpoint. Outside training loops a SIGHUP ends the command like a SIGTERM
(cli.py). Either way the gone outputs are pointed at /dev/null first, so that the lines and flushes
that follow do not fail. A job that should outlive its connection runs under tmux, screen or nohup.
"""
import errno
import os
import select
import sys
from typing import Callable

LOST_ERRNOS = frozenset({errno.EIO, errno.EPIPE})  # a hung-up terminal; a pipe or socket without a reader


def detach_lost() -> bool:
  """Points stdout and stderr at /dev/null where nothing reads them any more; whether one was."""
  lost = False
  for fd in (1, 2):
    poller = select.poll()
    try:
      poller.register(fd, select.POLLOUT)
      gone = any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError):  # closed, or never opened
      continue
    if gone:
      devnull = os.open(os.devnull, os.O_WRONLY)
      os.dup2(devnull, fd)
      os.close(devnull)
      lost = True
  return lost


class _Guarded:
  """A text stream whose writes and flushes that fail for want of a reader call `on_lost` (once)
  instead of raising: its text has nowhere to go."""

  def __init__(self, stream, on_lost: Callable[[], None]):
    self._stream, self._on_lost = stream, on_lost

  def _lost(self, error: OSError) -> None:
    if error.errno not in LOST_ERRNOS:
      raise error
    self._on_lost()

  def write(self, text: str) -> int:
    try:
      return self._stream.write(text)
    except OSError as e:
      self._lost(e)
      return len(text)

  def flush(self) -> None:
    try:
      self._stream.flush()
    except OSError as e:
      self._lost(e)

  def __getattr__(self, name: str):
    return getattr(self._stream, name)


class Guard:
  """While open, a lost console calls `on_lost` once, after pointing what is gone at /dev/null.
  Progress bars made inside write through it (tqdm keeps the stream it found when made)."""

  def __init__(self, on_lost: Callable[[], None]):
    self.on_lost, self.called = on_lost, False
    self.streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Guarded(sys.stdout, self._lost), _Guarded(sys.stderr, self._lost)

  def _lost(self) -> None:
    detach_lost()
    if not self.called:
      self.called = True
      self.on_lost()

  def close(self) -> None:
    sys.stdout, sys.stderr = self.streams
