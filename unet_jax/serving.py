"""Runs an exported model (from `--mode=export`) with jax, numpy and Pillow only.

    from unet_jax import serving
    model = serving.load("runs/demo/export")
    probs = model(images)            # (N, H, W, C) float32 in [0, 1] -> (N, H, W)
    mask = model.predict_file("scan.png")   # bool mask at the file's own size

This module deliberately imports nothing of the model code (only the numpy
`decoding`), so the folder can be copied next to any jax installation. It
applies model.json's decode rule and `never_empty`, not evaluation's other
post-processing (the largest blob, the box).
"""

import json
import pathlib

import jax
import numpy as np
from PIL import Image

from unet_jax import decoding


class ExportedModel:
  """A deserialized U-Net with the input contract from its model.json."""

  def __init__(self, folder: str | pathlib.Path):
    folder = pathlib.Path(folder)
    self.meta = json.loads((folder / "model.json").read_text())
    self._exported = jax.export.deserialize(bytearray((folder / "model.jax_exported").read_bytes()))

  def __call__(self, images: np.ndarray) -> np.ndarray:
    return np.asarray(self._exported.call(np.asarray(images, np.float32)))

  def predict_file(self, path: str | pathlib.Path) -> np.ndarray:
    """The mask (model.json's decode rule) of one image file, at the file's own size."""
    spec = self.meta["input"]
    with Image.open(path) as img:
      if img.mode.startswith("I;16"):
        array = np.asarray(img, np.float32) / 65535.0
      else:
        array = np.asarray(img.convert("L" if spec["channels"] == 1 else "RGB"), np.float32) / 255.0
    planes = array[..., None] if array.ndim == 2 else array
    resized = np.stack([_resize(planes[..., c], (spec["width"], spec["height"]))
                        for c in range(planes.shape[-1])], axis=-1)
    if resized.shape[-1] != spec["channels"]:
      resized = np.repeat(resized, spec["channels"], axis=-1)
    prob = _resize(self(resized[None])[0], (array.shape[1], array.shape[0]))
    return decoding.decode(prob, self.meta.get("decode", "threshold"), self.meta["threshold"],
                           self.meta.get("never_empty", False))


def _resize(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  return np.asarray(Image.fromarray(np.asarray(plane, np.float32)).resize(size, Image.Resampling.BILINEAR))


def load(folder: str | pathlib.Path) -> ExportedModel:
  return ExportedModel(folder)
