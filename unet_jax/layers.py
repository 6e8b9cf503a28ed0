"""2x2 stride-2 max pooling and transposed convolution, lowered for speed.

Each computes the same function, with the same parameters (names, shapes,
initial values), as flax's `nn.max_pool` / `nn.ConvTranspose` does for these
shapes; only the XLA program differs (tests/test_speed_equivalence.py checks
outputs and gradients). On XLA:CPU the flax forms' gradients were most of the
U-Net's train step (benchmarks/README.md).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


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
