"""Segmentation losses on logits and binary masks (pure jnp)."""

import jax
import jax.numpy as jnp
import optax


def soft_dice_loss(logits: jax.Array, masks: jax.Array, smooth: float = 1.0,
                   per_image: bool = True) -> jax.Array:
  """Soft Dice loss, 1 - Dice of sigmoid probabilities.

  Args:
    logits: (N, H, W, 1) tumour logits.
    masks: (N, H, W, 1) binary masks.
    smooth: Added to numerator and denominator; an empty mask predicted empty
      scores a loss of 0.
    per_image: Dice of each image (the default), or one Dice over the whole
      batch as if it were one image, repeated for every image.

  Returns:
    (N,) losses.
  """
  probs = jax.nn.sigmoid(logits)
  axes = tuple(range(1 if per_image else 0, logits.ndim))
  intersection = jnp.sum(probs * masks, axis=axes)
  total = jnp.sum(probs, axis=axes) + jnp.sum(masks, axis=axes)
  loss = 1.0 - (2.0 * intersection + smooth) / (total + smooth)
  return loss if per_image else jnp.full(logits.shape[:1], loss)


def bce_loss(logits: jax.Array, masks: jax.Array) -> jax.Array:
  """Per-image mean sigmoid binary cross-entropy; (N,) losses."""
  per_pixel = optax.sigmoid_binary_cross_entropy(logits, masks)
  return jnp.mean(per_pixel, axis=tuple(range(1, logits.ndim)))


def dice_bce_loss(logits: jax.Array, masks: jax.Array, dice_weight: float = 1.0,
                  bce_weight: float = 1.0, smooth: float = 1.0,
                  per_image: bool = True) -> jax.Array:
  """`dice_weight * soft Dice + bce_weight * BCE`, (N,) losses; losses and
  logits are float32 whatever the compute dtype."""
  logits = logits.astype(jnp.float32)
  return (dice_weight * soft_dice_loss(logits, masks, smooth, per_image)
          + bce_weight * bce_loss(logits, masks))
