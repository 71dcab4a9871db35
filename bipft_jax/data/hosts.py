"""The data of a multi-host run: the corpus cut into `data.shards` disjoint streams spread over hosts.

Each shard is one `PretrainingData` stream (`shard::shards` of the documents). Host h reads a
contiguous block of shards and its part of every global batch is their batches, concatenated, so
the global batch (host 0's rows first, as `jax.make_array_from_process_local_data` lays them out)
depends on the shard count only, not on the number of hosts: a 2-host run and a 1-host run with
`data.shards=2` train on the same batches. `data.shards=0` means one shard per host. A shard takes
every `shards`-th document of the corpus (`data.shard_by=documents`) or every `shards`-th file
(`files`: a host then opens its shards' files alone, `sources.FileShards`).
"""
import hashlib
import json
import os
from typing import Iterator, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from bipft_jax.data import pipeline, sources, workers
from bipft_jax.errors import UserError


def host_shards(num_shards: int) -> tuple:
  """(the shard indices this host reads, the total shard count)."""
  hosts, host = jax.process_count(), jax.process_index()
  count = num_shards or hosts
  if count < 1 or count % hosts:
    raise UserError(f"data.shards {num_shards} must be a positive multiple of the {hosts} hosts (or 0: one per host)")
  per_host = count // hosts
  return range(host * per_host, (host + 1) * per_host), count


def training_source(data_config) -> "Sequence | sources.FileShards":
  """The training corpus `HostData` reads (`sources.open_source`), its files checked against the
  shard count now rather than when the data starts, and the same on every host (a collective)."""
  source = sources.open_source(data_config, "train")
  if isinstance(source, sources.FileShards):
    source.check(host_shards(data_config.shards)[1])
  _check_same_everywhere(source)
  return source


def _seen(source) -> list:
  """[files, their bytes, documents (-1: not counted yet), a digest of the files' names and sizes]."""
  files = [(path, os.path.getsize(path)) for path in getattr(source, "paths", [])]
  seen = [len(files), sum(size for _, size in files), -1 if isinstance(source, sources.FileShards) else len(source)]
  return seen + [int.from_bytes(hashlib.sha256(json.dumps([files, seen]).encode()).digest()[:7], "little")]


def _check_same_everywhere(source) -> None:
  """UserError on every host unless every host sees the same training files (names and sizes) and
  documents: a host seeing a file more or less (one being copied, a stale network mount) would
  otherwise read other shards than the others think it reads, without a word."""
  if jax.process_count() == 1:
    return
  gathered = np.asarray(multihost_utils.process_allgather(np.array(_seen(source), np.int64))).reshape(-1, 4)
  differ = [i for i, row in enumerate(gathered) if not np.array_equal(row, gathered[0])]
  if differ:
    host, other = differ[0], gathered[differ[0]]
    counts = lambda row: f"{row[0]} files, {row[1]:,} bytes" + (f", {row[2]:,} documents" if row[2] >= 0 else "")
    names = "; other file names or sizes" if np.array_equal(other[:3], gathered[0][:3]) else ""
    raise UserError(f"host {host} sees other training data than host 0 ({counts(other)} against "
                    f"{counts(gathered[0])}{names}): every host must see the same data.paths (a shared file "
                    "system, or identical copies)")


def _concatenate(batches: list) -> dict:
  return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


def _shard_batch_size(global_batch_size: int, count: int, field: str) -> int:
  if global_batch_size % count:
    raise UserError(f"{field} {global_batch_size} must be a multiple of data.shards ({count})")
  return global_batch_size // count


class HostData(Iterator):
  """This host's rows of every global batch; `state()` is this host's, `global_state()` every host's.

  Its shards share `data.workers` worker processes (`workers.py`); `close()` ends them."""

  def __init__(self, source: "Sequence | sources.FileShards", tokenizer, data_config, *, global_batch_size: int,
               seed: int):
    self.shards, self.count = host_shards(data_config.shards)
    batch_size = _shard_batch_size(global_batch_size, self.count, "batch_size")
    if isinstance(source, sources.FileShards):  # each shard its own files, the whole of them
      self.sources = [source.open(i, self.count) for i in self.shards]
      parts = [(j, 0, 1) for j in range(len(self.shards))]
    else:  # each shard every count-th document of the one source
      self.sources = [source]
      parts = [(0, i, self.count) for i in self.shards]
    count = workers.worker_count(data_config.get("workers", 0))
    self.pool = workers.ExamplePool(count, self.sources, tokenizer, data_config, seed) if count else None
    spans = pipeline.SpanCache(pipeline.SPANS_BUDGET)  # the shards' streams keep one budget between them
    self.streams = [pipeline.PretrainingData(self.sources[j], tokenizer, data_config, batch_size=batch_size,
                                             seed=seed, process_index=i, process_count=n, pool=self.pool,
                                             pool_source=j, spans=spans)
                    for j, i, n in parts]

  def describe_file_shards(self, files: int) -> list:
    """Lines on the shards of `files` files dealt by file (a collective: every host calls it), with a
    warning when their sizes differ: each shard gives every batch as many rows, so the documents of a
    small shard come round more often than a large one's."""
    sizes = np.asarray(multihost_utils.process_allgather(np.array([len(s) for s in self.sources]))).reshape(-1)
    lines = [f"data.shard_by=files: {files} files in {self.count} shards of {sizes.min():,}-{sizes.max():,} "
             f"documents ({sizes.sum():,} in all)"]
    if sizes.max() > 2 * sizes.min():
      lines.append(f"warning: the documents of the smallest data shard come round {sizes.max() / sizes.min():.1f}x "
                   "as often as the largest's (every shard gives a batch as many rows): give the shards files of "
                   "about equal size, or set data.shard_by=documents")
    return lines

  def close(self) -> None:
    if self.pool is not None:
      self.pool.close()

  def __next__(self) -> dict:
    return _concatenate([next(stream) for stream in self.streams])

  def state(self) -> dict:
    """The states of this host's shards (cheap: called after every batch)."""
    return {"shards": [stream.state() for stream in self.streams]}

  def restore(self, state: dict) -> None:
    """Continues from a `global_state()` record (a bare stream state is a one-shard record)."""
    shards = state["shards"] if "shards" in state else [state]
    if len(shards) != self.count:
      raise UserError(f"the checkpointed data state has {len(shards)} shards, this run {self.count}; "
                      f"set --config.data.shards={len(shards)} to resume it")
    for i, stream in zip(self.shards, self.streams):
      stream.restore(shards[i])


def global_state(local_state: dict) -> dict:
  """Every host's shard states in shard order (a collective: all hosts call it at the same step).

  Checkpoints store this: orbax writes JSON items from process 0 alone.
  """
  if jax.process_count() == 1:
    return local_state
  keys = sorted(local_state["shards"][0])
  values = np.array([[state[k] for k in keys] for state in local_state["shards"]], np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(values)).reshape(-1, len(keys))
  return {"shards": [dict(zip(keys, map(int, row))) for row in gathered]}


def fixed_batches(source: Sequence, tokenizer, data_config, *, global_batch_size: int, num_batches: int,
                  seed: int) -> tuple:
  """(this host's rows of `num_batches` fixed held-out batches, whether they hold an example twice), by
  `pipeline.fixed_batches` per shard."""
  shards, count = host_shards(data_config.shards)
  batch_size = _shard_batch_size(global_batch_size, count, "eval_batch_size")
  per_shard = [pipeline.fixed_batches(source, tokenizer, data_config, batch_size=batch_size, num_batches=num_batches,
                                      seed=seed, process_index=i, process_count=count) for i in shards]
  return ([_concatenate(list(batches)) for batches in zip(*(b for b, _ in per_shard))],
          any(repeated for _, repeated in per_shard))
