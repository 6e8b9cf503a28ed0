"""Reading images and resizing image/mask pairs, shared by every source."""

import os

import numpy as np
from PIL import Image

from unet_jax.errors import UserError


def read_image(path: str | os.PathLike, channels: int) -> np.ndarray:
  """Reads an image file as float32 (H, W, channels) in [0, 1].

  Grey, RGB, RGBA, palette and 16-bit images are accepted; grey is repeated
  to 3 channels and colour is converted to luminance as `channels` asks.

  Raises:
    UserError: the file is missing or is not a readable image.
  """
  if channels not in (1, 3):
    raise UserError(f"data.channels must be 1 or 3, got {channels}")
  try:
    with Image.open(path) as img:
      img.load()
      if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(img, dtype=np.float32)
        top = 65535.0 if img.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = array / top
      else:
        array = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
  except FileNotFoundError:
    raise UserError(f"{path}: image file not found") from None
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise UserError(f"{path}: not a readable image ({e})") from None
  if array.ndim == 2:
    array = array[..., None]
  if array.shape[-1] != channels:
    array = np.repeat(array, channels, axis=-1) if array.shape[-1] == 1 else array.mean(-1, keepdims=True)
  return array


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of a float (H, W, C) image to (size, size, C)."""
  if image.shape[:2] == (size, size):
    return image
  planes = []
  for c in range(image.shape[-1]):
    plane = Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32))
    planes.append(np.asarray(plane.resize((size, size), Image.Resampling.BILINEAR)))
  return np.stack(planes, axis=-1)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
  """Nearest-neighbour resize of a binary (H, W) mask to uint8 (size, size, 1)."""
  if mask.shape[:2] != (size, size):
    mask = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST))
  return (mask > 0).astype(np.uint8)[..., None]
