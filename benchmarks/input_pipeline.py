"""Input pipeline benchmark: prints one JSON line.

Throughput of the training pipeline (decode, resize, augment, batch) over
one epoch of a COCO export, after a short warm-up:

    python benchmarks/input_pipeline.py --root=/path/to/brain-tumor-coco --num_workers=1

Peak resident memory over one epoch of N generated phantoms, for each N (the
sources hold file names and annotations, never images, so memory should not
grow with N; --split, --augment, --warmup, --batch_size and --num_workers
apply to each N's run):

    python benchmarks/input_pipeline.py --synthetic=2000,20000
"""

import gc
import json
import os
import pathlib
import re
import resource
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import brain  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_jax.errors import UserError  # pylint: disable=g-import-not-at-top,wrong-import-position

_ROOT = flags.DEFINE_string("root", None, "COCO export to read (throughput mode).")
_SPLIT = flags.DEFINE_string("split", "train", "Split to read.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, "Training image size.", lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Batch size.", lower_bound=1)
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 1, "grain worker processes.", lower_bound=0)
_WARMUP = flags.DEFINE_integer("warmup", 3, "Batches read before timing starts.", lower_bound=0)
_AUGMENT = flags.DEFINE_bool("augment", True, "Apply the training augmentation.")
_SYNTHETIC = flags.DEFINE_list("synthetic", [], "Memory mode: phantom counts, e.g. 2000,20000.")
_SYNTHETIC_SIZE = flags.DEFINE_integer("synthetic_size", 64, "Memory mode: phantom size.",
                                       lower_bound=32)
_ONE_MASK = flags.DEFINE_bool("one_mask", False, "Every category one tumour mask (the memory "
                              "mode's phantoms have one category, not the export's two).")
flags.register_validator(
    "synthetic", lambda counts: all(re.fullmatch(r"[0-9]+", n) and int(n) > 0 for n in counts),
    message="phantom counts are whole numbers of 1 or more, e.g. 2000,20000")


def _max_rss_mib(who: int = resource.RUSAGE_SELF) -> float:
  return resource.getrusage(who).ru_maxrss / 1024  # kilobytes on Linux


def _rss_now_mib() -> float | None:
  """Resident memory now (Linux), after the peak of building the source has passed."""
  try:
    with open("/proc/self/statm") as f:
      return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
  except OSError:
    return None


def _config(root: str, image_size: int):
  config = brain.get_config()
  config.data.root = root
  if _ONE_MASK.value:
    config.data.category_ids = ()
  config.data.image_size = image_size
  config.data.num_workers = _NUM_WORKERS.value
  config.train.batch_size = _BATCH_SIZE.value
  config.train.epochs = 1
  config.augment.enabled = _AUGMENT.value
  return config


def run_epoch(root: str, image_size: int) -> dict:
  """Reads one epoch of `root`'s split through the training pipeline."""
  rss_before = _max_rss_mib()
  # Imported here so the memory mode's parent process stays small.
  from unet_jax import data  # pylint: disable=g-import-not-at-top
  from unet_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  config = _config(root, image_size)
  rss_imports = _max_rss_mib()
  source = data.build_source(config.data, _SPLIT.value, workdir=tempfile.gettempdir())
  rss_source = _max_rss_mib()
  batches = pipeline.train_batches(source, config)
  steps = len(source) // config.train.batch_size
  for _ in range(min(_WARMUP.value, steps - 1)):
    next(batches)
  start, timed = time.perf_counter(), 0
  for batch in batches:
    timed += len(batch["file_name"])
  elapsed = time.perf_counter() - start
  del batches  # stops grain's workers before the process exits
  gc.collect()
  return {
      "images": len(source), "image_size": image_size, "batch_size": config.train.batch_size,
      "num_workers": config.data.num_workers, "augment": config.augment.enabled,
      "timed_samples": timed, "seconds": round(elapsed, 2),
      "samples_per_s": round(timed / elapsed, 1),
      "rss_before_imports_mib": round(rss_before, 1),
      "rss_after_imports_mib": round(rss_imports, 1),
      "rss_after_source_mib": round(rss_source, 1),
      "rss_after_epoch_mib": _rss_now_mib(),
      "peak_rss_mib": round(_max_rss_mib(), 1),
      "workers_peak_rss_mib": round(_max_rss_mib(resource.RUSAGE_CHILDREN), 1),
  }


def memory(counts: list[int]) -> dict:
  """Peak memory of one epoch over each count of phantoms, each in a fresh process."""
  from unet_jax.data import synthetic  # pylint: disable=g-import-not-at-top

  results = []
  with tempfile.TemporaryDirectory() as tmp:
    for count in counts:
      start = time.perf_counter()
      root = synthetic.write_phantom_coco(pathlib.Path(tmp) / f"phantoms_{count}",
                                          split_sizes={_SPLIT.value: count},
                                          image_size=_SYNTHETIC_SIZE.value)
      generate_s = time.perf_counter() - start
      out = subprocess.run(
          [sys.executable, __file__, f"--root={root}", f"--split={_SPLIT.value}",
           f"--image_size={_SYNTHETIC_SIZE.value}", f"--num_workers={_NUM_WORKERS.value}",
           f"--batch_size={_BATCH_SIZE.value}", f"--warmup={_WARMUP.value}",
           f"--{'' if _AUGMENT.value else 'no'}augment", "--one_mask"],
          check=False, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
      if out.returncode:
        raise UserError(f"--synthetic={count}: its run failed (exit {out.returncode}): "
                        f"{_last_error(out.stderr)}")
      result = json.loads(out.stdout.strip().splitlines()[-1])
      results.append({"images": count, "generate_s": round(generate_s, 1),
                      **{k: result[k] for k in ("rss_after_imports_mib", "rss_after_source_mib",
                                                "peak_rss_mib", "rss_after_epoch_mib",
                                                "workers_peak_rss_mib", "samples_per_s")}})
  return {"benchmark": "input_pipeline_memory", "split": _SPLIT.value,
          "image_size": _SYNTHETIC_SIZE.value, "augment": _AUGMENT.value,
          "num_workers": _NUM_WORKERS.value, "runs": results,
          "peak_rss_growth_mib": round(results[-1]["peak_rss_mib"] - results[0]["peak_rss_mib"],
                                       1)}


def _last_error(stderr: str) -> str:
  """The line of a failed run's stderr that says what went wrong: its `error:` line, or
  its last line (a traceback's exception)."""
  lines = [line.strip() for line in stderr.splitlines() if line.strip()]
  errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
  return (errors or lines or ["no output"])[-1]


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, a bad flag ending the command with one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}")


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments: {argv[1:]}")
  try:
    if _SYNTHETIC.value:
      record = memory([int(n) for n in _SYNTHETIC.value])
    elif _ROOT.value:
      record = {"benchmark": "input_pipeline", "root": _ROOT.value, "split": _SPLIT.value,
                **run_epoch(_ROOT.value, _IMAGE_SIZE.value)}
    else:
      sys.exit("error: pass --root=COCO_EXPORT or --synthetic=N1,N2")
  except UserError as e:
    sys.exit(f"error: {e}")
  # The machine's load: throughput on a shared host is only comparable at similar load.
  record.update(cpus=os.cpu_count(), load_average=round(os.getloadavg()[0], 2))
  print(json.dumps(record), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
