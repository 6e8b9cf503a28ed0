"""MIMO (Havasi et al., 2021): several subnetworks trained within one U-Net.

Each subnetwork has its own input channels and its own logits. In training each is fed an
image of the batch in its own order, so that they learn apart, like an ensemble's members;
at evaluation all see the same image and their probabilities are averaged. The members
share everything but the first convolution's input and the head's output channels, so
the ensemble costs about one model's compute.
"""

import jax
import jax.numpy as jnp


def mix(key: jax.Array, images: jax.Array, labels: jax.Array, count: int,
        shared: float) -> tuple[jax.Array, jax.Array]:
  """One training batch of `count` subnetworks from a plain one.

  Each subnetwork sees every image of the batch once, in an order of its own, except for a
  fraction `shared` of the images, which all of them see at once (input repetition, as
  in the paper's code: it leaves more of the model's capacity to features they share).

  Args:
    key: PRNG key of this batch.
    images: (N, H, W, C) images.
    labels: (N, H, W, 1) label maps.
    count: Number of subnetworks.
    shared: Fraction of the images that are every subnetwork's at once.

  Returns:
    (N, H, W, count * C) images, subnetwork m's at channels [m * C, (m + 1) * C), and
    (count, N, H, W, 1) label maps, subnetwork m's at [m].
  """
  n = images.shape[0]
  order_key, *member_keys = jax.random.split(key, count + 1)
  order = jax.random.permutation(order_key, n)
  apart = round(n * (1 - shared))
  member_orders = [jnp.concatenate([jax.random.permutation(k, order[:apart]), order[apart:]])
                   for k in member_keys]
  return (jnp.concatenate([images[member_order] for member_order in member_orders], axis=-1),
          jnp.stack([labels[member_order] for member_order in member_orders]))


def split_logits(logits: jax.Array, count: int) -> jax.Array:
  """(count, N, H, W, K) logits of each subnetwork from the model's (N, H, W, count * K)."""
  *batch_shape, channels = logits.shape
  members = logits.reshape(*batch_shape, count, channels // count)
  return jnp.moveaxis(members, -2, 0)


def mean_probability_logits(logits: jax.Array) -> jax.Array:
  """The logits of the subnetworks' mean sigmoid probability, (N, H, W, K) from
  (count, N, H, W, K); in log space, so that saturated logits stay finite."""
  log_count = jnp.log(logits.shape[0])
  log_p = jax.nn.logsumexp(jax.nn.log_sigmoid(logits), axis=0) - log_count
  log_not_p = jax.nn.logsumexp(jax.nn.log_sigmoid(-logits), axis=0) - log_count
  return log_p - log_not_p
