"""The runs' one metrics writer: WORKDIR/metrics.jsonl and TensorBoard scalars (WORKDIR/tensorboard).

Process 0 writes; other hosts' writers do nothing. Records may nest (a finetuning epoch's
{"dev": {"dev_matched": {"accuracy": ...}}}): metrics.jsonl keeps them as they are, TensorBoard gets
every number under its path joined by "/". Object stores (gs://) cannot append to a file, so there
metrics.jsonl is rewritten whole on every record; local files are appended to. (clu's
metric_writers does the same job but would add a dependency, and TensorFlow for its summaries.)

A resumed run writes the steps after its checkpoint again, so the writer first drops the records a
killed run wrote after that step (and a line cut short by the kill), and those of that step the run
writes again (a pretraining's evaluation at its start), and TensorBoard hides that run's events from
there on (`purge_step`): the log holds each step once, as the resumed run saw it.
"""
import json
import os
from numbers import Number
from typing import Callable

from etils import epath

from bipft_jax import distributed, files


def _scalars(record: dict, prefix: str = "") -> dict:
  """The numbers of a (nested) record by their "/"-joined paths."""
  out = {}
  for key, value in record.items():
    if isinstance(value, dict):
      out.update(_scalars(value, f"{prefix}{key}/"))
    elif isinstance(value, Number) and not isinstance(value, bool):
      out[f"{prefix}{key}"] = float(value)
  return out


def _kept(line: str, start_step: int, rewritten: Callable[[dict], bool]) -> bool:
  """Whether a metrics.jsonl line stays for a run resuming at `start_step`: a record of an earlier step,
  or of that step unless `rewritten` (the run writes it again); not a line cut short or not a record."""
  try:
    record = json.loads(line)
    step = record["step"]
  except (ValueError, TypeError, KeyError):
    return False
  if not isinstance(step, Number) or isinstance(step, bool):
    return False
  return step < start_step or (step == start_step and not rewritten(record))


class MetricsWriter:
  """Appends one JSON record per call to metrics.jsonl and its numbers to TensorBoard."""

  def __init__(self, workdir: str, start_step: int = 0, rewritten: Callable[[dict], bool] = lambda record: False):
    """`start_step`: the step the run starts from (a resumed run's checkpoint); records after it go,
    and those of it that `rewritten` says the run writes again."""
    self.active = distributed.is_primary()
    if self.active:
      from tensorboardX import SummaryWriter
      self.path = epath.Path(workdir) / "metrics.jsonl"
      self.rewrite = "://" in workdir
      text = self.path.read_text() if self.path.exists() else ""
      kept = "".join(line for line in text.splitlines(keepends=True) if _kept(line, start_step, rewritten))
      self.text = kept if self.rewrite else ""
      if not self.rewrite and kept != text:
        with files.atomic_write(os.fspath(self.path)) as f:
          f.write(kept)
      self.jsonl = None if self.rewrite else open(self.path, "a")
      self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)

  def write(self, step: int, record: dict) -> None:
    if not self.active:
      return
    line = json.dumps({"step": step, **record}) + "\n"
    if self.rewrite:
      self.text += line
      self.path.write_text(self.text)
    else:
      self.jsonl.write(line)
      self.jsonl.flush()
    for name, value in _scalars(record).items():
      self.tensorboard.add_scalar(name, value, step)
    self.tensorboard.flush()

  def close(self) -> None:
    if self.active:
      if self.jsonl:
        self.jsonl.close()
      self.tensorboard.close()
