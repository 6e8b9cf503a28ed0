"""Reading images and masks, and resizing them, shared by every source."""

from collections.abc import Iterator
import contextlib
import os

import numpy as np
from PIL import Image

from unet_jax.errors import UserError

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")


@contextlib.contextmanager
def _opened(path: str | os.PathLike, what: str = "image") -> Iterator[Image.Image]:
  """Opens an image, turning every way of failing into a one-line UserError."""
  try:
    with Image.open(path) as img:
      yield img
  except FileNotFoundError:
    raise UserError(f"{path}: {what} file not found") from None
  except UserError:
    raise
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise UserError(f"{path}: not a readable image ({e})") from None


def _check_channels(channels: int) -> None:
  if channels not in (1, 3):
    raise UserError(f"data.channels must be 1 or 3, got {channels}")


def _as_float(img: Image.Image, channels: int) -> np.ndarray:
  """float32 (H, W, channels) in [0, 1] of an open image."""
  if img.mode in _SIXTEEN_BIT:
    array = np.asarray(img, dtype=np.float32)
    top = 65535.0 if img.mode.startswith("I;16") or array.max() > 255 else 255.0
    array = np.minimum(array / top, 1.0)
  else:
    array = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
  if array.ndim == 2:
    array = array[..., None]
  if array.shape[-1] != channels:
    if array.shape[-1] == 1:
      array = np.repeat(array, channels, axis=-1)
    else:
      array = array.mean(-1, keepdims=True)
  return array


def read_image(path: str | os.PathLike, channels: int) -> np.ndarray:
  """Reads an image file as float32 (H, W, channels) in [0, 1].

  Grey, RGB, RGBA, palette and 16-bit images are accepted; grey is repeated
  to 3 channels and colour is converted to luminance as `channels` asks.

  Raises:
    UserError: the file is missing or is not a readable image.
  """
  _check_channels(channels)
  with _opened(path) as img:
    img.load()
    return _as_float(img, channels)


def load_image(path: str | os.PathLike, channels: int,
               size: int) -> tuple[np.ndarray, tuple[int, int]]:
  """Reads an image resized to float32 (size, size, channels) in [0, 1], and its stored size.

  The same image as `resize_image(read_image(path, channels), size)`, made
  faster: 8-bit images are resized before they become floats, and JPEGs are
  decoded straight at a reduced scale when that is still at least `size`.

  Returns:
    The image and the file's own (width, height).

  Raises:
    UserError: the file is missing or is not a readable image.
  """
  _check_channels(channels)
  with _opened(path) as img:
    stored = img.size
    if img.mode in _SIXTEEN_BIT:
      img.load()
      return resize_image(_as_float(img, channels), size), stored
    mode = "L" if channels == 1 else "RGB"
    img.draft(mode, (size, size))
    img = img.convert(mode)
    if img.size != (size, size):
      img = img.resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(img, dtype=np.float32) / 255.0
  return (array[..., None] if array.ndim == 2 else array), stored


def read_mask(path: str | os.PathLike) -> np.ndarray:
  """Reads a mask image as uint8 (H, W) in {0, 1}.

  Masks stored as 0/255 (or any 8-bit grey) are foreground from 128 up; masks
  stored as 0/1 are taken as they are.

  Raises:
    UserError: the file is missing or is not a readable image.
  """
  with _opened(path, "mask") as img:
    img.load()
    array = np.asarray(img.convert("L") if img.mode not in ("L", "1") else img)
  threshold = 127 if array.max(initial=0) > 1 else 0
  return (array > threshold).astype(np.uint8)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of a float (H, W, C) image to (size, size, C)."""
  if image.shape[:2] == (size, size):
    return image
  planes = []
  for c in range(image.shape[-1]):
    plane = Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32))
    planes.append(np.asarray(plane.resize((size, size), Image.Resampling.BILINEAR)))
  return np.stack(planes, axis=-1)


def resize_labels(labels: np.ndarray, size: int) -> np.ndarray:
  """Nearest-neighbour resize of a uint8 (H, W) label map to (size, size, 1)."""
  if labels.shape[:2] != (size, size):
    labels = np.asarray(Image.fromarray(labels.astype(np.uint8)).resize(
        (size, size), Image.Resampling.NEAREST))
  return labels.astype(np.uint8)[..., None]


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
  """Nearest-neighbour resize of a binary (H, W) mask (any nonzero is tumour) to uint8
  (size, size, 1) in {0, 1}."""
  return resize_labels(mask > 0, size)
