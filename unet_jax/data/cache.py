"""An on-disk cache of decoded, resized samples: one .npy file per sample.

The cache grows on disk as samples are first read and is never held in
memory. Its folder is named by a hash of the source's fingerprint (dataset,
subset, image size, channels, ...) and file names, so a change to any of
them starts a fresh cache. Files replaced in place under an unchanged dataset are not
noticed: delete the cache folder then.
"""

import hashlib
import os
import pathlib
import threading
from typing import Any

from absl import logging
import numpy as np

from unet_jax.errors import UserError


class CachedSource:
  """Wraps a source (with `fingerprint` and `file_names`) with an on-disk sample cache.

  A grain `RandomAccessDataSource` with the records of the wrapped source.
  Writes are atomic (temporary file, then rename), so worker processes may
  fill the cache at the same time.
  """

  def __init__(self, source, cache_dir: str | os.PathLike):
    self.source = source
    # The file names too: another subset of the same files, or their order, is another cache.
    self._file_names = list(source.file_names)
    key = hashlib.sha256("\n".join([source.fingerprint, *self._file_names]).encode()
                         ).hexdigest()[:16]
    self.folder = pathlib.Path(cache_dir).expanduser() / key
    try:
      self.folder.mkdir(parents=True, exist_ok=True)
      marker = self.folder / "source.txt"
      if not marker.exists():
        marker.write_text(source.fingerprint + "\n")
    except OSError as e:
      raise UserError(f"data.cache_dir {cache_dir}: cannot write the cache "
                      f"({e.strerror})") from None
    self._warned = False

  def __len__(self) -> int:
    return len(self.source)

  def __repr__(self) -> str:
    return f"CachedSource({self.source!r}, {self.folder})"

  @property
  def file_names(self) -> list[str]:
    return self._file_names

  @property
  def category_names(self) -> dict:
    return self.source.category_names

  def _write(self, path: pathlib.Path, stacked: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
      with open(tmp, "wb") as f:
        np.save(f, stacked)
      os.replace(tmp, path)
    except OSError as e:
      tmp.unlink(missing_ok=True)
      if not self._warned:
        logging.warning("%s: cannot write to the sample cache (%s); reading uncached",
                        self.folder, e.strerror)
        self._warned = True

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = self.folder / f"{index:07d}.npy"
    try:
      stacked = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
      stacked = None
    if stacked is None or stacked.ndim != 3 or stacked.dtype != np.float32:
      record = self.source[index]
      stacked = np.concatenate([record["image"], record["mask"].astype(np.float32)], axis=-1)
      self._write(path, stacked)
    return {"image": np.ascontiguousarray(stacked[..., :-1]),
            "mask": stacked[..., -1:].astype(np.uint8),
            "file_name": self._file_names[index]}
