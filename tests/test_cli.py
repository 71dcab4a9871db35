"""The installed `bipft` command: help, version, one-line errors with exit code 2 (bad input) or 1 (a
write the file system refused)."""
import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import bipft_jax
from bipft_jax import cli, model, pytorch_io


def _bipft(*args: str) -> subprocess.CompletedProcess:
  """Runs the console script that `pip install` put beside this Python."""
  script = shutil.which("bipft", path=os.path.dirname(sys.executable))
  if script is None:
    pytest.fail(f"no bipft console script beside {sys.executable}: run pip install -e . first")
  return subprocess.run([script, *args], capture_output=True, text=True, timeout=300)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
  assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, result.stderr
  assert "error:" in lines[0]
  return lines[0]


def test_help_lists_every_command():
  result = _bipft("--help")
  assert result.returncode == 0, result.stderr
  assert cli.COMMANDS, "no subcommands registered"
  for name in cli.COMMANDS:
    assert name in result.stdout


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_help_ends_with_examples_of_it(name, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main([name, "--help"])
  assert exit_info.value.code == 0
  examples = capsys.readouterr().out.split("\nexamples:\n")[1].splitlines()
  assert any(line.startswith(f"  bipft {name} ") or f"| bipft {name} " in line for line in examples), examples


def test_version():
  result = _bipft("--version")
  assert result.returncode == 0
  assert result.stdout.strip() == f"bipft-jax {bipft_jax.__version__}"


def test_unknown_command_is_a_usage_error():
  result = _bipft("no-such-command")
  assert result.returncode == 2
  assert "invalid choice" in result.stderr


def _import(src: pathlib.Path, out: pathlib.Path) -> str:
  line = _one_error_line(_bipft("convert", "from-pytorch", "--src", str(src), "--out", str(out)))
  assert not out.exists(), "a failed import must not leave a workdir behind"
  return line


def test_import_of_a_missing_directory(tmp_path):
  assert f"{tmp_path / 'nowhere'} does not exist" in _import(tmp_path / "nowhere", tmp_path / "out")


def test_import_of_a_directory_without_config(tmp_path):
  (tmp_path / "ckpt").mkdir()
  assert "config.json is missing" in _import(tmp_path / "ckpt", tmp_path / "out")


def test_import_of_corrupt_weights(tmp_path):
  src = tmp_path / "ckpt"
  src.mkdir()
  (src / "config.json").write_text(json.dumps({"hidden_size": 16, "num_attention_heads": 2}))
  (src / "model.safetensors").write_bytes(b"these are not tensors")
  assert "model.safetensors is not a readable safetensors file" in _import(src, tmp_path / "out")


def test_import_of_weights_that_do_not_fit(tmp_path):
  tiny = model.BertConfig(vocab_size=40, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                          max_position_embeddings=16)
  src = tmp_path / "ckpt"
  src.mkdir()
  hf_config = {theirs: getattr(tiny, ours) for theirs, ours in pytorch_io.HF_CONFIG_FIELDS.items()}
  (src / "config.json").write_text(json.dumps(hf_config))
  from safetensors.numpy import save_file
  save_file({"embeddings.word_embeddings.weight": np.zeros((41, 16), np.float32)},
            str(src / "model.safetensors"))
  line = _import(src, tmp_path / "out")
  assert "shape mismatch for embeddings.word_embeddings.weight: checkpoint (41, 16), model (40, 16)" in line
  assert "missing tensor encoder.layer.0.output.dense.weight" in line


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device", "/out/m.bin"),
                                   OSError(errno.EDQUOT, "Disk quota exceeded", "/out/m.bin")])
def test_a_refused_write_is_one_line_and_exit_1(monkeypatch, capsys, error):
  from bipft_jax import summary

  def run(args):
    raise error
  monkeypatch.setattr(summary, "run", run)
  assert cli.main(["summary", "--config", "unused.py"]) == 1
  assert capsys.readouterr().err == f"bipft summary: error: the file system refused a write: OSError: {error}\n"


def test_a_device_out_of_memory_is_one_line_with_what_to_change(monkeypatch, capsys):
  # XLA's own error, as XLA:CPU raised it for a 256 GiB buffer here (GPU and TPU raise the same status);
  # before, a traceback of jax's internals.
  import jax
  from bipft_jax import summary

  def run(args):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 274877906944 bytes.")
  monkeypatch.setattr(summary, "run", run)
  assert cli.main(["summary", "--config", "unused.py"]) == 1
  assert capsys.readouterr().err == (
      "bipft summary: error: a device ran out of memory: lower batch_size, raise grad_accum_steps (the same batch "
      "in smaller pieces), turn on remat (pretrain: model.remat, finetune: remat), or shard the parameters over an "
      "fsdp mesh axis (configs/meshes.py); a rerun resumes training from its newest checkpoint (JaxRuntimeError: "
      "RESOURCE_EXHAUSTED: Out of memory allocating 274877906944 bytes.)\n")


def test_other_errors_keep_their_traceback(monkeypatch):
  from bipft_jax import summary

  def run(args):  # a bug, or a read that failed: not the file system refusing a write
    raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/in/x")
  monkeypatch.setattr(summary, "run", run)
  with pytest.raises(FileNotFoundError):
    cli.main(["summary", "--config", "unused.py"])


# `bipft summary` stands in for any command that writes: it writes OUT (a file or a folder) the way
# every command does, and a SIGTERM (or SIGHUP) arrives in the middle of the write.
_SIGNAL_MID_WRITE = textwrap.dedent("""
  import os, signal, sys, time
  from bipft_jax import cli, files, summary
  def write_slowly(f):
    f.write("half of it")
    f.flush()
    os.kill(os.getpid(), int(os.environ["SIGNAL"]))
    time.sleep(60)
    f.write(" and the rest")
  def run(args):
    out = os.environ["OUT"]
    if out.endswith("/"):
      with files.atomic_folder(out) as folder, open(os.path.join(folder, "part"), "w") as f:
        write_slowly(f)
    else:
      with files.atomic_write(out) as f:
        write_slowly(f)
  summary.run = run
  sys.argv[0] = "bipft"
  sys.exit(cli.main())
""")


@pytest.mark.parametrize("target, signum", [("earlier.json", signal.SIGTERM), ("new_folder/", signal.SIGTERM),
                                            ("earlier.json", signal.SIGHUP)])
def test_a_sigterm_or_hangup_outside_training_removes_the_half_written_output(tmp_path, target, signum):
  # The default action killed the process mid-write: no word, and the temporary file left beside the
  # output. Now it unwinds like a Ctrl-C: one line, exit code 143 (129), the earlier file as it was.
  (tmp_path / "earlier.json").write_text('{"kept": true}')
  env = {**os.environ, "OUT": str(tmp_path / target), "SIGNAL": str(int(signum))}
  result = subprocess.run([sys.executable, "-c", _SIGNAL_MID_WRITE, "summary", "--config", "unused.py"],
                          env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 128 + signum, result.stderr
  assert result.stderr == f"bipft summary: stopped by {signum.name}\n"
  assert sorted(os.listdir(tmp_path)) == ["earlier.json"]
  assert (tmp_path / "earlier.json").read_text() == '{"kept": true}'
