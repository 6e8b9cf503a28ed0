"""Decoding probability maps: the expected-Dice mask and the post-processing."""

import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax import decoding
from unet_jax import metrics
from unet_jax.errors import UserError


def _dice(mask, truths):
  counts = metrics.confusion_counts(np.broadcast_to(mask, truths.shape), truths)
  return metrics.per_image_metrics(counts)["dice"]


def test_a_faint_tumour_is_kept_where_a_fixed_threshold_loses_it():
  probs = np.full((16, 16), 0.01)
  probs[4:8, 4:8] = 0.3  # A model unsure of this image: nothing passes 0.5.
  mask = decoding.expected_dice_mask(probs)
  np.testing.assert_array_equal(mask, probs > 0.2)
  assert not (probs > 0.5).any()


def test_confident_maps_decode_as_the_half_threshold_does():
  rng = np.random.default_rng(0)
  probs = np.where(rng.random((32, 32)) < 0.2, 0.97, 0.02) + rng.uniform(-0.01, 0.01, (32, 32))
  np.testing.assert_array_equal(decoding.expected_dice_mask(probs), probs > 0.5)


def test_empty_only_when_allowed_and_likeliest():
  probs = np.full((8, 8), 0.002)
  probs[3, 3] = 0.01
  assert not decoding.expected_dice_mask(probs).any()
  forced = decoding.expected_dice_mask(probs, allow_empty=False)
  assert forced.sum() >= 1 and forced[3, 3]


@pytest.mark.parametrize("rule", ["threshold", "expected_dice"])
def test_never_empty_takes_the_likeliest_region_and_one_pixel_of_a_map_of_zeros(rule):
  probs = np.full((8, 8), 0.01)
  probs[2:4, 2:5] = 0.3  # Nothing passes 0.5.
  assert decoding.decode(probs, rule, 0.5, False, False, False).sum() == (
      6 if rule == "expected_dice" else 0)
  np.testing.assert_array_equal(decoding.decode(probs, rule, 0.5, True, False, False),
                                probs == 0.3)
  # A logit under -88 is a probability of 0 in float32: no region, not the whole image.
  zeros = decoding.decode(np.zeros((8, 8), np.float32), rule, 0.5, True, True, True)
  assert zeros.sum() == 1 and zeros[0, 0]


def _expected_dice_mask_by_argsort(probs, allow_empty):
  """The definition, with every array in float64 and the sort's index."""
  flat = np.asarray(probs, np.float64).ravel()
  order = np.argsort(-flat, kind="stable")
  expected = 2 * np.cumsum(flat[order]) / (np.arange(1, flat.size + 1) + flat.sum())
  best = int(np.argmax(expected))
  mask = np.zeros(flat.size, bool)
  empty_chance = np.exp(np.log1p(-np.minimum(flat, 1 - 1e-7)).sum())
  if not (allow_empty and empty_chance >= expected[best]):
    mask[order[:best + 1]] = True
  return mask.reshape(np.shape(probs))


def test_the_mask_is_the_definitions_to_the_pixel_ties_and_large_maps_included():
  rng = np.random.default_rng(3)
  maps = [rng.random((40, 30)), rng.beta(0.3, 3.0, (64, 64)).astype(np.float32),
          np.round(rng.beta(0.5, 2.0, (50, 50)) * 8) / 8,  # Many equal values.
          np.where(rng.random((33, 33)) < 0.1, 1.0, 0.0),  # Saturated: ties at 1 and 0.
          np.full((16, 16), 0.002), np.zeros((8, 8), np.float32),
          np.where(np.arange(64).reshape(8, 8) == 9, np.nan, 0.3),  # A NaN sorts last.
          rng.beta(0.2, 5.0, (1100, 1000)).astype(np.float32)]  # Past one chunk.
  for probs in maps:
    for allow_empty in (True, False):
      np.testing.assert_array_equal(decoding.expected_dice_mask(probs, allow_empty),
                                    _expected_dice_mask_by_argsort(probs, allow_empty))


def test_no_fixed_threshold_beats_it_in_expected_dice():
  # Truths drawn pixel by pixel from the map: the decoded mask's mean Dice is
  # at least that of every threshold's mask, for maps of different confidence.
  rng = np.random.default_rng(1)
  for scale in (0.35, 0.6, 0.9):
    probs = np.clip(scale * rng.beta(0.5, 2.0, (12, 12)) * 1.6, 0, 1)
    truths = rng.random((3000, 12, 12)) < probs
    ours = _dice(decoding.expected_dice_mask(probs), truths).mean()
    for threshold in np.arange(0.05, 1.0, 0.05):
      assert ours >= _dice(probs > threshold, truths).mean() - 0.005, (scale, threshold)


def test_jax_arrays_decode_as_numpy_ones():
  probs = np.full((8, 8), 0.01, np.float32)
  probs[2:4, 2:5] = 0.3
  for rule in decoding.DECODERS:
    mask = decoding.decode(jnp.asarray(probs), rule, 0.5, never_empty=True)
    assert isinstance(mask, np.ndarray)
    np.testing.assert_array_equal(mask, decoding.decode(probs, rule, 0.5, never_empty=True))


def test_post_processing_of_a_map_that_is_not_2d_is_a_clear_error():
  with pytest.raises(ValueError, match=r"probabilities of shape \(2, 8, 8\): the largest blob"):
    decoding.decode(np.zeros((2, 8, 8)), "threshold", 0.5, largest_component=True)
  assert decoding.decode(np.zeros((2, 8, 8)), "threshold", 0.5).shape == (2, 8, 8)


def test_unknown_decoder_is_a_user_error():
  with pytest.raises(UserError, match="eval.decode='otsu'"):
    decoding.check_decoder("otsu")


def test_largest_blob_keeps_the_biggest_one():
  mask = np.zeros((10, 10), bool)
  mask[0:2, 0:2] = True
  mask[5:9, 5:9] = True
  mask[9, 0] = True
  kept = decoding.largest_blob(mask)
  assert kept.sum() == 16 and kept[5:9, 5:9].all()
  assert not decoding.largest_blob(np.zeros((4, 4), bool)).any()


def test_fill_boxes_fills_each_blobs_bounding_box():
  mask = np.zeros((10, 10), bool)
  mask[1, 1:4] = mask[2:4, 2] = True  # A T: its box is rows 1-3, columns 1-3.
  mask[7, 7] = True
  filled = decoding.fill_boxes(mask)
  expected = np.zeros((10, 10), bool)
  expected[1:4, 1:4] = expected[7, 7] = True
  np.testing.assert_array_equal(filled, expected)
