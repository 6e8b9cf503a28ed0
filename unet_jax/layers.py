"""Convolutions, batch norm and 2x2 stride-2 max pooling, lowered for speed.

Each computes the same function, with the same parameters (names, shapes,
initial values), as flax's `nn.Conv` / `nn.BatchNorm` / `nn.max_pool` /
`nn.ConvTranspose` does for the shapes it handles; only the XLA program differs
(tests/test_speed_equivalence.py checks outputs and gradients). On XLA:CPU
the flax forms' gradients were most of the U-Net's train step
(benchmarks/README.md).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from unet_jax import onednn


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def single_channel_conv(x: jax.Array, kernel: jax.Array, dilation: int = 1) -> jax.Array:
  """A stride-1 "SAME" convolution of a one-channel (N, H, W, 1) image, as a sum of taps.

  Each output channel is a weighted sum of the kernel_size shifted copies of
  the image: one fused element-wise loop. XLA:CPU's convolution kernels run
  a one-channel input far below their speed at wider inputs (the U-Net's
  first layer took half the time of its 16-channel second one); the gradient
  is the convolution's own, which is fast for these shapes.
  """
  kh, kw = kernel.shape[:2]
  top, left = dilation * (kh - 1) // 2, dilation * (kw - 1) // 2
  padded = jnp.pad(x, ((0, 0), (top, dilation * (kh - 1) - top),
                       (left, dilation * (kw - 1) - left), (0, 0)))
  h, w = x.shape[1:3]
  accumulate = jnp.promote_types(x.dtype, jnp.float32)
  out = jnp.zeros(x.shape[:3] + kernel.shape[-1:], accumulate)
  for i in range(kh):
    for j in range(kw):
      window = padded[:, i * dilation:i * dilation + h, j * dilation:j * dilation + w, :]
      out = out + window.astype(accumulate) * kernel[i, j, 0].astype(accumulate)
  return out.astype(x.dtype)


def _single_channel_conv_fwd(x, kernel, dilation):
  return single_channel_conv(x, kernel, dilation), (x, kernel)


def _single_channel_conv_bwd(dilation, res, g):
  x, kernel = res
  return jax.vjp(functools.partial(onednn.xla_conv, dilation=dilation), x, kernel)[1](g)


single_channel_conv.defvjp(_single_channel_conv_fwd, _single_channel_conv_bwd)


class Conv(nn.Conv):
  """nn.Conv with faster lowerings for the shapes the U-Net uses.

  1x1 convolutions are a matmul (XLA:CPU's convolution took 3x as long for
  the one-logit head, kernel gradient included), one-channel inputs a sum of
  taps, and other stride-1 "SAME" float32 or bfloat16 convolutions go to oneDNN where
  `onednn.takes()` says so. Same class name, so the same auto-named
  parameter paths (Conv_0), and the same parameters. Every other shape goes
  to nn.Conv.
  """

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    size = () if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
    ones = (None, 1, (1, 1))
    plain = (inputs.ndim == 4 and len(size) == 2 and self.strides in ones
             and self.input_dilation in ones and self.feature_group_count == 1
             and self.mask is None and self.shared_weights)
    pointwise = plain and size == (1, 1) and self.padding in ("SAME", "VALID")
    rates = self.kernel_dilation or 1
    rates = (rates, rates) if isinstance(rates, int) else tuple(rates)
    same = plain and self.padding == "SAME" and rates[0] == rates[1]
    one_channel = same and inputs.shape[-1] == 1 and all(k % 2 == 1 for k in size)
    compute = jnp.dtype(self.dtype or jnp.promote_types(inputs.dtype, self.param_dtype))
    on_onednn = (same and not (pointwise or one_channel) and inputs.size > 0
                 and onednn.takes(compute))
    if not (pointwise or one_channel or on_onednn):
      return super().__call__(inputs)
    kernel = self.param("kernel", self.kernel_init, size + (inputs.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    if pointwise:
      y = jnp.dot(inputs, kernel[0, 0], precision=self.precision)
    elif one_channel:
      y = single_channel_conv(inputs, kernel, rates[0])
    else:
      y = onednn.conv(inputs, kernel, rates[0])
    return y if bias is None else y + bias


class BatchNorm(nn.BatchNorm):
  """nn.BatchNorm that normalises on oneDNN in training where `onednn.takes()` says so.

  For float32 or bfloat16 NHWC inputs over the last axis, without a mask or a device
  axis: oneDNN makes two passes over the activations each way where XLA's
  lowering of flax's makes about four. Same class name, parameters and
  batch statistics (names, shapes, updates); evaluation (running averages)
  and every other case are flax's own.
  """

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None, *, mask=None):
    running = nn.merge_param("use_running_average", self.use_running_average,
                             use_running_average)
    # Activations float32 or bfloat16 throughout, float32 parameters and statistics.
    # flax computes dtype=None in x promoted with the parameters (float32 for bfloat16 x).
    dtypes = (jnp.dtype(self.dtype or jnp.promote_types(x.dtype, self.param_dtype)) == x.dtype
              and jnp.dtype(self.param_dtype) == jnp.float32)
    plain = (not running and mask is None and x.ndim == 4 and x.size > 0 and self.axis in (-1, 3)
             and self.axis_name is None and self.use_scale and self.use_bias and dtypes)
    if not (plain and onednn.takes(x.dtype)):
      return super().__call__(x, use_running_average, mask=mask)
    features = (x.shape[-1],)
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
    scale = self.param("scale", self.scale_init, features, self.param_dtype)
    bias = self.param("bias", self.bias_init, features, self.param_dtype)
    y, mean, var = onednn.batch_norm(x, scale, bias, self.epsilon)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y


def conv_transpose_2x2(x: jax.Array, kernel: jax.Array, bias: jax.Array | None,
                       precision=None) -> jax.Array:
  """flax's `ConvTranspose(kernel_size=(2, 2), strides=(2, 2), padding="SAME")` as a matmul.

  With stride equal to the kernel size the output windows do not overlap:
  output pixel (2i + a, 2j + b) is input pixel (i, j) times the kernel tap
  (1 - a, 1 - b) (lax.conv_transpose without transpose_kernel flips it).
  So it is one (N*H*W, Cin) x (Cin, 4*Cout) matmul and a pixel shuffle,
  where XLA:CPU lowers the convolution form's kernel gradient to a generic
  convolution with an HxW window (most of the train step's time).
  """
  n, h, w, cin = x.shape
  cout = kernel.shape[-1]
  taps = jnp.transpose(kernel[::-1, ::-1], (2, 0, 1, 3)).reshape(cin, 4 * cout)  # c, (a b o)
  y = jnp.dot(x.reshape(n * h * w, cin), taps, precision=precision).reshape(n, h, w, 2, 2, cout)
  y = jnp.transpose(y, (0, 1, 3, 2, 4, 5)).reshape(n, 2 * h, 2 * w, cout)
  if bias is not None:
    y = y + bias
  return y


class ConvTranspose(nn.ConvTranspose):
  """nn.ConvTranspose that computes the 2x2, stride-2 case with `conv_transpose_2x2`.

  Same class name, so the same auto-named parameter paths (ConvTranspose_0),
  and the same parameters: checkpoints of either load in the other.
  """

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    simple = (tuple(self.kernel_size) == (2, 2) and tuple(self.strides or (1, 1)) == (2, 2)
              and self.padding == "SAME" and not self.transpose_kernel
              and self.kernel_dilation in (None, 1, (1, 1)) and self.mask is None
              and inputs.ndim == 4)
    if not simple:
      return super().__call__(inputs)
    kernel = self.param("kernel", self.kernel_init, (2, 2, inputs.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    return conv_transpose_2x2(inputs, kernel, bias, self.precision)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """`nn.max_pool(x, (2, 2), strides=(2, 2))` on (N, H, W, C) with even H and W.

  The windows do not overlap, so the pooling is a reshape and a max. The
  gradient goes to the first maximum of each window in row-major order, as
  XLA's select-and-scatter (the gradient of reduce_window max) sends it,
  so forward and backward equal the original bit for bit. XLA:CPU lowers
  select-and-scatter to an arg-max reduce-window over index iotas and a
  scatter, several times the cost of these element-wise ops.
  """
  n, h, w, c = x.shape
  return jnp.max(x.reshape(n, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def _max_pool_fwd(x):
  y = max_pool_2x2(x)
  return y, (x, y)


def _max_pool_bwd(res, g):
  x, y = res
  n, h, w, c = x.shape
  windows = x.reshape(n, h // 2, 2, w // 2, 2, c)
  taken = jnp.zeros(y.shape, bool)
  grads = []
  for a in range(2):
    row = []
    for b in range(2):
      hit = (windows[:, :, a, :, b, :] == y) & ~taken
      taken = taken | hit
      row.append(jnp.where(hit, g, jnp.zeros_like(g)))
    grads.append(jnp.stack(row, axis=3))  # n, h/2, w/2, b, c
  dx = jnp.stack(grads, axis=2)  # n, h/2, a, w/2, b, c
  return (dx.reshape(n, h, w, c),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(inputs, window_shape, strides=None, padding="VALID"):
  """nn.max_pool that takes `max_pool_2x2` for 2x2, stride-2, VALID pooling of even sizes."""
  if (tuple(window_shape) == (2, 2) and tuple(strides or ()) == (2, 2) and padding == "VALID"
      and inputs.ndim == 4 and inputs.shape[1] % 2 == 0 and inputs.shape[2] % 2 == 0):
    return max_pool_2x2(inputs)
  return nn.max_pool(inputs, window_shape, strides=strides, padding=padding)
