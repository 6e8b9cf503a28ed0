"""grain input pipelines: shuffled, augmented train batches and complete eval batches.

Batches are a pure function of (seed, step): batch `k` of a run is always
the same images with the same augmentation, so resuming at step `k` needs no
iterator state beyond the step itself. Each JAX process reads only its share
of every global batch.
"""

import functools
import os
import signal
import threading
import time
from typing import Any, Iterator

from absl import flags
import grain
import jax
import ml_collections
import numpy as np

from unet_jax.data import augment as augment_lib
from unet_jax.errors import counted
from unet_jax.errors import UserError


def _check_positive(batch_size: int) -> None:
  if batch_size < 1:
    raise UserError(f"batch size {batch_size}: use 1 or more")


def local_batch_size(global_batch_size: int) -> int:
  """The batch each process reads; the global batch must split evenly."""
  _check_positive(global_batch_size)
  devices, processes = jax.device_count(), jax.process_count()
  if global_batch_size % devices:
    raise UserError(f"batch size {global_batch_size} does not divide evenly over "
                    f"{devices} devices; use a multiple of {devices}")
  return global_batch_size // processes


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  _check_positive(global_batch_size)
  steps = num_examples // global_batch_size
  if steps == 0:
    raise UserError(f"the training split has {counted(num_examples, 'image')}, fewer than one "
                    f"batch of {global_batch_size}; lower train.batch_size")
  return steps


def check_loader(data_config: ml_collections.ConfigDict) -> None:
  """Refuses negative data.prefetch and data.num_workers (grain's traceback, or silently none)."""
  for name in ("prefetch", "num_workers"):
    if data_config[name] < 0:
      raise UserError(f"data.{name}={data_config[name]}: use 0 or more")


def _read_options(config: ml_collections.ConfigDict) -> grain.ReadOptions:
  check_loader(config.data)
  return grain.ReadOptions(num_threads=max(1, config.data.prefetch),
                           prefetch_buffer_size=config.data.prefetch)


def _to_iterator(dataset: grain.MapDataset, config: ml_collections.ConfigDict) -> Iterator[Any]:
  iter_dataset = dataset.to_iter_dataset(_read_options(config))
  if config.data.num_workers > 0:
    if not flags.FLAGS.is_parsed():
      # grain's workers read its absl flags; outside launch.py (tests, notebooks) nobody
      # parsed them, so take their defaults.
      flags.FLAGS.mark_as_parsed()
    iter_dataset = iter_dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=config.data.num_workers),
        worker_init_fn=functools.partial(_exit_with_parent, os.getpid()))
  return iter(iter_dataset)


def _exit_with_parent(parent: int, worker_index: int, worker_count: int) -> None:
  """Ends a loader worker once `parent`, the process it loads for, is gone: a run stopped by
  Ctrl-C (which exits at once) or killed leaves no workers behind, each holding its memory.
  A terminal's Ctrl-C reaches the workers too: they leave it to the run (no traceback each)."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  if os.getppid() != parent:  # Reparented, or another process's child (a fork server's).
    if not _running(parent):  # The run ended while this worker started.
      os._exit(0)
    return

  def watch():
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(0)

  threading.Thread(target=watch, name="exit_with_parent", daemon=True).start()


def _running(pid: int) -> bool:
  """Whether process `pid` runs (an ended one not yet reaped, a zombie, does not)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    if os.path.isdir("/proc"):
      return False
  try:  # No /proc (macOS).
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  return True


def train_batches(source, config: ml_collections.ConfigDict, start_step: int = 0) -> Iterator[dict]:
  """This process's share of each training batch, from `start_step` to the end of training.

  Each epoch is a fresh seeded permutation with the last partial batch dropped.
  """
  dataset = grain.MapDataset.source(source).shuffle(seed=config.train.seed)
  if config.augment.enabled:
    augment_lib.check(config.augment)
    dataset = dataset.random_map(functools.partial(augment_lib.augment, config=config.augment),
                                 seed=config.train.seed + 1)
  # Whole global batches only, before each process takes its share: every process then has
  # the same number of batches in an epoch, and a global batch never spans two epochs.
  global_batch = config.train.batch_size
  local = local_batch_size(global_batch)
  dataset = dataset[:steps_per_epoch(len(dataset), global_batch) * global_batch]
  dataset = dataset[jax.process_index()::jax.process_count()]
  dataset = dataset.batch(local)
  dataset = dataset.repeat(config.train.epochs)
  return _to_iterator(dataset[start_step:], config)


def _padded_record(index: int, source, size: int) -> dict[str, Any]:
  record = dict(source[min(index, size - 1)])
  record["index"] = np.int32(min(index, size - 1))
  record["valid"] = np.bool_(index < size)
  return record


def eval_batches(source, config: ml_collections.ConfigDict, batch_size: int) -> Iterator[dict]:
  """Every image of `source` once, in order, in full batches.

  The last batch is padded by repeating the last image, with `valid` False
  on the padding, so no image is dropped and none is counted twice; `index`
  is each record's position in `source`.
  """
  local, size = local_batch_size(batch_size), len(source)
  padded = -(-size // batch_size) * batch_size
  dataset = grain.MapDataset.range(padded).map(
      functools.partial(_padded_record, source=source, size=size))
  dataset = dataset[jax.process_index()::jax.process_count()]
  dataset = dataset.batch(local)
  return _to_iterator(dataset, config)
