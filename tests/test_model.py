"""The U-Net's shapes, parameter counts, graph and flags.

Big models are only traced (jax.eval_shape), never initialised; forward
passes use tiny ones.
"""

import dataclasses
import functools
import sys

from absl import flags
import flax
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import pytest

from configs import default
from unet_jax import model as model_lib
from unet_jax import subnetworks
from unet_jax.errors import UserError


def _init(unet, shape, seed=0):
  # Jitted: one compilation is faster than running op by op.
  return jax.jit(lambda: unet.init(jax.random.key(seed), jnp.zeros(shape), train=False))()


def _variables(unet, shape, seed=0):
  """Variables shaped as the init's, drawn with numpy: XLA compiles the init's
  threefry draws slowly on the CPU (tens of seconds for a tiny model)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return rng.normal(0, np.prod(leaf.shape[:-1])**-0.5, leaf.shape).astype(np.float32)
    if name in ("scale", "var"):
      return np.ones(leaf.shape, np.float32)
    if name == "mean":
      return np.zeros(leaf.shape, np.float32)
    return rng.normal(0, 0.1, leaf.shape).astype(np.float32)  # Biases and norm shifts.

  return jax.tree_util.tree_map_with_path(draw, _abstract(unet, shape))


def _apply(unet, variables, x, *, train, **kwargs):
  return jax.jit(functools.partial(unet.apply, train=train, **kwargs))(variables, x)


def _abstract(unet, shape=(1, 16, 16, 1)):
  return jax.eval_shape(lambda: _init(unet, shape))


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def _image(shape, seed=1):
  return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def _dropout_key(seed):
  # rbg: its draws compile in a fraction of threefry's time on the CPU.
  return jax.random.key(seed, impl="rbg")


def _equations(unet, shape):
  """Every equation of the forward pass (train=False), nested jaxprs included."""
  variables = _abstract(unet, shape)
  closed = jax.make_jaxpr(lambda v, x: unet.apply(v, x, train=False))(
      variables, jax.ShapeDtypeStruct(shape, jnp.float32))
  found, todo = [], [closed.jaxpr]
  while todo:
    for eqn in todo.pop().eqns:
      found.append(eqn)
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          sub = getattr(sub, "jaxpr", sub)
          if hasattr(sub, "eqns"):
            todo.append(sub)
  return found


def _convs(unet, shape):
  """(input spatial size, kernel spatial size, strides, lhs dilation, rhs dilation) per conv."""
  return [(eqn.invars[0].aval.shape[1:3], eqn.invars[1].aval.shape[:2],
           tuple(eqn.params["window_strides"]), tuple(eqn.params["lhs_dilation"]),
           tuple(eqn.params["rhs_dilation"]))
          for eqn in _equations(unet, shape) if eqn.primitive.name == "conv_general_dilated"]


# ---------------------------------------------------------------------------
# Parameter counts by hand.


def _conv(i, o, k=3, bias=True):
  """Parameters of a k x k convolution from i to o channels."""
  return k * k * i * o + (o if bias else 0)


def test_an_image_without_its_batch_axis_is_a_clear_error():
  model = model_lib.UNet(features=4, depth=2)
  with pytest.raises(ValueError, match=r"images of shape \(16, 16, 1\): the U-Net takes a "
                     r"batch \(N, H, W, C\)"):
    model.init(jax.random.key(0), jnp.ones((16, 16, 1)), train=False)


def test_classic_unet_has_the_original_parameter_count():
  # Ronneberger et al. 2015 with "same" padding: 3x3 convs with biases, no
  # normalisation, 2x2 max pooling, 2x2 transposed convs that halve the
  # channels, a 1x1 head; width 64, depth 4. Layer by layer, (k, in, out):
  encoder = [(3, 1, 64), (3, 64, 64), (3, 64, 128), (3, 128, 128), (3, 128, 256),
             (3, 256, 256), (3, 256, 512), (3, 512, 512)]
  bottleneck = [(3, 512, 1024), (3, 1024, 1024)]
  decoder = [(2, 1024, 512), (3, 1024, 512), (3, 512, 512),
             (2, 512, 256), (3, 512, 256), (3, 256, 256),
             (2, 256, 128), (3, 256, 128), (3, 128, 128),
             (2, 128, 64), (3, 128, 64), (3, 64, 64)]
  head = [(1, 64, 2)]
  layers = encoder + bottleneck + decoder + head
  assert len(layers) == 23  # "In total the network has 23 convolutional layers."
  by_hand = sum(_conv(i, o, k) for k, i, o in layers)
  assert by_hand == 31_030_658
  classic = dict(features=64, depth=4, pooling="max", activation="relu",
                 upsampling="transpose", norm="none", out_channels=2)
  assert _count(_abstract(model_lib.UNet(**classic), (1, 16, 16, 1))["params"]) == 31_030_658
  # On RGB input: the 31,031,810 quoted for the public PyTorch reimplementations
  # without batch norm (9 * 2 * 64 more weights in the first conv).
  assert _count(_abstract(model_lib.UNet(**classic), (1, 16, 16, 3))["params"]) == 31_031_810
  # milesial/Pytorch-UNet (bilinear=False) adds a BatchNorm (scale, shift) after
  # each of the 18 3x3 convs and keeps their biases: 2 * 5,888 more on RGB.
  assert 31_031_810 + 2 * 5_888 == 31_043_586
  # Ours with batch norm drops the conv biases instead: + 5,888 on grey input.
  batch = model_lib.UNet(**{**classic, "norm": "batch"})
  assert _count(_abstract(batch)["params"]) == 31_030_658 + 5_888


def _hand_count(in_ch=1, features=8, depth=3, out=1, *, pooling="max", upsampling="transpose",
                norm="none", residual=False, attention=False, deep_supervision=False,
                coord_channels=False, bottleneck_heads=0):
  """Parameters of our U-Net, from the layer formulas."""
  in_ch += 2 if coord_channels else 0  # A row and a column channel.
  normed = norm != "none"

  def block(i, o):  # Two 3x3 convs; a norm replaces each bias with a scale and a shift.
    n = _conv(i, o, bias=not normed) + _conv(o, o, bias=not normed) + (4 * o if normed else 0)
    if residual and i != o:  # 1x1 projection of the shortcut (+ its norm).
      n += _conv(i, o, k=1, bias=not normed) + (2 * o if normed else 0)
    return n

  widths = (list(features) if isinstance(features, tuple)
            else [features * 2**level for level in range(depth + 1)])
  total, channels = 0, in_ch
  for w in widths[:-1]:
    total += block(channels, w) + (_conv(w, w) if pooling in ("conv", "dilated_conv") else 0)
    channels = w
  total += block(widths[-2], widths[-1])
  if bottleneck_heads:  # Two layer norms, query/key/value/out (c x c + c), MLP c -> 2c -> c.
    c = widths[-1]
    total += 2 * 2 * c + 4 * (c * c + c) + (c * 2 * c + 2 * c) + (2 * c * c + c)
  for below, w in reversed(list(zip(widths[1:], widths[:-1]))):
    total += _conv(below, w, k=2) if upsampling == "transpose" else _conv(below, w)
    if attention:  # W_skip (no bias), W_gate, psi.
      inner = max(w // 2, 1)
      total += _conv(w, inner, k=1, bias=False) + _conv(w, inner, k=1) + _conv(inner, 1, k=1)
    total += block(2 * w, w)
  if deep_supervision:  # A 1x1 head on each decoder level but the full resolution.
    total += sum(_conv(w, out, k=1) for w in widths[1:-1])
  return total + _conv(widths[0], out, k=1)


@pytest.mark.parametrize("flags_", [
    {}, {"norm": "batch"}, {"norm": "group"}, {"norm": "layer"},
    {"pooling": "avg"}, {"pooling": "conv"}, {"pooling": "dilated_conv"},
    {"upsampling": "bilinear"}, {"residual": True}, {"residual": True, "norm": "batch"},
    {"attention": True}, {"deep_supervision": True}, {"depth": 1, "features": 3},
    {"depth": 5, "in_ch": 3, "out": 2, "deep_supervision": True},
    {"coord_channels": True}, {"coord_channels": True, "in_ch": 3, "norm": "batch"},
    {"bottleneck_heads": 4}, {"bottleneck_heads": 1, "depth": 1, "norm": "batch"},
    {"pooling": "conv", "upsampling": "bilinear", "residual": True, "attention": True,
     "norm": "group", "features": 6},
    {"features": (6, 10, 8, 20)}, {"features": (4, 4, 8, 16), "attention": True, "norm": "batch"},
])
def test_parameter_count_matches_the_hand_count(flags_):
  in_ch = flags_.pop("in_ch", 1)
  out = flags_.pop("out", 1)
  flags_ = {"features": 8, "depth": 3, "norm": "none", **flags_}
  unet = model_lib.UNet(out_channels=out, **flags_)
  count = _count(_abstract(unet, (1, 32, 32, in_ch))["params"])
  assert count == _hand_count(in_ch, out=out, **flags_)


@pytest.mark.parametrize("flags_", [
    {"activation": "gelu"}, {"activation": "leaky_relu", "leaky_slope": 0.2},
    {"dilation": 2}, {"dilation": (1, 2, 4, 8)}, {"dropout": 0.5}, {"dtype": jnp.bfloat16}])
def test_flags_without_parameters_keep_the_count(flags_):
  base = _count(_abstract(model_lib.UNet(features=8, depth=3))["params"])
  assert _count(_abstract(model_lib.UNet(features=8, depth=3, **flags_))["params"]) == base


def test_widths_double_per_level_and_head_has_out_channels():
  params = _abstract(model_lib.UNet(features=6, depth=3, out_channels=2), (1, 16, 16, 3))["params"]
  assert params["down_0"]["Conv_0"]["kernel"].shape == (3, 3, 3, 6)
  for level in range(3):
    w = 6 * 2**level
    assert params[f"down_{level}"]["Conv_1"]["kernel"].shape == (3, 3, w, w)
    assert params[f"up_{level}"]["ConvTranspose_0"]["kernel"].shape == (2, 2, 2 * w, w)
    assert params[f"decode_{level}"]["Conv_0"]["kernel"].shape == (3, 3, 2 * w, w)
  assert params["bottleneck"]["Conv_1"]["kernel"].shape == (3, 3, 48, 48)
  assert params["head"]["kernel"].shape == (1, 1, 6, 2)


def test_widths_can_be_given_per_level_bottleneck_last():
  params = _abstract(model_lib.UNet(features=(4, 12, 8), depth=2))["params"]
  assert params["down_0"]["Conv_1"]["kernel"].shape == (3, 3, 4, 4)
  assert params["down_1"]["Conv_0"]["kernel"].shape == (3, 3, 4, 12)
  assert params["bottleneck"]["Conv_0"]["kernel"].shape == (3, 3, 12, 8)
  assert params["up_1"]["ConvTranspose_0"]["kernel"].shape == (2, 2, 8, 12)
  assert params["decode_1"]["Conv_0"]["kernel"].shape == (3, 3, 24, 12)
  assert params["up_0"]["ConvTranspose_0"]["kernel"].shape == (2, 2, 12, 4)
  doubling = jax.tree.map(lambda x: x.shape, _abstract(model_lib.UNet(features=4, depth=2)))
  assert jax.tree.map(lambda x: x.shape, _abstract(model_lib.UNet(features=(4, 8, 16),
                                                                  depth=2))) == doubling


# ---------------------------------------------------------------------------
# The graph each flag builds.


@pytest.mark.parametrize("pooling,primitive", [("max", "reduce_max"),
                                               ("avg", "reduce_window_sum")])
def test_fixed_pooling_ops(pooling, primitive):
  eqns = _equations(model_lib.UNet(features=4, depth=3, pooling=pooling), (1, 16, 16, 1))
  assert sum(e.primitive.name == primitive for e in eqns) == 3
  assert not [c for c in _convs(model_lib.UNet(features=4, depth=3, pooling=pooling),
                                (1, 16, 16, 1)) if c[2] == (2, 2)]


@pytest.mark.parametrize("pooling,rate", [("conv", 1), ("dilated_conv", 2)])
def test_learned_pooling_is_a_strided_conv(pooling, rate):
  unet = model_lib.UNet(features=4, depth=3, pooling=pooling)
  strided = [c for c in _convs(unet, (1, 16, 16, 1)) if c[2] == (2, 2)]
  assert strided == [((s, s), (3, 3), (2, 2), (1, 1), (rate, rate)) for s in (16, 8, 4)]
  eqns = _equations(unet, (1, 16, 16, 1))
  assert not [e for e in eqns if e.primitive.name.startswith("reduce_window")]


def test_dilation_one_rate_per_level_bottleneck_last():
  unet = model_lib.UNet(features=4, depth=2, dilation=(1, 2, 3))
  rates = {(size, c[4]) for c in _convs(unet, (1, 16, 16, 1))
           for size in [c[0][0]] if c[1] == (3, 3)}
  # Level 0 (16x16, encoder and decoder) rate 1, level 1 (8x8) rate 2, bottleneck (4x4) 3.
  assert rates == {(16, (1, 1)), (8, (2, 2)), (4, (3, 3))}
  unet = model_lib.UNet(features=4, depth=2, dilation=2)
  assert {c[4] for c in _convs(unet, (1, 16, 16, 1)) if c[1] == (3, 3)} == {(2, 2)}


def test_dilation_widens_the_receptive_field():
  def support(dilation):
    # elu: no dead units, so every pixel in the field has a nonzero gradient.
    unet = model_lib.UNet(features=2, depth=1, norm="none", activation="elu", dilation=dilation)
    variables = _variables(unet, (1, 32, 32, 1))
    grad = jax.jit(jax.grad(lambda x: unet.apply(variables, x, train=False)[0, 16, 16, 0]))(
        _image((1, 32, 32, 1)))
    rows = np.nonzero(np.abs(np.asarray(grad[0, :, 16, 0])) > 0)[0]
    return rows.max() - rows.min() + 1

  assert support(2) > support(1)


@pytest.mark.parametrize("upsampling", ["transpose", "bilinear"])
def test_upsampling(upsampling):
  unet = model_lib.UNet(features=4, depth=2, upsampling=upsampling)
  # The 2x2 stride-2 transposed convolution is computed as a matmul
  # (unet_jax.layers; its equality with flax's is in test_speed_equivalence).
  matmuls = [(e.invars[0].aval.shape, e.invars[1].aval.shape)
             for e in _equations(unet, (1, 16, 16, 1)) if e.primitive.name == "dot_general"]
  params = _abstract(unet)["params"]
  assert not [c for c in _convs(unet, (1, 16, 16, 1)) if c[3] == (2, 2)]
  if upsampling == "transpose":
    # (pixels, in channels) x (in channels, 2 * 2 * out channels) at 4x4 and 8x8,
    # then the 1x1 head (also a matmul).
    assert matmuls == [((16, 16), (16, 32)), ((64, 8), (8, 16)), ((1, 16, 16, 4), (4, 1))]
    assert params["up_0"]["ConvTranspose_0"]["kernel"].shape == (2, 2, 8, 4)
  else:
    assert params["up_0"]["Conv_0"]["kernel"].shape == (3, 3, 8, 4)


@pytest.mark.parametrize("norm,module", [("batch", "BatchNorm"), ("group", "GroupNorm"),
                                         ("layer", "LayerNorm"), ("none", None)])
def test_norm_after_each_conv(norm, module):
  # Width 12 with group norm: 4 groups (8 does not divide 12).
  unet = model_lib.UNet(features=12, depth=1, norm=norm)
  variables = _variables(unet, (1, 8, 8, 1))
  block = variables["params"]["down_0"]
  if module is None:
    assert set(block) == {"Conv_0", "Conv_1"} and "bias" in block["Conv_0"]
  else:
    assert set(block) == {"Conv_0", "Conv_1", f"{module}_0", f"{module}_1"}
    assert "bias" not in block["Conv_0"]
  assert ("batch_stats" in variables) == (norm == "batch")
  out = _apply(unet, variables, _image((2, 8, 8, 1)), train=False)
  assert np.isfinite(np.asarray(out)).all()


class _Norm(flax.linen.Module):
  norm: str

  @flax.linen.compact
  def __call__(self, x):
    # pylint: disable-next=protected-access
    return model_lib._normalise(x, self.norm, False, jnp.float32)


@pytest.mark.parametrize("norm,groups", [("layer", 1), ("group", 8)])
def test_layer_and_group_norm_normalise_each_image(norm, groups):
  x = _image((2, 4, 4, 16)) * np.arange(1, 17)
  norm_module = _Norm(norm)
  y = norm_module.apply(norm_module.init(jax.random.key(0), x), x)
  y = np.asarray(y).reshape(2, 16, groups, 16 // groups)
  np.testing.assert_allclose(y.mean(axis=(1, 3)), 0, atol=1e-5)
  np.testing.assert_allclose(y.var(axis=(1, 3)), 1, atol=1e-2)


def test_batch_norm_statistics_update_in_training():
  unet = model_lib.UNet(features=4, depth=1)
  variables = _variables(unet, (2, 8, 8, 1))
  _, updates = _apply(unet, variables, _image((2, 8, 8, 1)), train=True,
                      mutable=["batch_stats"])
  before = variables["batch_stats"]["down_0"]["BatchNorm_0"]["mean"]
  after = updates["batch_stats"]["down_0"]["BatchNorm_0"]["mean"]
  assert not np.allclose(before, after)


def _tiny_outputs(**flags_):
  unet = model_lib.UNet(features=4, depth=1, norm="none", **flags_)
  variables = _variables(unet, (1, 8, 8, 1))
  return np.asarray(_apply(unet, variables, _image((2, 8, 8, 1)) - 0.5, train=False))


def test_activations_differ_and_leaky_slope_zero_is_relu():
  outputs = {name: _tiny_outputs(activation=name) for name in model_lib.ACTIVATIONS}
  np.testing.assert_array_equal(_tiny_outputs(activation="leaky_relu", leaky_slope=0.0),
                                outputs["relu"])
  assert not np.allclose(_tiny_outputs(activation="leaky_relu", leaky_slope=0.3),
                         outputs["leaky_relu"])
  names = sorted(outputs)
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      assert not np.allclose(outputs[a], outputs[b]), (a, b)


def test_dropout_only_in_training():
  unet = model_lib.UNet(features=4, depth=1, norm="none", dropout=0.5)
  variables = _variables(unet, (1, 8, 8, 1))
  x = _image((2, 8, 8, 1))
  run = lambda seed: _apply(unet, variables, x, train=True,
                            rngs={"dropout": _dropout_key(seed)})
  assert not np.allclose(run(0), run(1))
  plain = model_lib.UNet(features=4, depth=1, norm="none")
  np.testing.assert_array_equal(_apply(unet, variables, x, train=False),
                                _apply(plain, variables, x, train=False))
  np.testing.assert_array_equal(_apply(plain, variables, x, train=True),
                                _apply(plain, variables, x, train=False))


def _without(tree, names):
  if not isinstance(tree, dict):
    return tree
  return {k: _without(v, names) for k, v in tree.items() if k not in names}


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_residual_block_adds_the_projected_input(norm):
  unet = model_lib.UNet(features=4, depth=2, norm=norm, residual=True)
  variables = flax.core.unfreeze(_variables(unet, (1, 16, 16, 1)))
  x = _image((2, 16, 16, 1))
  plain = model_lib.UNet(features=4, depth=2, norm=norm)
  stripped = _without(variables, {"shortcut", "shortcut_norm"})
  assert not np.allclose(_apply(unet, variables, x, train=False),
                         _apply(plain, stripped, x, train=False))
  # A zero shortcut leaves exactly the plain double conv.
  for module in variables["params"].values():
    if "shortcut" in module:
      module["shortcut"] = jax.tree.map(jnp.zeros_like, module["shortcut"])
      if "shortcut_norm" in module:
        module["shortcut_norm"] = jax.tree.map(jnp.zeros_like, module["shortcut_norm"])
  np.testing.assert_allclose(_apply(unet, variables, x, train=False),
                             _apply(plain, stripped, x, train=False), rtol=1e-5, atol=1e-6)


def test_attention_gate_weights_the_skip():
  unet = model_lib.UNet(features=4, depth=2, norm="none", attention=True)
  variables = flax.core.unfreeze(_variables(unet, (1, 16, 16, 1)))
  x = _image((2, 16, 16, 1))
  plain = model_lib.UNet(features=4, depth=2, norm="none")
  stripped = _without(variables, {"attention"})
  assert not np.allclose(_apply(unet, variables, x, train=False),
                         _apply(plain, stripped, x, train=False))
  # A gate that is always open (alpha = sigmoid(50) = 1) is the plain skip.
  for level in range(2):
    psi = variables["params"][f"up_{level}"]["attention"]["psi"]
    psi["kernel"] = jnp.zeros_like(psi["kernel"])
    psi["bias"] = jnp.full_like(psi["bias"], 50.0)
  np.testing.assert_allclose(_apply(unet, variables, x, train=False),
                             _apply(plain, stripped, x, train=False), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 32, 32, 1), (2, 13, 19, 1)])
def test_deep_supervision_sows_coarse_logits_beside_the_plain_head(shape):
  unet = model_lib.UNet(features=4, depth=3, deep_supervision=True)
  variables = _variables(unet, shape)
  image = _image(shape)
  logits, updates = _apply(unet, variables, image, train=True,
                           mutable=["batch_stats", "intermediates"])
  sown = {name: values[0].shape for name, values in updates["intermediates"].items()}
  height, width = shape[1:3]
  assert sown == {f"aux_logits_{level}": (2, -(-height // 2**level), -(-width // 2**level), 1)
                  for level in (1, 2)}
  # The full-resolution head is the plain U-Net's: same parameters, same logits.
  plain = model_lib.UNet(features=4, depth=3)
  shared = {"params": {k: v for k, v in variables["params"].items()
                       if not k.startswith("aux_head_")},
            "batch_stats": variables["batch_stats"]}
  np.testing.assert_allclose(_apply(unet, variables, image, train=False),
                             _apply(plain, shared, image, train=False), rtol=1e-6)
  assert logits.shape == shape


def test_bfloat16_computes_in_bfloat16_with_float32_params_and_logits():
  unet = model_lib.UNet(features=4, depth=2, dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(_abstract(unet)))
  variables = _variables(unet, (1, 16, 16, 1))
  convs = [e for e in _equations(unet, (1, 16, 16, 1))
           if e.primitive.name == "conv_general_dilated"]
  assert convs and all(e.invars[0].aval.dtype == jnp.bfloat16 for e in convs)
  logits = _apply(unet, variables, _image((2, 16, 16, 1)), train=False)
  assert logits.dtype == jnp.float32


@pytest.mark.parametrize("shape", [(2, 32, 32, 1), (1, 40, 24, 3), (3, 17, 45, 1)])
def test_logits_have_input_size(shape):
  unet = model_lib.UNet(features=4, depth=3)
  variables = _variables(unet, shape)
  logits = _apply(unet, variables, jnp.ones(shape), train=False)
  assert logits.shape == (*shape[:3], 1)
  assert logits.dtype == jnp.float32


def test_coordinate_channels_are_rows_and_columns_across_the_image():
  grid = np.asarray(model_lib._coordinates(jnp.zeros((2, 3, 5, 1))))
  assert grid.shape == (2, 3, 5, 2)
  np.testing.assert_allclose(grid[1, :, 0, 0], [-1, 0, 1])  # Rows, top to bottom.
  np.testing.assert_allclose(grid[1, 0, :, 1], [-1, -0.5, 0, 0.5, 1])  # Columns, left to right.
  np.testing.assert_array_equal(grid[0, :, :, 0], grid[0, :, ::-1, 0])


def test_coordinate_channels_tell_the_model_where_a_pixel_is():
  # On a constant image, away from the zero padding (a depth-1 U-Net sees 18 pixels across)
  # and at one phase of the 2x2 transposed conv, only the coordinate channels can make the
  # logits vary over the frame.
  unet = model_lib.UNet(features=4, depth=1, norm="none", coord_channels=True)
  variables = _variables(unet, (1, 64, 64, 1))
  kernel = variables["params"]["down_0"]["Conv_0"]["kernel"]
  assert kernel.shape == (3, 3, 3, 4)  # The image's channel, then the row and the column.
  image = jnp.full((1, 64, 64, 1), 0.5)
  interior = np.s_[0, 12:52:2, 12:52:2, 0]
  varied = np.asarray(_apply(unet, variables, image, train=False))[interior]
  variables["params"]["down_0"]["Conv_0"]["kernel"] = np.concatenate(
      [kernel[:, :, :1], np.zeros_like(kernel[:, :, 1:])], axis=2)
  flat = np.asarray(_apply(unet, variables, image, train=False))[interior]
  assert np.ptp(flat) < 1e-5 < 1e-2 < np.ptp(varied)


def test_bottleneck_attention_lets_every_pixel_see_the_whole_image():
  # A depth-1 U-Net's convolutions see 18 pixels across: a corner pixel reaches the opposite
  # corner's logits only through the attention over the bottleneck.
  image = jnp.zeros((1, 64, 64, 1))
  changed = image.at[0, 0, 0, 0].set(1.0)
  far = np.s_[0, 32:, 32:, 0]
  for heads, moves in ((0, False), (2, True)):
    unet = model_lib.UNet(features=4, depth=1, norm="none", bottleneck_heads=heads)
    variables = _variables(unet, image.shape)
    change = np.abs(_apply(unet, variables, changed, train=False)
                    - _apply(unet, variables, image, train=False))[far]
    assert (change.max() > 1e-4) == moves, heads


def test_space_to_depth_puts_each_patch_in_the_channels_and_back():
  x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
  patches = model_lib._space_to_depth(x, 2)
  assert patches.shape == (2, 2, 3, 12)
  np.testing.assert_array_equal(patches[1, 1, 2], x[1, 2:4, 4:6].reshape(-1))
  np.testing.assert_array_equal(model_lib._depth_to_space(patches, 2), x)


@pytest.mark.parametrize("deep_supervision", [False, True])
def test_patches_give_a_logit_per_pixel_at_a_coarser_unet(deep_supervision):
  unet = model_lib.UNet(features=4, depth=2, patch_size=2, deep_supervision=deep_supervision)
  variables = _variables(unet, (1, 16, 16, 1))
  assert variables["params"]["down_0"]["Conv_0"]["kernel"].shape == (3, 3, 4, 4)
  assert variables["params"]["head"]["kernel"].shape == (1, 1, 4, 4)
  image = _image((2, 13, 19, 1))
  logits, state = jax.jit(functools.partial(unet.apply, train=False, mutable="intermediates"))(
      variables, image)
  assert logits.shape == (2, 13, 19, 1)
  # Neighbours within one patch get logits of their own, not one shared value.
  assert np.abs(np.diff(np.asarray(logits)[:, :12:2, :18, 0], axis=-1)).min() > 0
  if deep_supervision:
    assert state["intermediates"]["aux_logits_1"][0].shape == (2, 7, 10, 1)
  # The down-sampling levels see 8 x 10 and 4 x 5 positions, a coarser grid than the image's.
  shapes = [eq.outvars[0].aval.shape for eq in _equations(unet, (2, 13, 19, 1))
            if eq.primitive.name == "conv_general_dilated"]
  assert max(shape[1] for shape in shapes) == 8


def test_subnetworks_have_their_own_inputs_and_logits_and_are_averaged_at_evaluation():
  unet = model_lib.UNet(features=4, depth=2, subnetworks=2)
  variables = _variables(unet, (1, 16, 16, 3))
  assert variables["params"]["down_0"]["Conv_0"]["kernel"].shape == (3, 3, 6, 4)
  assert variables["params"]["head"]["kernel"].shape == (1, 1, 4, 2)
  image = _image((2, 16, 16, 3))
  members = np.asarray(_apply(unet, variables, np.concatenate([image, image], -1), train=False,
                              mixed=True))
  assert members.shape == (2, 16, 16, 2)
  assert np.abs(members[..., 0] - members[..., 1]).max() > 1e-3
  averaged = np.asarray(_apply(unet, variables, image, train=False))
  assert averaged.shape == (2, 16, 16, 1)
  np.testing.assert_allclose(jax.nn.sigmoid(averaged[..., 0]),
                             jax.nn.sigmoid(members).mean(-1), rtol=1e-5, atol=1e-6)


def test_mean_probability_logits_stay_finite_when_saturated():
  logits = jnp.array([[-200.0, 0.0, 200.0], [-200.0, 3.0, 200.0]])
  got = np.asarray(subnetworks.mean_probability_logits(logits))
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(jax.nn.sigmoid(got), [0.0, (0.5 + jax.nn.sigmoid(3.0)) / 2, 1.0],
                             atol=1e-6)


def test_mixed_batches_keep_each_image_with_its_mask():
  n = 16
  index = np.arange(n, dtype=np.float32)[:, None, None, None]
  images = np.broadcast_to(index, (n, 4, 4, 1))
  labels = np.broadcast_to(index.astype(np.int32), (n, 4, 4, 1))
  key = jax.random.key(0)
  for shared in (0.0, 0.5, 1.0):
    mixed, member_labels = map(np.asarray, subnetworks.mix(key, images, labels, 3, shared))
    assert mixed.shape == (n, 4, 4, 3) and member_labels.shape == (3, n, 4, 4, 1)
    for member in range(3):
      np.testing.assert_array_equal(mixed[..., member], member_labels[member][..., 0])
      assert sorted(member_labels[member][:, 0, 0, 0]) == list(range(n))
    same = np.mean(member_labels[1][:, 0, 0, 0] == member_labels[0][:, 0, 0, 0])
    assert shared <= same < shared + 0.2, shared


def test_every_flag_together_runs_on_an_odd_size():
  unet = model_lib.UNet(features=6, depth=2, pooling="dilated_conv", activation="elu",
                        dilation=(1, 2, 2), norm="group", upsampling="bilinear", dropout=0.1,
                        residual=True, attention=True, out_channels=2, bottleneck_heads=2,
                        dtype=jnp.bfloat16)
  variables = _variables(unet, (1, 13, 19, 3))
  logits = _apply(unet, variables, _image((2, 13, 19, 3)), train=True,
                      rngs={"dropout": _dropout_key(0)})
  assert logits.shape == (2, 13, 19, 2) and logits.dtype == jnp.float32


# ---------------------------------------------------------------------------
# Pinned outputs: a silent change to the graph or the initialisation shows here.


def _pinned_input(shape):
  h, w = shape[1:3]
  rows, cols = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
  return jnp.asarray(np.sin(7 * rows) * np.cos(5 * cols) * 0.5 + 0.5,
                     jnp.float32)[None, :, :, None]


def test_default_model_output_is_pinned():
  unet = model_lib.from_config(default.get_config().model)
  variables = _init(unet, (1, 16, 16, 1), seed=0)
  assert _count(variables["params"]) == 7_762_465
  logits = np.asarray(_apply(unet, variables, _pinned_input((1, 16, 16, 1)), train=False))
  np.testing.assert_allclose([logits.sum(), logits[0, 0, 0, 0], logits[0, 9, 5, 0]],
                             PINNED_DEFAULT, rtol=1e-4, atol=1e-5)


def test_every_flag_model_output_is_pinned():
  unet = model_lib.UNet(features=4, depth=2, pooling="dilated_conv", activation="gelu",
                        dilation=(1, 2, 2), norm="group", upsampling="bilinear",
                        residual=True, attention=True)
  variables = _variables(unet, (1, 16, 16, 1), seed=0)
  logits = np.asarray(_apply(unet, variables, _pinned_input((1, 16, 16, 1)), train=False))
  np.testing.assert_allclose([logits.sum(), logits[0, 0, 0, 0], logits[0, 9, 5, 0]],
                             PINNED_EVERY_FLAG, rtol=1e-4, atol=1e-5)


PINNED_DEFAULT = [16.491051, -0.05459925, 0.06967452]
PINNED_EVERY_FLAG = [80.881187, -0.07806925, -0.04403525]


# ---------------------------------------------------------------------------
# config.model <-> UNet.


def _unet_fields():
  return {f.name: f.default for f in dataclasses.fields(model_lib.UNet)
          if f.name not in ("parent", "name")}


def test_config_model_has_every_unet_field_with_its_default():
  model = default.get_config().model
  assert set(model.keys()) == set(_unet_fields())
  built = model_lib.from_config(model)
  for name, value in _unet_fields().items():
    assert getattr(built, name) == value, name


def test_from_config_passes_every_field():
  model = default.get_config().model
  changed = dict(features=6, depth=2, pooling="dilated_conv", activation="leaky_relu",
                 leaky_slope=0.2, dilation=(1, 2, 3), norm="group", upsampling="bilinear",
                 dropout=0.1, residual=True, attention=True, deep_supervision=True,
                 out_channels=2, coord_channels=True, bottleneck_heads=3, patch_size=2,
                 subnetworks=2, dtype="bfloat16")
  for name, value in changed.items():
    model[name] = value
  built = model_lib.from_config(model)
  for name, value in changed.items():
    expected = jnp.bfloat16 if name == "dtype" else value
    assert getattr(built, name) == expected, name
  assert set(changed) == set(_unet_fields())


def test_tumour_logits_are_the_most_likely_categorys():
  logits = jnp.array([[[[-2.0, 1.0], [-3.0, -1.0]]]])
  np.testing.assert_array_equal(model_lib.tumour_logits(logits), [[[1.0, -1.0]]])
  assert model_lib.tumour_logits(jnp.zeros((2, 4, 4, 1))).shape == (2, 4, 4)


def test_from_config_reads_saved_json_configs():
  # config.json holds lists for tuples, and older runs lack newer fields.
  built = model_lib.from_config({"features": [4, 8, 4], "depth": 2, "dilation": [1, 2, 2]})
  assert built.features == (4, 8, 4) and built.dilation == (1, 2, 2)
  assert built.residual is False


@pytest.mark.parametrize("fields,message", [
    ({"pooling": "median"}, "model.pooling='median'"),
    ({"dilation": (1, 2)}, r"depth \+ 1 = 5 rates"),
    ({"features": (16, 32)}, r"depth \+ 1 = 5 counts"),
    ({"features": (16, 32, 0, 64, 64)}, "must be >= 1"),
    ({"features": 16.5}, r"model.features=16.5 needs one count .*whole numbers"),
    ({"features": "abc", "depth": 2}, r"model.features='abc' needs one count"),
    ({"dilation": 1.5}, r"model.dilation=1.5 needs one rate"),
    ({"dilation": 0}, "rates must be >= 1"),
    ({"dropout": 1.0}, "model.dropout"),
    ({"depth": 0}, "must be >= 1"),
    ({"patch_size": 0}, "model.patch_size must be >= 1"),
    ({"bottleneck_heads": 3}, "divide the bottleneck's 512 channels"),
])
def test_bad_fields_are_clear_errors(fields, message):
  with pytest.raises(UserError, match=message):
    model_lib.UNet(**fields)


@pytest.mark.parametrize("fields,message", [
    ({"dtype": "float16"}, "model.dtype"),
    ({"widht": 3}, "unknown fields"),
    ({"features": [16, 32, 64.5, 128, 256]}, r"model.features=\(16, 32, 64.5, 128, 256\)"),
])
def test_bad_config_fields_are_clear_errors(fields, message):
  with pytest.raises(UserError, match=message):
    model_lib.from_config({**default.get_config().model.to_dict(), **fields})


# config_flags imports config files with a loader Python deprecates; not our call.
@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
@pytest.mark.parametrize("field,argument,expected", [
    ("dilation", "2", (2,) * 5), ("dilation", "(1,1,2,2,4)", (1, 1, 2, 2, 4)),
    ("features", "16", (16, 32, 64, 128, 256)), ("features", "(16,32,64,256,256)",
                                                 (16, 32, 64, 256, 256))])
def test_dilation_and_features_take_one_value_or_a_tuple_on_the_command_line(
    monkeypatch, field, argument, expected):
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", lock_config=True, flag_values=flag_values)
  argv = ["launch.py", f"--config={default.__file__}", f"--config.model.{field}={argument}"]
  monkeypatch.setattr(sys, "argv", argv)
  flag_values(argv)
  built = model_lib.from_config(flag_values.config.model)
  assert (built.rates() if field == "dilation" else built.widths()) == expected
