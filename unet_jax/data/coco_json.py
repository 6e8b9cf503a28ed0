"""COCO annotation files: reading and checking them, and turning annotations into masks.

An annotation's geometry is its polygons (one or several), its RLE (`counts`
as a list or a compressed string) or, with no segmentation, its bbox. It is
checked once, when a split is loaded: polygons reaching outside the image are
clipped to it, polygons without area are dropped, each with a warning; what
cannot be read at all is a `UserError`.
"""

import dataclasses
import json
import math
import pathlib
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from unet_jax.errors import UserError

ANNOTATIONS_FILE = "_annotations.coco.json"


def load(path: pathlib.Path) -> dict[str, Any]:
  """Reads and checks a COCO annotation file.

  Returns:
    The file's dict, with "annotations" and "categories" present.

  Raises:
    UserError: missing file, malformed JSON, not a COCO export, a bad image
      entry, or an annotation of an unknown image.
  """
  try:
    with open(path, encoding="utf-8") as f:
      coco = json.load(f)
  except FileNotFoundError:
    raise UserError(f"{path}: annotation file not found") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: malformed JSON ({e})") from None
  except OSError as e:
    raise UserError(f"{path}: cannot read the annotation file ({e.strerror})") from None
  if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
    raise UserError(f"{path}: not a COCO export (no 'images' list)")
  coco.setdefault("annotations", [])
  coco.setdefault("categories", [])
  if not isinstance(coco["annotations"], list) or not isinstance(coco["categories"], list):
    raise UserError(f"{path}: not a COCO export ('annotations' or 'categories' is not a list)")
  ids = set()
  for image in coco["images"]:
    if not isinstance(image, dict) or not {"id", "file_name", "width", "height"} <= set(image):
      raise UserError(f"{path}: image entry {image!r:.80} lacks id, file_name, width or height")
    sizes = [image[k] for k in ("width", "height")]
    if not isinstance(image["file_name"], str) or not all(
        isinstance(v, (int, float)) and v > 0 and float(v).is_integer() for v in sizes):
      raise UserError(f"{path}: image {image['id']!r} needs a string file_name and positive "
                      "integer width and height")
    image["width"], image["height"] = (int(v) for v in sizes)
    if not isinstance(image["id"], (int, float, str)):
      raise UserError(f"{path}: image {image['file_name']!r} has id {image['id']!r:.40}; ids "
                      "are numbers or strings")
    if image["id"] in ids:
      raise UserError(f"{path}: image id {image['id']!r} appears twice")
    ids.add(image["id"])
  for annotation in coco["annotations"]:
    if not isinstance(annotation, dict):
      raise UserError(f"{path}: annotation {annotation!r:.40} is not an object")
    image_id = annotation.get("image_id")
    if not isinstance(image_id, (int, str)) or image_id not in ids:
      raise UserError(f"{path}: annotation {annotation.get('id')} refers to unknown image id "
                      f"{image_id!r:.40}")
    if not isinstance(annotation.get("category_id"), (int, float, str, type(None))):
      raise UserError(f"{path}: annotation {annotation.get('id')} has category_id "
                      f"{annotation['category_id']!r:.40}; ids are numbers or strings")
  for category in coco["categories"]:
    if isinstance(category, dict) and not isinstance(category.get("id"),
                                                     (int, float, str, type(None))):
      raise UserError(f"{path}: category {category.get('name')!r:.40} has id "
                      f"{category['id']!r:.40}; ids are numbers or strings")
  return coco


@dataclasses.dataclass(frozen=True)
class Shape:
  """One annotation's checked geometry, ready to rasterise.

  Attributes:
    kind: "polygon", "rle" or "bbox" (what the annotation gave).
    polygons: Flat [x0, y0, x1, y1, ...] lists inside the image (polygon, bbox).
    rle: A compressed RLE of the image's size (rle).
  """
  kind: str
  polygons: tuple[tuple[float, ...], ...] = ()
  rle: dict[str, Any] | None = None


def _on_one_line(points: np.ndarray) -> bool:
  """Whether a polygon's points lie on one line (or are one point): it covers no area.

  Not its signed area: that of a self-crossing "bow-tie" can be 0, and pycocotools fills
  its two triangles."""
  offsets = points - points[0]
  direction = offsets[np.abs(offsets).sum(axis=1).argmax()]
  return not np.any(offsets[:, 0] * direction[1] - offsets[:, 1] * direction[0])


def _clip(points: np.ndarray, width: int, height: int) -> np.ndarray:
  """Sutherland-Hodgman clip of a polygon to the image rectangle [0, width] x [0, height]."""
  for axis, bound, below in ((0, 0.0, False), (0, width, True), (1, 0.0, False), (1, height, True)):
    if not len(points):
      break
    inside = points[:, axis] <= bound if below else points[:, axis] >= bound
    clipped = []
    for i, point in enumerate(points):
      previous = points[i - 1]
      if inside[i] != inside[i - 1]:
        t = (bound - previous[axis]) / (point[axis] - previous[axis])
        crossing = previous + t * (point - previous)
        crossing[axis] = bound
        clipped.append(crossing)
      if inside[i]:
        clipped.append(point)
    points = np.asarray(clipped, np.float64).reshape(-1, 2)
  return points


def _as_polygons(segmentation: list[Any], where: str) -> list[list[float]]:
  if segmentation and all(isinstance(v, (int, float)) for v in segmentation):
    segmentation = [segmentation]  # some exporters write one flat polygon
  polygons = []
  for polygon in segmentation:
    if (not isinstance(polygon, list) or len(polygon) % 2
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in polygon)):
      raise UserError(f"{where}: polygon {polygon!r:.60} is not an even-length list of numbers")
    polygons.append(polygon)
  return polygons


def _checked_polygons(polygons: list[list[float]], height: int, width: int, where: str,
                      problems: list[str]) -> tuple[tuple[float, ...], ...]:
  kept = []
  for polygon in polygons:
    points = np.asarray(polygon, np.float64).reshape(-1, 2)
    if len(points) < 3 or _on_one_line(points):
      problems.append(f"{where}: zero-area polygon ignored")
      continue
    if (points < 0).any() or (points[:, 0] > width).any() or (points[:, 1] > height).any():
      points = _clip(points, width, height)
      if len(points) < 3 or _on_one_line(points):
        problems.append(f"{where}: polygon lies outside the {width}x{height} image; ignored")
        continue
      problems.append(f"{where}: polygon reaches outside the {width}x{height} image; clipped")
    kept.append(tuple(float(v) for v in points.ravel()))
  return tuple(kept)


def _string_counts(counts: str) -> list[int] | None:
  """The run lengths of COCO's compressed counts string, None when it is malformed.

  Each count is a little-endian run of 6-bit characters offset by 48 (5 bits of
  value, 0x20 for "more", 0x10 the sign of the last), and counts from the
  fourth on are stored as the difference to the count two before.
  """
  values: list[int] = []
  value = shift = 0
  for char in counts:
    c = ord(char) - 48
    if not 0 <= c < 64:
      return None
    value |= (c & 0x1F) << shift
    shift += 5
    if c & 0x20:
      continue
    if c & 0x10:
      value -= 1 << shift
    if len(values) > 2:
      value += values[-2]
    values.append(value)
    value = shift = 0
  return None if shift else values


def _checked_rle(rle: dict[str, Any], height: int, width: int, where: str) -> dict[str, Any]:
  counts, size = rle.get("counts"), rle.get("size")
  if not isinstance(size, list) or size != [height, width]:
    raise UserError(f"{where}: RLE size {size} differs from the image's [height, width] "
                    f"[{height}, {width}]")
  if isinstance(counts, (str, bytes)):
    values = _string_counts(counts.decode("latin-1") if isinstance(counts, bytes) else counts)
    if values is None:
      raise UserError(f"{where}: RLE counts string is not valid COCO RLE")
    counts = values
  if not isinstance(counts, list):
    raise UserError(f"{where}: RLE counts must be a list or a string")
  # pycocotools trusts the counts: too few leave pixels unset, too many write past the mask.
  if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != height * width:
    raise UserError(f"{where}: RLE counts do not add up to the {width}x{height} image")
  return mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)


def shape_of(annotation: dict[str, Any], height: int, width: int, where: str,
             problems: list[str]) -> Shape | None:
  """Checks one annotation's geometry against its image's size.

  Args:
    annotation: The COCO annotation.
    height: The image's height from the annotation file.
    width: The image's width from the annotation file.
    where: Names the file and annotation in messages.
    problems: Receives one line per fixable problem (clipped or dropped polygons).

  Returns:
    The shape to rasterise, or None when nothing of it is left.

  Raises:
    UserError: geometry that cannot be read.
  """
  segmentation = annotation.get("segmentation")
  if isinstance(segmentation, dict):
    return Shape("rle", rle=_checked_rle(segmentation, height, width, where))
  if isinstance(segmentation, list) and segmentation:
    polygons = _checked_polygons(_as_polygons(segmentation, where), height, width, where,
                                 problems)
    return Shape("polygon", polygons) if polygons else None
  if segmentation not in (None, []):
    raise UserError(f"{where}: segmentation is neither polygons nor RLE")
  bbox = annotation.get("bbox")
  if (not isinstance(bbox, list) or len(bbox) != 4
      or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
    raise UserError(f"{where}: no segmentation and no [x, y, width, height] bbox")
  x, y, w, h = bbox
  if w <= 0 or h <= 0:
    problems.append(f"{where}: zero-area bbox ignored")
    return None
  polygons = _checked_polygons([[x, y, x + w, y, x + w, y + h, x, y + h]], height, width, where,
                               problems)
  return Shape("bbox", polygons) if polygons else None


def to_rle(shape: Shape, height: int, width: int) -> dict[str, Any]:
  """The compressed RLE of a checked shape."""
  if shape.rle is not None:
    return shape.rle
  return mask_utils.merge(mask_utils.frPyObjects([list(p) for p in shape.polygons], height, width))


def rasterise(shape: Shape, height: int, width: int) -> np.ndarray:
  """The uint8 (height, width) mask of a checked shape."""
  return mask_utils.decode(to_rle(shape, height, width))
