"""Dice and BCE losses on hand-made masks."""

import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax import losses

BIG = 30.0  # A logit whose sigmoid is 1 to float32 precision.


def _mask(pixels):
  mask = np.zeros((1, 4, 4, 1), np.float32)
  for y, x in pixels:
    mask[0, y, x, 0] = 1
  return jnp.asarray(mask)


def test_dice_loss_perfect_disjoint_and_partial():
  truth = _mask([(0, 0), (0, 1), (1, 0), (1, 1)])
  perfect = jnp.where(truth > 0, BIG, -BIG)
  np.testing.assert_allclose(losses.soft_dice_loss(perfect, truth), [0.0], atol=1e-6)

  disjoint = jnp.where(_mask([(3, 3), (3, 2), (2, 3), (2, 2)]) > 0, BIG, -BIG)
  np.testing.assert_allclose(losses.soft_dice_loss(disjoint, truth), [1 - 1 / 9], atol=1e-6)

  # Two of four pixels predicted: Dice = (2*2 + 1) / (2 + 4 + 1).
  half = jnp.where(_mask([(0, 0), (0, 1)]) > 0, BIG, -BIG)
  np.testing.assert_allclose(losses.soft_dice_loss(half, truth), [1 - 5 / 7], atol=1e-6)


def test_empty_mask_predicted_empty_has_no_dice_loss():
  empty = _mask([])
  np.testing.assert_allclose(losses.soft_dice_loss(jnp.full_like(empty, -BIG), empty), [0.0],
                             atol=1e-6)


def test_bce_matches_formula_and_sum_is_weighted():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 4, 4, 1)), jnp.float32)
  masks = jnp.asarray(rng.random((2, 4, 4, 1)) > 0.5, jnp.float32)
  p = 1 / (1 + np.exp(-np.asarray(logits)))
  expected = -(masks * np.log(p) + (1 - masks) * np.log(1 - p)).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(losses.bce_loss(logits, masks), expected, rtol=1e-5)
  total = losses.dice_bce_loss(logits, masks, dice_weight=0.3, bce_weight=2.0)
  np.testing.assert_allclose(
      total, 0.3 * losses.soft_dice_loss(logits, masks) + 2.0 * expected, rtol=1e-5)


def test_lovasz_hinge_is_zero_past_the_margin_and_matches_hand_values():
  truth = _mask([(0, 0), (0, 1)])
  separated = jnp.where(truth > 0, 1.0, -1.0)  # Every pixel at the hinge's margin.
  np.testing.assert_allclose(losses.lovasz_hinge_loss(separated, truth), [0.0], atol=1e-6)

  # One tumour pixel at logit 0 (error 1), the other at the margin; one background
  # pixel at logit 0.5 (error 1.5), the rest at -1. Sorted errors 1.5, 1, 0, ...; the
  # IoU losses after each step are 1/3 (the false positive), then 2/3 (one missed), so
  # the weights are 1/3 and 1/3: loss = 1.5/3 + 1/3.
  logits = separated.at[0, 0, 0, 0].set(0.0).at[0, 3, 3, 0].set(0.5)
  np.testing.assert_allclose(losses.lovasz_hinge_loss(logits, truth), [1.5 / 3 + 1 / 3],
                             rtol=1e-6)

  # An empty mask: the largest error alone counts (one false positive is an IoU of 0).
  empty = _mask([])
  one_false = jnp.full_like(empty, -1.0).at[0, 2, 2, 0].set(2.0)
  np.testing.assert_allclose(losses.lovasz_hinge_loss(one_false, empty), [3.0], rtol=1e-6)


def test_lovasz_term_adds_with_its_weight():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 4, 4, 1)), jnp.float32)
  masks = jnp.asarray(rng.random((2, 4, 4, 1)) > 0.5, jnp.float32)
  np.testing.assert_allclose(
      losses.dice_bce_loss(logits, masks, lovasz_weight=0.5),
      losses.dice_bce_loss(logits, masks) + 0.5 * losses.lovasz_hinge_loss(logits, masks),
      rtol=1e-6)
  # With deep supervision, at full resolution only (the coarser masks are fractions).
  coarse = {1: logits[:, ::2, ::2]}
  with_lovasz = losses.deep_supervision_loss(logits, coarse, masks, lovasz_weight=0.5)
  without = losses.deep_supervision_loss(logits, coarse, masks)
  np.testing.assert_allclose(with_lovasz - without,
                             0.5 * losses.lovasz_hinge_loss(logits, masks) / 1.5, rtol=1e-5)


def test_batch_dice_pools_the_images():
  truth = jnp.concatenate([_mask([(0, 0), (0, 1)]), _mask([])])
  pred = jnp.concatenate([jnp.where(_mask([(0, 0)]) > 0, BIG, -BIG), jnp.full((1, 4, 4, 1), -BIG)])
  # Pooled: intersection 1, totals 1 + 2: Dice (2 + 1) / (3 + 1).
  np.testing.assert_allclose(losses.soft_dice_loss(pred, truth, per_image=False),
                             [1 - 3 / 4] * 2, atol=1e-6)
  np.testing.assert_allclose(losses.soft_dice_loss(pred, truth, smooth=0.5),
                             [1 - 2.5 / 3.5, 0.0], atol=1e-6)


def test_masks_average_down_to_tumour_fractions():
  truth = _mask([(0, 0), (0, 1), (1, 0), (3, 3)])[:, :3, :4]  # 3x4: a ragged row.
  np.testing.assert_allclose(losses.downsample_masks(truth, 2)[0, ..., 0],
                             [[0.75, 0.0], [0.0, 0.0]])
  np.testing.assert_allclose(losses.downsample_masks(_mask([(0, 0), (3, 3)]), 4)[0, ..., 0],
                             [[2 / 16]])


def test_deep_supervision_weighs_level_l_by_two_to_the_minus_l():
  rng = np.random.default_rng(0)
  masks = jnp.asarray(rng.random((2, 8, 8, 1)) > 0.5, jnp.float32)
  logits = [jnp.asarray(rng.normal(size=(2, 8 // 2**level, 8 // 2**level, 1)), jnp.float32)
            for level in range(3)]
  each = [losses.dice_bce_loss(logits[level], losses.downsample_masks(masks, 2**level))
          for level in range(3)]
  np.testing.assert_allclose(
      losses.deep_supervision_loss(logits[0], {1: logits[1], 2: logits[2]}, masks),
      (each[0] + each[1] / 2 + each[2] / 4) / 1.75, rtol=1e-6)
  np.testing.assert_allclose(losses.deep_supervision_loss(logits[0], {}, masks), each[0])


def test_targets_are_the_tumour_or_one_channel_per_label():
  labels = jnp.array([0, 1, 2, 2], jnp.uint8).reshape(1, 2, 2, 1)
  np.testing.assert_array_equal(losses.targets(labels, 1)[0, ..., 0], [[0, 1], [1, 1]])
  per_label = losses.targets(labels, 2)[0]
  np.testing.assert_array_equal(per_label[..., 0], [[0, 1], [0, 0]])
  np.testing.assert_array_equal(per_label[..., 1], [[0, 0], [1, 1]])


def test_each_image_weighs_as_the_category_covering_most_of_its_tumour():
  labels = np.zeros((3, 4, 4, 1), np.int32)
  labels[0, :2, :2] = 1  # Four pixels of category 1 outweigh one of category 2.
  labels[0, 3, 3] = 2
  labels[1, :, :1] = 2
  # The third image holds no tumour.
  np.testing.assert_allclose(losses.category_weights(jnp.asarray(labels), (2.0, 0.5)),
                             [2.0, 0.5, 1.0])


def test_masks_of_another_shape_than_the_logits_are_refused_not_broadcast():
  logits = jnp.zeros((2, 8, 8, 1))
  with pytest.raises(ValueError, match=r"logits of shape \(2, 8, 8, 1\) and masks of shape "
                     r"\(2, 8, 8\): both must be \(N, H, W, K\)"):
    losses.dice_bce_loss(logits, jnp.zeros((2, 8, 8)))
