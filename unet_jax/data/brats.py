"""BraTS2020 training slices stored as HDF5 files (the Kaggle "BraTS2020 training data" set).

    <root>/.../volume_<v>_slice_<s>.h5    datasets "image" (240, 240, 4) float: the four
                                          MRI modalities; "mask" (240, 240, 3): the tumour regions

`data.modalities` picks image channels (their number is `data.channels`);
the mask is the union of `data.mask_channels` (all three: the whole tumour).
Each slice's channels are scaled to [0, 1] on their own, by robust min-max
over the non-zero (brain) pixels; the background stays 0. Volumes, not
slices, are split into train, valid and test (seeded). Hidden files and
folders (macOS "._<name>" companions) are not slices. Needs h5py, the
optional extra: pip install -e '.[brats]'.
"""

from collections.abc import Iterator
import contextlib
import os
import pathlib
import re
from typing import Any, Mapping, Sequence

import numpy as np

from unet_jax import images as images_lib
from unet_jax.data import listing
from unet_jax.data import splits
from unet_jax.errors import UserError

_NAME = re.compile(r"volume_(\d+)_slice_(\d+)\.h5")


def h5py_module():
  """The h5py module, imported on first use since it is an optional extra.

  Raises:
    UserError: h5py is not installed.
  """
  try:
    import h5py  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError("BraTS .h5 slices need h5py, the optional extra: "
                    "pip install -e '.[brats]'") from None
  return h5py


def scan(root: str | os.PathLike) -> list[tuple[str, str]]:
  """Finds every (volume, slice path relative to root) under `root`, sorted by volume and slice.

  Raises:
    UserError: no volume_<v>_slice_<s>.h5 file, or the same slice twice.
  """
  root = pathlib.Path(root)
  found: dict[tuple[int, int], pathlib.Path] = {}
  for path in listing.visible_files(root, "volume_*_slice_*.h5"):
    match = _NAME.fullmatch(path.name)
    if not match:
      continue
    key = (int(match[1]), int(match[2]))
    if key in found:
      raise UserError(f"{path}: the same slice as {found[key]}; point data.root at one copy "
                      "of the dataset")
    found[key] = path
  if not found:
    raise UserError(f"data.root {root}: no volume_<v>_slice_<s>.h5 files; expected the "
                    "BraTS2020 training slices as HDF5")
  return [(str(v), found[v, s].relative_to(root).as_posix()) for v, s in sorted(found)]


def normalise(image: np.ndarray, percentiles: Sequence[float]) -> np.ndarray:
  """Robust min-max of each channel to [0, 1] over its non-zero pixels; zeros stay 0, and so
  do NaN or infinite voxels (a single one had left its whole channel at 0)."""
  out = np.zeros(image.shape, np.float32)
  for c in range(image.shape[-1]):
    plane = image[..., c]
    brain = (plane != 0) & np.isfinite(plane)
    if brain.sum() < 2:
      continue
    low, high = np.percentile(plane[brain], percentiles)
    if high > low:
      out[..., c] = np.where(brain, np.clip((plane - low) / (high - low), 0, 1), 0)
  return out


def _dataset(fid: Any, name: str, path: pathlib.Path) -> Any:
  try:
    return h5py_module().h5d.open(fid, name.encode())
  except KeyError:
    raise UserError(f"{path}: lacks its {name!r} dataset") from None


@contextlib.contextmanager
def _checked(path: pathlib.Path, modalities: Sequence[int],
             mask_channels: Sequence[int]) -> Iterator[tuple[Any, Any]]:
  """The low-level ids of a slice file's "image" and "mask" datasets, their shapes checked.

  Low-level h5py opens a file and reads its datasets' metadata in half the
  time of `h5py.File`, which counts when every slice is checked.

  Raises:
    UserError: unreadable file, a missing dataset, or shapes that do not fit.
  """
  with _opened(path) as fid:
    image, mask = _dataset(fid, "image", path), _dataset(fid, "mask", path)
    _check_shapes(path, image.shape, mask.shape, modalities, mask_channels)
    yield image, mask


@contextlib.contextmanager
def _opened(path: pathlib.Path) -> Iterator[Any]:
  """The low-level id of an open slice file; a missing or damaged file is a UserError."""
  h5py = h5py_module()
  try:
    with contextlib.closing(h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY)) as fid:
      yield fid
  except FileNotFoundError:
    raise UserError(f"{path}: slice file not found") from None
  except OSError as e:
    raise UserError(f"{path}: not a readable HDF5 file ({e})") from None


def _check_shapes(path: pathlib.Path, image: tuple[int, ...], mask: tuple[int, ...],
                  modalities: Sequence[int], mask_channels: Sequence[int]) -> None:
  """Checks stored shapes: image (H, W, C), mask (H, W, K) or (H, W), the channels asked for."""
  # (C, H, W) beside (H, W, ...), or both so.
  channels_first = (mask[1:3] == image[:2] or image[1:3] == mask[:2]
                    or (len(image) == len(mask) == 3 and image[1:] == mask[1:]))
  if len(image) != 3 or len(mask) not in (2, 3) or (image[:2] != mask[:2] and channels_first):
    raise UserError(f"{path}: image of shape {image} and mask of shape {mask} are not "
                    "(H, W, channels) of one H, W; store slices channels-last")
  if image[:2] != mask[:2]:
    raise UserError(f"{path}: image of {image[0]}x{image[1]} pixels but mask of "
                    f"{mask[0]}x{mask[1]}; a slice's image and mask must be the same size")
  if max(modalities) >= image[-1]:
    raise UserError(f"{path}: image of shape {image} does not fit "
                    f"data.modalities={tuple(modalities)}")
  if max(mask_channels) >= (mask[-1] if len(mask) == 3 else 1):
    raise UserError(f"{path}: mask of shape {mask} has no channels "
                    f"data.mask_channels={tuple(mask_channels)}")


def _read(dataset_id: Any) -> np.ndarray:
  return np.asarray(h5py_module().Dataset(dataset_id)[()])


def _merged(mask: np.ndarray, mask_channels: Sequence[int]) -> np.ndarray:
  if mask.ndim == 2:
    mask = mask[..., None]
  return (mask[..., list(mask_channels)] > 0).any(-1).astype(np.uint8)


def check_slice(path: pathlib.Path, modalities: Sequence[int],
                mask_channels: Sequence[int]) -> None:
  """Checks a slice file from its metadata alone, without reading pixels.

  Raises:
    UserError: unreadable file, a missing dataset, or shapes that do not fit.
  """
  with _checked(path, modalities, mask_channels):
    pass


def read_mask(path: pathlib.Path, modalities: Sequence[int],
              mask_channels: Sequence[int]) -> np.ndarray:
  """The uint8 (H, W) union of a slice's `mask_channels`, the slice checked, its image unread.

  Raises:
    UserError: as `check_slice`.
  """
  with _checked(path, modalities, mask_channels) as (_, mask):
    return _merged(_read(mask), mask_channels)


def read_slice(path: pathlib.Path, modalities: Sequence[int],
               mask_channels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """Reads one slice: the chosen modalities (H, W, M) as stored and the uint8 (H, W) mask.

  Raises:
    UserError: as `check_slice`, or pixels that cannot be read.
  """
  with _checked(path, modalities, mask_channels) as (image, mask):
    image, mask = _read(image), _read(mask)
  return image[..., list(modalities)], _merged(mask, mask_channels)


def read_image(path: pathlib.Path, modalities: Sequence[int]) -> np.ndarray:
  """Reads the chosen modalities (H, W, M) of a slice as stored; it needs no mask (a new scan).

  Raises:
    UserError: unreadable file, no "image" dataset, or one that does not fit `modalities`.
  """
  with _opened(path) as fid:
    image = _dataset(fid, "image", path)
    shape = image.shape
    # Without a mask to compare with, (C, H, W) shows as a channel axis longer than H or W.
    if len(shape) != 3 or shape[-1] > min(shape[:2]) or max(modalities) >= shape[-1]:
      raise UserError(f"{path}: image of shape {shape} is not (H, W, channels) with the "
                      f"channels data.modalities={tuple(modalities)} names; store slices "
                      "channels-last")
    return _read(image)[..., list(modalities)]


def check_indices(name: str, values: Sequence[int]) -> tuple[int, ...]:
  values = tuple(values)
  if not values or len(set(values)) != len(values) or not all(
      isinstance(v, int) and v >= 0 for v in values):
    raise UserError(f"data.{name} must be distinct channel indices, got {values}")
  return values


class BratsSource:
  """One subset of the BraTS2020 h5 slices: {"image", "mask", "file_name"} records.

  A grain `RandomAccessDataSource`; `file_name` is the slice's path relative
  to the root. Every slice of the subset is checked from its metadata when the
  source is made (`check_slice`); pixels are read on access, never held in memory.
  """

  def __init__(self, root: str | os.PathLike, split: str, image_size: int,
               modalities: Sequence[int] = (0, 1, 2, 3), mask_channels: Sequence[int] = (0, 1, 2),
               percentiles: Sequence[float] = (0.5, 99.5), val_fraction: float = 0.1,
               test_fraction: float = 0.1, split_seed: int = 0,
               recorded_split: Mapping[str, str] | None = None):
    h5py_module()
    self.modalities = check_indices("modalities", modalities)
    self.mask_channels = check_indices("mask_channels", mask_channels)
    self.percentiles = tuple(float(p) for p in percentiles)
    if len(self.percentiles) != 2 or not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
      raise UserError(f"data.clip_percentiles must be (low, high) in [0, 100], got {percentiles}")
    self.root = pathlib.Path(root).resolve()
    self.split, self.image_size = split, image_size
    slices = scan(self.root)
    assignment = splits.assign((v for v, _ in slices), val_fraction, test_fraction, split_seed,
                               recorded_split)
    chosen = [(volume, name) for volume, name in slices if assignment[volume] == split]
    self._file_names = [name for _, name in chosen]
    self.groups = [volume for volume, _ in chosen]  # Each slice's volume, in index order.
    if not self._file_names:
      raise UserError(f"data.root {self.root}: no volumes in split {split!r}; the BraTS splits "
                      f"are {', '.join(splits.SUBSETS)} (data.val_fraction, data.test_fraction)")
    # Metadata only (~0.3 ms a slice): a damaged file stops the run now, not at its end.
    for name in self._file_names:
      check_slice(self.root / name, self.modalities, self.mask_channels)
    self.volumes = sorted({v for v, s in assignment.items() if s == split}, key=int)
    self.fingerprint = (f"brats {self.root} {split} {image_size} {self.modalities} "
                        f"{self.mask_channels} {self.percentiles}")

  def __len__(self) -> int:
    return len(self._file_names)

  def __repr__(self) -> str:
    return f"BratsSource({self.root}, {self.split!r}, {len(self)} slices)"

  @property
  def file_names(self) -> list[str]:
    """Slice paths relative to the root, in index order."""
    return self._file_names

  def __getitem__(self, index: int) -> dict[str, Any]:
    name = self._file_names[index]
    image, mask = read_slice(self.root / name, self.modalities, self.mask_channels)
    return {
        "image": images_lib.resize_image(normalise(image, self.percentiles), self.image_size),
        "mask": images_lib.resize_mask(mask, self.image_size),
        "file_name": name,
    }
