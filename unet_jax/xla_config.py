"""Process-wide settings: XLA:CPU options, the persistent compilation cache, malloc.

Call `keep_freed_memory()` first of all, before numpy or jax is imported
(they start threads), and `configure()` before the first JAX computation
(XLA reads XLA_FLAGS when its backend starts); launch.py does:

    from unet_jax import xla_config
    xla_config.keep_freed_memory()
    ...
    xla_config.configure(xla_config.cache_dir_for(workdir))

Environment overrides:
  UNET_JAX_CACHE_DIR: persistent compilation cache folder instead of
    <workdir>/compile_cache, e.g. one folder shared by all runs; "off" or ""
    turns the cache off.
  UNET_JAX_XLA_DEFAULTS=0: leave XLA_FLAGS as the user set them.
  UNET_JAX_KEEP_FREED_MEMORY=0: leave glibc's malloc at its defaults.
  XLA_FLAGS: a flag the user set there wins over ours.
"""

import ctypes
import logging
import os
import platform

# XLA:CPU options measured to speed up the U-Net train step (benchmarks/README.md):
# convolutions go to XLA's Eigen kernels instead of YNNPACK, whose
# kernel-gradient convolutions (the backward pass's weight gradients) run at a
# third of Eigen's speed on the U-Net's shapes. Dots stay on YNNPACK. The
# incremental '-' form keeps whatever else the jaxlib enables by default.
CPU_FLAGS: tuple[str, ...] = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)
# The jaxlib releases these flags were measured on and are known to parse
# (XLA aborts the process on an unknown flag, so other releases get none).
_FLAGS_JAXLIB = ((0, 10), (0, 11))

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8

# Compilations faster than this are not worth a cache entry (seconds).
MIN_COMPILE_SECS = 1.0
CACHE_DIR = "compile_cache"  # A run's own, in its workdir.


def cache_dir_for(workdir: str) -> str:
  """UNET_JAX_CACHE_DIR if set, else the run's own `<workdir>/compile_cache`."""
  return os.environ.get("UNET_JAX_CACHE_DIR", os.path.join(workdir, CACHE_DIR))


def merge_flags(current: str, flags) -> str:
  """`current` XLA_FLAGS plus each of `flags` whose name it does not set already."""
  names = {f.split("=", 1)[0] for f in current.split()}
  extra = [f for f in flags if f.split("=", 1)[0] not in names]
  return " ".join([*current.split(), *extra])


def _jaxlib_in_range() -> bool:
  try:
    import jaxlib.version  # pylint: disable=g-import-not-at-top
    version = tuple(int(p) for p in jaxlib.version.__version__.split(".")[:2])
  except (ImportError, ValueError):
    return False
  low, high = _FLAGS_JAXLIB
  return low <= version < high


def cpu_flags() -> tuple[str, ...]:
  """The XLA flags configure() adds on this install (none when switched off)."""
  if os.environ.get("UNET_JAX_XLA_DEFAULTS", "1") == "0" or not _jaxlib_in_range():
    return ()
  return CPU_FLAGS


def keep_freed_memory() -> bool:
  """Makes glibc's malloc keep freed memory for reuse; returns whether it could.

  By default glibc maps each block over 32 MiB afresh and unmaps it when it
  is freed, and a thread other than the main one allocates from its own
  arena, which maps any block too big for it whatever the limits. XLA:CPU
  allocates an execution's temporaries (878 MiB for the train step at
  256x256, batch 8) on its own threads, so every step page-faulted them in,
  zeroed by the kernel: 0.45 CPU-s of system time a step, which took 1.18 s
  against 0.94-0.97 s with the blocks kept (benchmarks/README.md). With one
  arena, no maps and no trimming, the blocks freed by one step serve the
  next. Call it before any thread starts (before importing numpy or jax): a
  thread that has allocated keeps its own arena. The price is resident
  memory: the brain recipe's peak RSS went from 1.8 to 3.8-4.3 GiB.
  """
  if (os.environ.get("UNET_JAX_KEEP_FREED_MEMORY", "1") == "0" or platform.system() != "Linux"
      or platform.libc_ver()[0] != "glibc"):
    return False
  mallopt = ctypes.CDLL(None).mallopt
  return all(mallopt(param, value) for param, value in
             ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_ARENA_MAX, 1)))


def configure(cache_dir: str) -> str | None:
  """Sets our XLA:CPU flags and turns on the persistent compilation cache.

  A second run of the same program with the same shapes and config then
  loads its compiled steps from the cache instead of compiling them.

  Args:
    cache_dir: Persistent compilation cache folder; "off" or "" turns it off.

  Returns:
    The cache folder in use, or None when the cache is off.
  """
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

  flags = cpu_flags()
  if flags:
    if xla_bridge.backends_are_initialized():
      logging.warning("xla_config.configure() after JAX started: XLA flags %s not applied", flags)
    else:
      os.environ["XLA_FLAGS"] = merge_flags(os.environ.get("XLA_FLAGS", ""), flags)

  return enable_compilation_cache(cache_dir)


def enable_compilation_cache(cache_dir: str) -> str | None:
  """Turns on JAX's persistent compilation cache in `cache_dir` ("off" or "": off).

  Returns:
    The cache folder in use, or None when the cache is off.
  """
  import jax  # pylint: disable=g-import-not-at-top

  if cache_dir in ("", "off"):
    # Off means off, for a cache that $JAX_COMPILATION_CACHE_DIR names too.
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
  try:
    os.makedirs(cache_dir, exist_ok=True)
  except OSError as e:
    logging.warning("no compilation cache: cannot make %s (%s)", cache_dir, e.strerror)
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  return cache_dir
