"""Writing outputs without losing what is on disk: checks before any work, temp name then rename.

Every file a command writes goes through `atomic_path` (or `atomic_write`, `write_json`), every new
output folder through `atomic_folder`: written under a temporary name beside the target and renamed
over it only when complete, so a crash, a full disk or a bad value leaves the earlier file whole.
The result has the mode a plain `open`/`mkdir` would give it (0666/0777 less the umask), not
mkstemp's owner-only 0600.
The `check_*` functions turn an unwritable output into one UserError before anything expensive runs.
`workdir_lock` keeps a second run out of a workdir that a run is writing.
"""
import contextlib
import datetime
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
from typing import Iterator

from bipft_jax.errors import UserError


def _umask() -> int:
  umask = os.umask(0)
  os.umask(umask)
  return umask


def normalize_modes(path: str) -> None:
  """Gives `path` (a file, or a folder and everything in it) the modes of a plain open/mkdir."""
  umask = _umask()
  if os.path.isdir(path):
    for root, dirs, names in os.walk(path):
      for name in dirs:
        os.chmod(os.path.join(root, name), 0o777 & ~umask)
      for name in names:
        os.chmod(os.path.join(root, name), 0o666 & ~umask)
    os.chmod(path, 0o777 & ~umask)
  else:
    os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary file name beside `path` (its folder created if needed); renamed over `path`
  when the block succeeds, deleted when it raises."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  os.close(fd)
  try:
    yield tmp
    normalize_modes(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w"):
  """`open(path, mode)` ('w' or 'wb') that replaces `path` only once the block completes."""
  with atomic_path(path) as tmp, open(tmp, mode) as f:
    yield f


@contextlib.contextmanager
def atomic_folder(path: str) -> Iterator[str]:
  """Yields a temporary folder beside `path` (absent or empty: see `check_new_folder`), renamed to
  `path` when the block succeeds, deleted when it raises."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path))
  try:
    yield tmp
    normalize_modes(tmp)  # mkdtemp and some writers create owner-only modes
    if os.path.isdir(path):
      os.rmdir(path)  # empty: an earlier folder with contents is never replaced
    os.rename(tmp, path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str, value, indent: int | None = 1) -> None:
  """`value` as JSON, atomically."""
  with atomic_write(path) as f:
    json.dump(value, f, indent=indent)


def replace_tree(source: str, target: str) -> None:
  """Moves the file or folder `source` to `target` (same filesystem), replacing what is there.

  A file is replaced atomically; a folder is swapped in with two renames, the old one deleted
  only after the new one is in place."""
  if not os.path.isdir(target) or not os.path.isdir(source):
    if os.path.isdir(target):
      shutil.rmtree(target)
    os.replace(source, target)
    return
  old = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(target)), prefix=f".{os.path.basename(target)}.")
  os.rmdir(old)  # a free name beside target
  os.rename(target, old)
  os.rename(source, target)
  shutil.rmtree(old)


def _existing_ancestor(path: str) -> str:
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return path


def check_writable_dir(path: str, what: str) -> None:
  """UserError unless `path` is a writable folder or can be created as one."""
  if "://" in path:  # object stores: checked by the first write
    return
  ancestor = _existing_ancestor(path)
  if not os.path.isdir(ancestor):
    raise UserError(f"{what} {path} cannot be a folder: {ancestor} is a file")
  if not os.access(ancestor, os.W_OK | os.X_OK):
    raise UserError(f"{what} {path} is not writable: {ancestor} is read-only")
  folder = ancestor
  while os.path.dirname(folder) != folder:
    if os.path.basename(folder).isdigit() and os.path.isfile(os.path.join(folder, "_CHECKPOINT_METADATA")):
      raise UserError(f"{what} {path} is inside checkpoint step {folder}: a run that keeps fewer steps deletes it "
                      "with the step; write it outside the workdir's step folders")
    folder = os.path.dirname(folder)


def check_new_folder(path: str, what: str) -> None:
  """UserError unless `path` can be created as a folder (or is an empty one)."""
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise UserError(f"{what} {path} already exists and is not empty; choose a new {what} or remove it")
  check_writable_dir(path, what)


def check_output_file(path: str, what: str, overwrite: bool = False, flag: str = "--overwrite") -> None:
  """UserError unless a new file can be written at `path`; an existing file is refused unless
  `overwrite` (the user passed `flag`)."""
  if os.path.isdir(path):
    raise UserError(f"{what} {path} is a folder; name the file to write")
  if os.path.exists(path) and not overwrite:
    raise UserError(f"{what} {path} already exists; choose another name or pass {flag} to replace it")
  check_writable_dir(os.path.dirname(os.path.abspath(path)), f"the folder of {what}")


LOCK_FILE = ".bipft-lock"


@contextlib.contextmanager
def workdir_lock(workdir: str, command: str) -> Iterator[None]:
  """Holds `workdir` (created if needed) for this process while the block runs; UserError naming the
  holder if another process holds it. Two runs writing one workdir would interleave their
  checkpoints and logs, and a finetuning run would delete the other's staged outputs.

  An exclusive flock on WORKDIR/.bipft-lock, which the kernel releases however the process ends (a
  SIGKILL leaves no stale lock); the file, naming the holder, is removed on the way out, and the workdir
  too if this call created it and the run left nothing there (an error before its first write). A job of
  several processes takes it through `distributed.workdir_lock`. Object stores (gs://) and file
  systems without locks are not locked (a warning says so)."""
  if "://" in workdir:
    yield
    return
  created = not os.path.exists(workdir)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  while True:
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except FileNotFoundError:  # a run that created the workdir removed it, empty, as it left
      os.makedirs(workdir, exist_ok=True)
      continue
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 4096).decode(errors="replace").strip() or "a process that is starting"
      os.close(fd)
      raise UserError(f"{workdir} is in use by another run: {holder}; wait for it to end or choose "
                      "another --workdir") from None
    except OSError as e:  # ENOLCK, EOPNOTSUPP: some network and FUSE file systems have no locks
      os.close(fd)
      print(f"bipft {command}: warning: {workdir} cannot be locked ({e.strerror}); make sure no other "
            "run writes to it", file=sys.stderr)
      yield
      return
    with contextlib.suppress(FileNotFoundError):
      if os.path.samestat(os.fstat(fd), os.stat(path)):
        break  # else the holder removed the file we locked as it left: lock the new one
    os.close(fd)
  try:
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    os.ftruncate(fd, 0)
    os.write(fd, f"bipft {command}, pid {os.getpid()} on {socket.gethostname()}, since {started}\n".encode())
    yield
  finally:
    with contextlib.suppress(OSError):
      os.remove(path)  # while still locked, so a process that opened it before sees a removed file
    os.close(fd)
    if created:
      with contextlib.suppress(OSError):  # not empty: the run wrote there
        os.rmdir(workdir)
