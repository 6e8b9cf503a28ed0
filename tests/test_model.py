"""The U-Net's shapes, parameters and flags."""

import jax
import jax.numpy as jnp
import pytest

from unet_jax import model as model_lib


def _init(unet, shape):
  return unet.init(jax.random.key(0), jnp.zeros(shape), train=False)


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("shape", [(2, 32, 32, 1), (1, 40, 24, 3), (3, 17, 45, 1)])
def test_logits_have_input_size(shape):
  unet = model_lib.UNet(features=4, depth=3)
  variables = _init(unet, shape)
  logits = unet.apply(variables, jnp.ones(shape), train=False)
  assert logits.shape == (*shape[:3], 1)
  assert logits.dtype == jnp.float32


def test_classic_parameter_count_without_norm():
  # Hand count of a U-Net with 3x3 double convs, 2x2 transposed convs and a
  # 1x1 head: conv(i, o) has 9*i*o + o parameters, transposed 4*i*o + o.
  def conv(i, o, k=9):
    return k * i * o + o

  widths = [8, 16, 32]
  expected, channels = 0, 1
  for w in widths:
    expected += conv(channels, w) + conv(w, w)
    channels = w
  expected += conv(32, 64) + conv(64, 64)
  for w in reversed(widths):
    expected += conv(2 * w, w, k=4) + conv(2 * w, w) + conv(w, w)
  expected += conv(8, 1, k=1)
  unet = model_lib.UNet(features=8, depth=3, norm="none")
  assert _count(_init(unet, (1, 16, 16, 1))["params"]) == expected


@pytest.mark.parametrize("flags", [
    {"pooling": "avg"}, {"pooling": "conv"}, {"activation": "gelu"},
    {"activation": "leaky_relu"}, {"norm": "group"}, {"norm": "layer"},
    {"upsampling": "bilinear"}, {"dtype": jnp.bfloat16}])
def test_each_flag_builds_and_runs(flags):
  unet = model_lib.UNet(features=8, depth=2, **flags)
  variables = _init(unet, (2, 16, 16, 1))
  logits = unet.apply(variables, jnp.ones((2, 16, 16, 1)), train=False)
  assert logits.shape == (2, 16, 16, 1) and logits.dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables["params"]))


def test_conv_pooling_adds_parameters():
  base = _count(_init(model_lib.UNet(features=4, depth=2), (1, 16, 16, 1))["params"])
  conv = _count(_init(model_lib.UNet(features=4, depth=2, pooling="conv"), (1, 16, 16, 1))["params"])
  assert conv - base == (9 * 4 * 4 + 4) + (9 * 8 * 8 + 8)


def test_unknown_choice_is_a_clear_error():
  with pytest.raises(ValueError, match="model.pooling='median'"):
    _init(model_lib.UNet(pooling="median"), (1, 16, 16, 1))
