"""Finding a dataset's files on disk."""

import fnmatch
import os
import pathlib

from unet_jax.errors import UserError


def visible_files(root: str | os.PathLike, pattern: str) -> list[pathlib.Path]:
  """The files under `root` whose names match `pattern`, at any depth, hidden ones left out.

  A file is hidden when its name, or a folder's between it and `root`, starts
  with ".": macOS AppleDouble companions ("._<name>"), .ipynb_checkpoints and
  .Trash copies are not slices. Folders above `root` may be hidden
  (~/.cache/kagglehub). Linked folders are followed (a subset of a dataset
  made of links to its patient folders), each real folder once.

  Raises:
    UserError: a matching name is a link to nothing.
  """
  found, seen = [], set()
  for folder, subfolders, names in os.walk(root, followlinks=True):
    real = os.path.realpath(folder)
    if real in seen:  # A link back up the tree, or a second link to one folder.
      subfolders.clear()
      continue
    seen.add(real)
    subfolders[:] = [name for name in subfolders if not name.startswith(".")]
    for name in names:
      if name.startswith(".") or not fnmatch.fnmatchcase(name, pattern):
        continue
      path = pathlib.Path(folder) / name
      if not path.exists():
        raise UserError(f"{path}: a link to {os.readlink(path)}, which does not exist")
      if path.is_file():
        found.append(path)
  return found
