"""Folder locks: one training process per run folder, one writer per evaluation folder."""

import contextlib
import fcntl
import os
import pathlib
import time
from typing import Iterator

import jax

from unet_jax import time_budget
from unet_jax.errors import UserError

LOCK_FILE = ".training.lock"
WRITER_LOCK_FILE = ".writing.lock"


def _locked(lock, tries: int = 10) -> bool:
  """Takes the exclusive lock; an eval's test of it (training()) holds it for an instant only."""
  for attempt in range(tries):
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
      return True
    except BlockingIOError:
      if attempt + 1 < tries:
        time.sleep(0.02)
  return False


@contextlib.contextmanager
def held(workdir: str | os.PathLike) -> Iterator[None]:
  """Holds `workdir`'s lock while a run trains there (process 0 takes it for all).

  The kernel drops the lock when its process ends, killed or not, so a stopped
  run never leaves its folder locked.

  Raises:
    UserError: another process holds it.
  """
  path = pathlib.Path(workdir) / LOCK_FILE
  with contextlib.ExitStack() as stack:
    got = True
    if jax.process_index() == 0:
      path.parent.mkdir(parents=True, exist_ok=True)
      lock = stack.enter_context(open(path, "a"))
      got = _locked(lock)
    if not time_budget.agreed(int(got)):  # Every process stops, not process 0 alone.
      raise UserError(f"{workdir}: another process is training this run; wait for it to end "
                      "(or stop it), or use another --workdir")
    yield


def training(workdir: str | os.PathLike) -> bool:
  """Whether another process trains in `workdir` now (holds its lock)."""
  try:
    lock = open(pathlib.Path(workdir) / LOCK_FILE)
  except OSError:  # No lock file: never trained here, or not by this version.
    return False
  with lock:  # Closing it drops the shared lock taken to test.
    try:
      fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
      return True
  return False


@contextlib.contextmanager
def writing(folder: pathlib.Path) -> Iterator[None]:
  """Waits for, then holds, `folder`'s writer lock (an evaluation's files are written together).

  Two evaluations of one split at once (an eval command beside training's final
  one, say) then leave one's three files, not a mix of both.
  """
  folder.mkdir(parents=True, exist_ok=True)
  with open(folder / WRITER_LOCK_FILE, "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Dropped when the file is closed or the process ends.
    yield
