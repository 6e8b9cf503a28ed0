"""Runs an exported model (from `--mode=export`) with jax, numpy and Pillow.

    from unet_jax import serving
    model = serving.load("runs/demo/export")
    probs = model(images)            # (N, H, W, C) float32 in [0, 1], model.json's size
    mask = model.predict_file("scan.png")   # bool mask at the file's own size
    mask = model.predict_file("volume_1_slice_80.h5")   # a BraTS model's: an h5 slice

This module deliberately imports nothing of the model code (only `decoding`,
`images` and `errors`, themselves numpy, scipy and Pillow), so it, those three
and the export folder run beside any jax installation; a BraTS model's .h5
slices also need h5py and `unet_jax.data`. A file is read and
resized exactly as in training, and decoded as model.json says, post-processing
included: as evaluation and `--mode=predict` decode it.
"""

import hashlib
import json
import pathlib

import jax
import numpy as np
from PIL import Image

from unet_jax import decoding
from unet_jax import images


class ExportedModel:
  """A deserialized U-Net with the input contract from its model.json."""

  def __init__(self, folder: str | pathlib.Path):
    folder = pathlib.Path(folder)
    if not (folder / "model.json").is_file():
      raise FileNotFoundError(f"{folder}: no model.json; give an export's folder (RUN/export, "
                              "written by --mode=export)")
    self.meta = json.loads((folder / "model.json").read_text())
    serialized = (folder / "model.jax_exported").read_bytes()
    expected = self.meta.get("model_sha256")  # Exports made before it had none.
    if expected and hashlib.sha256(serialized).hexdigest() != expected:
      raise ValueError(f"{folder}: model.json does not describe model.jax_exported (an export "
                       "stopped between the two, or files of two exports); export again")
    self._exported = jax.export.deserialize(bytearray(serialized))

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """(N, height, width, channels) in [0, 1], at model.json's size -> (N, height, width)."""
    spec = self.meta["input"]
    images = np.asarray(images)
    scaled = ("the model takes floats in [0, 1] (model.json's input.scale); predict_file "
              "scales a file")
    if not np.issubdtype(images.dtype, np.floating):
      raise ValueError(f"images of {images.dtype}: {scaled}")
    if images.size and not 0 <= images.min() <= images.max() <= 1:
      raise ValueError(f"images span [{images.min():g}, {images.max():g}]: {scaled}")
    images = images.astype(np.float32)
    if images.ndim != 4 or images.shape[1:] != (spec["height"], spec["width"], spec["channels"]):
      raise ValueError(f"images of shape {images.shape}: the model takes (N, {spec['height']}, "
                       f"{spec['width']}, {spec['channels']}); predict_file resizes a file")
    if not len(images):  # The artifact's symbolic batch is at least 1.
      return np.zeros((0, spec["height"], spec["width"]), np.float32)
    return np.array(self._exported.call(images))  # A copy: jax's view is read-only.

  def predict_file(self, path: str | pathlib.Path) -> np.ndarray:
    """The mask (model.json's decode rule) of one image file, or of a BraTS model's .h5
    slice, at the file's own size."""
    spec = self.meta["input"]
    if self.meta.get("h5_slices"):
      image, size = self._load_slice(pathlib.Path(path))
    else:
      image, size = images.load_image(path, spec["channels"], spec["height"])
    prob = Image.fromarray(self(image[None])[0]).resize(size, Image.Resampling.BILINEAR)
    meta = self.meta
    return decoding.decode(np.asarray(prob), meta.get("decode", "threshold"), meta["threshold"],
                           meta.get("never_empty", False), meta.get("largest_component", False),
                           meta.get("fill_box", False))

  def _load_slice(self, path: pathlib.Path) -> tuple[np.ndarray, tuple[int, int]]:
    """A BraTS slice's model input, scaled and resized as training read it, and its size."""
    # Only a BraTS model's: h5py and the data package, which serving otherwise does without.
    from unet_jax.data import brats  # pylint: disable=g-import-not-at-top
    h5 = self.meta["h5_slices"]
    image = brats.normalise(brats.read_image(path, h5["modalities"]), h5["clip_percentiles"])
    return images.resize_image(image, self.meta["input"]["height"]), image.shape[1::-1]


def load(folder: str | pathlib.Path) -> ExportedModel:
  return ExportedModel(folder)
