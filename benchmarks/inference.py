"""Prediction throughput (images/s of steps.predict_step) at several sizes and batches.

    python benchmarks/inference.py [--sizes=256,640] [--batches=1,16] [--features=16] \
        [--reference=torch]

Prints one JSON line: per case (size, batch) img_per_s, call_s (median),
compile_s and, with --reference=torch, the same U-Net in PyTorch eval mode
(channels_last, inference_mode, bfloat16 autocast for --dtype=bfloat16) timed
alternately in the same run, with ratio = ours / torch; min_ratio over the
cases; peak_rss_mb (MiB). --sizes and --batches stand for --image_size and
--batch_size, which it refuses.
"""

import functools
import time

# First: common sets malloc up before numpy and jax start threads (XLA flags: common.setup).
import common  # pylint: disable=g-bad-import-order

import jax
import numpy as np

from unet_jax import optim
from unet_jax import parallel
from unet_jax import steps


def main():
  parser = common.ArgumentParser(description=__doc__.split("\n")[0])
  common.model_flags(parser, sized=False)
  parser.add_argument("--sizes", type=common.positive_list, default="256,640")
  parser.add_argument("--batches", type=common.positive_list, default="1,16")
  args = parser.parse_args()
  if args.reference == "torch":
    common.require_torch("--reference=torch")
  kept_memory = common.setup(args)
  sizes, batches = args.sizes, args.batches
  # The config's shapes are the first case's; each case compiles its own.
  args.image_size, args.batch_size = sizes[0], batches[0]

  config = common.make_config(args)
  mesh = parallel.make_mesh()
  tx = optim.make_optimizer(config)
  state = jax.device_put(
      steps.create_train_state(config, (sizes[0], sizes[0], args.channels), tx),
      parallel.replicated(mesh))
  jit_predict = functools.partial(steps.jit_predict, mesh)
  predict = jit_predict()
  torch_model = None
  if args.reference == "torch":
    torch_model = _torch_model(config)

  cases = []
  for size in sizes:
    for batch_size in batches:
      rng = np.random.default_rng(args.seed)
      images = rng.random((batch_size, size, size, args.channels), dtype=np.float32)
      device_images = jax.device_put(images, parallel.batch_sharded(mesh))
      start = time.perf_counter()
      lowered = predict.lower(state, device_images)
      compiled = lowered.compile()
      compile_s = time.perf_counter() - start
      runners = {"jax": lambda c=compiled, x=device_images: c(state, x).block_until_ready()}
      if torch_model is not None:
        runners["torch"] = _torch_predict(torch_model, images, args.dtype)
      warm = {name: common.time_calls(run, 1)[0] for name, run in runners.items()}
      # Blocks of about half a second each, so that small calls are timed many times.
      per_block = max(1, min(20, round(0.5 / max(warm.values()))))
      times = common.alternate(runners, per_block, args.repeats)
      call_s = common.median(times["jax"])
      case = {"size": size, "batch": batch_size, "img_per_s": batch_size / call_s,
              "call_s": call_s, "compile_s": compile_s,
              "gflop": common.model_flops(lambda: jit_predict().lower(state, device_images)) / 1e9}
      if "torch" in times:
        torch_s = common.median(times["torch"])
        case.update(torch_img_per_s=batch_size / torch_s, ratio=torch_s / call_s)
      cases.append({k: (round(v, 4) if isinstance(v, float) else v) for k, v in case.items()})

  out = {"benchmark": "inference", "features": args.features, "depth": args.depth,
         "norm": args.norm, "dtype": args.dtype, "lowering": args.lowering,
         "conv": common.conv_backend(args.dtype), "cases": cases,
         "peak_rss_mb": common.peak_rss_mb(), "device": common.device_name(),
         "xla_flags": common.xla_flags(),
         "keep_freed_memory": kept_memory}
  if torch_model is not None:
    out["min_ratio"] = min(c["ratio"] for c in cases)
  common.emit(out)


def _torch_model(config):
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = common.torch_unet(config).to(memory_format=torch.channels_last)
  return model.eval()


def _torch_predict(model, images, dtype_name):
  """One prediction per call, under bfloat16 autocast for bfloat16 (as train_step's)."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  x, _ = common.torch_inputs({"image": images, "mask": images[..., :1]})
  if dtype_name == "bfloat16":
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
  else:
    autocast = contextlib.nullcontext

  def run():
    with torch.inference_mode():
      with autocast():
        logits = model(x)
      torch.sigmoid(logits.float())[:, 0].contiguous()

  return run


if __name__ == "__main__":
  common.run(main)
