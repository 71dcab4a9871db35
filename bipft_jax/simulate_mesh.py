"""`bipft simulate-mesh`: a shipped mesh's real topology on this machine, checked against one device.

  bipft simulate-mesh v4-32 --workdir /tmp/sim -- pretrain --config configs/pretrain.py:tiny ...

Runs the bipft command twice and compares the per-step training losses of the two metrics.jsonl:
on the mesh, in as many local processes as the mesh's machine has hosts (configs/meshes.py), each
with as many CPU devices as a host has chips, joined by jax.distributed (a localhost coordinator,
gloo collectives, the BIPFT_* variables of launch/local.sh); and in one process on one device. The
command should be a tiny model for a few steps: every process compiles and holds the whole program.
`--processes N` runs the same mesh on fewer processes (more devices each) when the real host count
does not fit this machine; the result then says that it is not the real topology.
"""
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

import numpy as np

from bipft_jax import config_loading, files
from bipft_jax.errors import UserError

LOSS_KEYS = ("total_loss", "loss")  # pretrain's and finetune's per-step training loss in metrics.jsonl
# Fields that make a command's batches independent of the number of hosts, set to the process
# count in both runs unless the command sets them: pretrain's default is one data shard per host.
SAME_BATCHES = {"pretrain": "data.shards"}
_DEVICES_FLAG = "--xla_force_host_platform_device_count"
# One compute thread per process: dozens of processes share a few cores, and more threads per
# process only add contention (both runs use it, so the comparison is like for like).
_THREAD_FLAGS = ("--xla_cpu_multi_thread_eigen=false",)
_LOG_TAIL_LINES = 12


def add_arguments(parser) -> None:
  parser.add_argument("mesh", help="a mesh name from the meshes file (configs/meshes.py)")
  parser.add_argument("command", nargs="+", metavar="COMMAND",
                      help="after --: the bipft command and its arguments, without --workdir (pretrain ...)")
  parser.add_argument("--workdir", required=True, help="a new folder: the two runs' workdirs (mesh/, "
                      "one_device/) and every process's log (logs/)")
  parser.add_argument("--meshes", default="configs/meshes.py", help="the meshes file (default: %(default)s)")
  parser.add_argument("--processes", type=int, default=0,
                      help="fewer processes than the mesh's hosts, same mesh (default: the hosts)")
  parser.add_argument("--devices", type=int, default=8,
                      help="the device count of a mesh with a -1 axis (default: %(default)s)")
  parser.add_argument("--rtol", type=float, default=1e-5, help="loss tolerance (default: %(default)s)")
  parser.add_argument("--timeout", type=float, default=3600.0,
                      help="seconds for both runs together, then all is killed (default: %(default)s)")
  parser.add_argument("--min-free-gib", type=float, default=1.0,
                      help="kill every process when the machine's free memory falls below this many GiB "
                           "(default: %(default)s)")


def run(args) -> int:
  # The CLI set every --config.field=value aside; this command has no config: they are the command's.
  command = args.command + [config_loading.OVERRIDE_PREFIX + item for item in args.config_overrides]
  # SIGTERM unwinds like Ctrl-C, through the process groups' kill (an orphaned process would wait
  # forever for the collectives of the ones killed).
  previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
  try:
    result = simulate(args.mesh, command, args.workdir, meshes=args.meshes, processes=args.processes,
                      devices=args.devices, rtol=args.rtol, timeout=args.timeout,
                      min_free=args.min_free_gib * 2**30)
  finally:
    signal.signal(signal.SIGTERM, previous)
  print(result.summary(), flush=True)
  return 0 if result.equal else 1


# ----------------------------------------------------------------------------------------------
# Topology


@dataclasses.dataclass(frozen=True)
class Topology:
  """A mesh's axis sizes and rules and the processes x devices that run it here."""
  name: str
  shape: dict
  rules: tuple
  hosts: int       # the real machine's
  processes: int   # simulated here
  devices_per_process: int

  @property
  def real(self) -> bool:
    return self.processes == self.hosts

  def describe(self) -> str:
    what = f"{self.name}: {self.processes} process{'es' if self.processes > 1 else ''} x " \
        f"{self.devices_per_process} devices"
    return what if self.real else f"{what} (NOT the real topology: the slice has {self.hosts} hosts)"


def topology(name: str, meshes_path: str, processes: int = 0, devices: int = 8) -> Topology:
  """The named mesh's topology: its hosts as processes (or `processes`), the devices split evenly."""
  meshes = config_loading.load_module(meshes_path)
  try:
    mesh, hosts = meshes.get_config(name), meshes.hosts(name)
  except ValueError as e:
    raise UserError(f"{meshes_path}: {e}") from None
  sizes = [int(size) for size in mesh.shape.values()]
  known = int(np.prod([s for s in sizes if s != -1]))
  total = devices if -1 in sizes else known
  processes = processes or hosts
  if total % known or processes < 1 or total % processes:
    raise UserError(f"mesh {name} ({dict(mesh.shape)}, {total} devices) cannot be split over {processes} "
                    "processes; choose --processes dividing the device count")
  return Topology(name, dict(mesh.shape), tuple(mesh.rules), hosts, processes, total // processes)


# ----------------------------------------------------------------------------------------------
# Processes


@dataclasses.dataclass
class Process:
  """One started bipft process: its own process group, output in `log`.out / `log`.err."""
  name: str
  popen: subprocess.Popen
  log: str
  code: Optional[int] = None
  peak_rss: int = 0  # bytes, from the kernel's accounting when the process is reaped

  def tail(self) -> str:
    with open(self.log + ".err", errors="replace") as f:
      lines = [line.rstrip() for line in f.read().splitlines() if line.strip()]
    return "\n".join("  " + line for line in lines[-_LOG_TAIL_LINES:]) or "  (empty)"


def environment(devices: int, distributed: Optional[dict] = None) -> dict:
  """The environment of one process: CPU devices, one compute thread, BIPFT_* only if distributed."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("BIPFT_")}
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICES_FLAG)]
  env["XLA_FLAGS"] = " ".join(flags + [f"{_DEVICES_FLAG}={devices}", *_THREAD_FLAGS])
  env["JAX_PLATFORMS"] = "cpu"
  env.setdefault("MALLOC_ARENA_MAX", "2")  # glibc: fewer per-thread heaps, ~10% less memory per process
  env.update(distributed or {})
  return env


def start(name: str, argv: list, env: dict, logdir: str) -> Process:
  log = os.path.join(logdir, name)
  with open(log + ".out", "w") as out, open(log + ".err", "w") as err:
    popen = subprocess.Popen(argv, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                             start_new_session=True)
  return Process(name, popen, log)


def _reap(process: Process, block: bool) -> bool:
  pid, status, usage = os.wait4(process.popen.pid, 0 if block else os.WNOHANG)
  if not pid:
    return False
  process.code = process.popen.returncode = os.waitstatus_to_exitcode(status)
  process.peak_rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
  return True


def _proc_field(path: str, field: str) -> int:
  """A `Field:  N kB` line of a /proc file in bytes; 0 where /proc is missing (not Linux) or gone."""
  try:
    with open(path) as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError):
    pass
  return 0


def wait_all(processes: list, deadline: float, what: str, min_free: float = 0.0) -> int:
  """Waits for every process until `deadline` (time.monotonic); the first failure, the deadline or
  the machine's free memory falling below `min_free` bytes kills every process group and raises one
  UserError naming the cause and a log's tail. Returns the peak of the processes' private memory
  together (their anonymous RSS, sampled: shared library pages are mapped once for all)."""
  peak = 0
  try:
    while any(p.code is None for p in processes):
      running = [p for p in processes if p.code is None]
      private = sum(_proc_field(f"/proc/{p.popen.pid}/status", "RssAnon") for p in running)
      peak = max(peak, private)
      for p in processes:
        if p.code is None and _reap(p, block=False) and p.code != 0:
          raise UserError(f"{what}: {p.name} exited with code {p.code}; the end of {p.log}.err:\n{p.tail()}")
      free = _proc_field("/proc/meminfo", "MemAvailable")
      if free and free < min_free:
        raise UserError(f"{what}: the machine is down to {free / 2**30:.1f} GiB of free memory with "
                        f"{private / 2**30:.1f} GiB in the run's processes; killed them. Run fewer processes "
                        "(--processes) or free memory")
      if time.monotonic() > deadline:
        names = ", ".join(p.name for p in running[:4]) + (", ..." if len(running) > 4 else "")
        raise UserError(f"{what}: still running at the deadline ({names}); killed; raise --timeout or "
                        f"shrink the command. The end of {running[0].log}.err:\n{running[0].tail()}")
      time.sleep(0.2)
  finally:
    for p in processes:
      if p.code is None:
        os.killpg(p.popen.pid, signal.SIGKILL)
        _reap(p, block=True)
  return peak


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# The two runs and their comparison


@dataclasses.dataclass
class Run:
  """What one run cost: wall time, the peak RSS of each process, the peak of their private memory."""
  seconds: float
  peak_rss: list
  peak_private: int

  def describe(self) -> str:
    return (f"{self.seconds:.0f} s; peak RSS per process {max(self.peak_rss) / 2**20:.0f} MiB, "
            f"{sum(self.peak_rss) / 2**30:.1f} GiB summed over {len(self.peak_rss)}; "
            f"peak private memory of all together {self.peak_private / 2**30:.1f} GiB")


@dataclasses.dataclass
class Result:
  topology: Topology
  mesh_losses: dict
  single_losses: dict
  mesh_run: Run
  single_run: Run
  rtol: float

  def __post_init__(self):
    if sorted(self.mesh_losses) != sorted(self.single_losses):
      raise UserError(f"the mesh run logged losses at steps {sorted(self.mesh_losses)}, the one-device run "
                      f"at {sorted(self.single_losses)}")

  @property
  def max_relative_difference(self) -> float:
    return max(abs(self.mesh_losses[s] - self.single_losses[s]) / abs(self.single_losses[s])
               for s in self.single_losses)

  @property
  def equal(self) -> bool:
    return self.max_relative_difference <= self.rtol

  def summary(self) -> str:
    verdict = "equal to one device" if self.equal else "DIFFERENT from one device"
    return (f"simulate-mesh {self.topology.describe()}\n"
            f"  mesh run: {self.mesh_run.describe()}\n"
            f"  one-device run: {self.single_run.describe()}\n"
            f"  losses at steps {min(self.single_losses)}..{max(self.single_losses)}: max relative "
            f"difference {self.max_relative_difference:.2e} (rtol {self.rtol:g}): {verdict}")


def read_losses(workdir: str) -> dict:
  """step -> training loss from a run's metrics.jsonl."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise UserError(f"{path} does not exist: the command wrote no metrics")
  losses = {}
  with open(path) as f:
    for record in map(json.loads, f):
      key = next((k for k in LOSS_KEYS if k in record), None)
      if key is not None:
        losses[record["step"]] = record[key]
  if not losses:
    raise UserError(f"{path} has no per-step training loss (a record with {' or '.join(LOSS_KEYS)})")
  return losses


def _mesh_overrides(shape: dict, rules: tuple = ()) -> list:
  overrides = [f"--config.mesh.shape.{axis}={size}" for axis, size in shape.items()]
  return overrides + ([f"--config.mesh.rules={rules!r}"] if rules else [])


def _argv(command: list, workdir: str, extra: list) -> list:
  return [sys.executable, "-m", "bipft_jax.cli", *command, "--workdir", workdir, *extra]


def run_one_device(command: list, workdir: str, deadline: float, min_free: float = 0.0) -> tuple:
  """(losses, Run) of `command` in one process on one device (mesh 1 x 1 x 1), in workdir/one_device."""
  run_dir = os.path.join(workdir, "one_device")
  argv = _argv(command, run_dir, _mesh_overrides({"data": 1, "fsdp": 1, "tensor": 1}))
  started = time.monotonic()
  single = start("one_device", argv, environment(1), _logdir(workdir))
  peak = wait_all([single], deadline, "the one-device run", min_free)
  return read_losses(run_dir), Run(time.monotonic() - started, [single.peak_rss], peak)


def run_on_mesh(topo: Topology, command: list, workdir: str, deadline: float, min_free: float = 0.0) -> tuple:
  """(losses, Run) of `command` on the mesh in `topo.processes` local processes, in workdir/mesh."""
  run_dir = os.path.join(workdir, "mesh")
  argv = _argv(command, run_dir, _mesh_overrides(topo.shape, topo.rules))
  coordinator, started, job = f"localhost:{_free_port()}", time.monotonic(), []
  for i in range(topo.processes):
    env = environment(topo.devices_per_process, {
        "BIPFT_DISTRIBUTED": "1", "BIPFT_COORDINATOR": coordinator,
        "BIPFT_NUM_PROCESSES": str(topo.processes), "BIPFT_PROCESS_ID": str(i)})
    job.append(start(f"process_{i}", argv, env, _logdir(workdir)))
  peak = wait_all(job, deadline, f"{topo.name}, the {topo.processes}-process run", min_free)
  return read_losses(run_dir), Run(time.monotonic() - started, [p.peak_rss for p in job], peak)


def _logdir(workdir: str) -> str:
  logdir = os.path.join(workdir, "logs")
  os.makedirs(logdir, exist_ok=True)
  return logdir


def simulate(mesh: str, command: list, workdir: str, *, meshes: str = "configs/meshes.py", processes: int = 0,
             devices: int = 8, rtol: float = 1e-5, timeout: float = 3600.0,
             min_free: float = 2**30) -> Result:
  """Runs `command` on one device, then on the mesh's simulated topology; returns both runs' losses."""
  if "--workdir" in command or any(arg.startswith("--workdir=") for arg in command):
    raise UserError("leave --workdir out of the command: the simulation gives each run its own")
  topo = topology(mesh, meshes, processes, devices)
  files.check_new_folder(workdir, "--workdir")
  same = SAME_BATCHES.get(command[0])
  if same and not any(arg.startswith(f"--config.{same}") for arg in command):
    command = [*command, f"--config.{same}={topo.processes}"]
  deadline = time.monotonic() + timeout
  # One device first: a command that fails anyway fails there, cheaply and with one log.
  single_losses, single_run = run_one_device(command, workdir, deadline, min_free)
  mesh_losses, mesh_run = run_on_mesh(topo, command, workdir, deadline, min_free)
  return Result(topo, mesh_losses, single_losses, mesh_run, single_run, rtol)
