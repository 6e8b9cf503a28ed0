"""CutMix: a box of the batch's image before it, labels and all."""

import jax
import numpy as np

from unet_jax import cutmix


def _numbered_batch(n=8, size=16):
  """Image i is i + 1 everywhere; its label map is i % 3."""
  values = np.arange(n, dtype=np.float32)[:, None, None, None]
  images = np.broadcast_to(values + 1, (n, size, size, 1)).copy()
  labels = np.broadcast_to(values % 3, (n, size, size, 1)).astype(np.int32)
  return images, labels


def test_labels_move_with_the_pasted_box():
  images, labels = _numbered_batch()
  mixed, mixed_labels = map(np.asarray, cutmix.cutmix(jax.random.key(0), images, labels, 1.0))
  source = mixed - 1
  own = np.arange(8)[:, None, None, None]
  # Each pixel is the image's own or the previous image's (the batch rolled by one)...
  assert np.all((source == own) | (source == (own - 1) % 8))
  # ...and its label is that image's.
  np.testing.assert_array_equal(mixed_labels, source % 3)
  pasted = source != own
  assert pasted.any() and not pasted.all()
  for i in range(8):  # The pasted pixels of an image form one box.
    rows, cols = np.nonzero(pasted[i, ..., 0])
    if rows.size:
      assert rows.size == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)


def test_probability_zero_leaves_the_batch_and_labels_of_more_leading_axes_follow():
  images, labels = _numbered_batch()
  same, same_labels = cutmix.cutmix(jax.random.key(0), images, labels, 0.0)
  np.testing.assert_array_equal(same, images)
  np.testing.assert_array_equal(same_labels, labels)
  _, stacked = cutmix.cutmix(jax.random.key(1), images, labels[None], 1.0)
  _, plain = cutmix.cutmix(jax.random.key(1), images, labels, 1.0)
  np.testing.assert_array_equal(stacked[0], plain)
