"""The training loop: `train_and_evaluate(config, workdir)`."""

import json
import pathlib
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from unet_jax import checkpoint as checkpoint_lib
from unet_jax import data as data_lib
from unet_jax import evaluate
from unet_jax import parallel
from unet_jax import reports
from unet_jax import steps
from unet_jax.data import pipeline

from unet_jax.saved_config import CONFIG_FILE


def write_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  tmp = workdir / (CONFIG_FILE + ".tmp")
  tmp.write_text(json.dumps(config.to_dict(), indent=2, default=list) + "\n")
  tmp.replace(workdir / CONFIG_FILE)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`, then evaluates its best checkpoint.

  Returns:
    The evaluation summary of `config.eval.split`, or the best validation
    record when that split does not exist.
  """
  workdir_path = pathlib.Path(workdir)
  workdir_path.mkdir(parents=True, exist_ok=True)
  mesh = parallel.make_mesh()
  train_source = data_lib.build_source(config.data, config.data.train_split, workdir)
  val_source = data_lib.build_source(config.data, config.data.val_split, workdir)
  epoch_steps = pipeline.steps_per_epoch(len(train_source), config.train.batch_size)
  total_steps = config.train.epochs * epoch_steps
  image_shape = (config.data.image_size, config.data.image_size, config.data.channels)

  tx = steps.make_optimizer(config, total_steps, epoch_steps)
  state = jax.device_put(steps.create_train_state(config, image_shape, tx), parallel.replicated(mesh))
  checkpoints = checkpoint_lib.Checkpoints(workdir, keep_latest=config.train.keep_checkpoints)
  start_step = checkpoints.latest_step() or 0
  if start_step:
    state = checkpoints.restore(start_step, state)
    reports.truncate_metrics(workdir, start_step)
    logging.info("Resumed from step %d", start_step)
  if jax.process_index() == 0:
    write_config(config, workdir_path)
  if start_step >= total_steps:
    logging.info("%s already finished (%d steps); raise train.epochs to train further.",
                 workdir, start_step)
    checkpoints.close()
    return {}
  logging.info("Training %d steps (%d epochs of %d), global batch %d on %d devices",
               total_steps, config.train.epochs, epoch_steps, config.train.batch_size,
               jax.device_count())

  p_train, p_eval = steps.jit_steps(config, mesh)
  batches = pipeline.train_batches(train_source, config, start_step)
  window_start, window_metrics = time.perf_counter(), []
  for step in range(start_step, total_steps):
    batch = next(batches)
    state, step_metrics = p_train(state, parallel.device_batch(batch, mesh))
    window_metrics.append(step_metrics)
    epoch = step // epoch_steps + 1
    if (step + 1) % config.train.log_every_steps == 0 or (step + 1) % epoch_steps == 0:
      window = jax.tree.map(lambda *xs: float(np.mean(xs)), *parallel.to_host(window_metrics))
      elapsed = time.perf_counter() - window_start
      record = {"step": step + 1, "epoch": epoch, "split": "train", **window,
                "img_per_s": len(window_metrics) * config.train.batch_size / elapsed}
      logging.info("step %d/%d epoch %d: loss %.4f dice %.3f (%.1f img/s)", step + 1,
                   total_steps, epoch, record["loss"], record["dice"], record["img_per_s"])
      if jax.process_index() == 0:
        reports.append_metrics(workdir, record)
      window_start, window_metrics = time.perf_counter(), []
    if (step + 1) % epoch_steps == 0:
      val = steps.validation_record(steps.evaluate_split(p_eval, state, val_source, config, mesh))
      logging.info("epoch %d validation: loss %.4f dice %.4f iou %.4f", epoch, val["loss"],
                   val["dice"], val["iou"])
      checkpoints.save(step + 1, state, {checkpoint_lib.BEST_METRIC: val["dice"]})
      if jax.process_index() == 0:
        reports.append_metrics(workdir, {"step": step + 1, "epoch": epoch, "split": "valid", **val})
        reports.plot_learning_curve(workdir)
      window_start = time.perf_counter()
  checkpoints.wait()
  checkpoints.close()

  if data_lib.has_split(config.data, config.eval.split, workdir):
    return evaluate.evaluate(config, workdir)
  logging.info("No %r split in the dataset; skipped the final evaluation.", config.eval.split)
  return {}
