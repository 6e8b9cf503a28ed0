"""CutMix for segmentation (Yun et al., 2019; French et al., 2020): a box of another image of
the batch, with its labels, pasted into an image."""

import jax
import jax.numpy as jnp


def cutmix(key: jax.Array, images: jax.Array, labels: jax.Array, prob: float
           ) -> tuple[jax.Array, jax.Array]:
  """Each image, with probability `prob`, takes a box of the image before it in the batch
  (the first image takes one of the last).

  Each side of the box is the image's times the square root of a number uniform in [0, 1];
  centred anywhere and clipped at the borders, it covers a third of the image on average.
  Its labels come with it, so a tumour may be covered and another pasted in.

  Args:
    key: PRNG key of this batch.
    images: (N, H, W, C) images.
    labels: (..., N, H, W, 1) label maps.
    prob: Probability that an image is mixed.

  Returns:
    The mixed images and labels, shaped as given.
  """
  n, height, width = images.shape[:3]
  fire_key, area_key, centre_key = jax.random.split(key, 3)
  fires = jax.random.bernoulli(fire_key, prob, (n,))
  side = jnp.sqrt(jax.random.uniform(area_key, (n,)))
  centre = jax.random.uniform(centre_key, (n, 2))
  rows, cols = jnp.arange(height) + 0.5, jnp.arange(width) + 0.5

  def inside(positions, size, centre_fraction):
    low = (centre_fraction - side / 2) * size
    high = (centre_fraction + side / 2) * size
    return (positions[None] >= low[:, None]) & (positions[None] < high[:, None])

  box = (inside(rows, height, centre[:, 0])[:, :, None]
         & inside(cols, width, centre[:, 1])[:, None, :] & fires[:, None, None])[..., None]
  mixed_images = jnp.where(box, jnp.roll(images, 1, axis=0), images)
  mixed_labels = jnp.where(box, jnp.roll(labels, 1, axis=-4), labels)
  return mixed_images, mixed_labels
