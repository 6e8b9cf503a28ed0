"""The U-Net (Ronneberger et al., 2015) in Flax linen, with its design choices as fields."""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "leaky_relu": nn.leaky_relu,
    "gelu": nn.gelu,
    "silu": nn.silu,
    "elu": nn.elu,
}
POOLINGS = ("max", "avg", "conv")
NORMS = ("batch", "group", "layer", "none")
UPSAMPLINGS = ("transpose", "bilinear")


def _choice(name: str, value: str, allowed) -> str:
  if value not in allowed:
    raise ValueError(f"model.{name}={value!r} is not one of {sorted(allowed)}")
  return value


class ConvBlock(nn.Module):
  """Two 3x3 convolutions, each followed by normalisation and activation.

  Attributes:
    features: Output channels of both convolutions.
    activation: Name of the activation (see ACTIVATIONS).
    norm: batch, group, layer or none.
    dtype: Compute dtype.
  """

  features: int
  activation: str = "relu"
  norm: str = "batch"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    act = ACTIVATIONS[self.activation]
    for _ in range(2):
      # A bias before a normalisation that re-centres is redundant.
      x = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=self.norm == "none",
                  dtype=self.dtype)(x)
      x = _normalise(x, self.norm, train, self.dtype)
      x = act(x)
    return x


def _normalise(x: jax.Array, norm: str, train: bool, dtype: Any) -> jax.Array:
  if norm == "batch":
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=dtype)(x)
  if norm == "group":
    return nn.GroupNorm(num_groups=min(8, x.shape[-1]), dtype=dtype)(x)
  if norm == "layer":
    return nn.LayerNorm(dtype=dtype)(x)
  return x


class Down(nn.Module):
  """Halves the spatial size.

  Attributes:
    pooling: max, avg or conv (a learned strided 3x3 convolution).
    dtype: Compute dtype.
  """

  pooling: str = "max"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.pooling == "max":
      return nn.max_pool(x, (2, 2), strides=(2, 2))
    if self.pooling == "avg":
      return nn.avg_pool(x, (2, 2), strides=(2, 2))
    return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), padding="SAME", dtype=self.dtype)(x)


class Up(nn.Module):
  """Doubles the spatial size and halves the channels, then joins the skip.

  Attributes:
    features: Output channels of the up-sampling.
    upsampling: transpose (2x2 transposed conv) or bilinear (resize + 3x3 conv).
    dtype: Compute dtype.
  """

  features: int
  upsampling: str = "transpose"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array) -> jax.Array:
    if self.upsampling == "transpose":
      x = nn.ConvTranspose(self.features, (2, 2), strides=(2, 2), dtype=self.dtype)(x)
    else:
      n, h, w, c = x.shape
      x = jax.image.resize(x, (n, 2 * h, 2 * w, c), method="bilinear")
      x = nn.Conv(self.features, (3, 3), padding="SAME", dtype=self.dtype)(x)
    return jnp.concatenate([skip.astype(x.dtype), x], axis=-1)


class UNet(nn.Module):
  """U-Net returning one tumour logit per pixel.

  Any input size works: the input is padded to a multiple of 2**depth and the
  logits are cropped back to the input size.

  Attributes:
    features: Channels of the first level; they double at each level down.
    depth: Number of down-sampling steps.
    pooling: max, avg or conv.
    activation: relu, leaky_relu, gelu, silu or elu.
    norm: batch, group, layer or none.
    upsampling: transpose or bilinear.
    dropout: Dropout rate in the bottleneck and decoder.
    out_channels: Logit channels (1 for a binary mask).
    dtype: Compute dtype; parameters and logits stay float32.
  """

  features: int = 32
  depth: int = 4
  pooling: str = "max"
  activation: str = "relu"
  norm: str = "batch"
  upsampling: str = "transpose"
  dropout: float = 0.0
  out_channels: int = 1
  dtype: Any = jnp.float32

  def _check_fields(self):
    _choice("pooling", self.pooling, POOLINGS)
    _choice("activation", self.activation, ACTIVATIONS)
    _choice("norm", self.norm, NORMS)
    _choice("upsampling", self.upsampling, UPSAMPLINGS)
    if self.depth < 1 or self.features < 1:
      raise ValueError(f"model.depth and model.features must be >= 1, got {self.depth}, {self.features}")

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    self._check_fields()
    height, width = images.shape[1:3]
    multiple = 2**self.depth
    pad_h, pad_w = -height % multiple, -width % multiple
    x = jnp.pad(images, ((0, 0), (0, pad_h), (0, pad_w), (0, 0))).astype(self.dtype)

    block = lambda f, name: ConvBlock(f, self.activation, self.norm, self.dtype, name=name)
    skips = []
    for level in range(self.depth):
      x = block(self.features * 2**level, f"down_{level}")(x, train=train)
      skips.append(x)
      x = Down(self.pooling, self.dtype, name=f"pool_{level}")(x)

    x = block(self.features * 2**self.depth, "bottleneck")(x, train=train)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)

    for level in reversed(range(self.depth)):
      features = self.features * 2**level
      x = Up(features, self.upsampling, self.dtype, name=f"up_{level}")(x, skips[level])
      x = block(features, f"decode_{level}")(x, train=train)
      x = nn.Dropout(self.dropout, deterministic=not train)(x)

    logits = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="head")(x)
    return logits[:, :height, :width].astype(jnp.float32)


def from_config(model: ml_collections.ConfigDict) -> UNet:
  """Builds the U-Net described by a `config.model` block."""
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
  return UNet(
      features=model.features,
      depth=model.depth,
      pooling=model.pooling,
      activation=model.activation,
      norm=model.norm,
      upsampling=model.upsampling,
      dropout=model.dropout,
      dtype=dtypes[_choice("dtype", model.dtype, dtypes)],
  )
