"""launch/*.sh: the commands their dry runs print, their flag errors, and shellcheck."""
import glob
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from test_glue_finetune import glue_dir, tiny_overrides, vocab_dir  # noqa: F401  (fixtures)

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
  srun = shlex.split(next(line for line in lines if line.startswith("srun ")).removesuffix(" &"))
  assert srun[-6:] == ["bipft", *BIPFT, "--workdir", "/shared/run"]


FAKE_SRUN = """#!/usr/bin/env bash
# srun as the test drives it: records its command; FAKE_SRUN=run waits for a SIGTERM (the run saves and
# exits 143), FAKE_SRUN=EXIT exits with that code at once.
trap 'echo TERM >> "$FAKE_LOG"; exit 143' TERM
echo "srun $*" >> "$FAKE_LOG"
[[ $FAKE_SRUN == run ]] || exit "$FAKE_SRUN"
while true; do sleep 0.05; done
"""


@pytest.mark.parametrize("srun, usr1, code, requeued", [
    ("run", True, 143, True),     # the time limit: SIGUSR1 to the shell, SIGTERM to the run, requeued
    ("143", False, 143, False),   # a scancel's SIGTERM reached the run alone: not requeued
    ("0", False, 0, False),       # training ended
    ("1", False, 1, False),       # a failure
])
def test_gpu_slurm_batch_script_stops_the_run_before_the_time_limit_and_requeues_it(tmp_path, srun, usr1, code,
                                                                                    requeued):
  fake_bin = tmp_path / "venv" / "bin"
  fake_bin.mkdir(parents=True)
  (fake_bin / "activate").write_text(f'export PATH="{fake_bin}:$PATH"\n')
  (fake_bin / "srun").write_text(FAKE_SRUN)
  (fake_bin / "scontrol").write_text('#!/usr/bin/env bash\necho "scontrol $*" >> "$FAKE_LOG"\n')
  for tool in ("srun", "scontrol"):
    os.chmod(fake_bin / tool, 0o755)
  run = _launch("gpu_slurm.sh", "--dry-run", "--requeue", "--stop-before", "120", "--venv", str(tmp_path / "venv"),
                "--workdir", "/shared/run", "--", *BIPFT)
  assert run.returncode == 0, run.stderr
  assert {"#SBATCH --signal=B:USR1@120", "#SBATCH --requeue", "#SBATCH --open-mode=append"} <= set(
      run.stdout.splitlines())
  log = tmp_path / "log"
  env = {**os.environ, "FAKE_LOG": str(log), "FAKE_SRUN": srun, "SLURM_JOB_ID": "4242"}
  shell = subprocess.Popen(["bash", "-c", run.stdout], env=env, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 30
  while not log.exists() and time.time() < deadline:  # srun has started
    time.sleep(0.05)
  if usr1:
    shell.send_signal(signal.SIGUSR1)  # what SLURM sends 120 s before the limit
  assert shell.wait(timeout=30) == code
  calls = log.read_text().splitlines()
  assert calls[0] == "srun --kill-on-bad-exit=1 bipft " + " ".join(BIPFT) + " --workdir /shared/run"
  assert calls[1:] == (["TERM", "scontrol requeue 4242"] if requeued else [])
  stderr = shell.stderr.read()
  assert ("requeueing job 4242 to resume it" in stderr) == requeued


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
    ("gpu_slurm.sh", ["--stop-before", "5m", "--workdir", "/w", "--", "pretrain"],
     "--stop-before takes seconds >= 0, got 5m"),
    ("gpu_slurm.sh", ["--requeue", "--stop-before", "0", "--workdir", "/w", "--", "pretrain"],
     "--requeue needs --stop-before > 0"),
    ("local.sh", ["--processes", "0", "--", "pretrain"], "positive integer, got 0"),
    ("local.sh", ["--what"], "unknown option --what"),
    ("glue.sh", ["--tasks", "rte"], "give --out DIR"),
    ("glue.sh", ["--out", "runs", "--tasks", "rte,mnli-mm"], "unknown GLUE task 'mnli-mm'; choose from cola"),
    ("glue.sh", ["--out", "runs", "--seeds", "1,two"], "--seeds takes comma-separated integers >= 0, got '1,two'"),
    # Options after -- that would replace what the script sets for each run (every --seeds run given
    # one seed, its report's spread no spread over seeds).
    ("glue.sh", ["--out", "runs", "--seeds", "1,2", "--", "--config.epochs=3", "--config.seed", "7"],
     "--config.seed after -- would override what glue.sh sets for each run from --seeds: give it there"),
    ("glue.sh", ["--out", "runs", "--", "--workdir=elsewhere"],
     "--workdir after -- would override what glue.sh sets for each run from --out and --tasks"),
    ("glue.sh", ["--out", "runs", "--data", "glue_data", "--", "--config.data.path=other"],
     "--config.data.path after -- would override what glue.sh sets for each run from --data"),
])
def test_bad_flags_exit_2_with_one_line(script, args, message):
  run = _launch(script, "--dry-run", *args)
  assert run.returncode == 2 and run.stdout == ""
  assert len(run.stderr.splitlines()) == 1 and message in run.stderr, run.stderr


@pytest.mark.parametrize("script", ["tpu_pod.sh", "gpu_slurm.sh", "local.sh", "glue.sh"])
def test_help_lists_the_dry_run(script):
  run = _launch(script, "--help")
  assert run.returncode == 0 and run.stdout.startswith("Usage:") and "--dry-run" in run.stdout


def test_scripts_are_shellcheck_clean():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed")
  run = subprocess.run(["shellcheck", *SCRIPTS], capture_output=True, text=True, timeout=60)
  assert run.returncode == 0, run.stdout


def test_glue_dry_run_prints_a_finetune_per_task_and_the_report(tmp_path):
  (tmp_path / "rte").mkdir()
  (tmp_path / "rte" / "results.json").write_text("{}")  # finished: skipped, but in the report
  run = _launch("glue.sh", "--dry-run", "--out", str(tmp_path), "--init_from", "runs/pre", "--data", "glue_data",
                "--", "--config.seed=1")
  assert run.returncode == 0, run.stderr
  commands = [shlex.split(line) for line in run.stdout.splitlines()]
  tasks = ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "wnli"]
  config = os.path.join(REPO, "configs", "glue.py")
  assert commands[:-1] == [["bipft", "finetune", "--config", f"{config}:task={task}", "--workdir",
                            str(tmp_path / task), "--init_from", "runs/pre", "--config.data.path=glue_data",
                            "--config.seed=1"] for task in tasks]
  assert commands[-1] == ["bipft", "glue-report", "--workdirs", *[str(tmp_path / t) for t in tasks[:7]],
                          str(tmp_path / "rte"), str(tmp_path / "wnli"), "--submission_dir",
                          str(tmp_path / "submission"), "--overwrite"]
  assert f"rte already finished ({tmp_path / 'rte'}/results.json): skipped" in run.stderr


def test_glue_dry_run_with_seeds_runs_each_task_once_a_seed(tmp_path):
  (tmp_path / "rte-seed2").mkdir()
  (tmp_path / "rte-seed2" / "results.json").write_text("{}")
  run = _launch("glue.sh", "--dry-run", "--out", str(tmp_path), "--tasks", "rte,mrpc", "--seeds", "1,2",
                "--", "--config.epochs=3")
  assert run.returncode == 0, run.stderr
  commands = [shlex.split(line) for line in run.stdout.splitlines()]
  config = os.path.join(REPO, "configs", "glue.py")
  runs = [("rte", 1), ("mrpc", 1), ("mrpc", 2)]
  assert commands[:-1] == [["bipft", "finetune", "--config", f"{config}:task={task}", "--workdir",
                            str(tmp_path / f"{task}-seed{seed}"), f"--config.seed={seed}", "--config.epochs=3"]
                           for task, seed in runs]
  assert commands[-1][:3] == ["bipft", "glue-report", "--workdirs"]
  assert commands[-1][3:7] == [str(tmp_path / name) for name in ("rte-seed1", "rte-seed2", "mrpc-seed1", "mrpc-seed2")]


def test_glue_runs_every_task_goes_on_past_a_failure_and_reports(glue_dir, vocab_dir, tmp_path):
  (tmp_path / "rte").write_text("a file where rte's workdir would go")  # its finetune fails
  overrides = [f"--config.{o}" for o in tiny_overrides(glue_dir, vocab_dir, "epochs=1", "steps_per_epoch=1")]
  env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
  run = subprocess.run([os.path.join(REPO, "launch", "glue.sh"), "--out", str(tmp_path), "--tasks", "rte,sst2",
                        "--", *overrides], capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
  assert run.returncode == 1, run.stderr
  assert "bipft finetune: error: " in run.stderr
  assert run.stderr.splitlines()[-1] == ("glue.sh: rte did not finish (their errors above); run the same command "
                                         "again to retry them")
  assert (tmp_path / "sst2" / "results.json").is_file()
  report = (tmp_path / "report.md").read_text()
  assert "SST-2" in report and report in run.stdout
  assert os.listdir(tmp_path / "submission") == ["SST-2.tsv"]
  written = tmp_path / "sst2" / "submission" / "SST-2.tsv"
  assert (tmp_path / "submission" / "SST-2.tsv").read_text() == written.read_text()


FAKE_BIPFT = """#!/usr/bin/env python3
# A stand-in for bipft: says whether it can see a Ctrl-C, then waits for a signal and exits with its
# code, or with FAKE_EXIT's (a task that finished as the signal came).
import os, signal, sys, time
log = open(os.environ["FAKE_LOG"], "a", buffering=1)
ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
def stop(signum, frame):
  log.write(f"got {signal.Signals(signum).name}\\n")
  sys.exit(int(os.environ.get("FAKE_EXIT", 128 + signum)))
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGHUP, stop)
log.write(f"started {sys.argv[1]} SIGINT {'ignored' if ignored else 'seen'}\\n")  # the test signals after it
time.sleep(60)
"""


def start_glue_on_the_stand_in(tmp_path, **env):
  """glue.sh on rte then sst2 with FAKE_BIPFT as bipft, once the stand-in for rte has started."""
  (tmp_path / "bin").mkdir()
  (tmp_path / "bin" / "bipft").write_text(FAKE_BIPFT)
  (tmp_path / "bin" / "bipft").chmod(0o755)
  log = tmp_path / "log"
  env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(log), **env}
  script = subprocess.Popen([os.path.join(REPO, "launch", "glue.sh"), "--out", str(tmp_path / "runs"), "--tasks",
                             "rte,sst2"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a terminal gives it
  deadline = time.time() + 30
  while not (log.exists() and "started" in log.read_text()) and time.time() < deadline:
    time.sleep(0.05)
  return script, log


@pytest.mark.parametrize("signum, to_group", [(signal.SIGTERM, False), (signal.SIGINT, True), (signal.SIGHUP, True)],
                         ids=["SIGTERM to the script", "Ctrl-C to the process group", "a hangup of the terminal"])
def test_glue_passes_a_stop_signal_to_the_running_task_and_exits_with_its_code(tmp_path, signum, to_group):
  script, log = start_glue_on_the_stand_in(tmp_path)
  os.killpg(script.pid, signum) if to_group else os.kill(script.pid, signum)
  _, err = script.communicate(timeout=30)
  assert script.returncode == 128 + signum, err
  assert log.read_text().splitlines() == ["started finetune SIGINT seen", f"got {signum.name}"]  # sst2 never ran
  assert err.strip() == "glue.sh: stopped during rte; run the same command again to resume"


def test_glue_stops_after_a_task_that_finished_as_the_signal_came(tmp_path):
  # The signal is remembered: a task ending normally does not let the script start the next one.
  script, log = start_glue_on_the_stand_in(tmp_path, FAKE_EXIT="0")
  os.kill(script.pid, signal.SIGTERM)
  _, err = script.communicate(timeout=30)
  assert script.returncode == 143, err
  assert log.read_text().splitlines() == ["started finetune SIGINT seen", "got SIGTERM"]
  assert err.strip() == "glue.sh: stopped before sst2; run the same command again to resume"
