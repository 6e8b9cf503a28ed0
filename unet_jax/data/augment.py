"""Training augmentation that is safe for MRI: small rigid motion and intensity jitter.

The same geometric transform moves image and mask; masks are resampled with
nearest neighbour so they stay binary.
"""

from typing import Any

import ml_collections
import numpy as np
from PIL import Image


def _rotate_shift(plane: np.ndarray, degrees: float, shift: tuple[int, int], resample) -> np.ndarray:
  image = Image.fromarray(plane)
  return np.asarray(image.rotate(degrees, resample=resample, translate=shift, fillcolor=0))


def augment(sample: dict[str, Any], rng: np.random.Generator,
            config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Returns an augmented copy of a {"image", "mask", ...} sample.

  Args:
    sample: float32 (H, W, C) image in [0, 1] and uint8 (H, W, 1) mask.
    rng: The sample's own generator (grain derives it from seed and index).
    config: The `config.augment` block.
  """
  image, mask = sample["image"], sample["mask"]
  if rng.random() < config.geometric_prob:
    degrees = rng.uniform(-config.rotate_degrees, config.rotate_degrees)
    max_shift = config.shift_fraction * image.shape[0]
    shift = tuple(int(round(s)) for s in rng.uniform(-max_shift, max_shift, size=2))
    image = np.stack([_rotate_shift(np.ascontiguousarray(image[..., c]), degrees, shift,
                                    Image.Resampling.BILINEAR)
                      for c in range(image.shape[-1])], axis=-1)
    mask = _rotate_shift(np.ascontiguousarray(mask[..., 0]), degrees, shift,
                         Image.Resampling.NEAREST)[..., None]
  if rng.random() < config.hflip_prob:
    image, mask = image[:, ::-1], mask[:, ::-1]
  if rng.random() < config.intensity_prob:
    contrast = rng.uniform(1 - config.contrast, 1 + config.contrast)
    brightness = rng.uniform(-config.brightness, config.brightness)
    mean = image.mean()
    image = np.clip((image - mean) * contrast + mean + brightness, 0.0, 1.0)
  return {**sample, "image": np.ascontiguousarray(image, dtype=np.float32),
          "mask": np.ascontiguousarray(mask, dtype=np.uint8)}
