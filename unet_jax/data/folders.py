"""Image/mask file pairs in one folder per patient (the Kaggle LGG MRI layout).

    <root>/<patient>/<case>_<n>.tif        an MRI slice (the LGG set: 3 channels,
    <root>/<patient>/<case>_<n>_mask.tif   pre-contrast, FLAIR, post-contrast; masks 0/255)

Folders may sit at any depth under the root; a patient is a folder holding
slices. Hidden files and folders (macOS "._<name>" companions) are not slices.
Patients, not slices, are split into train, valid and test (seeded), so no
patient is ever on two sides.
"""

import os
import pathlib
import re
from typing import Any, Mapping

import numpy as np

from unet_jax import images as images_lib
from unet_jax.data import listing
from unet_jax.data import splits
from unet_jax.errors import UserError

MASK_SUFFIX = "_mask"
EXTENSIONS = (".tif", ".tiff")


def _natural_key(name: str) -> list[Any]:
  # Slice 2 before slice 10.
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def scan(root: str | os.PathLike,
         unpaired: list[str] | None = None) -> list[tuple[str, str, str]]:
  """Finds every (patient, image, mask) under `root`, paths relative to it.

  Args:
    root: The dataset's root.
    unpaired: When given, each slice without its mask and mask without its slice is
      listed here (one line each) and left out, instead of raising.

  Returns:
    Sorted by patient, then slice number.

  Raises:
    UserError: no pairs, a slice without its mask or a mask without its
      slice, files outside a patient folder, or a patient folder twice.
  """
  def refuse(problem: str) -> None:
    if unpaired is None:
      raise UserError(problem)
    unpaired.append(problem)

  root = pathlib.Path(root)
  images, masks = set(), set()
  for path in listing.visible_files(root, "*"):
    if path.suffix.lower() in EXTENSIONS:
      relative = path.relative_to(root)
      (masks if path.stem.endswith(MASK_SUFFIX) else images).add(relative)
  if not masks:
    raise UserError(f"data.root {root}: no <case>_<n>{MASK_SUFFIX}.tif files; expected the "
                    "LGG layout (one folder per patient, each slice beside its mask)")
  pairs, folders = [], {}
  for mask in sorted(masks):
    image = mask.with_name(mask.stem[:-len(MASK_SUFFIX)] + mask.suffix)
    if image not in images:
      refuse(f"{root / mask}: mask without its image {image.name}")
      continue
    images.discard(image)
    if mask.parent == pathlib.Path("."):
      raise UserError(f"{root / mask}: not in a patient folder; the split is by patient folder")
    patient = mask.parent.name
    if folders.setdefault(patient, mask.parent) != mask.parent:
      raise UserError(f"{root}: patient {patient!r} is in two folders ({folders[patient]} and "
                      f"{mask.parent}); point data.root at one copy of the dataset")
    pairs.append((patient, image.as_posix(), mask.as_posix()))
  for image in sorted(images):
    refuse(f"{root / image}: no mask {image.stem}{MASK_SUFFIX}{image.suffix} beside it")
  return sorted(pairs, key=lambda p: (p[0], _natural_key(pathlib.PurePath(p[1]).name)))


def _check_sizes(mask_path: pathlib.Path, mask: tuple[int, int], image: tuple[int, int]) -> None:
  if mask != image:
    raise UserError(f"{mask_path}: mask is {mask[0]}x{mask[1]} but its image is "
                    f"{image[0]}x{image[1]}")


def check_pair(root: pathlib.Path, image: str, mask: str) -> None:
  """Checks a slice and its mask from their headers, without decoding pixels.

  Raises:
    UserError: either file is missing or not an image, or their sizes differ.
  """
  image_size = images_lib.displayed_size(root / image)
  _check_sizes(root / mask, images_lib.displayed_size(root / mask, "mask"), image_size)


class FolderSource:
  """One subset of an LGG-layout dataset: {"image", "mask", "file_name"} records.

  A grain `RandomAccessDataSource`; `file_name` is the slice's path relative
  to the root. Images are float32 (size, size, channels) in [0, 1], masks
  uint8 (size, size, 1) in {0, 1}. Every slice and mask of the subset is
  checked from its header when the source is made (`check_pair`); pixels are
  read on access.
  """

  def __init__(self, root: str | os.PathLike, split: str, image_size: int, channels: int = 3,
               val_fraction: float = 0.1, test_fraction: float = 0.1, split_seed: int = 0,
               recorded_split: Mapping[str, str] | None = None):
    if channels not in (1, 3):
      raise UserError(f"data.channels must be 1 or 3 for LGG slices, got {channels}")
    self.root = pathlib.Path(root).resolve()
    self.split, self.image_size, self.channels = split, image_size, channels
    pairs = scan(self.root)
    assignment = splits.assign((p for p, _, _ in pairs), val_fraction, test_fraction,
                               split_seed, recorded_split)
    chosen = [(patient, image, mask) for patient, image, mask in pairs
              if assignment[patient] == split]
    self._pairs = [(image, mask) for _, image, mask in chosen]
    self.groups = [patient for patient, _, _ in chosen]  # Each slice's patient, in index order.
    if not self._pairs:
      raise UserError(f"data.root {self.root}: no patients in split {split!r}; the LGG splits "
                      f"are {', '.join(splits.SUBSETS)} (data.val_fraction, data.test_fraction)")
    # Headers only (~0.5 ms a slice): a damaged file stops the run now, not at its end.
    for image, mask in self._pairs:
      check_pair(self.root, image, mask)
    self.patients = sorted({p for p, s in assignment.items() if s == split})
    self._file_names = [image for image, _ in self._pairs]
    self.fingerprint = f"lgg {self.root} {split} {image_size} {channels}"

  def __len__(self) -> int:
    return len(self._pairs)

  def __repr__(self) -> str:
    return f"FolderSource({self.root}, {self.split!r}, {len(self)} slices)"

  @property
  def file_names(self) -> list[str]:
    """Slice paths relative to the root, in index order."""
    return self._file_names

  def mask(self, index: int) -> np.ndarray:
    """The (H, W) mask of slice `index` at its stored size."""
    return images_lib.read_mask(self.root / self._pairs[index][1])

  def __getitem__(self, index: int) -> dict[str, Any]:
    image_name, mask_name = self._pairs[index]
    image, (width, height) = images_lib.load_image(self.root / image_name, self.channels,
                                                   self.image_size)
    mask = self.mask(index)
    _check_sizes(self.root / mask_name, (mask.shape[1], mask.shape[0]), (width, height))
    return {
        "image": image,
        "mask": images_lib.resize_mask(mask, self.image_size),
        "file_name": image_name,
    }
