"""Times the U-Net's 3x3 convolutions alone: XLA's, oneDNN's through the FFI, PyTorch's.

    python benchmarks/convolutions.py [--image_size=256 --batch_size=8 --features=16 --depth=4]

For each distinct 3x3 layer of the U-Net (the one-channel input layer left
out: it is a sum of taps, unet_jax.layers) and each of forward, input
gradient and kernel gradient, the three implementations alternate call by
call, the order rotated each round. Prints one JSON line: per layer and op the
median milliseconds, and the totals per implementation with `ratio` (PyTorch's
total time over ours) for XLA's and oneDNN's. Needs PyTorch (the bench extra:
README, Performance).
"""

import functools
import statistics
import time

# First: common sets malloc up before numpy and jax start threads (XLA flags: main).
import common  # pylint: disable=g-bad-import-order

import jax
import numpy as np

from unet_jax import model as model_lib
from unet_jax import onednn

OPS = ("fwd", "dx", "dkernel")


def unet_layers(size: int, widths: tuple[int, ...]) -> list[tuple[int, int, int]]:
  """(spatial size, Cin, Cout) of each distinct 3x3 convolution after the first."""
  layers = set()
  depth = len(widths) - 1
  for level, width in enumerate(widths):
    s = size // 2**level
    layers.add((s, width, width))  # second conv of each block
    if level:
      layers.add((s, widths[level - 1], width))  # first conv of an encoder block
    if level < depth:
      layers.add((s, 2 * width, width))  # first conv of a decoder block (skip concatenated)
  return sorted(layers, reverse=True)


def jax_ops(conv) -> dict:
  def vjp(x, kernel, dy):
    return jax.vjp(conv, x, kernel)[1](dy)
  return {"fwd": jax.jit(lambda x, k, dy: conv(x, k)),
          "dx": jax.jit(lambda x, k, dy: vjp(x, k, dy)[0]),
          "dkernel": jax.jit(lambda x, k, dy: vjp(x, k, dy)[1])}


def torch_ops() -> dict:
  import torch  # pylint: disable=g-import-not-at-top

  def backward(mask):
    return lambda x, k, dy: torch.ops.aten.convolution_backward(
        dy, x, k, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)
  return {"fwd": lambda x, k, dy: torch.nn.functional.conv2d(x, k, padding=1),
          "dx": backward([True, False, False]), "dkernel": backward([False, True, False])}


def time_layer(size, cin, cout, batch, impls, reps) -> dict[str, dict[str, float]]:
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, size, size, cin), np.float32)
  kernel = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
  dy = rng.standard_normal((batch, size, size, cout), np.float32)
  jax_args = tuple(jax.device_put(a) for a in (x, kernel, dy))
  # NCHW shapes with NHWC memory (channels_last), as PyTorch's reference U-Net runs.
  torch_args = (torch.from_numpy(x).permute(0, 3, 1, 2),
                torch.from_numpy(kernel).permute(3, 2, 0, 1).contiguous(
                    memory_format=torch.channels_last),
                torch.from_numpy(dy).permute(0, 3, 1, 2))
  args = {name: (torch_args if name == "torch" else jax_args) for name in impls}
  result = {}
  with torch.no_grad():
    for op in OPS:
      calls = {name: (lambda f=ops[op], a=args[name]: jax.block_until_ready(f(*a)))
               for name, ops in impls.items()}
      for call in calls.values():
        for _ in range(3):
          call()
      times = {name: [] for name in calls}
      names = list(calls)
      for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
          start = time.perf_counter()
          calls[name]()
          times[name].append(time.perf_counter() - start)
      for name, t in times.items():
        result.setdefault(name, {})[op] = 1e3 * statistics.median(t)
  return result


def main():
  parser = common.ArgumentParser(description=__doc__.splitlines()[0])
  common.shape_flags(parser)
  parser.add_argument("--reps", type=common.positive, default=10)
  args = parser.parse_args()
  if args.image_size < 2**args.depth:
    parser.error(f"--image_size={args.image_size}: the deepest of --depth={args.depth} levels "
                 f"needs {2**args.depth} or more")
  common.require_torch("convolutions.py")
  common.xla_config.configure(cache_dir="off")  # The project's XLA:CPU flags, as in training.
  kept_memory = common.KEPT_FREED_MEMORY
  onednn.ensure_registered()
  xla_conv = functools.partial(onednn.xla_conv, dilation=1)
  impls = {"xla": jax_ops(xla_conv), "onednn": jax_ops(onednn.conv), "torch": torch_ops()}
  layers, totals = [], {name: dict.fromkeys(OPS, 0.0) for name in impls}
  widths = model_lib.UNet(features=args.features, depth=args.depth).widths()
  for size, cin, cout in unet_layers(args.image_size, widths):
    ms = time_layer(size, cin, cout, args.batch_size, impls, args.reps)
    layers.append({"size": size, "cin": cin, "cout": cout,
                   **{f"{name}_{op}_ms": ms[name][op] for name in impls for op in OPS}})
    for name in impls:
      for op in OPS:
        totals[name][op] += ms[name][op]
  out = {"benchmark": "convolutions", "image_size": args.image_size,
         "batch_size": args.batch_size, "features": args.features, "depth": args.depth,
         "layers": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in layer.items()}
                    for layer in layers],
         "device": common.device_name(), "xla_flags": common.xla_flags(),
         "keep_freed_memory": kept_memory}
  torch_total = sum(totals["torch"].values())
  for name in impls:
    out.update({f"{name}_{op}_ms": totals[name][op] for op in OPS})
    out[f"{name}_total_ms"] = sum(totals[name].values())
    if name != "torch":
      out[f"{name}_ratio"] = torch_total / out[f"{name}_total_ms"]
  common.emit(out)


if __name__ == "__main__":
  common.run(main)
