"""Per-image segmentation metrics, the way medical-segmentation papers report them.

Empty-mask semantics (no image is ever dropped from a mean):
- truth and prediction both empty: Dice, IoU, precision, recall 1 and HD95 0
  (a correct "no tumour");
- exactly one empty: Dice, IoU 0 and HD95 the image diagonal (a miss or a
  false alarm costs the most it can).
"""

import jax.numpy as jnp
import numpy as np
from scipy import ndimage


def confusion_counts(pred, target):
  """Per-image true/false positive/negative pixel counts.

  Works on numpy and jax arrays alike.

  Args:
    pred: (N, ...) binary predictions.
    target: (N, ...) binary ground truth.

  Returns:
    (N, 4) counts: tp, fp, fn, tn.
  """
  xp = np if isinstance(pred, np.ndarray) else jnp
  pred = pred.astype(bool).reshape(pred.shape[0], -1)
  target = target.astype(bool).reshape(target.shape[0], -1)
  tp = xp.sum(pred & target, axis=1)
  fp = xp.sum(pred & ~target, axis=1)
  fn = xp.sum(~pred & target, axis=1)
  tn = xp.sum(~pred & ~target, axis=1)
  return xp.stack([tp, fp, fn, tn], axis=1)


def dice_from_counts(counts):
  """Per-image Dice from (N, 4) counts; 1 where both masks are empty. numpy or jax."""
  xp = np if isinstance(counts, np.ndarray) else jnp
  tp, fp, fn = counts[:, 0], counts[:, 1], counts[:, 2]
  return xp.where(tp + fp + fn > 0, 2 * tp / xp.maximum(2 * tp + fp + fn, 1), 1.0)


def _ratio(num: np.ndarray, den: np.ndarray, empty: float | np.ndarray = 1.0) -> np.ndarray:
  """num / den, and `empty` where den is 0."""
  num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
  return np.where(den > 0, num / np.maximum(den, 1e-300), empty)


def per_image_metrics(counts: np.ndarray) -> dict[str, np.ndarray]:
  """Overlap metrics per image from (N, 4) tp, fp, fn, tn counts.

  Returns:
    dice, iou, precision, recall (sensitivity), specificity, accuracy, and
    miou (mean of background and tumour IoU), each (N,) float64.
  """
  counts = np.asarray(counts, dtype=np.float64)
  tp, fp, fn, tn = counts.T
  iou = _ratio(tp, tp + fp + fn)
  return {
      "dice": dice_from_counts(counts),
      "iou": iou,
      # An empty prediction is precise only if there was nothing to find, and
      # recall on an empty truth is perfect only without false alarms.
      "precision": _ratio(tp, tp + fp, empty=(fn == 0).astype(float)),
      "recall": _ratio(tp, tp + fn, empty=(fp == 0).astype(float)),
      "specificity": _ratio(tn, tn + fp),
      "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
      "miou": (iou + _ratio(tn, tn + fp + fn)) / 2,
  }


def pooled_metrics(counts: np.ndarray) -> dict[str, float]:
  """Dice and IoU over all pixels of all images together."""
  tp, fp, fn, _ = np.asarray(counts, dtype=np.float64).sum(axis=0)
  return {"dice": float(_ratio(2 * tp, 2 * tp + fp + fn)), "iou": float(_ratio(tp, tp + fp + fn))}


def _means(scores: dict[str, np.ndarray], chosen: np.ndarray) -> dict[str, float | None]:
  """Mean Dice and IoU of the `chosen` images; None for none."""
  return {name: float(scores[name][chosen].mean()) if chosen.any() else None
          for name in ("dice", "iou")}


def by_truth(scores: dict[str, np.ndarray], counts: np.ndarray) -> dict[str, dict]:
  """The images with a tumour, their count and mean Dice and IoU (what papers on data of many
  healthy slices, LGG's and BraTS's, report), and those without, their count and how many
  of them have a tumour predicted (false alarms)."""
  tumour = (counts[:, 0] + counts[:, 2]) > 0
  predicted = (counts[:, 0] + counts[:, 1]) > 0
  return {"with_tumour": {"n_images": int(tumour.sum()), **_means(scores, tumour)},
          "without_tumour": {"n_images": int((~tumour).sum()),
                             "false_alarms": int((predicted & ~tumour).sum())}}


def by_group(counts: np.ndarray, groups: list[str]) -> dict[str, float | int]:
  """Each group's (an LGG patient's, a BraTS volume's) slices pooled into one 3-D mask, scored
  as an image is, then averaged over the groups: their count and mean Dice and IoU."""
  position = {name: i for i, name in enumerate(sorted(set(groups)))}
  pooled = np.zeros((len(position), 4), np.int64)
  np.add.at(pooled, [position[g] for g in groups], counts)
  scores = per_image_metrics(pooled)
  return {"n": len(position), "dice": float(scores["dice"].mean()),
          "iou": float(scores["iou"].mean())}


def by_category(scores: dict[str, np.ndarray], counts: np.ndarray, labels: np.ndarray,
                category_names: dict) -> dict[str, dict]:
  """Category id -> its name, its images' count, mean Dice and IoU, and pooled Dice and IoU;
  an image counts for the category covering most of its tumour (label k: the k-th id of
  `category_names`, id -> name)."""
  summary = {}
  for label, (category, name) in enumerate(category_names.items(), start=1):
    chosen = labels == label
    summary[str(category)] = {
        "name": name, "n_images": int(chosen.sum()), **_means(scores, chosen),
        "pooled": pooled_metrics(counts[chosen]) if chosen.any() else None}
  return summary


def _surface(mask: np.ndarray) -> np.ndarray:
  """Boundary pixels: the mask minus its 4-connected erosion."""
  return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(2, 1))


def hd95(pred: np.ndarray, target: np.ndarray) -> float:
  """95th-percentile symmetric Hausdorff distance in pixels between two (H, W) masks.

  The percentile is taken over the distances from each boundary pixel of one
  mask to the nearest boundary pixel of the other, both directions pooled.
  """
  pred, target = np.asarray(pred, bool), np.asarray(target, bool)
  if pred.ndim != 2 or pred.shape != target.shape:
    raise ValueError(f"masks of shapes {pred.shape} and {target.shape}: hd95 takes two (H, W) "
                     "masks of one size")
  if not pred.any() and not target.any():
    return 0.0
  if not pred.any() or not target.any():
    return float(np.hypot(*pred.shape))
  pred_surface, target_surface = _surface(pred), _surface(target)
  to_target = ndimage.distance_transform_edt(~target_surface)[pred_surface]
  to_pred = ndimage.distance_transform_edt(~pred_surface)[target_surface]
  return float(np.percentile(np.concatenate([to_target, to_pred]), 95))


def summarise(values: np.ndarray, seed: int = 0, resamples: int = 1000) -> dict[str, float]:
  """Mean, median, standard deviation and a 95% bootstrap interval of the mean over images."""
  values = np.asarray(values, dtype=np.float64)
  rng = np.random.default_rng(seed)
  means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
  low, high = np.percentile(means, [2.5, 97.5])
  return {"mean": float(values.mean()), "median": float(np.median(values)),
          "std": float(values.std()), "ci95": [float(low), float(high)]}
