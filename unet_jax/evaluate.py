"""Restores a run's checkpoint and measures it on a split: writes eval/<split>/."""

import contextlib
import csv
import json
import pathlib
from typing import Any, Iterator

from absl import logging
import jax
import ml_collections
import numpy as np

from configs import default as default_config
from unet_jax import checkpoint as checkpoint_lib
from unet_jax import data as data_lib
from unet_jax import decoding
from unet_jax import metrics as metrics_lib
from unet_jax import optim
from unet_jax import parallel
from unet_jax import reports
from unet_jax import run_lock
from unet_jax import saved_config
from unet_jax import steps
from unet_jax.data import pipeline
from unet_jax.errors import UserError

# Candidate thresholds for eval.tune_threshold.
THRESHOLDS = np.round(np.arange(0.1, 0.95, 0.05), 2)


def check_eval_config(eval_config: ml_collections.ConfigDict) -> None:
  """Checks the eval.* values that eval, predict, export and validation use, before anything
  is read or written: a known decode rule, a threshold in [0, 1], a batch that splits over
  the devices, a checkpoint named as `resolve` takes, pictures of 0 rows or more."""
  decoding.check_decoder(eval_config.decode)
  checkpoint_lib.named_step(eval_config.checkpoint)
  if eval_config.num_pictures < 0:
    raise UserError(f"eval.num_pictures={eval_config.num_pictures}: use 0 (none) or more rows")
  if not 0 <= eval_config.threshold <= 1:
    raise UserError(f"eval.threshold={eval_config.threshold}: a probability, in [0, 1] "
                    "(pixels above it are tumour)")
  # The default threshold is nobody's choice; another one, or tuning it, is.
  if eval_config.decode != "threshold" and (
      eval_config.tune_threshold
      or eval_config.threshold != default_config.get_config().eval.threshold):
    logging.warning("eval.decode=%s picks each image's mask without a threshold: "
                    "eval.threshold and eval.tune_threshold are ignored (they are "
                    "eval.decode=threshold's)", eval_config.decode)
  try:
    pipeline.local_batch_size(eval_config.batch_size)
  except UserError as e:
    raise UserError(f"eval.batch_size: {e}") from None


def warn_untuned_threshold(config: ml_collections.ConfigDict, command: str) -> None:
  """predict and export decode with eval.threshold: a threshold tuned by eval is not saved."""
  if config.eval.decode == "threshold" and config.eval.tune_threshold:
    logging.warning("%s uses eval.threshold=%g, not a tuned one (eval/<split>/summary.json "
                    "has those; pass --config.eval.threshold)", command, config.eval.threshold)


def restore_state(config: ml_collections.ConfigDict, workdir: str,
                  mesh) -> tuple[steps.TrainState, int]:
  """The train state of the checkpoint named by `config.eval.checkpoint`, and its step."""
  saved_config.check_same_model(config, workdir)
  checkpoints = checkpoint_lib.Checkpoints(workdir, read_only=True)
  step = checkpoints.resolve(config.eval.checkpoint)
  image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
  # The optimiser state and the EMA are laid out as the run trained them, whatever train.*
  # says now: evaluation needs neither, but the checkpoint holds them.
  target_config = config.copy_and_resolve_references()
  if (pathlib.Path(workdir) / saved_config.CONFIG_FILE).is_file():
    target_config.train = saved_config.load(workdir).train
  target = steps.abstract_train_state(target_config, image_shape,
                                      optim.make_optimizer(target_config),
                                      parallel.replicated(mesh))
  state, _ = checkpoints.restore(step, target)
  checkpoints.close()
  return state, step


def ensemble_members(config: ml_collections.ConfigDict, mesh) -> list[tuple[str, Any, int]]:
  """(workdir, train state, step) of the best checkpoint of each run in `eval.ensemble`.

  Each run is restored with its own saved config (width, depth, dtype may
  differ); its images must be those of this run: same size and channels.
  """
  workdirs = _ensemble_workdirs(config)
  member_configs = []
  for workdir in workdirs:  # All checked before any is restored.
    try:
      member_config = saved_config.load(workdir)
    except UserError as e:
      raise UserError(f"eval.ensemble: {e}") from None
    for key in ("image_size", "channels"):
      if member_config.data[key] != config.data[key]:
        raise UserError(f"eval.ensemble: {workdir} was trained with data.{key}="
                        f"{member_config.data[key]}, this run with {config.data[key]}")
    member_config.eval.checkpoint = "best"
    member_configs.append(member_config)
  return [(workdir, *restore_state(member_config, workdir, mesh))
          for workdir, member_config in zip(workdirs, member_configs)]


def _ensemble_workdirs(config: ml_collections.ConfigDict) -> list[str]:
  return [w.strip() for w in config.eval.ensemble.split(",") if w.strip()]


def output_dir(config: ml_collections.ConfigDict, workdir: str) -> pathlib.Path:
  """eval/<split>/; an ensemble's eval/<split>_ensemble/, beside the run's own, not over them."""
  split = config.eval.split
  return pathlib.Path(workdir) / "eval" / (
      f"{split}_ensemble" if _ensemble_workdirs(config) else split)


def summary_path(config: ml_collections.ConfigDict, workdir: str) -> pathlib.Path:
  """The evaluation's summary.json, written last: its presence marks the evaluation done."""
  return output_dir(config, workdir) / "summary.json"


def restore_runs(config: ml_collections.ConfigDict, workdir: str, mesh):
  """(states, step, ensemble): the train states of this run's checkpoint and of
  `eval.ensemble`'s runs (this run's first), this run's step and `ensemble_members`."""
  state, step = restore_state(config, workdir, mesh)
  members = ensemble_members(config, mesh)
  return (state, *(member[1] for member in members)), step, members


def restore_predictor(config: ml_collections.ConfigDict, workdir: str, mesh):
  """(predict, state, step, ensemble): the jitted `predict(state, images)` with `eval.tta`, the
  run's train state (with `eval.ensemble`, every run's, their probabilities averaged), its
  checkpoint step and `ensemble_members`."""
  states, step, members = restore_runs(config, workdir, mesh)
  predict = steps.jit_predict(mesh, tta=config.eval.tta, up_down=config.eval.tta_up_down)
  if members:
    return averaged(predict), states, step, members
  return predict, states[0], step, members


def averaged(predict):
  """`predict` over a tuple of train states: the mean of their probabilities."""
  return lambda states, images: sum(predict(state, images) for state in states) / len(states)


def _probabilities(predict, state, source, config,
                   mesh) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
  """(index, probability map, ground-truth label map) for every image of `source`."""
  step = lambda state_, arrays: {"probs": predict(state_, arrays["image"])}
  for index, outputs, labels in _per_image(step, state, source, config, mesh):
    yield index, outputs["probs"], labels


def _per_image(step, state, source, config, mesh) -> Iterator[tuple[int, dict, np.ndarray]]:
  """(index, that image's `step(state, device batch)` outputs, ground-truth label map: the
  tumour where not 0) for every image of `source`."""
  for batch in pipeline.eval_batches(source, config, config.eval.batch_size):
    arrays = parallel.device_batch(batch, mesh)
    # Gathered with the outputs, so every process sees the global batch.
    outputs = step(state, arrays)
    arrays.pop("image")  # Not needed on the host.
    host = parallel.to_host({"outputs": outputs, **arrays})
    for i in np.flatnonzero(host["valid"]):
      yield (int(host["index"][i]), {name: values[i] for name, values in host["outputs"].items()},
             host["mask"][i, ..., 0])


def predict_padded(predict, state, images: np.ndarray, batch_size: int, mesh) -> np.ndarray:
  """The probability maps of `images` (each process holds all), `batch_size` at a time.

  Each batch is padded to `batch_size` images, the shape of evaluation's batches, so the
  step is compiled once whatever the count (predict skips unreadable files).
  """
  probs = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)])
    batch, _ = parallel.put_global_batch(padded, mesh)
    probs.append(parallel.to_host(predict(state, batch))[:len(chunk)])
  return np.concatenate(probs)


def binarise(probs: np.ndarray, threshold: float | None,
             post: ml_collections.ConfigDict) -> np.ndarray:
  """The mask `post.decode` reads from the probabilities, post-processed as `post` says.

  `post` is config.eval; `threshold` serves decode="threshold" only.
  """
  return decoding.decode(probs, post.decode, threshold, post.never_empty,
                         post.largest_component, post.fill_box)


def tune_threshold(predict, state, config: ml_collections.ConfigDict, workdir: str, mesh) -> float:
  """The threshold of THRESHOLDS with the best mean Dice on the validation split."""
  source = data_lib.build_source(config.data, config.data.val_split, workdir)
  dice = np.zeros((len(source), len(THRESHOLDS)))
  tumour = False
  for index, probs, labels in _probabilities(predict, state, source, config, mesh):
    masks = np.stack([binarise(probs, t, config.eval) for t in THRESHOLDS])
    counts = metrics_lib.confusion_counts(masks, np.broadcast_to(labels > 0, masks.shape))
    dice[index] = metrics_lib.per_image_metrics(counts)["dice"]
    tumour = tumour or bool(labels.any())
  if not tumour:
    logging.warning("eval.tune_threshold: data.val_split=%r has no tumour pixel at "
                    "data.image_size=%d, so the best threshold would be one that predicts "
                    "nothing; eval.threshold=%g kept", config.data.val_split,
                    config.data.image_size, config.eval.threshold)
    return config.eval.threshold
  mean = dice.mean(axis=0)
  # Among equal scores prefer the threshold nearest 0.5.
  best = max(range(len(THRESHOLDS)), key=lambda i: (round(mean[i], 6), -abs(THRESHOLDS[i] - 0.5)))
  logging.info("Threshold tuned on %s: %.2f (mean Dice %.4f; at 0.5: %.4f)", config.data.val_split,
               THRESHOLDS[best], mean[best], mean[np.argmin(abs(THRESHOLDS - 0.5))])
  return float(THRESHOLDS[best])


def _main_label(labels: np.ndarray) -> int:
  """The label covering most of a label map's tumour; 0 when it has none."""
  tumour = np.bincount(labels.ravel())[1:]
  return int(tumour.argmax()) + 1 if tumour.any() else 0


def score_split(predict, state, source, config, mesh,
                threshold: float | None) -> dict[str, np.ndarray]:
  """Per-image metrics (source order) of the thresholded, post-processed predictions, with
  each image's counts and label (the label covering most of its tumour; 0: none)."""
  counts = np.zeros((len(source), 4), np.int64)
  hd95 = np.zeros(len(source))
  image_labels = np.zeros(len(source), np.int64)
  for index, probs, labels in _probabilities(predict, state, source, config, mesh):
    mask, truth = binarise(probs, threshold, config.eval), labels > 0
    counts[index] = metrics_lib.confusion_counts(mask[None], truth[None])[0]
    hd95[index] = metrics_lib.hd95(mask, truth)
    image_labels[index] = _main_label(labels)
  scores = metrics_lib.per_image_metrics(counts)
  scores["hd95"] = hd95
  return {"counts": counts, "labels": image_labels, **scores}


def validate(p_eval, state, source, config: ml_collections.ConfigDict, mesh) -> dict[str, float]:
  """Mean loss, Dice and IoU of `source` with the masks evaluation reads.

  The masks are decoded as `config.eval` says (TTA, decode rule, post-
  processing), so the best checkpoint is the best as evaluated; a tuned
  threshold is not tuned each epoch: `eval.threshold` stands in for it.
  """
  threshold = config.eval.threshold if config.eval.decode == "threshold" else None
  loss, counts = np.zeros(len(source)), np.zeros((len(source), 4), np.int64)
  for index, outputs, labels in _per_image(p_eval, state, source, config, mesh):
    mask = binarise(outputs["probs"], threshold, config.eval)
    counts[index] = metrics_lib.confusion_counts(mask[None], labels[None] > 0)[0]
    loss[index] = outputs["loss"]
  if not (counts[:, 0] + counts[:, 2]).any():
    logging.log_first_n(
        logging.WARNING, "data.val_split=%r has no tumour pixel at data.image_size=%d: its Dice "
        "rewards only predicting nothing, so it picks the best checkpoint poorly", 1,
        config.data.val_split, config.data.image_size)
  scores = metrics_lib.per_image_metrics(counts)
  return {"loss": float(loss.mean()), "dice": float(scores["dice"].mean()),
          "iou": float(scores["iou"].mean())}


def _picture_rows(dice: np.ndarray, count: int) -> list[int]:
  """Images from best to worst Dice, evenly spaced, so best, median and worst show."""
  order = np.argsort(-dice, kind="stable")
  picks = np.linspace(0, len(order) - 1, num=min(count, len(order))).round().astype(int)
  return [int(order[i]) for i in dict.fromkeys(picks)]


def _short_name(file_name: str, width: int = 28) -> str:
  """The file's own name (not its folders), its middle elided to fit a picture's title."""
  name = pathlib.PurePath(file_name).name
  if len(name) <= width:
    return name
  head = (width - 1) // 2
  return name[:head] + "\u2026" + name[-(width - 1 - head):]


def _write_pictures(path, predict, state, source, scores, config, mesh, threshold) -> None:
  """Draws the picture rows to `path` (process 0); none when eval.num_pictures is 0."""
  rows = _picture_rows(scores["dice"], config.eval.num_pictures)
  if not rows:
    return
  samples = [source[i] for i in rows]
  images = np.stack([s["image"] for s in samples])
  probs = predict_padded(predict, state, images, config.eval.batch_size, mesh)
  titles = [f"{_short_name(s['file_name'])}\nDice {scores['dice'][i]:.3f}"
            for s, i in zip(samples, rows)]
  masks = np.stack([s["mask"][..., 0] > 0 for s in samples])
  predicted = np.stack([binarise(p, threshold, config.eval) for p in probs])
  post = [name for name in ("never_empty", "largest_component", "fill_box") if config.eval[name]]
  rule = "expected-Dice mask" if threshold is None else f"p > {threshold:g}"
  heading = f"prediction ({rule})" + ("\n" + ", ".join(post) if post else "")
  if jax.process_index() == 0:
    reports.plot_predictions(path, images, masks, probs, predicted, heading, titles)


def _write_scores(path, source, scores, counts, labels, category_ids) -> None:
  """Writes the per-image scores (per_image.csv) to `path`."""
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["file_name", *scores, "tumour_pixels", "predicted_pixels",
                     *(["category"] if category_ids else [])])
    for i, name in enumerate(source.file_names):
      tp, fp, fn, _ = counts[i]
      category = [category_ids[labels[i] - 1] if labels[i] else ""] if category_ids else []
      writer.writerow([name, *(f"{scores[m][i]:.6f}" for m in scores), tp + fn, tp + fp,
                       *category])


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Evaluates `config.eval.checkpoint` of the run in `workdir` on `config.eval.split`.

  With `eval.ensemble`, its probabilities are averaged with those of the
  other runs' best checkpoints, and the results go to eval/<split>_ensemble/.

  Returns:
    The summary written to eval/<split>[_ensemble]/summary.json.
  """
  check_eval_config(config.eval)
  mesh = parallel.make_mesh()
  split = config.eval.split
  # The checkpoint first: a folder without a run is an error before anything is written there.
  predict, state, step, members = restore_predictor(config, workdir, mesh)
  source = data_lib.build_source(config.data, split, workdir)
  # The expected-Dice mask needs no threshold, so none is tuned for it.
  by_threshold = config.eval.decode == "threshold"
  threshold = config.eval.threshold if by_threshold else None
  tuned = by_threshold and config.eval.tune_threshold
  if tuned:
    threshold = tune_threshold(predict, state, config, workdir, mesh)
  scores = score_split(predict, state, source, config, mesh, threshold)
  counts, labels = scores.pop("counts"), scores.pop("labels")
  is_coco = data_lib.data_format(config.data) == "coco"
  category_ids = tuple(config.data.category_ids) if is_coco else ()
  summary = {
      "split": split,
      "data_root": str(data_lib.data_root(config.data, workdir).resolve()),
      "n_images": len(source),
      "checkpoint_step": step,
      "decode": config.eval.decode,
      "threshold": threshold,
      "threshold_tuned_on": config.data.val_split if tuned else None,
      "tta": config.eval.tta,
      "tta_up_down": config.eval.tta_up_down,
      "largest_component": config.eval.largest_component,
      "fill_box": config.eval.fill_box,
      "never_empty": config.eval.never_empty,
      "ensemble": [{"workdir": w, "checkpoint_step": s} for w, _, s in members],
      "metrics": {name: metrics_lib.summarise(values) for name, values in scores.items()},
      "pooled": metrics_lib.pooled_metrics(counts),
      **metrics_lib.by_truth(scores, counts),
  }
  groups = getattr(getattr(source, "source", source), "groups", None)  # Unwrapped from a cache.
  if groups:
    summary["by_patient"] = metrics_lib.by_group(counts, groups)
  if category_ids:
    summary["by_category"] = metrics_lib.by_category(scores, counts, labels,
                                                     source.category_names)
  out = output_dir(config, workdir)
  with contextlib.ExitStack() as writer:
    aside = {}  # Process 0 writes; the pictures' predictions are every process's.
    if jax.process_index() == 0:
      writer.enter_context(run_lock.writing(out))
      # An earlier evaluation stays whole until this one is written, the summary that marks
      # it done put in place last: one stopped in between (training's final one among them)
      # leaves no summary, and is evaluated again. No pictures (eval.num_pictures=0): none,
      # not an earlier evaluation's.
      aside = writer.enter_context(reports.replaced_together(
          out, ("per_image.csv", "predictions.png", "summary.json")))
      _write_scores(aside["per_image.csv"], source, scores, counts, labels, category_ids)
    _write_pictures(aside.get("predictions.png"), predict, state, source, scores, config, mesh,
                    threshold)
    if jax.process_index() == 0:
      aside["summary.json"].write_text(json.dumps(summary, indent=2) + "\n")
  averaging = f", averaged with {len(members)} other run(s)" if members else ""
  logging.info("%s (step %d%s): mean Dice %.4f, IoU %.4f, HD95 %.2f px over %d images -> %s",
               split, step, averaging, summary["metrics"]["dice"]["mean"],
               summary["metrics"]["iou"]["mean"], summary["metrics"]["hd95"]["mean"],
               len(source), out)
  found, healthy = summary["with_tumour"], summary["without_tumour"]
  if found["n_images"] and healthy["n_images"]:  # Else the line above says it all.
    logging.info("%s: mean Dice %.4f over the %d images with a tumour; %d false alarms on the "
                 "%d without", split, found["dice"], found["n_images"], healthy["false_alarms"],
                 healthy["n_images"])
  if groups:
    logging.info("%s: mean Dice %.4f over its %d patients (LGG) or volumes (BraTS), each one 3-D "
                 "mask", split, summary["by_patient"]["dice"], summary["by_patient"]["n"])
  for category, result in summary.get("by_category", {}).items():
    logging.info("%s, category %s (%r): mean Dice %s over %d images", split, category,
                 result["name"], "-" if result["dice"] is None else f"{result['dice']:.4f}",
                 result["n_images"])
  return summary
