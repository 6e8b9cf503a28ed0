"""Probability map -> binary mask: by a threshold, or the mask of highest expected Dice, then
the post-processing (the largest blob, each blob's box).

numpy and scipy only, so `serving` can use it without the model code.
"""

import numpy as np
from scipy import ndimage

from unet_jax.errors import UserError

DECODERS = ("threshold", "expected_dice")
_CHUNK = 1 << 20  # Elements of expected_dice_mask's temporary arrays.


def check_decoder(name: str) -> None:
  """Raises UserError unless `name` is one of DECODERS."""
  if name not in DECODERS:
    raise UserError(f"eval.decode={name!r} is not one of {list(DECODERS)}")


def decode(probs: np.ndarray, rule: str, threshold: float | None, never_empty: bool = False,
           largest_component: bool = False, fill_box: bool = False) -> np.ndarray:
  """The mask `rule` (one of DECODERS) reads from a probability map, post-processed.

  Args:
    probs: Probabilities, any shape ((H, W) for the post-processing).
    rule: "threshold" (probs above `threshold`) or "expected_dice".
    threshold: Used by "threshold" only.
    never_empty: Never return an empty mask: for data where every image
      holds a tumour.
    largest_component: Keep only the largest 8-connected blob.
    fill_box: Replace each blob by its bounding box.
  """
  check_decoder(rule)
  probs = np.asarray(probs)
  if (largest_component or fill_box) and probs.ndim != 2:
    raise ValueError(f"probabilities of shape {probs.shape}: the largest blob and the boxes "
                     "are found in one (H, W) map")
  if rule == "expected_dice":
    mask = expected_dice_mask(probs, allow_empty=not never_empty)
  else:
    mask = probs > threshold
    if never_empty and not mask.any():
      # The data promise a tumour in every image: take the likeliest region (a map of zeros,
      # as a logit under -88 gives, has none: its first pixel, as expected_dice_mask takes).
      mask = probs > probs.max() / 2
      if not mask.any():
        mask.flat[np.argmax(probs)] = True
  if largest_component:
    mask = largest_blob(mask)
  if fill_box:
    mask = fill_boxes(mask)
  return mask


def expected_dice_mask(probs: np.ndarray, allow_empty: bool = True) -> np.ndarray:
  """The mask maximising the expected Dice if each pixel is tumour with its probability.

  With pixels independent, E[Dice(M)] ~ 2 sum_{i in M} p_i / (|M| + sum_i p_i),
  which for every size |M| = k is largest for the k likeliest pixels; the
  best k is read off the cumulative sum of the sorted probabilities. So each
  image gets its own cut-off and no threshold is tuned on labels.

  Args:
    probs: Probabilities, any shape.
    allow_empty: Compare against an empty mask, whose expected Dice is the
      chance that no pixel is tumour (an empty truth scores Dice 1). False
      for data where every image holds a tumour.

  Returns:
    A boolean mask of the shape of `probs`.
  """
  flat = np.asarray(probs).ravel()
  # Computed as 2 * cumsum(sorted) / (k + total) in float64, without the index of the sort:
  # predict decodes at the image's own size, and a 6000x6000 map's arrays are 288 MB each.
  values = flat.astype(np.float64)
  total = values.sum()
  # Then, in place, log(1 - p): the chance that no pixel is tumour.
  np.minimum(values, 1 - 1e-7, out=values)
  np.negative(values, out=values)
  np.log1p(values, out=values)
  empty_chance = np.exp(values.sum())
  del values
  descending = np.sort(-flat)  # Negated, not reversed: a NaN stays last, as argsort put it.
  np.negative(descending, out=descending)
  expected = np.cumsum(descending, dtype=np.float64)
  for start in range(0, flat.size, _CHUNK):
    stop = min(start + _CHUNK, flat.size)
    expected[start:stop] *= 2
    expected[start:stop] /= np.arange(start + 1, stop + 1) + total
  best = int(np.argmax(expected))
  if allow_empty and empty_chance >= expected[best]:
    return np.zeros(np.shape(probs), bool)
  # The best + 1 likeliest pixels; among equal ones, the first in order.
  cut = descending[best]
  mask = flat > cut
  ties = np.flatnonzero(flat == cut)[:best + 1 - int(mask.sum())]
  mask[ties] = True
  return mask.reshape(np.shape(probs))


def largest_blob(mask: np.ndarray) -> np.ndarray:
  """Keeps only the largest 8-connected component of a binary (H, W) mask."""
  labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
  if count <= 1:
    return mask.astype(bool)
  sizes = np.bincount(labels.ravel())
  sizes[0] = 0
  return labels == sizes.argmax()


def fill_boxes(mask: np.ndarray) -> np.ndarray:
  """Each 8-connected component of a binary (H, W) mask replaced by its bounding box."""
  labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))
  filled = np.zeros(mask.shape, bool)
  for box in ndimage.find_objects(labels):
    filled[box] = True
  return filled
