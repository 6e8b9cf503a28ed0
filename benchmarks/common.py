"""Shared pieces of the benchmarks: configs, the JAX steps, a PyTorch twin, timing.

Each benchmark is one command printing one JSON line. Timings that compare
two implementations alternate between them in one process, so load from
other processes on the machine hits both alike; the medians are reported.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time
from typing import Any, Callable

# PyTorch's OpenMP threads spin while they wait by default; on a machine shared
# with other processes that halves its speed (measured: 2.4 s vs 5.7 s a step),
# so the reference gets the setting that is best for it here. Set
# OMP_WAIT_POLICY=ACTIVE in the environment to time the default instead. It governs
# our oneDNN calls' OpenMP threads too, which launch.py leaves at the default: there, on a
# 2-core Zen 3, the brain recipe trained at 18.0-18.7 img/s, against 16.6-17.5 with PASSIVE.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/x.py` from anywhere: configs/ is beside unet_jax/.
  sys.path.insert(0, ROOT)

from unet_jax import xla_config  # pylint: disable=g-import-not-at-top,wrong-import-position

# Before numpy and jax start threads; UNET_JAX_KEEP_FREED_MEMORY=0 times glibc's defaults.
KEPT_FREED_MEMORY = xla_config.keep_freed_memory()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_jax import model as model_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_jax import onednn  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_jax.errors import UserError  # pylint: disable=g-import-not-at-top,wrong-import-position


class ArgumentParser(argparse.ArgumentParser):
  """argparse's parser, a bad flag ending the command with one line: `error: ...`."""

  def error(self, message):
    sys.exit(f"error: {message}")


def at_least(minimum: int) -> Callable[[str], int]:
  """An argparse type: a whole number of `minimum` or more."""

  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
      raise argparse.ArgumentTypeError(f"{value}: use {minimum} or more")
    return value

  return parse


positive = at_least(1)


def positive_list(text: str) -> list[int]:
  """An argparse type: comma-separated whole numbers of 1 or more."""
  return [positive(value) for value in text.split(",")]


def _parse_widths(text: str) -> int | tuple[int, ...]:
  """--features: one width (doubling per level down) or comma-separated widths per level."""
  values = tuple(positive_list(text))
  return values[0] if len(values) == 1 else values


class _Refused(argparse.Action):
  """A flag the script does not take, refused with the one it takes instead."""

  def __call__(self, parser, namespace, values, option_string=None):
    parser.error(f"{option_string}: not taken here; {self.help}")


def shape_flags(parser: argparse.ArgumentParser, sized: bool = True) -> None:
  """The flags that size the U-Net's layers: input size, batch, widths and depth.

  Without `sized`, --image_size and --batch_size are refused (the script takes lists).
  """
  if sized:
    parser.add_argument("--image_size", type=positive, default=256)
    parser.add_argument("--batch_size", type=positive, default=8)
  else:
    parser.add_argument("--image_size", action=_Refused, help="use --sizes")
    parser.add_argument("--batch_size", action=_Refused, help="use --batches")
  parser.add_argument("--features", type=_parse_widths, default=16,
                      help="Width of level 0 (doubling per level down), or depth + 1 "
                           "comma-separated widths, one per level (model.features).")
  parser.add_argument("--depth", type=positive, default=4)


def model_flags(parser: argparse.ArgumentParser, sized: bool = True) -> None:
  """The flags that pick the U-Net variant (`sized`: shape_flags')."""
  shape_flags(parser, sized)
  parser.add_argument("--channels", type=positive, default=1)
  parser.add_argument("--pooling", default="max")
  parser.add_argument("--activation", default="relu")
  parser.add_argument("--norm", default="batch")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--reference", default="none", choices=("none", "torch"),
                      help="torch: time the same U-Net in PyTorch in the same run.")
  parser.add_argument("--repeats", type=positive, default=3,
                      help="Rounds of alternation between the implementations.")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--cache_dir", default="off",
                      help="Persistent compilation cache folder ('off': every run compiles).")
  parser.add_argument("--xla_defaults", type=int, default=1,
                      help="0: without unet_jax.xla_config's XLA flags (the 'before' numbers).")
  parser.add_argument("--conv", default="auto", choices=("auto", "xla", "onednn"),
                      help="UNET_JAX_CONV: where the 3x3 convolutions run (unet_jax.onednn).")
  parser.add_argument("--lowering", default="ours", choices=("ours", "flax"),
                      help="flax: flax's own max_pool and ConvTranspose instead of "
                           "unet_jax.layers' (the 'before' numbers).")


def setup(args) -> bool:
  """Applies the process settings of the flags; call before any JAX computation.

  Returns:
    Whether freed memory is kept (`keep_freed_memory`).
  """
  if not args.xla_defaults:
    os.environ["UNET_JAX_XLA_DEFAULTS"] = "0"
  os.environ["UNET_JAX_CONV"] = args.conv
  # The cache off by default, as any other (JAX_COMPILATION_CACHE_DIR): compile_s is cold.
  xla_config.configure(cache_dir=args.cache_dir)
  return KEPT_FREED_MEMORY


def require_torch(what: str):
  """The torch module, or an exit with one line saying that `what` needs it."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    sys.exit(f"error: {what} needs PyTorch: pip install -e '.[bench]' (on Linux with PyTorch's "
             "CPU index: README, Performance)")
  return torch


def run(main: Callable[[], None]) -> None:
  """Calls `main`; a value the project refuses (UserError) ends it with one line."""
  try:
    main()
  except UserError as e:
    sys.exit(f"error: {e}")


def conv_backend(dtype: str) -> str:
  """Where the model's 3x3 convolutions ran in `dtype`: onednn or xla."""
  return "onednn" if onednn.takes(dtype) else "xla"


def xla_flags() -> str:
  return os.environ.get("XLA_FLAGS", "")


def make_config(args):
  """The default config with the flags' model and batch; applies `--lowering`."""
  if args.lowering == "flax":
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    from unet_jax import layers  # pylint: disable=g-import-not-at-top
    layers.max_pool, layers.ConvTranspose = nn.max_pool, nn.ConvTranspose
  config = default.get_config()
  config.data.image_size = args.image_size
  config.data.channels = args.channels
  config.model.features = args.features
  config.model.depth = args.depth
  config.model.pooling = args.pooling
  config.model.activation = args.activation
  config.model.norm = args.norm
  config.model.dtype = args.dtype
  config.train.batch_size = args.batch_size
  config.train.seed = args.seed
  config.train.optimizer = "adam"
  config.train.schedule = "constant"
  return config


def fake_batch(config, seed: int = 0) -> dict:
  """Images in [0, 1] and masks with a blob of foreground, like the real data."""
  rng = np.random.default_rng(seed)
  n, s, c = config.train.batch_size, config.data.image_size, config.data.channels
  images = rng.random((n, s, s, c), dtype=np.float32)
  yy, xx = np.mgrid[:s, :s]
  masks = ((yy - s / 2) ** 2 + (xx - s / 3) ** 2 < (s / 6) ** 2).astype(np.float32)
  masks = np.broadcast_to(masks[None, :, :, None], (n, s, s, 1)).copy()
  return {"image": images, "mask": masks}


def param_count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def cost_flops(stage) -> float:
  """FLOPs of a lowered or compiled computation from XLA's cost analysis."""
  cost = stage.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def model_flops(lower: Callable[[], Any]) -> float:
  """FLOPs of the computation `lower()` jits afresh and lowers, with XLA's convolutions.

  XLA's cost analysis counts oneDNN's custom calls as zero; the mathematics,
  and so the model's FLOPs, are the same with XLA's convolutions.
  """
  with onednn.xla_convolutions():
    return cost_flops(lower())


def peak_rss_mb() -> float:
  """The process's peak resident memory in MiB (ru_maxrss is in KiB on Linux)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_name() -> str:
  device = jax.devices()[0]
  kind = getattr(device, "device_kind", device.platform)
  return f"{device.platform}:{kind} x{jax.device_count()}"


def count_cache_hits():
  """Starts counting persistent-compilation-cache hits; returns a function reading the count."""
  hits = [0]

  def listener(event, **kwargs):
    del kwargs
    if event == "/jax/compilation_cache/cache_hits":
      hits[0] += 1

  jax.monitoring.register_event_listener(listener)
  return lambda: hits[0]


def matmul_runner(n: int = 2048, dtype: str = "float32"):
  """A jitted n x n matmul in `dtype`: (call that blocks, its FLOPs)."""
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32), dtype=dtype)
  b = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32), dtype=dtype)
  compiled = jax.jit(jnp.matmul).lower(a, b).compile()
  return (lambda: compiled(a, b).block_until_ready()), 2.0 * n**3


def block(tree):
  jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)
  return tree


def time_calls(fn, n: int) -> list[float]:
  """Seconds of each of `n` calls of `fn` (which must block until done)."""
  times = []
  for _ in range(n):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def alternate(runners: dict, n: int, repeats: int) -> dict[str, list[float]]:
  """Per-call seconds of each runner, alternating blocks of `n` calls `repeats` times."""
  times = {name: [] for name in runners}
  for r in range(repeats):
    order = list(runners) if r % 2 == 0 else list(reversed(runners))
    for name in order:
      times[name] += time_calls(runners[name], n)
  return times


def median(values) -> float:
  return float(statistics.median(values))


def emit(record: dict) -> None:
  print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()}))
  sys.stdout.flush()


# ----------------------------------------------------------------------------------------------
# PyTorch twin of unet_jax.model.UNet (the subset the benchmarks use).


def torch_num_threads() -> int:
  import torch  # pylint: disable=g-import-not-at-top
  return torch.get_num_threads()


def torch_unet(config):
  """The same U-Net as `unet_jax.model.from_config(config.model)`, in PyTorch.

  Same layers, widths and parameter count: 3x3 convolutions without bias
  before a normalisation, BatchNorm (momentum 0.1 = flax's 0.9, eps 1e-5),
  2x2 stride-2 transposed convolutions with bias, skip concatenated before
  the up-sampled features, 1x1 head with bias.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  m = config.model
  # GELU's tanh form, as flax's gelu (approximate=True), not PyTorch's default erf form.
  acts = {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(m.leaky_slope),
          "gelu": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU, "elu": nn.ELU}
  if (m.upsampling != "transpose" or m.residual or m.attention or m.dropout or m.deep_supervision
      or m.coord_channels or m.bottleneck_heads):
    raise SystemExit("the torch reference mirrors transpose up-sampling, plain blocks, no dropout,"
                     " no deep supervision, coordinate channels or bottleneck attention")

  def norm(c):
    if m.norm == "batch":
      return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)
    if m.norm == "group":
      import math  # pylint: disable=g-import-not-at-top
      return nn.GroupNorm(math.gcd(8, c), c, eps=1e-6)
    if m.norm == "layer":
      raise SystemExit("layer norm has no channels_last twin here")
    return nn.Identity()

  def conv_block(cin, cout):
    bias = m.norm == "none"
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=bias), norm(cout), acts[m.activation](),
        nn.Conv2d(cout, cout, 3, padding=1, bias=bias), norm(cout), acts[m.activation]())

  class Pool(nn.Module):

    def __init__(self, c):
      super().__init__()
      if m.pooling == "max":
        self.op = nn.MaxPool2d(2)
      elif m.pooling == "avg":
        self.op = nn.AvgPool2d(2)
      elif m.pooling == "conv":
        # flax "SAME" with stride 2 on an even size pads (0, 1): top/left 0, bottom/right 1.
        self.op = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(c, c, 3, stride=2))
      else:
        raise SystemExit(f"pooling={m.pooling} has no torch twin here")

    def forward(self, x):
      return self.op(x)

  class UNet(nn.Module):

    def __init__(self):
      super().__init__()
      widths = model_lib.from_config(m).widths()
      cin = config.data.channels
      self.down = nn.ModuleList()
      self.pool = nn.ModuleList()
      for width in widths[:-1]:
        self.down.append(conv_block(cin, width))
        self.pool.append(Pool(width))
        cin = width
      self.bottleneck = conv_block(cin, widths[-1])
      self.up = nn.ModuleList()
      self.decode = nn.ModuleList()
      for level in reversed(range(m.depth)):
        self.up.append(nn.ConvTranspose2d(widths[level + 1], widths[level], 2, stride=2))
        self.decode.append(conv_block(2 * widths[level], widths[level]))
      self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x):
      skips = []
      for block, pool in zip(self.down, self.pool):
        x = block(x)
        skips.append(x)
        x = pool(x)
      x = self.bottleneck(x)
      for up, block, skip in zip(self.up, self.decode, reversed(skips)):
        x = block(torch.cat([skip, up(x)], dim=1))
      return self.head(x)

  return UNet()


def torch_loss(logits, masks, smooth: float = 1.0):
  """Per-image soft Dice + mean BCE, averaged over the batch (losses.dice_bce_loss)."""
  import torch  # pylint: disable=g-import-not-at-top
  probs = torch.sigmoid(logits)
  inter = (probs * masks).sum(dim=(1, 2, 3))
  total = probs.sum(dim=(1, 2, 3)) + masks.sum(dim=(1, 2, 3))
  dice = 1 - (2 * inter + smooth) / (total + smooth)
  bce = torch.nn.functional.binary_cross_entropy_with_logits(
      logits, masks, reduction="none").mean(dim=(1, 2, 3))
  return (dice + bce).mean()


def torch_inputs(batch: dict):
  """NCHW tensors in channels_last memory format (NHWC storage, as the JAX side)."""
  import torch  # pylint: disable=g-import-not-at-top
  to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous(
      memory_format=torch.channels_last)
  return to(batch["image"]), to(batch["mask"])
