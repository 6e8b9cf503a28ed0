"""Train-step throughput of the project's U-Net, optionally against the same U-Net in PyTorch.

    python benchmarks/train_step.py --image_size=256 --batch_size=8 --features=16 --depth=4 \
        --steps=10 [--reference=torch] [--dtype=bfloat16 --against_float32=1]

Prints one JSON line: img_per_s, step_s (median), compile_s, gflop_per_step
(XLA's cost analysis of the step as lowered: the model's FLOPs), gflops_per_s,
peak_rss_mb (MiB, the process after the JAX steps, before any PyTorch work), device;
matmul_gflops_per_s (a --peak_size^3 matmul in --dtype timed between the steps)
and peak_fraction (gflops_per_s over it); mfu (over --chip_peak_tflops, when
given); with --reference=torch also torch_img_per_s, torch_step_s and ratio
(ours / torch), timed alternately with ours; with --against_float32=1 also
float32_img_per_s, float32_step_s and float32_ratio (the float32 step's time
over ours), likewise alternated (with --dtype=bfloat16 only).
"""

import copy
import time

# First: common sets malloc up before numpy and jax start threads (XLA flags: common.setup).
import common  # pylint: disable=g-bad-import-order

import jax

from unet_jax import optim
from unet_jax import parallel
from unet_jax import steps


def main():
  parser = common.ArgumentParser(description=__doc__.split("\n")[0])
  common.model_flags(parser)
  parser.add_argument("--steps", type=common.positive, default=10,
                      help="Timed steps per implementation.")
  parser.add_argument("--warmup", type=common.at_least(0), default=1)
  parser.add_argument("--peak", type=int, default=1,
                      help="1: also time a --peak_size^3 matmul (in --dtype) between the steps.")
  parser.add_argument("--peak_size", type=common.positive, default=2048,
                      help="Matmul size for --peak; 8192 fills an accelerator.")
  parser.add_argument("--against_float32", type=int, default=0,
                      help="1: also time the same step in float32 (for --dtype=bfloat16).")
  parser.add_argument("--chip_peak_tflops", type=float, default=0.0,
                      help="The chip's datasheet dense peak in --dtype, for `mfu` (0: not given).")
  args = parser.parse_args()
  if args.against_float32 and args.dtype == "float32":
    parser.error("--against_float32=1 with --dtype=float32 would time the same step twice; "
                 "give --dtype=bfloat16")
  if args.reference == "torch":
    common.require_torch("--reference=torch")
  kept_memory = common.setup(args)
  hits = common.count_cache_hits()

  config = common.make_config(args)
  mesh = parallel.make_mesh()
  host_batch = common.fake_batch(config, args.seed)
  batch = parallel.device_batch(host_batch, mesh)
  state, compiled, compile_s = _compiled_step(config, mesh, batch)
  # The step as lowered, before XLA's rewrites: the model's FLOPs on any backend (a compiled
  # GPU step calls cuDNN convolutions, which its cost analysis counts as zero).
  flops = common.model_flops(lambda: steps.jit_steps(config, mesh)[0].lower(
      state, batch, config.train.learning_rate))
  params = common.param_count(state.params)
  jax_step = _runner(compiled, state, batch, config.train.learning_rate)
  for _ in range(args.warmup):
    jax_step()
  rss = common.peak_rss_mb()
  runners = {"jax": jax_step}
  if args.against_float32:
    float32_config = copy.deepcopy(config)
    float32_config.model.dtype = "float32"
    float32_state, float32_step = _compiled_step(float32_config, mesh, batch)[:2]
    runners["float32"] = _runner(float32_step, float32_state, batch,
                                 config.train.learning_rate)
    for _ in range(args.warmup):
      runners["float32"]()
  if args.reference == "torch":
    torch_step, torch_params = _torch_step(config, host_batch, args.dtype)
    for _ in range(args.warmup):
      torch_step()
    runners["torch"] = torch_step
  if args.peak:
    matmul, matmul_flops = common.matmul_runner(args.peak_size, args.dtype)
    matmul()
    runners["matmul"] = matmul

  repeats = args.repeats if len(runners) > 1 else 1
  per_block = max(1, -(-args.steps // repeats))  # At least --steps timed steps.
  blocks = {name: (per_block if name != "matmul" else 2) for name in runners}
  times = {name: [] for name in runners}
  for r in range(repeats):  # Alternate, reversing the order every other round.
    for name in (list(runners) if r % 2 == 0 else list(reversed(runners))):
      times[name] += common.time_calls(runners[name], blocks[name])
  step_s = common.median(times["jax"])
  out = {
      "benchmark": "train_step", "image_size": args.image_size, "batch_size": args.batch_size,
      "features": args.features, "depth": args.depth, "pooling": args.pooling,
      "activation": args.activation, "norm": args.norm, "dtype": args.dtype,
      "lowering": args.lowering, "conv": common.conv_backend(args.dtype),
      "img_per_s": args.batch_size / step_s, "step_s": step_s, "compile_s": compile_s,
      "compile_cache_hits": hits(), "gflop_per_step": flops / 1e9,
      "gflops_per_s": flops / 1e9 / step_s, "peak_rss_mb": rss, "params": params,
      "steps_timed": len(times["jax"]), "device": common.device_name(),
      "xla_flags": common.xla_flags(),
      "keep_freed_memory": kept_memory}
  if args.chip_peak_tflops:
    out["mfu"] = out["gflops_per_s"] / (args.chip_peak_tflops * 1e3)
  if "matmul" in times:
    matmul_gflops = matmul_flops / common.median(times["matmul"]) / 1e9
    out.update(matmul_gflops_per_s=matmul_gflops,
               peak_fraction=out["gflops_per_s"] / matmul_gflops)
  if "float32" in times:
    float32_s = common.median(times["float32"])
    out.update(float32_img_per_s=args.batch_size / float32_s, float32_step_s=float32_s,
               float32_ratio=float32_s / step_s)
  if "torch" in times:
    torch_s = common.median(times["torch"])
    out.update(torch_params=torch_params, torch_img_per_s=args.batch_size / torch_s,
               torch_step_s=torch_s, ratio=torch_s / step_s,
               torch_threads=common.torch_num_threads())
  common.emit(out)


def _compiled_step(config, mesh, batch):
  """(initial train state, the compiled train step of `config`, seconds to compile)."""
  image_shape = (config.data.image_size,) * 2 + (config.data.channels,)
  state = jax.device_put(steps.create_train_state(config, image_shape,
                                                 optim.make_optimizer(config)),
                         parallel.replicated(mesh))
  start = time.perf_counter()
  compiled = steps.jit_steps(config, mesh)[0].lower(state, batch,
                                                    config.train.learning_rate).compile()
  return state, compiled, time.perf_counter() - start


def _runner(compiled, state, batch, rate):
  """One train step per call, each on the state the last one left."""
  holder = {"state": state}

  def step():
    holder["state"], metrics = compiled(holder["state"], batch, rate)
    common.block((holder["state"], metrics))
  return step


def _torch_step(config, host_batch, dtype_name):
  """A PyTorch step doing what steps.train_step does: forward, Dice + BCE, backward, Adam,
  the batch Dice metric and the gradient norm. Returns (step, parameter count)."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  model = common.torch_unet(config).to(memory_format=torch.channels_last)
  model.train()
  opt = torch.optim.Adam(model.parameters(), lr=config.train.learning_rate)
  images, masks = common.torch_inputs(host_batch)
  if dtype_name == "bfloat16":
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
  else:
    autocast = contextlib.nullcontext

  def step():
    opt.zero_grad(set_to_none=True)
    with autocast():
      logits = model(images)
    loss = common.torch_loss(logits.float(), masks)
    loss.backward()
    opt.step()
    with torch.no_grad():
      grad_norm = torch.linalg.vector_norm(
          torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
      pred, truth = logits > 0, masks > 0.5
      tp = (pred & truth).sum(dim=(1, 2, 3))
      fp = (pred & ~truth).sum(dim=(1, 2, 3))
      fn = (~pred & truth).sum(dim=(1, 2, 3))
      dice = torch.where(tp + fp + fn > 0, 2 * tp / torch.clamp(2 * tp + fp + fn, min=1), 1.0)
      loss.detach().item(), dice.mean().item(), grad_norm.item()

  return step, int(sum(p.numel() for p in model.parameters()))


if __name__ == "__main__":
  common.run(main)
