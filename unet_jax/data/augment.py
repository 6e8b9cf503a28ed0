"""Training augmentation that is safe for MRI: small rigid motion and zoom, intensity jitter
(brightness, contrast, gamma, noise), flips.

Each transform has its own strength and probability in `config.augment`. The
same geometric transform moves image and mask; masks are resampled with
nearest neighbour so they stay binary. Every random number is drawn whether
or not its transform fires, so turning one transform off leaves the others'
draws, and so the batches of an ablation, unchanged.
"""

import math
from typing import Any

import ml_collections
import numpy as np
from PIL import Image

from unet_jax.errors import UserError

PROBABILITIES = ("rotate_prob", "shift_prob", "zoom_prob", "brightness_prob", "contrast_prob",
                 "gamma_prob", "noise_prob", "hflip_prob", "vflip_prob", "cutmix_prob")


def check(config: ml_collections.ConfigDict) -> None:
  """Raises UserError for a `config.augment` strength or probability out of its range."""
  for name in PROBABILITIES:
    if not 0 <= config[name] <= 1:
      raise UserError(f"augment.{name}={config[name]} is not a probability in [0, 1]")
  # Factors drawn from [1 - x, 1 + x] must stay positive.
  for name in ("zoom", "contrast", "gamma"):
    if not 0 <= config[name] < 1:  # NaN too.
      raise UserError(f"augment.{name}={config[name]} is not in [0, 1)")
  # The most any of these can do: half a turn, half the image, the whole intensity range.
  for name, most in (("rotate_degrees", 180), ("shift_fraction", 0.5), ("brightness", 1),
                     ("noise", 1)):
    if not 0 <= config[name] <= most:  # NaN too.
      raise UserError(f"augment.{name}={config[name]} is not in [0, {most}]")


def _affine_matrix(height: int, width: int, degrees: float, shift: tuple[int, int],
                   zoom: float) -> tuple[float, ...]:
  """PIL's inverse affine for `Image.rotate(degrees, translate=shift)` with a zoom folded in.

  Rotation (anticlockwise) and zoom are about the centre, then the shift, so
  the image is resampled once whichever transforms fire.
  """
  angle = -math.radians(degrees)
  a, b = math.cos(angle) / zoom, math.sin(angle) / zoom
  d, e = -b, a
  centre_x, centre_y = width / 2, height / 2
  x, y = -centre_x - shift[0], -centre_y - shift[1]
  return (a, b, a * x + b * y + centre_x, d, e, d * x + e * y + centre_y)


def _resample(plane: np.ndarray, matrix: tuple[float, ...],
              resample: Image.Resampling) -> np.ndarray:
  image = Image.fromarray(plane)
  return np.asarray(image.transform(image.size, Image.Transform.AFFINE, matrix, resample,
                                    fillcolor=0))


def _move(image: np.ndarray, mask: np.ndarray, degrees: float, shift: tuple[int, int],
          zoom: float) -> tuple[np.ndarray, np.ndarray]:
  matrix = _affine_matrix(*image.shape[:2], degrees, shift, zoom)
  planes = [_resample(np.ascontiguousarray(image[..., c], np.float32), matrix,
                      Image.Resampling.BILINEAR) for c in range(image.shape[-1])]
  moved_mask = _resample(np.ascontiguousarray(mask[..., 0]), matrix, Image.Resampling.NEAREST)
  return np.stack(planes, axis=-1), moved_mask[..., None]


def augment(sample: dict[str, Any], rng: np.random.Generator,
            config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Returns an augmented copy of a {"image", "mask", ...} sample.

  Args:
    sample: float32 (H, W, C) image in [0, 1] and uint8 (H, W, 1) mask.
    rng: The sample's own generator (grain derives it from the seed and the
      sample's position in the run).
    config: The `config.augment` block.
  """
  image, mask = sample["image"], sample["mask"]
  fire = rng.random(6) < np.array([config.rotate_prob, config.shift_prob, config.brightness_prob,
                                   config.contrast_prob, config.hflip_prob, config.vflip_prob])
  degrees = rng.uniform(-config.rotate_degrees, config.rotate_degrees)
  max_shift = config.shift_fraction * np.array(image.shape[1::-1])
  shift = rng.uniform(-max_shift, max_shift)
  brightness = rng.uniform(-config.brightness, config.brightness)
  contrast = rng.uniform(1 - config.contrast, 1 + config.contrast)
  # Drawn after the others, so that runs from before these existed keep their draws.
  zoom_fires = rng.random() < config.zoom_prob
  zoom = rng.uniform(1 - config.zoom, 1 + config.zoom)
  gamma_fires, noise_fires = rng.random(2) < np.array([config.gamma_prob, config.noise_prob])
  gamma = rng.uniform(1 - config.gamma, 1 + config.gamma)
  noise_std = rng.uniform(0, config.noise)

  degrees = degrees if fire[0] else 0.0
  shift = (int(round(shift[0])), int(round(shift[1]))) if fire[1] else (0, 0)
  zoom = zoom if zoom_fires else 1.0
  if degrees or any(shift) or zoom != 1.0:
    image, mask = _move(image, mask, degrees, shift, zoom)
  if gamma_fires:  # Before the jitters, on intensities still in [0, 1].
    image = np.clip(image, 0.0, 1.0)**gamma
  if fire[2]:
    image = image + brightness
  if fire[3]:
    mean = image.mean()
    image = (image - mean) * contrast + mean
  if noise_fires:  # The last draw, so only runs with noise pay for a field of normals.
    image = image + noise_std * rng.standard_normal(image.shape, np.float32)
  if fire[4]:
    image, mask = image[:, ::-1], mask[:, ::-1]
  if fire[5]:
    image, mask = image[::-1], mask[::-1]
  return {**sample, "image": np.ascontiguousarray(np.clip(image, 0.0, 1.0), dtype=np.float32),
          "mask": np.ascontiguousarray(mask, dtype=np.uint8)}
