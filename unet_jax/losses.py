"""Segmentation losses on logits and binary masks (pure jnp)."""

import jax
import jax.numpy as jnp
import optax


def targets(labels: jax.Array, channels: int) -> jax.Array:
  """Float targets for `channels` logits from (N, H, W, 1) label maps (0 background):
  with one channel the tumour (any label), else channel k - 1 for label k."""
  if channels == 1:
    return (labels > 0).astype(jnp.float32)
  return jax.nn.one_hot(labels[..., 0], channels + 1, dtype=jnp.float32)[..., 1:]


def category_weights(labels: jax.Array, weights: tuple[float, ...]) -> jax.Array:
  """(N,) weight of each image of (N, H, W, 1) label maps: `weights[k - 1]` for the label k
  covering most of its tumour, 1 for an image without tumour."""
  areas = jnp.sum(jax.nn.one_hot(labels[..., 0], len(weights) + 1, dtype=jnp.float32),
                  axis=(1, 2))[:, 1:]
  main = jnp.argmax(areas, axis=-1)
  return jnp.where(areas.sum(axis=-1) > 0, jnp.asarray(weights, jnp.float32)[main], 1.0)


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


def lovasz_hinge_loss(logits: jax.Array, masks: jax.Array) -> jax.Array:
  """Lovasz hinge of each image (Berman et al., 2018): a convex surrogate of
  1 - IoU of the thresholded logits; (N,) losses."""
  def one_image(logits, mask):
    logits, mask = logits.reshape(-1), mask.reshape(-1)
    errors = 1.0 - logits * (2.0 * mask - 1.0)
    order = jnp.argsort(-errors)
    errors, mask = errors[order], mask[order]
    tumour = jnp.sum(mask)
    iou = (tumour - jnp.cumsum(mask)) / (tumour + jnp.cumsum(1.0 - mask))
    weights = jax.lax.stop_gradient(jnp.diff(1.0 - iou, prepend=0.0))
    return jnp.dot(jax.nn.relu(errors), weights)
  return jax.vmap(one_image)(logits, masks)


def dice_bce_loss(logits: jax.Array, masks: jax.Array, dice_weight: float = 1.0,
                  bce_weight: float = 1.0, lovasz_weight: float = 0.0, smooth: float = 1.0,
                  per_image: bool = True) -> jax.Array:
  """`dice_weight * soft Dice + bce_weight * BCE + lovasz_weight * Lovasz hinge`,
  (N,) losses; losses and logits are float32 whatever the compute dtype."""
  if logits.shape != masks.shape:  # Broadcast, they would give a loss silently wrong.
    raise ValueError(f"logits of shape {logits.shape} and masks of shape {masks.shape}: both "
                     "must be (N, H, W, K), the masks' values in [0, 1]")
  logits = logits.astype(jnp.float32)
  loss = (dice_weight * soft_dice_loss(logits, masks, smooth, per_image)
          + bce_weight * bce_loss(logits, masks))
  if lovasz_weight:
    loss += lovasz_weight * lovasz_hinge_loss(logits, masks)
  return loss


def downsample_masks(masks: jax.Array, factor: int) -> jax.Array:
  """(N, H, W, C) masks averaged over `factor` x `factor` cells: the fraction of
  tumour in each cell of the coarser grid; a ragged edge is zero-padded."""
  n, height, width, channels = masks.shape
  pad_h, pad_w = -height % factor, -width % factor
  padded = jnp.pad(masks, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  cells = padded.reshape(n, (height + pad_h) // factor, factor, (width + pad_w) // factor,
                         factor, channels)
  return cells.mean(axis=(2, 4))


def deep_supervision_loss(logits: jax.Array, aux_logits: dict[int, jax.Array],
                          masks: jax.Array, **options) -> jax.Array:
  """`dice_bce_loss` on the full-resolution logits and on each coarser level's.

  Level l (logits at 1/2**l of the resolution, against the masks averaged
  down to it) weighs 2**-l, the full resolution 1, and the weights are
  normalised to sum to 1 (nnU-Net's scheme). The Lovasz hinge, defined for
  binary masks, enters at full resolution only: the coarser masks are fractions.

  Args:
    logits: (N, H, W, 1) full-resolution logits.
    aux_logits: Level -> (N, ceil(H / 2**level), ceil(W / 2**level), 1) logits.
    masks: (N, H, W, 1) binary masks.
    **options: `dice_bce_loss` keywords.

  Returns:
    (N,) losses.
  """
  total, weights = dice_bce_loss(logits, masks, **options), 1.0
  coarse_options = {**options, "lovasz_weight": 0.0}
  for level, level_logits in aux_logits.items():
    weight = 0.5**level
    total += weight * dice_bce_loss(level_logits, downsample_masks(masks, 2**level),
                                    **coarse_options)
    weights += weight
  return total / weights
