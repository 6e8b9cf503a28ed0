"""COCO segmentation exports as a grain random-access source.

Two layouts:

- split folders (the Roboflow export): `<root>/<split>/_annotations.coco.json`
  beside that split's images;
- one annotation file (`data.annotations`, relative to the root) whose image
  entries name their subset under `data.subset_key` (a dotted key reaches into
  nested objects, e.g. "extra.split"); file names are relative to
  `data.image_dir` (default: the annotation file's folder).

The selected categories (default: all, merged) are the tumour foreground;
an image with no annotation is a negative with an empty mask. The mask is a
label map: 0 background, k the k-th of `data.category_ids` (1 for every
category when they are merged), which a model with one logit per category
learns per category (`model.out_channels`) and every metric reads as
tumour where it is not 0.
"""

import dataclasses
import os
import pathlib
from typing import Any, Sequence

from absl import logging
import numpy as np
from pycocotools import mask as mask_utils

from unet_jax import images as images_lib
from unet_jax.data import coco_json
from unet_jax.data import splits
from unet_jax.errors import EmptySplit
from unet_jax.errors import counted
from unet_jax.errors import some_of
from unet_jax.errors import UserError

ANNOTATIONS_FILE = coco_json.ANNOTATIONS_FILE
_MAX_WARNINGS = 10


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a COCO dataset keeps its annotations (see the module docstring).

  Attributes:
    annotations: One annotation file for every subset, relative to the root;
      "" for the split-folder layout.
    subset_key: The image entry's key naming its subset (one-file layout).
    image_dir: Folder the file names are relative to, relative to the root;
      "" for the annotation file's own folder.
  """
  annotations: str = ""
  subset_key: str = "subset"
  image_dir: str = ""


def annotations_path(root: str | os.PathLike, split: str,
                     layout: Layout = Layout()) -> pathlib.Path:
  """The annotation file holding `split`."""
  if layout.annotations:
    return pathlib.Path(root) / layout.annotations
  return pathlib.Path(root) / split / ANNOTATIONS_FILE


def _subset_of(image: dict[str, Any], key: str, json_path: pathlib.Path) -> str:
  value: Any = image
  for part in key.split("."):
    if not isinstance(value, dict) or part not in value:
      raise UserError(f"{json_path}: image {image['file_name']!r} has no {key!r} naming its "
                      "subset (data.subset_key)")
    value = value[part]
  return str(value)


def subset_names(root: str | os.PathLike, layout: Layout = Layout()) -> list[str]:
  """The subsets of the dataset, train, valid and test first."""
  if layout.annotations:
    json_path = annotations_path(root, "", layout)
    images = coco_json.load(json_path)["images"]
    return splits.ordered({_subset_of(image, layout.subset_key, json_path) for image in images})
  return splits.ordered(
      {path.parent.name for path in pathlib.Path(root).glob(f"*/{ANNOTATIONS_FILE}")})


def has_subset(root: str | os.PathLike, split: str, layout: Layout = Layout()) -> bool:
  """Whether the dataset has subset `split`."""
  if layout.annotations:
    return split in subset_names(root, layout)
  return annotations_path(root, split, layout).is_file()


@dataclasses.dataclass
class Subset:
  """One subset of a COCO dataset as its annotation file describes it.

  Attributes:
    json_path: The annotation file.
    image_dir: The folder its file names are relative to.
    images: The subset's image entries, sorted by file name.
    annotations: Image id -> that image's annotations (every category).
    categories: Category id -> name.
  """
  json_path: pathlib.Path
  image_dir: pathlib.Path
  images: list[dict[str, Any]]
  annotations: dict[Any, list[dict[str, Any]]]
  categories: dict[Any, str]


def load_subset(root: str | os.PathLike, split: str, layout: Layout = Layout()) -> Subset:
  """Reads the images and annotations of one subset.

  Raises:
    UserError: the annotation file is bad, or the subset is not in it.
  """
  json_path = annotations_path(root, split, layout)
  coco = coco_json.load(json_path)
  images = coco["images"]
  if layout.annotations:
    images = [image for image in images
              if _subset_of(image, layout.subset_key, json_path) == split]
    if not images:
      raise UserError(f"{json_path}: no image has {layout.subset_key}={split!r}; it has "
                      f"{', '.join(subset_names(root, layout)) or 'no subsets'}")
  image_dir = (pathlib.Path(root) / layout.image_dir if layout.image_dir else json_path.parent)
  images = sorted(images, key=lambda image: image["file_name"])
  annotations: dict[Any, list[dict[str, Any]]] = {image["id"]: [] for image in images}
  for annotation in coco["annotations"]:
    if annotation["image_id"] in annotations:
      annotations[annotation["image_id"]].append(annotation)
  categories = {c.get("id"): str(c.get("name", c.get("id"))) for c in coco["categories"]
                if isinstance(c, dict)}
  return Subset(json_path, image_dir.resolve(), images, annotations, categories)


def duplicate_file_names(subset: Subset) -> list[str]:
  """One line per image entry whose file_name an earlier entry of the subset already lists."""
  # Merging two entries of one file could be right (a split export joined back) or hide a
  # mistake (a copied entry, two folders flattened); only the author of the file can tell.
  seen: dict[str, Any] = {}
  problems = []
  for image in subset.images:
    name = os.path.normpath(image["file_name"])
    if name in seen:
      problems.append(f"{subset.json_path}: file_name {image['file_name']!r} is listed twice "
                      f"(image ids {seen[name]!r} and {image['id']!r}); give each image one entry")
    else:
      seen[name] = image["id"]
  return problems


def images_in_both(paths: Sequence[pathlib.Path], other_paths: Sequence[pathlib.Path]
                   ) -> list[str]:
  """The image files (links followed) that two splits both list, sorted."""
  return sorted(map(str, {p.resolve() for p in paths} & {p.resolve() for p in other_paths}))


def shared_images_line(split: str, other_split: str, shared: Sequence[str]) -> str:
  """`images_in_both`'s result as one line."""
  return (f"splits {split!r} and {other_split!r} both list "
          f"{counted(len(shared), 'image file')} ({some_of(shared)})")


def log_problems(problems: list[str], where: pathlib.Path) -> None:
  """Logs fixable data problems: the first few in full, then a count."""
  for problem in problems[:_MAX_WARNINGS]:
    logging.warning("%s", problem)
  if len(problems) > _MAX_WARNINGS:
    logging.warning("%s: %d more problems like these", where,
                    len(problems) - _MAX_WARNINGS)


def image_path(subset: Subset, file_name: str) -> pathlib.Path:
  """An image's path, refusing names that leave the image folder and missing files.

  The name is checked as written, so an image may be a symlink to a file
  elsewhere (Hugging Face Hub snapshots, DVC, git-annex).

  Raises:
    UserError: the name is absolute, climbs out of the folder with "..", or
      names no file.
  """
  name = os.path.normpath(file_name)
  if os.path.isabs(name) or name.split(os.sep)[0] == os.pardir:
    raise UserError(f"{subset.json_path}: file_name {file_name!r} leaves the dataset folder "
                    f"{subset.image_dir}; refused")
  path = subset.image_dir / name
  if not path.is_file():
    raise UserError(f"{path}: image file not found (listed in {subset.json_path})")
  return path


def check_category_ids(subset: Subset, category_ids: Sequence[Any]) -> None:
  """Refuses `data.category_ids` that repeat an id, or that the subset's file does not
  declare (one that declares none takes any)."""
  repeated = sorted({c for c in category_ids if list(category_ids).count(c) > 1}, key=str)
  if repeated:
    raise UserError(f"data.category_ids={tuple(category_ids)}: {repeated} named more than "
                    "once; name each category once")
  unknown = set(category_ids) - set(subset.categories)
  if subset.categories and unknown:
    known = ", ".join(f"{k} ({v})" for k, v in subset.categories.items())
    raise UserError(f"{subset.json_path}: data.category_ids {sorted(unknown, key=str)} are not "
                    f"among its categories: {known}; name some of them, or '()' for all")


def check_image(subset: Subset, image: dict[str, Any]) -> pathlib.Path:
  """The path of one of the subset's images, which exists, is an image (its header is read)
  and has the size the file lists.

  Raises:
    UserError: it is none of these, or its file_name leaves the dataset's folder.
  """
  path = image_path(subset, image["file_name"])
  check_size(path, images_lib.displayed_size(path), image["width"], image["height"],
             subset.json_path)
  return path


def check_size(path: pathlib.Path, displayed: tuple[int, int], width: int, height: int,
               json_path: pathlib.Path) -> None:
  """Refuses an image whose displayed (width, height) is not the one `json_path` lists."""
  if displayed != (width, height):
    turned = ""
    if displayed == (height, width) and images_lib.turned_by_exif(path):
      turned = (f" (its EXIF orientation turns the stored {width}x{height} a quarter turn: "
                "annotate the image as displayed, or remove the orientation tag)")
    raise UserError(f"{path}: image is {displayed[0]}x{displayed[1]} as displayed but "
                    f"{json_path.name} says {width}x{height}{turned}")


def undeclared_category(subset: Subset, annotation: dict[str, Any], where: str) -> str | None:
  """The problem of an annotation whose category the file does not declare (it is ignored),
  or None."""
  if subset.categories and annotation.get("category_id") not in subset.categories:
    return (f"{where}: category_id {annotation.get('category_id')!r} is not among the file's "
            "categories; ignored")
  return None


def shapes_of(subset: Subset, image: dict[str, Any], category_ids: Sequence[Any],
              problems: list[str]) -> tuple[coco_json.Shape, ...]:
  """The checked shapes of an image's annotations in `category_ids` (all when empty)."""
  shapes = []
  for annotation in subset.annotations[image["id"]]:
    if category_ids and annotation.get("category_id") not in category_ids:
      continue
    where = f"{subset.json_path}: annotation {annotation.get('id')} of {image['file_name']}"
    undeclared = undeclared_category(subset, annotation, where)
    if undeclared:
      problems.append(undeclared)
      continue
    shape = coco_json.shape_of(annotation, image["height"], image["width"], where, problems)
    if shape is not None:
      shapes.append(shape)
  return tuple(shapes)


def merged_counts(shapes: Sequence[coco_json.Shape], height: int, width: int) -> bytes | None:
  """The compressed RLE counts of the union of `shapes`, None when there are none."""
  if not shapes:
    return None
  rle = mask_utils.merge([coco_json.to_rle(shape, height, width) for shape in shapes])
  return rle["counts"]


def label_counts(subset: Subset, image: dict[str, Any], category_ids: Sequence[Any],
                 problems: list[str]) -> tuple[tuple[int, bytes], ...]:
  """(label, RLE counts) of an image's foreground: label 1 for all categories merged
  (`category_ids` empty), else label k for the k-th of `category_ids`; labels without
  shapes are left out."""
  groups = [(1, category_ids)] if not category_ids else [
      (label, (category,)) for label, category in enumerate(category_ids, start=1)]
  labelled = []
  for label, categories in groups:
    counts = merged_counts(shapes_of(subset, image, categories, problems), image["height"],
                           image["width"])
    if counts is not None:
      labelled.append((label, counts))
  return tuple(labelled)


class CocoSource:
  """One subset of a COCO dataset: {"image", "mask", "file_name"} records.

  A grain `RandomAccessDataSource`. Images are float32 (size, size, channels)
  in [0, 1]; masks uint8 (size, size, 1) in {0, 1}. The annotation file is
  checked when the source is made (geometry, file names, that each image
  exists) and only a compressed foreground mask per image is kept; image
  files are read on access, never held in memory.
  """

  def __init__(self, root: str | os.PathLike, split: str, image_size: int, channels: int = 1,
               category_ids: Sequence[Any] = (), layout: Layout = Layout()):
    if channels not in (1, 3):
      raise UserError(f"data.channels must be 1 or 3 for COCO images, got {channels}")
    subset = load_subset(root, split, layout)
    if not subset.images:
      # Nothing to train on, and validation or evaluation over no images scores NaN.
      raise EmptySplit(f"{subset.json_path}: lists no images, so split {split!r} is empty")
    duplicates = duplicate_file_names(subset)
    if duplicates:
      raise UserError(duplicates[0])
    self.json_path, self.image_dir, self.split = subset.json_path, subset.image_dir, split
    self.image_size, self.channels = image_size, channels
    self.category_ids = tuple(category_ids)
    check_category_ids(subset, self.category_ids)
    # The export's own names, which need not be its ids (the brain-tumour export's 1 is "0").
    self.category_names = {c: subset.categories.get(c, str(c)) for c in self.category_ids}
    self._file_names = [image["file_name"] for image in subset.images]
    # Headers only: a fraction of a second for thousands.
    self._paths = [check_image(subset, image) for image in subset.images]
    self._sizes = np.array([(image["height"], image["width"]) for image in subset.images],
                           np.int64).reshape(-1, 2)
    problems: list[str] = []
    self._counts = [label_counts(subset, image, self.category_ids, problems)
                    for image in subset.images]
    log_problems(problems, self.json_path)
    self._warn_of_vanishing_tumours()
    if problems and not any(self._counts):
      more = f"; and {len(problems) - 1} more" if len(problems) > 1 else ""
      raise UserError(f"{self.json_path}: none of its annotations is usable, so {split} has no "
                      f"tumour to learn or score ({problems[0]}{more})")
    stat = self.json_path.stat()
    self.fingerprint = (f"coco {self.json_path.resolve()} {stat.st_size} {stat.st_mtime_ns} "
                        f"{self.image_dir} {split} {image_size} {channels} "
                        f"labels {list(map(str, self.category_ids))}")

  def _warn_of_vanishing_tumours(self) -> None:
    """Warns of annotated tumours that the nearest-neighbour resize to `image_size` empties:
    those images train and score as without tumour."""
    vanished = []
    for index, ((height, width), labelled) in enumerate(zip(self._sizes, self._counts)):
      area = sum(mask_utils.area({"size": [int(height), int(width)], "counts": counts})
                 for _, counts in labelled)
      # Only small ones can vanish (a thin sliver aside); only they are resized here.
      if (0 < area * self.image_size**2 / (height * width) < 16
          and not images_lib.resize_labels(self.labels(index), self.image_size).any()):
        vanished.append(self._file_names[index])
    if vanished:
      logging.warning("%s: %s (%s) hold tumours too small to keep a pixel at "
                      "data.image_size=%d: they train and score as without tumour; raise "
                      "data.image_size to keep them", self.json_path,
                      counted(len(vanished), "image"), some_of(vanished), self.image_size)

  def __len__(self) -> int:
    return len(self._file_names)

  def __repr__(self) -> str:
    return f"CocoSource({self.json_path}, {self.split!r}, {len(self)} images)"

  @property
  def file_names(self) -> list[str]:
    """Image file names in index order."""
    return self._file_names

  @property
  def paths(self) -> list[pathlib.Path]:
    """Image files in index order."""
    return self._paths

  def labels(self, index: int) -> np.ndarray:
    """The uint8 label map of image `index` at its original size (module docstring).

    Where shapes of two categories overlap, the later category's label wins.
    """
    height, width = (int(v) for v in self._sizes[index])
    labels = np.zeros((height, width), np.uint8)
    for label, counts in self._counts[index]:
      labels[mask_utils.decode({"size": [height, width], "counts": counts}) > 0] = label
    return labels

  def mask(self, index: int) -> np.ndarray:
    """The binary foreground mask of image `index` at its original size."""
    return (self.labels(index) > 0).astype(np.uint8)

  def __getitem__(self, index: int) -> dict[str, Any]:
    file_name, path = self._file_names[index], self._paths[index]
    height, width = (int(v) for v in self._sizes[index])
    image, stored = images_lib.load_image(path, self.channels, self.image_size)
    check_size(path, stored, width, height, self.json_path)
    return {
        "image": image,
        "mask": images_lib.resize_labels(self.labels(index), self.image_size),
        "file_name": file_name,
    }
