"""COCO segmentation exports as a grain random-access source.

Layout: `<root>/<split>/_annotations.coco.json` beside that split's images
(the Roboflow export). Every selected category is merged into one tumour
foreground; an image with no annotation is a negative with an empty mask.
"""

import json
import os
import pathlib
from typing import Any, Sequence

import grain
import numpy as np
from pycocotools import mask as mask_utils

from unet_jax.data import images
from unet_jax.errors import UserError

ANNOTATIONS_FILE = "_annotations.coco.json"


def annotations_path(root: str | os.PathLike, split: str) -> pathlib.Path:
  return pathlib.Path(root) / split / ANNOTATIONS_FILE


def load_coco_json(path: pathlib.Path) -> dict[str, Any]:
  """Reads and checks a COCO annotation file.

  Raises:
    UserError: missing file, malformed JSON, or not a COCO export.
  """
  try:
    with open(path) as f:
      coco = json.load(f)
  except FileNotFoundError:
    raise UserError(f"{path}: annotation file not found") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: malformed JSON ({e})") from None
  if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
    raise UserError(f"{path}: not a COCO export (no 'images' list)")
  coco.setdefault("annotations", [])
  for image in coco["images"]:
    if not {"id", "file_name", "width", "height"} <= set(image):
      raise UserError(f"{path}: image entry {image!r:.80} lacks id, file_name, width or height")
  return coco


def rasterise(annotation: dict[str, Any], height: int, width: int) -> np.ndarray:
  """One annotation's mask at (height, width), from its polygon, RLE or bbox."""
  segmentation = annotation.get("segmentation")
  if isinstance(segmentation, list) and segmentation:
    polygons = [p for p in segmentation if len(p) >= 6]
    if not polygons:
      return np.zeros((height, width), np.uint8)
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
  elif isinstance(segmentation, dict):
    rle = segmentation
    if isinstance(rle.get("counts"), list):
      rle = mask_utils.frPyObjects(rle, height, width)
  else:
    x, y, w, h = annotation["bbox"]
    rle = mask_utils.frPyObjects([[x, y, x + w, y, x + w, y + h, x, y + h]], height, width)[0]
  return mask_utils.decode(rle)


class CocoSource(grain.sources.RandomAccessDataSource):
  """One split of a COCO export: {"image", "mask", "file_name"} records.

  Images are float32 (size, size, channels) in [0, 1]; masks uint8
  (size, size, 1) in {0, 1}. Files are read on access, never held in memory.
  """

  def __init__(self, root: str | os.PathLike, split: str, image_size: int, channels: int = 1,
               category_ids: Sequence[int] = ()):
    self.json_path = annotations_path(root, split)
    self.split_dir = self.json_path.parent.resolve()
    self.image_size = image_size
    self.channels = channels
    coco = load_coco_json(self.json_path)
    self.images = sorted(coco["images"], key=lambda image: image["file_name"])
    by_id = {image["id"]: image for image in self.images}
    self.annotations: dict[Any, list[dict[str, Any]]] = {image["id"]: [] for image in self.images}
    wanted = set(category_ids)
    for annotation in coco["annotations"]:
      if annotation.get("image_id") not in by_id:
        raise UserError(f"{self.json_path}: annotation {annotation.get('id')} refers to "
                        f"unknown image id {annotation.get('image_id')}")
      if not wanted or annotation.get("category_id") in wanted:
        self.annotations[annotation["image_id"]].append(annotation)

  def __len__(self) -> int:
    return len(self.images)

  @property
  def file_names(self) -> list[str]:
    """Image file names in index order."""
    return [image["file_name"] for image in self.images]

  def __repr__(self) -> str:
    return f"CocoSource({self.json_path}, {len(self)} images)"

  def image_path(self, file_name: str) -> pathlib.Path:
    """The image's path, refusing names that leave the split's folder."""
    path = (self.split_dir / file_name).resolve()
    if os.path.isabs(file_name) or not path.is_relative_to(self.split_dir):
      raise UserError(f"{self.json_path}: file_name {file_name!r} leaves the dataset folder; refused")
    return path

  def mask(self, index: int) -> np.ndarray:
    """The merged foreground mask of image `index` at its original size."""
    info = self.images[index]
    height, width = int(info["height"]), int(info["width"])
    mask = np.zeros((height, width), np.uint8)
    for annotation in self.annotations[info["id"]]:
      mask |= rasterise(annotation, height, width)
    return mask

  def __getitem__(self, index: int) -> dict[str, Any]:
    info = self.images[index]
    path = self.image_path(info["file_name"])
    image = images.read_image(path, self.channels)
    if image.shape[:2] != (int(info["height"]), int(info["width"])):
      raise UserError(f"{path}: image is {image.shape[1]}x{image.shape[0]} but "
                      f"{self.json_path.name} says {info['width']}x{info['height']}")
    return {
        "image": images.resize_image(image, self.image_size),
        "mask": images.resize_mask(self.mask(index), self.image_size),
        "file_name": info["file_name"],
    }

