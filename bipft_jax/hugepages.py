"""Opt-in: large allocations on transparent huge pages (glibc's `glibc.malloc.hugetlb=1`), by re-executing.

XLA:CPU allocates a step's temporaries afresh on every run, and glibc hands large freed blocks back
to the kernel, so every step touches gigabytes of new memory 4 KiB at a time: a BERT-base
distillation step took 760,000 page faults and 2 s of kernel time on the 2-core Intel host
(docs/performance.md, "Training step"). With the tunable, glibc asks for transparent huge pages (`madvise`, the
kernel's default mode) and the same step faults 1,600 times and takes 0.67-0.90x the time. It is
not the default: the small demo model ran 1.18x slower with it (313 vs 265 s), and PyTorch's
BERT-base step 2.4-3x slower. glibc reads its tunables once, at process start, so with
BIPFT_HUGEPAGES=1 the `bipft` command re-executes itself once, before importing JAX, with the
tunable added to GLIBC_TUNABLES; child processes inherit it. Nothing changes numerically: only
where the memory comes from.
"""
import os
import platform
import sys
from typing import Mapping

from bipft_jax.errors import UserError

TUNABLE = "glibc.malloc.hugetlb"
OPT_IN = "BIPFT_HUGEPAGES"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)  # the first glibc with the tunable


def thp_mode(path: str = THP_MODE_FILE) -> str:
  """The kernel's transparent huge page mode (always, madvise, never), "" if it has none."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return ""
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else ""


def opted_in(environ: Mapping[str, str]) -> bool:
  """BIPFT_HUGEPAGES read strictly: "1" on; "0", empty or unset off; anything else is a UserError (a
  typo such as "yes" would otherwise silently leave it off)."""
  value = environ.get(OPT_IN) or "0"
  if value not in ("0", "1"):
    raise UserError(f"{OPT_IN}={value!r}: use 1 (huge-page malloc) or 0 (glibc's default)")
  return value == "1"


def wanted(environ: Mapping[str, str], libc: tuple, mode: str) -> bool:
  """Whether a process started with `environ`, on `libc` (platform.libc_ver()) and THP `mode`,
  should re-execute with the tunable: asked for (BIPFT_HUGEPAGES=1), glibc new enough, huge pages
  available, not set already. Raises UserError on a BIPFT_HUGEPAGES other than 0 or 1."""
  if not opted_in(environ):
    return False
  name, version = libc
  try:
    glibc = name == "glibc" and tuple(int(part) for part in version.split(".")[:2]) >= MIN_GLIBC
  except ValueError:
    glibc = False
  return glibc and mode in ("always", "madvise") and TUNABLE not in environ.get("GLIBC_TUNABLES", "")


def with_tunable(environ: Mapping[str, str]) -> dict:
  """`environ` with the tunable appended to GLIBC_TUNABLES (colon-separated, others kept)."""
  tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
  return {**environ, "GLIBC_TUNABLES": ":".join(tunables + [f"{TUNABLE}=1"])}


def reexec_with_hugepages() -> None:
  """Re-executes this process with the tunable if `wanted` (it does not return then); else returns.

  Call it first thing in a command's entry point: the process starts over from its own command line.
  Raises UserError on a bad BIPFT_HUGEPAGES, on every platform.
  """
  if not wanted(os.environ, platform.libc_ver(), thp_mode()) or not sys.executable or sys.platform != "linux":
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], with_tunable(os.environ))
  except OSError:  # cannot restart (a sandbox without exec): run on with glibc's default
    return
