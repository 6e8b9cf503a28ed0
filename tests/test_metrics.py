"""Per-image metrics against hand-computed cases."""

import numpy as np
import pytest

from unet_jax import metrics


def _pair(pred_pixels, true_pixels, size=10):
  pred, true = np.zeros((1, size, size), bool), np.zeros((1, size, size), bool)
  for y, x in pred_pixels:
    pred[0, y, x] = True
  for y, x in true_pixels:
    true[0, y, x] = True
  return pred, true


def test_counts_and_scores_by_hand():
  # 3 true pixels, 4 predicted, 2 shared: tp 2, fp 2, fn 1, tn 95.
  pred, true = _pair([(0, 0), (0, 1), (5, 5), (6, 6)], [(0, 0), (0, 1), (0, 2)])
  counts = metrics.confusion_counts(pred, true)
  assert counts.tolist() == [[2, 2, 1, 95]]
  scores = metrics.per_image_metrics(counts)
  assert scores["dice"][0] == pytest.approx(4 / 7)
  assert scores["iou"][0] == pytest.approx(2 / 5)
  assert scores["precision"][0] == pytest.approx(2 / 4)
  assert scores["recall"][0] == pytest.approx(2 / 3)
  assert scores["specificity"][0] == pytest.approx(95 / 97)
  assert scores["accuracy"][0] == pytest.approx(97 / 100)


def test_empty_mask_semantics():
  both_empty = metrics.per_image_metrics(metrics.confusion_counts(*_pair([], [])))
  assert all(both_empty[m][0] == 1.0 for m in ("dice", "iou", "precision", "recall"))
  missed = metrics.per_image_metrics(metrics.confusion_counts(*_pair([], [(1, 1)])))
  assert missed["dice"][0] == 0 and missed["recall"][0] == 0 and missed["precision"][0] == 0
  false_alarm = metrics.per_image_metrics(metrics.confusion_counts(*_pair([(1, 1)], [])))
  assert false_alarm["dice"][0] == 0 and false_alarm["precision"][0] == 0


def test_pooled_weights_pixels_not_images():
  counts = np.array([[90, 10, 0, 0], [0, 0, 1, 0]])
  assert metrics.pooled_metrics(counts)["dice"] == pytest.approx(180 / 191)
  assert metrics.per_image_metrics(counts)["dice"].mean() == pytest.approx((180 / 190) / 2)
  assert metrics.summarise(np.array([1.0, 0.0, 0.5]))["median"] == 0.5
