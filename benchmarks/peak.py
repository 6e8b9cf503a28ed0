"""Measured fp32 matmul throughput of this machine: the yardstick for the train step.

    python benchmarks/peak.py [--size=2048] [--repeats=10]

Prints one JSON line: jax_gflops_per_s (a jitted float32 matmul, XLA:CPU),
numpy_gflops_per_s (numpy's BLAS), torch_gflops_per_s (when torch is
installed), peak_gflops_per_s (the best of them), cores and cpu. Each is the
best of `repeats` timed calls, alternating between the libraries, so it
estimates what the machine can do rather than a loaded average.
"""

import os
import platform

# First: common sets malloc up before numpy and jax start threads. XLA's flags stay the
# jaxlib's: they only change where convolutions run.
import common  # pylint: disable=g-bad-import-order

import jax
import jax.numpy as jnp
import numpy as np


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def main():
  parser = common.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=common.positive, default=2048)
  parser.add_argument("--repeats", type=common.positive, default=10)
  args = parser.parse_args()
  n = args.size
  flop = 2.0 * n**3
  rng = np.random.default_rng(0)
  a = rng.standard_normal((n, n), dtype=np.float32)
  b = rng.standard_normal((n, n), dtype=np.float32)

  ja, jb = jnp.asarray(a), jnp.asarray(b)
  matmul = jax.jit(jnp.matmul).lower(ja, jb).compile()
  runners = {"jax": lambda: matmul(ja, jb).block_until_ready(),
             "numpy": lambda: np.matmul(a, b)}
  try:
    import torch  # pylint: disable=g-import-not-at-top
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    runners["torch"] = lambda: torch.matmul(ta, tb)
  except ImportError:
    pass
  for run in runners.values():
    run()
  times = common.alternate(runners, 1, args.repeats)
  record = {"benchmark": "peak", "size": n, "dtype": "float32"}
  for name, values in times.items():
    record[f"{name}_gflops_per_s"] = flop / min(values) / 1e9
    record[f"{name}_median_gflops_per_s"] = flop / common.median(values) / 1e9
  record["peak_gflops_per_s"] = max(record[f"{name}_gflops_per_s"] for name in times)
  record.update(cores=len(os.sched_getaffinity(0)), cpu=cpu_model(),
                device=common.device_name(),
                openblas_coretype=os.environ.get("OPENBLAS_CORETYPE", ""))
  common.emit(record)


if __name__ == "__main__":
  common.run(main)
