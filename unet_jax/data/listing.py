"""Finding a dataset's files on disk."""

import os
import pathlib


def visible_files(root: str | os.PathLike, pattern: str) -> list[pathlib.Path]:
  """The files under `root` matching `pattern` at any depth, hidden ones left out.

  A file is hidden when its name, or a folder's between it and `root`, starts
  with ".": macOS AppleDouble companions ("._<name>"), .ipynb_checkpoints and
  .Trash copies are not slices. Folders above `root` may be hidden
  (~/.cache/kagglehub).
  """
  root = pathlib.Path(root)
  return [path for path in root.rglob(pattern)
          if not any(part.startswith(".") for part in path.relative_to(root).parts)
          and path.is_file()]
