"""Restores a run's checkpoint and measures it on a split: writes eval/<split>/."""

import csv
import json
import pathlib
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from unet_jax import checkpoint as checkpoint_lib
from unet_jax import data as data_lib
from unet_jax import metrics as metrics_lib
from unet_jax import parallel
from unet_jax import reports
from unet_jax import steps


def restore_state(config: ml_collections.ConfigDict, workdir: str, mesh) -> tuple[steps.TrainState, int]:
  """The train state of the checkpoint named by `config.eval.checkpoint`, and its step."""
  checkpoints = checkpoint_lib.Checkpoints(workdir, read_only=True)
  step = checkpoints.resolve(config.eval.checkpoint)
  image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
  target = steps.create_train_state(config, image_shape, steps.make_optimizer(config, 1, 1))
  state = checkpoints.restore(step, jax.device_put(target, parallel.replicated(mesh)))
  checkpoints.close()
  return state, step


def _picture_rows(dice: np.ndarray, count: int) -> list[int]:
  """Images from best to worst Dice, evenly spaced, so best, median and worst show."""
  order = np.argsort(-dice, kind="stable")
  picks = np.linspace(0, len(order) - 1, num=min(count, len(order))).round().astype(int)
  return [int(order[i]) for i in dict.fromkeys(picks)]


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Evaluates `config.eval.checkpoint` of the run in `workdir` on `config.eval.split`.

  Returns:
    The summary written to eval/<split>/summary.json.
  """
  mesh = parallel.make_mesh()
  split = config.eval.split
  source = data_lib.build_source(config.data, split, workdir)
  state, step = restore_state(config, workdir, mesh)
  _, p_eval = steps.jit_steps(config, mesh)
  per_image = steps.evaluate_split(p_eval, state, source, config, mesh)
  scores = metrics_lib.per_image_metrics(per_image["counts"])
  summary = {
      "split": split,
      "n_images": len(source),
      "checkpoint_step": step,
      "threshold": config.eval.threshold,
      "metrics": {name: metrics_lib.summarise(values) for name, values in scores.items()},
      "pooled": metrics_lib.pooled_metrics(per_image["counts"]),
      "loss": float(per_image["loss"].mean()),
  }
  if jax.process_index() != 0:
    return summary

  out = pathlib.Path(workdir) / "eval" / split
  out.mkdir(parents=True, exist_ok=True)
  (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  with open(out / "per_image.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["file_name", *scores, "tumour_pixels", "predicted_pixels"])
    for i, info in enumerate(source.images):
      tp, fp, fn, _ = per_image["counts"][i]
      writer.writerow([info["file_name"], *(f"{scores[m][i]:.6f}" for m in scores), tp + fn, tp + fp])

  rows = _picture_rows(scores["dice"], config.eval.num_pictures)
  samples = [source[i] for i in rows]
  images = np.stack([s["image"] for s in samples])
  probs = np.asarray(jax.jit(steps.predict_step)(state, images))
  titles = [f"{s['file_name'][:28]}\nDice {scores['dice'][i]:.3f}" for s, i in zip(samples, rows)]
  reports.plot_predictions(out / "predictions.png", images, np.stack([s["mask"][..., 0] for s in samples]),
                           probs, config.eval.threshold, titles)
  logging.info("%s (step %d): mean Dice %.4f, IoU %.4f over %d images -> %s", split, step,
               summary["metrics"]["dice"]["mean"], summary["metrics"]["iou"]["mean"],
               len(source), out)
  return summary
