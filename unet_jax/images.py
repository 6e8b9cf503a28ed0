"""Reading images and masks, and resizing them, shared by every source."""

from collections.abc import Iterator
import contextlib
import io
import os
import pathlib
import struct

import numpy as np
from PIL import ExifTags
from PIL import Image
from PIL import ImageOps

from unet_jax.errors import UserError


_STACK_FORMATS = {"TIFF": "pages", "GIF": "frames", "WEBP": "frames", "PNG": "frames"}


@contextlib.contextmanager
def _opened(path: str | os.PathLike, what: str = "image") -> Iterator[Image.Image]:
  """Opens an image, turning every way of failing into a one-line UserError."""
  try:
    with contextlib.ExitStack() as stack:
      img = stack.enter_context(Image.open(path))
      if img.format == "TIFF" and _turned(img):
        # Pillow maps an uncompressed TIFF's pixels from the file as if already turned: they
        # come out scrambled. Read from memory, they are turned as they should be.
        img = stack.enter_context(Image.open(io.BytesIO(pathlib.Path(path).read_bytes())))
      # A TIFF stack or volume, or an animated GIF, WebP or PNG (a cine loop), would silently be
      # read as its first frame. (Other formats' extra frames, a JPEG's embedded preview say,
      # are not slices.)
      if img.format in _STACK_FORMATS and img.n_frames > 1:
        raise UserError(f"{path}: a {img.format} of {img.n_frames} {_STACK_FORMATS[img.format]} "
                        "(a stack, volume or animation); only single 2-D images are read: "
                        "save each slice as its own file")
      yield img
  except FileNotFoundError:
    raise UserError(f"{path}: {what} file not found") from None
  except UserError:
    raise
  except Image.DecompressionBombError as e:
    raise UserError(f"{path}: too large to read safely ({e}); downscale it") from None
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: not a readable image ({e})") from None
  # Pillow reads a damaged header (a TIFF's IFDs, its EXIF) as these too; raised elsewhere,
  # they are bugs, not the file's.
  except (SyntaxError, TypeError, IndexError, EOFError, struct.error) as e:
    if not _raised_in_pillow(e):
      raise
    raise UserError(f"{path}: not a readable image ({e})") from None


def _raised_in_pillow(error: BaseException) -> bool:
  frame = error.__traceback__
  while frame.tb_next is not None:
    frame = frame.tb_next
  return f"{os.sep}PIL{os.sep}" in frame.tb_frame.f_code.co_filename


def _check_channels(channels: int) -> None:
  if channels not in (1, 3):
    raise UserError(f"data.channels must be 1 or 3, got {channels}")


def _wide(mode: str) -> bool:
  """Whether an image mode holds more than 8 bits per pixel (read without `convert`)."""
  return mode in ("I", "F") or mode.startswith("I;16")


def _upright(img: Image.Image) -> None:
  """Turns an open image, in place, as its EXIF orientation says it is displayed."""
  ImageOps.exif_transpose(img, in_place=True)


def _turned(img: Image.Image) -> bool:
  """Whether an open image is displayed a quarter turn from how it is stored (EXIF 5 to 8)."""
  return img.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8)


def _upright_size(img: Image.Image) -> tuple[int, int]:
  """The (width, height) of an open image as displayed, before it is decoded."""
  # A TIFF's size is its stored one or, in newer Pillows, the displayed one: its tags say which.
  width, height = (img.tag_v2[256], img.tag_v2[257]) if img.format == "TIFF" else img.size
  return (height, width) if _turned(img) else (width, height)


_TIFF_OFFSETS = ((273, 279), (324, 325))  # (StripOffsets, StripByteCounts), the tile pair.


def _as_tuple(value) -> tuple:
  return value if isinstance(value, tuple) else (value,)


def _check_tiff_length(img: Image.Image, path: str | os.PathLike) -> None:
  """Refuses a TIFF shorter than its header says its pixel data reaches (a truncated copy)."""
  for offsets_tag, counts_tag in _TIFF_OFFSETS:
    offsets, counts = img.tag_v2.get(offsets_tag), img.tag_v2.get(counts_tag)
    if offsets and counts:
      end = max(int(o) + int(c) for o, c in zip(_as_tuple(offsets), _as_tuple(counts)))
      length = os.path.getsize(path)
      if end > length:
        raise UserError(f"{path}: truncated: {length} bytes, but its pixel data ends at byte "
                        f"{end}")


def turned_by_exif(path: str | os.PathLike) -> bool:
  """Whether an image file is displayed a quarter turn from how it is stored."""
  with _opened(path) as img:
    return _turned(img)


def displayed_size(path: str | os.PathLike, what: str = "image") -> tuple[int, int]:
  """An image file's (width, height) as displayed, from its header alone.

  A TIFF is also checked to be as long as its header says (a truncated copy
  fails here, not when its pixels are read).

  Args:
    path: The file.
    what: What the file is ("image", "mask"), for the error message.

  Raises:
    UserError: the file is missing, not a readable image, or a truncated TIFF.
  """
  with _opened(path, what) as img:
    if img.format == "TIFF":
      _check_tiff_length(img, path)
    return _upright_size(img)


def _as_float(img: Image.Image, channels: int, path: str | os.PathLike) -> np.ndarray:
  """float32 (H, W, channels) in [0, 1] of an open image (see `read_image` for the scale)."""
  if _wide(img.mode):
    array = np.asarray(img, dtype=np.float32)
    if img.mode == "F" and not np.isfinite(array).all():
      raise UserError(f"{path}: {np.count_nonzero(~np.isfinite(array))} of its 32-bit float "
                      "pixels are NaN or infinite")
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if img.mode == "F":
      if not (0 <= low and high <= 1):
        raise UserError(f"{path}: 32-bit float pixels span [{low:g}, {high:g}]; float images "
                        "must already be scaled to [0, 1]")
    else:
      if not (0 <= low and high <= 65535):
        raise UserError(f"{path}: 32-bit integer pixels span [{low:g}, {high:g}]; integer "
                        "images must be 8 or 16 bits (0-65535)")
      array /= 65535.0
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
  """Reads an image file as float32 (H, W, channels) in [0, 1], as it is displayed.

  Grey, RGB, RGBA, palette and 16-bit images are accepted; grey is repeated
  to 3 channels and colour is converted to luminance as `channels` asks. The
  EXIF orientation is applied. The scale is the file's type, never its content:
  8-bit / 255, 16-bit and 32-bit integer / 65535 (values past 65535 are an
  error), 32-bit float as it is (values outside [0, 1] are an error).

  Raises:
    UserError: the file is missing, not a readable image, or out of its scale.
  """
  _check_channels(channels)
  with _opened(path) as img:
    _upright(img)
    return _as_float(img, channels, path)


def read_picture(path: str | os.PathLike, channels: int) -> tuple[np.ndarray, float | None]:
  """Reads an image as displayed, as uint8 (H, W) grey for pictures of it: the mean of the
  `channels` that `read_image` gives, rounded.

  Returns:
    The picture and, for a 16- or 32-bit image, its brightest pixel as a fraction of full
    scale (`read_image`'s); None for an 8-bit one.

  Raises:
    UserError: the file is missing, not a readable image, or out of its scale.
  """
  _check_channels(channels)
  with _opened(path) as img:
    _upright(img)
    # In integers: a 6000x6000 scan's picture takes 36 MB, not float32 planes of 144 MB each.
    if not _wide(img.mode) and channels == 1:
      return np.asarray(img.convert("L")), None
    if not _wide(img.mode):  # A sum of thirds is never halfway: rounds as the float mean did.
      planes = np.asarray(img.convert("RGB"))
      total = sum(planes[..., c].astype(np.uint16) for c in range(3))
      return np.round(total / 3).astype(np.uint8), None
    grey = _as_float(img, 1, path)[..., 0]
  brightest = float(grey.max()) if grey.size else 0.0
  return (grey * 255).round().astype(np.uint8), brightest


def load_image(path: str | os.PathLike, channels: int,
               size: int) -> tuple[np.ndarray, tuple[int, int]]:
  """Reads an image resized to float32 (size, size, channels) in [0, 1], and its stored size.

  Nearly the same image as `resize_image(read_image(path, channels), size)`
  (within a few 8-bit levels), made faster: 8-bit images are resized before
  they become floats, and JPEGs are decoded straight at a reduced scale when
  that is still at least `size`. Training, evaluation, predict and serving all
  read images so.

  Returns:
    The image and the file's (width, height) as displayed (EXIF orientation applied).

  Raises:
    UserError: the file is missing, not a readable image, or out of its scale.
  """
  _check_channels(channels)
  with _opened(path) as img:
    stored = _upright_size(img)
    if _wide(img.mode):
      _upright(img)
      return resize_image(_as_float(img, channels, path), size), stored
    mode = "L" if channels == 1 else "RGB"
    img.draft(mode, (size, size))
    _upright(img)
    img = img.convert(mode)
    if img.size != (size, size):
      img = img.resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(img, dtype=np.float32) / 255.0
  return (array[..., None] if array.ndim == 2 else array), stored


def read_mask(path: str | os.PathLike) -> np.ndarray:
  """Reads a mask image as uint8 (H, W) in {0, 1}, as it is displayed.

  Palette masks are foreground where their index is not 0. Other masks are
  foreground where not 0 when their largest value is below half their type's
  range (label maps: 0/1, 0/2, 0/1/2/4), else above that half (0/255 masks,
  with or without anti-aliased edges). A mask with any value not 0 is never
  read as empty.

  Raises:
    UserError: the file is missing or is not a readable image.
  """
  with _opened(path, "mask") as img:
    _upright(img)
    if img.mode == "P":
      return (np.asarray(img) != 0).astype(np.uint8)
    if img.mode.startswith("I"):
      array, half = np.asarray(img), 32767
    else:
      array, half = np.asarray(img if img.mode in ("L", "1") else img.convert("L")), 127
  threshold = half if array.max(initial=0) > half else 0
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
