"""Per-image segmentation metrics from confusion counts.

Empty-mask semantics: when prediction and ground truth are both empty, Dice,
IoU, precision and recall are 1 (a correct "no tumour"); when exactly one is
empty they are 0. No image is ever dropped from a mean.
"""

import jax.numpy as jnp
import numpy as np

PER_IMAGE = ("dice", "iou", "precision", "recall", "specificity", "accuracy")


def confusion_counts(pred, target):
  """Per-image true/false positive/negative pixel counts.

  Works on numpy and jax arrays alike.

  Args:
    pred: (N, ...) binary predictions.
    target: (N, ...) binary ground truth.

  Returns:
    (N, 4) counts: tp, fp, fn, tn.
  """
  xp = jnp if not isinstance(pred, np.ndarray) else np
  pred = pred.astype(bool).reshape(pred.shape[0], -1)
  target = target.astype(bool).reshape(target.shape[0], -1)
  tp = xp.sum(pred & target, axis=1)
  fp = xp.sum(pred & ~target, axis=1)
  fn = xp.sum(~pred & target, axis=1)
  tn = xp.sum(~pred & ~target, axis=1)
  return xp.stack([tp, fp, fn, tn], axis=1)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  """num / den, with 0/0 = 1 (both empty agrees) and x/0 impossible otherwise."""
  out = np.ones_like(num, dtype=np.float64)
  nonzero = den > 0
  out[nonzero] = num[nonzero] / den[nonzero]
  return out


def per_image_metrics(counts: np.ndarray) -> dict[str, np.ndarray]:
  """Dice, IoU, precision, recall, specificity and accuracy per image.

  Args:
    counts: (N, 4) tp, fp, fn, tn from `confusion_counts`.

  Returns:
    Metric name to (N,) float64 values.
  """
  tp, fp, fn, tn = np.asarray(counts, dtype=np.float64).T
  return {
      "dice": _ratio(2 * tp, 2 * tp + fp + fn),
      "iou": _ratio(tp, tp + fp + fn),
      # Precision of an empty prediction on a non-empty mask is 0 (a miss),
      # recall of any prediction on an empty mask is 1 only if it is empty too.
      "precision": np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), (fn == 0).astype(float)),
      "recall": np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), (fp == 0).astype(float)),
      "specificity": _ratio(tn, tn + fp),
      "accuracy": (tp + tn) / np.maximum(tp + fp + fn + tn, 1),
  }


def pooled_metrics(counts: np.ndarray) -> dict[str, float]:
  """Dice and IoU over all pixels of all images together."""
  tp, fp, fn, _ = np.asarray(counts, dtype=np.float64).sum(axis=0)
  return {
      "dice": float(_ratio(np.array([2 * tp]), np.array([2 * tp + fp + fn]))[0]),
      "iou": float(_ratio(np.array([tp]), np.array([tp + fp + fn]))[0]),
  }


def summarise(values: np.ndarray) -> dict[str, float]:
  """Mean, median and standard deviation over images."""
  values = np.asarray(values, dtype=np.float64)
  return {"mean": float(values.mean()), "median": float(np.median(values)),
          "std": float(values.std())}
