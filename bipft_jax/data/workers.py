"""Pretraining examples made in worker processes, so that a host's CPUs, not one Python thread, keep
its accelerators fed.

A document's examples in an epoch are a pure function of (seed, epoch, document), so workers make
the documents ahead of a stream and the stream takes them in its own order: the batches are the
same for any number of workers (`data.workers=0`: made in the data thread). The workers are started
with "spawn" (forking a process that runs JAX's threads can deadlock), ignore SIGINT, SIGTERM and
SIGHUP (the run's own handler saves first, then ends them) and leave when their parent has gone,
however it ended.
"""
import concurrent.futures
import contextlib
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import ml_collections

from bipft_jax.data import pipeline
from bipft_jax.errors import HostFailed

MAX_AUTO_WORKERS = 8
# The run's to handle: a Ctrl-C, or a terminal's hangup, reaches the whole process group.
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def usable_cpus() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_count(requested: int) -> int:
  """`data.workers`: N processes, 0 for none, -1 (auto) one for every 4 CPUs this process may use, at
  most 8 (none below 4 CPUs, where the steps need the cores: the demo's data waits are under 0.1%)."""
  return requested if requested >= 0 else min(MAX_AUTO_WORKERS, usable_cpus() // 4)


class ExamplePool:
  """Worker processes that make documents' examples (`PretrainingData.document_examples`) of any of
  `sources` (a host's shards' own files, or the one corpus they share)."""

  def __init__(self, workers: int, sources: list, tokenizer, data_config, seed: int):
    self.workers = workers
    self.executor = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
        initargs=(os.getpid(), sources, tokenizer, data_config.to_dict(), seed))

  def submit(self, epoch: int, documents, source: int = 0) -> concurrent.futures.Future:
    # The pool starts its workers in submit: blocked here, a Ctrl-C or SIGTERM stays blocked in them
    # (until the initializer ignores it) and waits for this thread (the run's handler saves first).
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
      with _failure():
        return self.executor.submit(_make_examples, source, epoch, [int(d) for d in documents])
    finally:
      signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

  def result(self, future: concurrent.futures.Future) -> list:
    with _failure():
      return future.result()

  def close(self) -> None:
    self.executor.shutdown(wait=True, cancel_futures=True)  # waits for at most one task a worker


@contextlib.contextmanager
def _failure():
  try:
    yield
  except BrokenProcessPool:
    raise HostFailed("a data worker process ended abruptly (its error is above if it had one; else it was killed, "
                     "by the out-of-memory killer say); the run stopped without saving: rerun the same command to "
                     "resume from the newest checkpoint, with fewer --config.data.workers if memory is short (0: "
                     "examples made in the run's own process)") from None


_streams = []  # the worker's PretrainingData of each source


def _start_worker(parent: int, sources: list, tokenizer, data_config: dict, seed: int) -> None:
  for signum in STOP_SIGNALS:
    signal.signal(signum, signal.SIG_IGN)
  signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
  threading.Thread(target=_leave_with, args=(parent,), daemon=True).start()
  config = ml_collections.ConfigDict(data_config)
  spans = pipeline.SpanCache(pipeline.SPANS_BUDGET)  # one budget for the process, as in HostData
  _streams[:] = [pipeline.PretrainingData(source, tokenizer, config, batch_size=1, seed=seed, spans=spans)
                 for source in sources]


def _leave_with(parent: int) -> None:
  """Ends the worker once its parent is gone (a SIGKILL, an out-of-memory kill): no orphans on the host."""
  while os.getppid() == parent:
    time.sleep(0.5)
  os._exit(0)


def _make_examples(source: int, epoch: int, documents: list) -> list:
  return [_streams[source].document_examples(epoch, document) for document in documents]
