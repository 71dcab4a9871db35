"""Running `bipft` commands inside this process (`cli.main`) and reading what they write: the
drivers of other commands (`bipft track`, `bipft study`) run the same commands a user would, with the
same arguments, so what they measure is what a user gets."""
import contextlib
import io
import json
import os
import signal
import statistics
import sys
from typing import Iterator

from bipft_jax import cli, config_loading, console
from bipft_jax.errors import STOPPED, Stopped


def override_args(overrides) -> list:
  """`--config.a.b=value` arguments of a (nested) ConfigDict of overrides."""
  flat = {}

  def walk(node, prefix):
    for key, value in node.items():
      if hasattr(value, "items"):
        walk(value, f"{prefix}{key}.")
      else:
        flat[f"{prefix}{key}"] = value
  walk(overrides, "")
  return [f"{config_loading.OVERRIDE_PREFIX}{key}={value}" for key, value in flat.items()]


def config_with_overrides(config_arg: str, overrides):
  """The config a command given `--config CONFIG_ARG` and `override_args(overrides)` runs with."""
  return config_loading.load_config(config_arg, [a[len(config_loading.OVERRIDE_PREFIX):]
                                                 for a in override_args(overrides)])


class _Tee(io.TextIOBase):
  """A stream writing to `stream` and keeping a copy (a command's error line, besides the console)."""

  def __init__(self, stream):
    self.stream, self.copy = stream, io.StringIO()

  def write(self, text: str) -> int:
    self.copy.write(text)
    return self.stream.write(text)

  def flush(self) -> None:
    self.stream.flush()

  def isatty(self) -> bool:
    return self.stream.isatty()

  def getvalue(self) -> str:
    return self.copy.getvalue()


def run_command(argv: list, quiet: bool = False) -> tuple:
  """(exit code, stdout text, error message or None) of `bipft ARGV` run in this process; `quiet`
  keeps its output off the console. `Stopped` if a SIGTERM or Ctrl-C stopped the command (a training
  loop saves first): the driver stops too."""
  out, err = (io.StringIO(), io.StringIO()) if quiet else (_Tee(sys.stdout), _Tee(sys.stderr))
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.main(argv)
  if code in STOPPED:
    raise Stopped(code)
  prefix = f"bipft {argv[0]}: error: "
  errors = [line[len(prefix):] for line in err.getvalue().splitlines() if line.startswith(prefix)]
  return code, out.getvalue(), (errors[-1] if errors else f"exit code {code}") if code else None


@contextlib.contextmanager
def signals_between_commands() -> Iterator[list]:
  """For a driver of commands: a SIGTERM or SIGHUP outside their training loops (which save and stop
  on their own: `Stopped`) is noted in the list this yields instead of killing the driver mid-way
  without a word, so the driver can finish and record what it is doing, then stop."""
  noted = []

  def note(signum, _):
    if signum == signal.SIGHUP:
      console.detach_lost()  # the driver's last lines have somewhere to go
    noted.append(signum)

  previous = {signum: signal.signal(signum, note) for signum in (signal.SIGTERM, signal.SIGHUP)
              if signal.getsignal(signum) != signal.SIG_IGN}
  try:
    yield noted
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


def read_jsonl(path: str) -> list:
  """The records of a JSON-lines file (metrics.jsonl)."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def pretraining_numbers(workdir: str, tokens_per_step: int) -> dict:
  """Training speed and the final distillation numbers from a pretraining's metrics.jsonl: the last
  logged step's (one batch, with dropout) and the last held-out evaluation's."""
  records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  speeds = [r["tokens_per_second"] for r in records if "tokens_per_second" in r]
  trained = [r for r in records if "rep_dist_loss" in r]
  evaluated = [r for r in records if "eval_mlm_accuracy" in r]
  tokens_per_second = statistics.median(speeds)
  return {"train_tokens_per_second": tokens_per_second,
          # the batch's positions over the rate of its real tokens: padding counted, an upper bound
          "train_step_seconds": tokens_per_step / tokens_per_second,
          "hidden_mse": trained[-1]["rep_dist_loss"], "total_loss": trained[-1]["total_loss"],
          "mlm_accuracy": evaluated[-1]["eval_mlm_accuracy"],
          # the last held-out evaluation's (None from runs before 2026-12-04, which did not measure it)
          "held_out_mse": evaluated[-1].get("eval_rep_dist_loss")}
