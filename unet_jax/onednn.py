"""Stride-1 "SAME" convolutions and training-mode batch norm on oneDNN, for XLA:CPU.

XLA:CPU's own convolution kernels took 1.5x the time of oneDNN's on the
U-Net's 3x3 layers, and its batch norm makes more passes over the
activations than oneDNN's two (benchmarks/README.md). `conv` and
`batch_norm` run the forward pass and the gradients as oneDNN primitives,
called through the XLA FFI from `csrc/*.cc`. Those files are compiled
against the oneDNN of the `onednn-cpu-gomp` wheel the first time they are
needed (a few seconds, with the C++ compiler `$CXX`, else `c++`) and kept
in `$UNET_JAX_BUILD_DIR` (default `~/.cache/unet_jax`), one library per
source, jaxlib and oneDNN version.

`UNET_JAX_CONV` picks where layers.Conv and layers.BatchNorm send these
operations: `auto` (the default: oneDNN when JAX computes on one CPU device
and the library builds, else XLA), `xla`, or `onednn` (an error when it
cannot be used). Either way the mathematics is the same
(tests/test_onednn.py). Several devices always use XLA's: a custom call is
not partitioned over a sharded batch.

Activations may be float32 or bfloat16 (`model.dtype`). In bfloat16 oneDNN
runs the convolutions on the CPU's bfloat16 instructions (AMX, AVX512-BF16)
where it has them (bfloat16 needs AVX-512: elsewhere such models keep XLA's
kernels, `takes`), summing in float32 and rounding once as XLA does, and
batch norm keeps its statistics in float32: on a CPU with AMX the float32
train step of the brain recipe took 1.8x as long (benchmarks/README.md).
"""

import contextlib
import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import tempfile

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from unet_jax.errors import UserError

SOURCES = tuple(sorted(pathlib.Path(__file__).with_name("csrc").glob("onednn_*.*")))
_LIBRARY_WHEEL, _HEADERS_WHEEL = "onednn-cpu-gomp", "onednn-devel-cpu-gomp"
_TARGETS = {"unet_onednn_conv_fwd": "UnetOnednnConvFwd",
            "unet_onednn_conv_bwd_data": "UnetOnednnConvBwdData",
            "unet_onednn_conv_bwd_weights": "UnetOnednnConvBwdWeights",
            "unet_onednn_batch_norm_fwd": "UnetOnednnBatchNormFwd",
            "unet_onednn_batch_norm_bwd": "UnetOnednnBatchNormBwd"}
CHOICES = ("auto", "xla", "onednn")
# The activation dtypes `conv` and `batch_norm` take (model.dtype float32 or bfloat16).
DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16))
# dnnl_cpu_isa_avx512_core's bits (dnnl_types.h): oneDNN's bfloat16 kernels need AVX-512.
_AVX512_CORE = 0x27
_xla_only = False


@contextlib.contextmanager
def xla_convolutions():
  """Within it, models trace XLA's convolutions whatever UNET_JAX_CONV says.

  For what must not hold our custom call: a jax.export artifact, which other
  machines and platforms run without this library, and cost analyses, which
  count a custom call as zero FLOPs. Trace afresh inside it (a new jax.jit),
  so that no trace made outside is reused.
  """
  global _xla_only
  saved, _xla_only = _xla_only, True
  try:
    yield
  finally:
    _xla_only = saved


def choice() -> str:
  """UNET_JAX_CONV: auto, xla or onednn."""
  value = os.environ.get("UNET_JAX_CONV", "auto")
  if value not in CHOICES:
    raise UserError(f"UNET_JAX_CONV={value!r}: use one of {', '.join(CHOICES)}")
  return value


def wanted() -> bool:
  """Whether layers.Conv should use `conv` for the convolutions it can take.

  Only on one CPU device: XLA does not partition a custom call, and under a
  sharded batch the kernel gradient came out wrong, so several devices
  (fake CPU devices, several hosts) keep XLA's convolutions.
  """
  setting = choice()
  if setting == "xla" or _xla_only:
    return False
  one_cpu = jax.default_backend() == "cpu" and jax.device_count() == 1
  if setting == "onednn":
    if not one_cpu:
      raise UserError(f"UNET_JAX_CONV=onednn needs one CPU device; JAX has "
                      f"{jax.device_count()} {jax.default_backend()} device(s)")
    ensure_registered()
    return True
  if not one_cpu:
    return False
  reason = unavailable_reason()
  if reason:
    _warn_once(reason)
  return reason is None


@functools.cache
def cpu_dtypes() -> tuple[np.dtype, ...]:
  """Those of DTYPES oneDNN has kernels for on this CPU.

  bfloat16 needs AVX-512 in oneDNN's effective ISA (which ONEDNN_MAX_CPU_ISA
  may lower); without it oneDNN creates no bfloat16 primitive at all.
  """
  library = ctypes.CDLL(str(_wheel_file(_LIBRARY_WHEEL, "libdnnl.so.3")))
  isa = library.dnnl_get_effective_cpu_isa()
  return DTYPES if isa & _AVX512_CORE == _AVX512_CORE else (np.dtype(np.float32),)


def takes(dtype) -> bool:
  """Whether layers should send activations of `dtype` to `conv` and `batch_norm`.

  `wanted()`, for a dtype oneDNN has kernels for here; a bfloat16 model on a
  CPU without AVX-512 keeps XLA's (an error under UNET_JAX_CONV=onednn).
  """
  if np.dtype(dtype) not in DTYPES or not wanted():
    return False
  reason = _no_kernels(dtype)
  if reason is None:
    return True
  if choice() == "onednn":
    raise UserError(f"UNET_JAX_CONV=onednn: {reason}")
  _warn_once(reason)
  return False


def _no_kernels(dtype) -> str | None:
  """Why oneDNN cannot compute in `dtype` on this CPU, or None when it can."""
  if np.dtype(dtype) in cpu_dtypes():
    return None
  return f"oneDNN has no {np.dtype(dtype)} kernels on this CPU, which lacks AVX-512"


@functools.cache
def _warn_once(reason: str) -> None:
  logging.warning("oneDNN convolutions unavailable (%s); using XLA's", reason)


@functools.cache  # Read by library_path and cpu_dtypes: the wheel's file list once.
def _wheel_file(wheel: str, suffix: str) -> pathlib.Path:
  try:
    dist = importlib.metadata.distribution(wheel)
  except importlib.metadata.PackageNotFoundError:
    raise UserError(f"the {wheel} package is not installed (pip install {wheel})") from None
  for f in dist.files or ():
    if str(f).endswith(suffix):
      return pathlib.Path(dist.locate_file(f)).resolve()
  raise UserError(f"the {wheel} package holds no {suffix}; reinstall it")


def _build_dir() -> pathlib.Path:
  default = pathlib.Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "unet_jax"
  return pathlib.Path(os.environ.get("UNET_JAX_BUILD_DIR", default))


def library_path() -> pathlib.Path:
  """The compiled library, built first if this source, jaxlib and oneDNN have none."""
  if platform.system() != "Linux" or platform.machine() != "x86_64":
    raise UserError(f"oneDNN convolutions are built for Linux x86-64 only, not "
                    f"{platform.system()} {platform.machine()}")
  dnnl = _wheel_file(_LIBRARY_WHEEL, "libdnnl.so.3")
  header = _wheel_file(_HEADERS_WHEEL, "oneapi/dnnl/dnnl.hpp")
  compiler = shlex.split(os.environ.get("CXX", "c++")) or ["c++"]  # "ccache g++" too.
  command = [*compiler, "-O3", "-shared", "-fPIC", "-std=c++17",
             "-isystem", jax.ffi.include_dir(), "-isystem", str(header.parents[2]),
             *(str(f) for f in SOURCES if f.suffix == ".cc"), str(dnnl),
             # RPATH, not RUNPATH: the wheel's oneDNN, not one LD_LIBRARY_PATH names (oneAPI's).
             f"-Wl,-rpath,{dnnl.parent}", "-Wl,--disable-new-dtags"]
  versions = [importlib.metadata.version(name)
              for name in ("jaxlib", _LIBRARY_WHEEL, _HEADERS_WHEEL)]
  key = hashlib.sha256(b"\0".join([*(f.read_bytes() for f in SOURCES),
                                   *(part.encode() for part in command),
                                   *(v.encode() for v in versions)])).hexdigest()[:16]
  target = _build_dir() / f"onednn-{key}.so"
  if target.exists():
    return target
  if not shutil.which(compiler[0]):
    raise UserError(f"no C++ compiler {compiler[0]!r} to build {SOURCES[0].parent} (set CXX)")
  target.parent.mkdir(parents=True, exist_ok=True)
  # Built under a temporary name and renamed, so concurrent processes never
  # load a half-written library.
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    built = pathlib.Path(tmp) / target.name
    result = subprocess.run([*command, "-o", str(built)], capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
      first = next((l for l in result.stderr.splitlines() if "error" in l), result.stderr.strip())
      raise UserError(f"{SOURCES[0].parent}: could not be compiled ({first[:300]})")
    os.replace(built, target)
  return target


@functools.cache
def _library() -> ctypes.CDLL:
  library = ctypes.CDLL(str(library_path()))
  library.UnetOnednnConvIsOptimised.argtypes = [ctypes.c_int64] * 10
  library.UnetOnednnConvIsOptimised.restype = ctypes.c_int
  return library


@functools.cache
def ensure_registered() -> None:
  """Builds and loads the library and registers its FFI targets (once per process)."""
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(_library(), symbol)),
                                platform="cpu")


@functools.cache
def unavailable_reason() -> str | None:
  """Why oneDNN convolutions cannot be used here, or None when they can."""
  try:
    ensure_registered()
  except (UserError, OSError) as e:
    return str(e)
  return None


def xla_conv(x: jax.Array, kernel: jax.Array, dilation: int = 1) -> jax.Array:
  """What `conv` computes, as XLA's convolution."""
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", rhs_dilation=(dilation,) * 2,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


_FWD, _BWD_DATA, _BWD_WEIGHTS = range(3)  # The kinds of convolution in csrc/onednn_conv.cc.


@functools.cache
def _optimised(kind: int, x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], dilation: int,
               dtype: np.dtype) -> bool:
  """Whether oneDNN runs this convolution (or gradient) on a kernel faster than its reference.

  Its reference kernel took 20-100x XLA's time (a dilated kernel's gradient on an 800x800
  image): such convolutions go to XLA.
  """
  n, h, w, cin = x_shape
  kh, kw, _, cout = kernel_shape
  return bool(_library().UnetOnednnConvIsOptimised(kind, n, h, w, cin, cout, kh, kw, dilation,
                                                   dtype == jnp.bfloat16))


def _call(target: str, out: jax.ShapeDtypeStruct, a, b, dilation: int):
  return jax.ffi.ffi_call(target, out, vmap_method="sequential")(a, b, dilation=np.int64(dilation))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv(x: jax.Array, kernel: jax.Array, dilation: int = 1) -> jax.Array:
  """`lax.conv_general_dilated(x, kernel, (1, 1), "SAME", rhs_dilation=(dilation,) * 2)`.

  Args:
    x: (N, H, W, Cin) float32 or bfloat16.
    kernel: (KH, KW, Cin, Cout), the dtype of x.
    dilation: Dilation rate of the kernel.

  Returns:
    (N, H, W, Cout), the dtype of x. bfloat16 products are summed in float32
    and rounded once, as XLA's bfloat16 convolution does.
  """
  if x.dtype != kernel.dtype or x.dtype not in DTYPES:
    raise ValueError(f"onednn.conv takes float32 or bfloat16 x and kernel of one dtype, not "
                     f"{x.dtype} and {kernel.dtype}")
  if reason := _no_kernels(x.dtype):
    raise ValueError(f"onednn.conv: {reason}")
  ensure_registered()
  if not _optimised(_FWD, x.shape, kernel.shape, dilation, x.dtype):
    return xla_conv(x, kernel, dilation)
  out = jax.ShapeDtypeStruct(x.shape[:3] + kernel.shape[3:], x.dtype)
  return _call("unet_onednn_conv_fwd", out, x, kernel, dilation)


def _conv_fwd(x, kernel, dilation):
  return conv(x, kernel, dilation), (x, kernel)


def _conv_bwd(dilation, residuals, dy):
  x, kernel = residuals
  geometry = (x.shape, kernel.shape, dilation, x.dtype)

  def xla_grads():
    return jax.vjp(functools.partial(xla_conv, dilation=dilation), x, kernel)[1](dy)

  if _optimised(_BWD_DATA, *geometry):
    dx = _call("unet_onednn_conv_bwd_data", jax.ShapeDtypeStruct(x.shape, x.dtype), dy, kernel,
               dilation)
  else:
    dx = xla_grads()[0]
  if _optimised(_BWD_WEIGHTS, *geometry):
    dkernel = _call("unet_onednn_conv_bwd_weights",
                    jax.ShapeDtypeStruct(kernel.shape, kernel.dtype), x, dy, dilation)
  else:
    dkernel = xla_grads()[1]
  return dx, dkernel


conv.defvjp(_conv_fwd, _conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm(x: jax.Array, scale: jax.Array, bias: jax.Array,
               epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode batch norm over all but the last axis, as flax's BatchNorm computes it.

  Args:
    x: (N, H, W, C) float32 or bfloat16 (statistics in float32 either way).
    scale, bias: (C,) float32.
    epsilon: Added to the variance.

  Returns:
    (y, mean, variance): y = (x - mean) / sqrt(variance + epsilon) * scale + bias,
    with the batch's mean and biased variance per channel, y in the dtype of x
    and the statistics in float32. Gradients flow
    through y only: mean and variance are for the running statistics.
  """
  if x.dtype not in DTYPES or scale.dtype != np.float32 or bias.dtype != np.float32:
    raise ValueError(f"onednn.batch_norm takes float32 or bfloat16 x and float32 scale and bias, "
                     f"not {x.dtype}, {scale.dtype} and {bias.dtype}")
  if reason := _no_kernels(x.dtype):
    raise ValueError(f"onednn.batch_norm: {reason}")
  ensure_registered()
  return _batch_norm_call("unet_onednn_batch_norm_fwd", x, scale, epsilon, x, scale, bias)


def _batch_norm_call(target: str, x, scale, epsilon: float, *operands):
  """One (N, H, W, C) result like x and two (C,) float32: (y, mean, var) or (dx, dscale, dbias)."""
  channels = jax.ShapeDtypeStruct(scale.shape, np.float32)
  out = (jax.ShapeDtypeStruct(x.shape, x.dtype), channels, channels)
  return tuple(jax.ffi.ffi_call(target, out, vmap_method="sequential")(
      *operands, epsilon=np.float32(epsilon)))


def _batch_norm_fwd(x, scale, bias, epsilon):
  y, mean, variance = batch_norm(x, scale, bias, epsilon)
  return (y, mean, variance), (x, scale, mean, variance)


def _batch_norm_bwd(epsilon, residuals, cotangents):
  x, scale, mean, variance = residuals
  return _batch_norm_call("unet_onednn_batch_norm_bwd", x, scale, epsilon,
                          x, mean, variance, cotangents[0], scale)


batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)
