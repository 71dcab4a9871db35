"""launch/*.sh: the commands their dry runs print, their flag errors, and shellcheck."""
import glob
import os
import shlex
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "launch", "*.sh")))
BIPFT = ["pretrain", "--config", "configs/pretrain.py:base,mesh=v4-32"]


def _launch(script: str, *args) -> subprocess.CompletedProcess:
  return subprocess.run([os.path.join(REPO, "launch", script), *args], capture_output=True, text=True,
                        timeout=60, cwd=REPO)


def _sublist(needle: list, haystack: list) -> bool:
  return any(haystack[i:i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


def test_tpu_pod_dry_run_prints_the_gcloud_commands_for_the_pod():
  run = _launch("tpu_pod.sh", "--dry-run", "--name", "bipft-v4", "--zone", "us-central2-b", "--accelerator",
                "v4-32", "--project", "my-project", "--spot", "--workdir", "gs://bucket/runs/base", "--", *BIPFT)
  assert run.returncode == 0, run.stderr
  commands = [shlex.split(line) for line in run.stdout.splitlines()]
  gcloud = [c for c in commands if c[0] == "gcloud"]
  assert [c[:5] for c in gcloud] == [["gcloud", "compute", "tpus", "tpu-vm", verb]
                                     for verb in ("create", "scp", "ssh", "ssh")]
  create, scp, setup, train = gcloud
  assert create[5] == "bipft-v4" and {"--zone=us-central2-b", "--project=my-project", "--accelerator-type=v4-32",
                                      "--spot"} <= set(create)
  for command in (scp, setup, train):
    assert {"--worker=all", "--zone=us-central2-b", "--project=my-project"} <= set(command)
  assert scp[5].endswith(".tar.gz") and scp[6] == "bipft-v4:bipft-jax-src.tar.gz"
  assert setup[5] == train[5] == "bipft-v4"
  remote = shlex.split(next(a for a in train if a.startswith("--command=")).split("=", 1)[1])
  # Every worker runs the same bipft command, with the workdir and the multi-host switch.
  assert _sublist(["BIPFT_DISTRIBUTED=1", "bipft", *BIPFT, "--workdir", "gs://bucket/runs/base"], remote), remote


def test_gpu_slurm_dry_run_prints_the_batch_script():
  run = _launch("gpu_slurm.sh", "--dry-run", "--nodes", "4", "--gpus-per-node", "8", "--partition", "a100",
                "--workdir", "/shared/run", "--", *BIPFT)
  assert run.returncode == 0, run.stderr
  lines = run.stdout.splitlines()
  assert {"#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --partition=a100",
          "export BIPFT_DISTRIBUTED=1"} <= set(lines)
  srun = shlex.split(next(line for line in lines if line.startswith("srun")))
  assert srun[-6:] == ["bipft", *BIPFT, "--workdir", "/shared/run"]


def test_local_dry_run_prints_one_process_per_rank():
  run = _launch("local.sh", "--dry-run", "--processes", "3", "--port", "23456", "--", *BIPFT)
  assert run.returncode == 0, run.stderr
  commands = [shlex.split(line.rstrip("&")) for line in run.stdout.splitlines()]
  assert len(commands) == 3
  for rank, command in enumerate(commands):
    assert {"BIPFT_DISTRIBUTED=1", "BIPFT_COORDINATOR=localhost:23456", "BIPFT_NUM_PROCESSES=3",
            f"BIPFT_PROCESS_ID={rank}"} <= set(command)
    assert command[-3:] == BIPFT


@pytest.mark.parametrize("script, args, message", [
    ("tpu_pod.sh", ["--bogus"], "unknown option --bogus"),
    ("tpu_pod.sh", ["--name", "pod", "--workdir", "gs://b/r", "--", "pretrain"], "--zone is required"),
    ("tpu_pod.sh", ["--name", "pod", "--zone", "z", "--workdir", "gs://b/r"], "give the bipft command"),
    ("gpu_slurm.sh", ["--nodes", "two", "--workdir", "/w", "--", "pretrain"], "positive integers, got two"),
    ("gpu_slurm.sh", ["--", "pretrain"], "--workdir is required"),
    ("local.sh", ["--processes", "0", "--", "pretrain"], "positive integer, got 0"),
    ("local.sh", ["--what"], "unknown option --what"),
])
def test_bad_flags_exit_2_with_one_line(script, args, message):
  run = _launch(script, "--dry-run", *args)
  assert run.returncode == 2 and run.stdout == ""
  assert len(run.stderr.splitlines()) == 1 and message in run.stderr, run.stderr


@pytest.mark.parametrize("script", ["tpu_pod.sh", "gpu_slurm.sh", "local.sh"])
def test_help_lists_the_dry_run(script):
  run = _launch(script, "--help")
  assert run.returncode == 0 and run.stdout.startswith("Usage:") and "--dry-run" in run.stdout


def test_scripts_are_shellcheck_clean():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed")
  run = subprocess.run(["shellcheck", *SCRIPTS], capture_output=True, text=True, timeout=60)
  assert run.returncode == 0, run.stdout
