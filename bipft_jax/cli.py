"""The `bipft` command line: one subcommand per job, each in its own module.

A subcommand module defines `add_arguments(parser)` and `run(args) -> int`; it is imported only
when used, so `bipft --help` stays fast. Bad input raises `UserError`: one line, exit code 2; a write
the machine refused (`WriteFailed`, or any error carrying a full disk's error number) or a resource it
took away (`HostFailed`) or a device's memory that ran out (`errors.out_of_memory`): one line, exit code 1. A Ctrl-C outside a training loop (whose first Ctrl-C saves, `distributed.StopSignals`):
one line, exit code 130, what was written complete (every file is written atomically); a SIGTERM there
the same, exit code 143 (left to its default action, it would kill the process mid-write and leave its
temporary file behind), and a SIGHUP (a console that hung up: console.py) exit code 129. In a
multi-process job a failed process ends the others with its line (`distributed.leave_job`).
"""
import argparse
import importlib
import os
import signal
import sys

from bipft_jax import __version__, console, errors, hugepages
from bipft_jax.config_loading import split_overrides
from bipft_jax.errors import UserError, WriteFailed

# name -> (module, one-line help), in the order of a user's work. Subcommands register here.
COMMANDS = {
    "pretrain": ("bipft_jax.train", "distil the 1-bit student from a full-precision teacher (orbax checkpoints, resumable)"),
    "finetune": ("bipft_jax.glue.finetune", "finetune on a GLUE task (or rt_demo) and evaluate every epoch"),
    "evaluate": ("bipft_jax.evaluate", "score a checkpoint: GLUE dev metrics (and test predictions) or held-out MLM accuracy"),
    "predict": ("bipft_jax.predict", "label texts of your own with a finetuned classifier (a checkpoint, or a "
                "packed file run 1-bit), or fill their [MASK]s with a pretrained model"),
    "export-packed": ("bipft_jax.packed_export", "bit-packed 1-bit export (safetensors) with sizes vs FP32"),
    "glue-report": ("bipft_jax.glue.report", "markdown table of finetuning runs and GLUE leaderboard files"),
    "convert": ("bipft_jax.convert", "convert checkpoints: orbax <-> PyTorch (Hugging Face or release names)"),
    "eval-pytorch": ("bipft_jax.eval_pytorch", "score a PyTorch export on a GLUE dev set with the JAX run's data and metrics"),
    "summary": ("bipft_jax.summary", "parameters, memory and OPs per layer of a 1-bit model vs its FP twin"),
    "simulate-mesh": ("bipft_jax.simulate_mesh", "run a command on a mesh's real topology in local processes "
                      "and check its losses equal one device's"),
    "track": ("bipft_jax.track", "every binarizer through the same pretraining and finetuning: one table"),
    "study": ("bipft_jax.study", "BiPFT vs binarizing per task on offline data sets: seeds, a learning-rate "
              "sweep, tables and plots (resumable)"),
}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="bipft", description="BiPFT binary BERT in JAX: pretrain, finetune, evaluate, convert, export.")
  parser.add_argument("--version", action="version", version=f"bipft-jax {__version__}")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name, (module_name, help_text) in COMMANDS.items():
    sub.add_parser(name, help=help_text, add_help=False)
  return parser


def main(argv=None) -> int:
  command_line = argv is None  # the `bipft` command itself, not a caller's main([...])
  if command_line:
    try:
      hugepages.reexec_with_hugepages()
    except UserError as e:
      print(f"bipft: error: {e}", file=sys.stderr)
      return 2
    signal.signal(signal.SIGTERM, _terminate)  # only here: a driver's in-process commands keep its handler
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:  # not under nohup
      signal.signal(signal.SIGHUP, _terminate)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where the shell ignores it
      signal.signal(signal.SIGINT, errors.interrupt)
  argv = sys.argv[1:] if argv is None else list(argv)
  # transformers serves tokenizers here; without the torch extra it would advise on every run that
  # "PyTorch was not found".
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  parser = build_parser()
  if not argv or argv[0] not in COMMANDS:
    parser.parse_args(argv or ["--help"])  # prints help/version, or the usage error (exit 2)
    return 2
  name, rest = argv[0], argv[1:]
  unexpected = None  # an error of ours, shown with its traceback
  try:
    module = importlib.import_module(COMMANDS[name][0])  # seconds of imports: a Ctrl-C may come here
    sub = argparse.ArgumentParser(prog=f"bipft {name}", description=COMMANDS[name][1],
                                  epilog=usage_examples(module.__doc__),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(sub)
    rest, overrides = split_overrides(rest)
    args = sub.parse_args(rest)
    args.config_overrides = overrides  # --config.field=value items, for load_config
    return int(module.run(args) or 0)
  except (UserError, WriteFailed, errors.HostFailed) as e:
    failure = e
    code, line = (2 if isinstance(e, UserError) else 1), f"bipft {name}: error: {e}"
  except (KeyboardInterrupt, errors.Terminated) as e:
    failure = e
    errors.RECEIVED.clear()  # handled
    code = errors.signal_exit_code(signal.SIGINT if isinstance(e, KeyboardInterrupt) else e.signum)
    line = f"bipft {name}: stopped by {errors.STOPPED[code]}"
  except Exception as e:
    failure = e
    if errors.os_error_code(e) in errors.WRITE_REFUSED:
      code, line = 1, f"bipft {name}: error: the file system refused a write: {errors.first_line(e)}"
    elif errors.out_of_memory(e):
      code, line = 1, f"bipft {name}: error: {errors.OUT_OF_MEMORY_ADVICE} ({errors.first_line(e)})"
    elif _several_processes():
      unexpected, code, line = e, 1, f"bipft {name}: error: {errors.first_line(e)} (its traceback above)"
    else:
      raise
  if _several_processes():  # the others wait for this process in a collective: end them too
    sys.modules["bipft_jax.distributed"].leave_job(line, code, unexpected)
  print(line, file=sys.stderr)
  if command_line and isinstance(failure, WriteFailed):  # the failed save's threads in orbax would log
    sys.stdout.flush()  # their ends after this line as the interpreter exits; our files are closed by now
    sys.stderr.flush()
    os._exit(code)
  return code


def usage_examples(docstring: str | None) -> str | None:
  """The examples `bipft CMD --help` ends with: the indented lines that follow the first line of the
  subcommand module's docstring."""
  block = []
  for line in (docstring or "").splitlines()[1:]:
    if line.strip() and not line.startswith("  "):
      break
    block.append(line)
  text = "\n".join(block).strip("\n")
  return f"examples:\n{text}" if text else None


def _terminate(signum: int, _) -> None:
  """The SIGTERM and SIGHUP handler outside training loops; a second one kills at once, as by default."""
  signal.signal(signum, signal.SIG_DFL)
  errors.RECEIVED.append(signum)
  if signum == signal.SIGHUP:
    console.detach_lost()  # the command's last line has somewhere to go
  raise errors.Terminated(signum)


def _several_processes() -> bool:
  """Whether this process is one of a multi-process job (only a job that imported jax can be one)."""
  distributed = sys.modules.get("bipft_jax.distributed")
  return distributed is not None and distributed.several_processes()


if __name__ == "__main__":
  sys.exit(main())
