"""The U-Net (Ronneberger et al., 2015) in Flax linen, with its design choices as fields.

Parameter paths: `down_<level>`, `pool_<level>` (learned poolings only),
`bottleneck`, `bottleneck_attention` (when on), `up_<level>` (with
`attention` inside when gated), `decode_<level>`, `head` and, with deep
supervision, `aux_head_<level>`; level 0 is the full resolution.
"""

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from unet_jax import layers
from unet_jax import subnetworks as subnetworks_lib
from unet_jax.errors import UserError

ACTIVATIONS = ("relu", "leaky_relu", "gelu", "silu", "elu")
POOLINGS = ("max", "avg", "conv", "dilated_conv")
NORMS = ("batch", "group", "layer", "none")
UPSAMPLINGS = ("transpose", "bilinear")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Group norm's groups; gcd(GROUPS, width) when GROUPS does not divide the width.
GROUPS = 8
# Rate of the strided 3x3 convolution of `pooling="dilated_conv"`.
POOL_DILATION = 2


def _choice(name: str, value: str, allowed) -> str:
  if value not in allowed:
    raise UserError(f"model.{name}={value!r} is not one of {sorted(allowed)}")
  return value


def activation_fn(name: str, leaky_slope: float = 0.01) -> Callable[[jax.Array], jax.Array]:
  """The activation called `name`; `leaky_slope` is leaky_relu's negative slope."""
  if name == "leaky_relu":
    return functools.partial(nn.leaky_relu, negative_slope=leaky_slope)
  return {"relu": nn.relu, "gelu": nn.gelu, "silu": nn.silu, "elu": nn.elu}[name]


def _normalise(x: jax.Array, norm: str, train: bool, dtype: Any,
               name: str | None = None) -> jax.Array:
  if norm == "batch":
    return layers.BatchNorm(use_running_average=not train, momentum=0.9, dtype=dtype,
                            name=name)(x)
  if norm == "group":
    return nn.GroupNorm(num_groups=math.gcd(GROUPS, x.shape[-1]), dtype=dtype, name=name)(x)
  if norm == "layer":
    # Over each image's whole feature map (GroupNorm with one group), scale and
    # shift per channel. Over the channels of each pixel alone, it would erase
    # the intensity of a grey image after the first conv.
    return nn.LayerNorm(reduction_axes=(-3, -2, -1), feature_axes=-1, dtype=dtype,
                        name=name)(x)
  return x


class ConvBlock(nn.Module):
  """Two 3x3 convolutions, each followed by normalisation and activation.

  As a residual block the second activation comes after adding the input,
  projected by a 1x1 convolution (`shortcut`) when its width differs.

  Attributes:
    features: Output channels of both convolutions.
    activation: Name of the activation (see ACTIVATIONS).
    leaky_slope: Negative slope of leaky_relu.
    norm: batch, group, layer or none.
    dilation: Dilation rate of both convolutions.
    residual: Whether to add the (projected) input before the last activation.
    dtype: Compute dtype.
  """

  features: int
  activation: str = "relu"
  leaky_slope: float = 0.01
  norm: str = "batch"
  dilation: int = 1
  residual: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    act = activation_fn(self.activation, self.leaky_slope)
    # A bias before a normalisation that re-centres is redundant.
    use_bias = self.norm == "none"
    inputs = x
    for i in range(2):
      x = layers.Conv(self.features, (3, 3), padding="SAME", kernel_dilation=self.dilation,
                      use_bias=use_bias, dtype=self.dtype)(x)
      x = _normalise(x, self.norm, train, self.dtype)
      if i == 0 or not self.residual:
        x = act(x)
    if self.residual:
      if inputs.shape[-1] != self.features:
        inputs = layers.Conv(self.features, (1, 1), use_bias=use_bias, dtype=self.dtype,
                             name="shortcut")(inputs)
        inputs = _normalise(inputs, self.norm, train, self.dtype, name="shortcut_norm")
      x = act(x + inputs.astype(x.dtype))
    return x


class Down(nn.Module):
  """Halves the spatial size.

  Attributes:
    pooling: max, avg, conv (a learned strided 3x3 convolution) or
      dilated_conv (the same with dilation POOL_DILATION).
    dtype: Compute dtype.
  """

  pooling: str = "max"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.pooling == "max":
      return layers.max_pool(x, (2, 2), strides=(2, 2))
    if self.pooling == "avg":
      return nn.avg_pool(x, (2, 2), strides=(2, 2))
    dilation = POOL_DILATION if self.pooling == "dilated_conv" else 1
    return layers.Conv(x.shape[-1], (3, 3), strides=(2, 2), kernel_dilation=dilation,
                       padding="SAME", dtype=self.dtype)(x)


class AttentionGate(nn.Module):
  """Additive attention gate on a skip connection (Oktay et al., 2018).

  alpha = sigmoid(psi(relu(W_skip skip + W_gate gate + b))) per pixel, and
  the skip is multiplied by alpha. The gating signal is the up-sampled
  decoder feature, at the skip's resolution (as in common reimplementations).

  Attributes:
    features: Channels of the intermediate space.
    dtype: Compute dtype.
  """

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, skip: jax.Array, gate: jax.Array) -> jax.Array:
    x = layers.Conv(self.features, (1, 1), use_bias=False, dtype=self.dtype, name="skip")(skip)
    g = layers.Conv(self.features, (1, 1), dtype=self.dtype, name="gate")(gate)
    alpha = nn.sigmoid(layers.Conv(1, (1, 1), dtype=self.dtype, name="psi")(nn.relu(x + g)))
    return skip * alpha


class GlobalAttention(nn.Module):
  """A pre-norm transformer block over the positions of a feature map.

  Every position attends to all the others, so a decision at one place can
  weigh what lies anywhere in the image; the positions are known to it only
  through the convolutions' features. Self-attention, then a two-layer GELU
  MLP twice as wide as the input, each with a residual connection.

  Attributes:
    heads: Attention heads; they split the channels between them.
    dtype: Compute dtype.
  """

  heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, height, width, channels = x.shape
    tokens = x.reshape(n, height * width, channels)
    y = nn.LayerNorm(dtype=self.dtype, name="attention_norm")(tokens)
    tokens = tokens + nn.MultiHeadDotProductAttention(
        self.heads, dtype=self.dtype, name="attention")(y)
    y = nn.LayerNorm(dtype=self.dtype, name="mlp_norm")(tokens)
    y = nn.gelu(nn.Dense(2 * channels, dtype=self.dtype, name="mlp_in")(y))
    tokens = tokens + nn.Dense(channels, dtype=self.dtype, name="mlp_out")(y)
    return tokens.reshape(n, height, width, channels)


class Up(nn.Module):
  """Doubles the spatial size and halves the channels, then joins the skip.

  Attributes:
    features: Output channels of the up-sampling.
    upsampling: transpose (2x2 transposed conv) or bilinear (resize + 3x3 conv).
    attention: Whether an AttentionGate weights the skip first.
    dtype: Compute dtype.
  """

  features: int
  upsampling: str = "transpose"
  attention: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array) -> jax.Array:
    if self.upsampling == "transpose":
      x = layers.ConvTranspose(self.features, (2, 2), strides=(2, 2), dtype=self.dtype)(x)
    else:
      n, h, w, c = x.shape
      x = jax.image.resize(x, (n, 2 * h, 2 * w, c), method="bilinear")
      x = layers.Conv(self.features, (3, 3), padding="SAME", dtype=self.dtype)(x)
    skip = skip.astype(x.dtype)
    if self.attention:
      skip = AttentionGate(max(self.features // 2, 1), self.dtype, name="attention")(skip, x)
    return jnp.concatenate([skip, x], axis=-1)


class UNet(nn.Module):
  """U-Net returning `out_channels` logits per pixel: one tumour logit (the default), or
  one per category (`tumour_logits` reads the tumour from them).

  Convolutions are "same"-padded and any input size works: the input is padded
  to a multiple of 2**depth * patch_size and the logits are cropped back to it.

  Attributes:
    features: Channels of the first level, doubling at each level down; or
      depth + 1 counts, one per level with the bottleneck's last (the
      encoder and decoder blocks of level i and its up-sampling use count i).
    depth: Number of down-sampling steps.
    pooling: max, avg, conv (strided 3x3) or dilated_conv (strided, dilated 3x3).
    activation: relu, leaky_relu, gelu, silu or elu.
    leaky_slope: Negative slope of leaky_relu.
    dilation: Dilation of the 3x3 convolutions: one rate for all, or depth + 1
      rates, one per level (the encoder and decoder blocks of level i use
      rate i) with the last for the bottleneck.
    norm: batch, group (GROUPS groups), layer (over each image's feature map)
      or none, between each convolution and its activation.
    upsampling: transpose or bilinear.
    dropout: Dropout rate after the bottleneck and each decoder block.
    residual: Whether the double convolutions are residual blocks.
    attention: Whether attention gates weight the skip connections.
    deep_supervision: Whether each decoder level below the full resolution
      gets a 1x1 head too; its logits, at that level's resolution, are sown
      into the "intermediates" collection as `aux_logits_<level>` for the
      training loss (evaluation reads the full-resolution head only).
    out_channels: Logit channels: 1 for the tumour, or one per category.
    coord_channels: Whether two input channels holding each pixel's row and
      column, in [-1, 1] across the image, are added to the image's, so
      that the convolutions can learn where in the frame tumours lie.
    bottleneck_heads: 0, or a GlobalAttention block with this many heads
      after the bottleneck, so that every position there sees the whole image.
    patch_size: 1, or the U-Net runs at 1/patch_size of the input's resolution: each
      patch_size x patch_size patch of pixels enters as the channels of one position
      (space-to-depth), and each head predicts a logit for every pixel of its patch
      (depth-to-space), so the logits keep the input's resolution at about the
      compute of a patch_size times smaller input.
    subnetworks: 1, or this many MIMO subnetworks (`subnetworks.py`) in the one
      U-Net, each with its own input channels and logits: the call with `mixed`
      takes their images side by side and returns their logits side by side;
      without, each sees the same image and the logits are their mean probability's.
    dtype: Compute dtype; parameters and logits stay float32.
  """

  features: int | tuple[int, ...] = 32
  depth: int = 4
  pooling: str = "max"
  activation: str = "relu"
  leaky_slope: float = 0.01
  dilation: int | tuple[int, ...] = 1
  norm: str = "batch"
  upsampling: str = "transpose"
  dropout: float = 0.0
  residual: bool = False
  attention: bool = False
  deep_supervision: bool = False
  out_channels: int = 1
  coord_channels: bool = False
  bottleneck_heads: int = 0
  patch_size: int = 1
  subnetworks: int = 1
  dtype: Any = jnp.float32

  def __post_init__(self):
    self._check_fields()
    super().__post_init__()

  def _check_fields(self):
    _choice("pooling", self.pooling, POOLINGS)
    _choice("activation", self.activation, ACTIVATIONS)
    _choice("norm", self.norm, NORMS)
    _choice("upsampling", self.upsampling, UPSAMPLINGS)
    for name, unit in (("features", "count"), ("dilation", "rate")):
      value = getattr(self, name)
      whole = isinstance(value, int) or (isinstance(value, (tuple, list)) and
                                         all(isinstance(v, int) for v in value))
      if not whole or (not isinstance(value, int) and len(value) != self.depth + 1):
        raise UserError(f"model.{name}={value!r} needs one {unit} or depth + 1 = "
                        f"{self.depth + 1} {unit}s, whole numbers (one per level, the last "
                        "for the bottleneck)")
    counts = {"depth": self.depth, "features": min(self.widths()),
              "out_channels": self.out_channels, "patch_size": self.patch_size,
              "subnetworks": self.subnetworks}
    for name, value in counts.items():
      if value < 1:
        raise UserError(f"model.{name} must be >= 1, got {getattr(self, name)}")
    if not 0 <= self.dropout < 1:
      raise UserError(f"model.dropout={self.dropout} is not in [0, 1)")
    if min(self.rates()) < 1:
      raise UserError(f"model.dilation={self.dilation}: rates must be >= 1")
    width = self.widths()[-1]
    if self.bottleneck_heads < 0 or (self.bottleneck_heads and width % self.bottleneck_heads):
      raise UserError(f"model.bottleneck_heads={self.bottleneck_heads} must be 0 or divide the "
                      f"bottleneck's {width} channels")

  def widths(self) -> tuple[int, ...]:
    """The channels of each level, 0 to depth (the bottleneck)."""
    if isinstance(self.features, int):
      return tuple(self.features * 2**level for level in range(self.depth + 1))
    return tuple(self.features)

  def rates(self) -> tuple[int, ...]:
    """The dilation rate of each level, 0 to depth (the bottleneck)."""
    if isinstance(self.dilation, int):
      return (self.dilation,) * (self.depth + 1)
    return tuple(self.dilation)

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool, mixed: bool = False) -> jax.Array:
    if images.ndim != 4:
      raise ValueError(f"images of shape {images.shape}: the U-Net takes a batch (N, H, W, C)")
    height, width = images.shape[1:3]
    ensembled = self.subnetworks > 1 and not mixed
    if ensembled:
      images = jnp.tile(images, (1, 1, 1, self.subnetworks))
    multiple = 2**self.depth * self.patch_size
    pad_h, pad_w = -height % multiple, -width % multiple
    if self.coord_channels:
      images = jnp.concatenate([images, _coordinates(images)], axis=-1)
    x = jnp.pad(images, ((0, 0), (0, pad_h), (0, pad_w), (0, 0))).astype(self.dtype)
    x = _space_to_depth(x, self.patch_size)
    # Each head: a logit per pixel of its position's patch, per category and subnetwork.
    head_channels = self.patch_size**2 * self.subnetworks * self.out_channels
    widths, rates = self.widths(), self.rates()

    def block(level, name):
      return ConvBlock(widths[level], activation=self.activation,
                       leaky_slope=self.leaky_slope, norm=self.norm, dilation=rates[level],
                       residual=self.residual, dtype=self.dtype, name=name)

    skips = []
    for level in range(self.depth):
      x = block(level, f"down_{level}")(x, train=train)
      skips.append(x)
      x = Down(self.pooling, self.dtype, name=f"pool_{level}")(x)

    x = block(self.depth, "bottleneck")(x, train=train)
    if self.bottleneck_heads:
      x = GlobalAttention(self.bottleneck_heads, self.dtype, name="bottleneck_attention")(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)

    for level in reversed(range(self.depth)):
      x = Up(widths[level], self.upsampling, self.attention, self.dtype,
             name=f"up_{level}")(x, skips[level])
      x = block(level, f"decode_{level}")(x, train=train)
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
      if self.deep_supervision and level > 0:
        aux = _depth_to_space(layers.Conv(head_channels, (1, 1), dtype=jnp.float32,
                                          name=f"aux_head_{level}")(x), self.patch_size)
        size = [math.ceil(side / 2**level) for side in (height, width)]
        self.sow("intermediates", f"aux_logits_{level}",
                 aux[:, :size[0], :size[1]])

    # The heads in float32 (a 1x1 conv: nothing to save), so the logits are float32-precise.
    logits = layers.Conv(head_channels, (1, 1), dtype=jnp.float32, name="head")(x)
    logits = _depth_to_space(logits, self.patch_size)[:, :height, :width]
    if ensembled:
      logits = subnetworks_lib.mean_probability_logits(
          subnetworks_lib.split_logits(logits, self.subnetworks))
    return logits


def _space_to_depth(x: jax.Array, patch: int) -> jax.Array:
  """(N, H / patch, W / patch, patch * patch * C), each patch's pixels row by row, channels
  innermost, from (N, H, W, C) with H and W multiples of `patch`."""
  if patch == 1:
    return x
  n, height, width, channels = x.shape
  x = x.reshape(n, height // patch, patch, width // patch, patch, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, height // patch, width // patch, -1)


def _depth_to_space(x: jax.Array, patch: int) -> jax.Array:
  """The inverse of `_space_to_depth`."""
  if patch == 1:
    return x
  n, height, width, channels = x.shape
  x = x.reshape(n, height, width, patch, patch, channels // patch**2)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, height * patch, width * patch, -1)


def _coordinates(images: jax.Array) -> jax.Array:
  """(N, H, W, 2) rows and columns of (N, H, W, C) images, each in [-1, 1]."""
  n, height, width = images.shape[:3]
  rows, cols = jnp.meshgrid(jnp.linspace(-1, 1, height), jnp.linspace(-1, 1, width),
                            indexing="ij")
  grid = jnp.stack([rows, cols], axis=-1).astype(images.dtype)
  return jnp.broadcast_to(grid, (n, height, width, 2))


def tumour_logits(logits: jax.Array) -> jax.Array:
  """(N, H, W) tumour logits of (N, H, W, out_channels) ones: the most likely category's,
  so that a pixel is tumour when any category is (with one channel, that channel)."""
  return jnp.max(logits, axis=-1)


def from_config(model: ml_collections.ConfigDict) -> UNet:
  """Builds the U-Net described by a `config.model` block.

  Fields missing from `model` (a config saved by an older version) take the
  UNet's defaults.

  Raises:
    UserError: an unknown field or value.
  """
  defaults = {f.name: f.default for f in dataclasses.fields(UNet)
              if f.name not in ("parent", "name")}
  unknown = sorted(set(model.keys()) - set(defaults))
  if unknown:
    raise UserError(f"config.model has unknown fields {unknown}; known: {sorted(defaults)}")
  fields = {name: model.get(name, default) for name, default in defaults.items()}
  for name in ("features", "dilation"):
    if isinstance(fields[name], (list, tuple)):  # A saved config.json holds a list.
      fields[name] = tuple(fields[name])
  dtype = fields["dtype"] if isinstance(fields["dtype"], str) else jnp.dtype(fields["dtype"]).name
  fields["dtype"] = DTYPES[_choice("dtype", dtype, DTYPES)]
  return UNet(**fields)
