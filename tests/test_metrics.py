"""Per-image metrics against hand-computed cases."""

import ml_collections
import numpy as np
import pytest

from unet_jax import evaluate
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


def test_hd95_by_hand():
  a = np.zeros((20, 20), bool)
  a[5:10, 5:10] = True
  shifted = np.roll(a, 3, axis=1)  # every boundary point moves 3 px
  assert metrics.hd95(a, a) == 0.0
  assert metrics.hd95(a, shifted) == pytest.approx(3.0)
  assert metrics.hd95(np.zeros_like(a), np.zeros_like(a)) == 0.0
  assert metrics.hd95(a, np.zeros_like(a)) == pytest.approx(np.hypot(20, 20))


def test_against_medpy_reference():
  binary = pytest.importorskip("medpy.metric.binary")
  rng = np.random.default_rng(0)
  for _ in range(10):
    pred = np.zeros((40, 40), bool)
    true = np.zeros((40, 40), bool)
    for mask in (pred, true):
      y, x = rng.integers(5, 30, size=2)
      h, w = rng.integers(3, 10, size=2)
      mask[y:y + h, x:x + w] = True
      mask[rng.integers(0, 40), rng.integers(0, 40)] = True  # a stray pixel
    scores = metrics.per_image_metrics(metrics.confusion_counts(pred[None], true[None]))
    assert scores["dice"][0] == pytest.approx(binary.dc(pred, true))
    assert scores["iou"][0] == pytest.approx(binary.jc(pred, true))
    assert scores["precision"][0] == pytest.approx(binary.precision(pred, true))
    assert scores["recall"][0] == pytest.approx(binary.recall(pred, true))
    assert scores["specificity"][0] == pytest.approx(binary.specificity(pred, true))
    assert metrics.hd95(pred, true) == pytest.approx(binary.hd95(pred, true))


def test_mean_iou_averages_background_and_tumour():
  pred, true = _pair([(0, 0), (0, 1)], [(0, 0)])  # tp 1, fp 1, fn 0, tn 98
  scores = metrics.per_image_metrics(metrics.confusion_counts(pred, true))
  assert scores["miou"][0] == pytest.approx((1 / 2 + 98 / 99) / 2)


@pytest.mark.parametrize("decode,never_empty,largest,fill,expected_pixels", [
    ("threshold", False, False, False, 0),  # Nothing above 0.9.
    ("threshold", True, False, False, 3),  # The region above half the peak: both blobs.
    ("threshold", True, True, False, 2),
    ("threshold", True, True, True, 4),  # The larger blob's 2x2 box.
    ("expected_dice", False, False, False, 3),  # The three likely pixels; no threshold.
    ("expected_dice", False, True, True, 4),
])
def test_binarise_post_processing(decode, never_empty, largest, fill, expected_pixels):
  probs = np.zeros((6, 6), np.float32)
  probs[1, 1], probs[2, 2] = 0.8, 0.5  # Diagonal neighbours: one 8-connected blob.
  probs[4, 5] = 0.45
  post = ml_collections.ConfigDict({"decode": decode, "never_empty": never_empty,
                                    "largest_component": largest, "fill_box": fill})
  assert evaluate.binarise(probs, 0.9, post).sum() == expected_pixels


def test_bootstrap_interval_brackets_the_mean():
  values = np.random.default_rng(1).random(200)
  summary = metrics.summarise(values)
  low, high = summary["ci95"]
  assert low < summary["mean"] < high
  assert high - low == pytest.approx(2 * 1.96 * values.std() / np.sqrt(200), rel=0.2)
  assert metrics.summarise(values) == summary  # seeded


def test_scores_break_down_by_the_category_of_each_image():
  counts = np.array([[4, 0, 0, 60], [2, 2, 2, 58], [0, 0, 0, 64]])
  scores = metrics.per_image_metrics(counts)
  result = metrics.by_category(scores, counts, np.array([1, 1, 0]), {7: "seven", 9: "nine"})
  assert result["7"]["n_images"] == 2 and result["7"]["dice"] == pytest.approx((1 + 0.5) / 2)
  assert result["7"]["pooled"]["dice"] == pytest.approx(12 / 16)
  assert result["9"] == {"name": "nine", "n_images": 0, "dice": None, "iou": None,
                         "pooled": None}


def test_images_with_and_without_a_tumour_are_scored_apart():
  # A found tumour (Dice 1), a half-found one (Dice 0.5), a correct empty, a false alarm.
  counts = np.array([[4, 0, 0, 60], [2, 2, 2, 58], [0, 0, 0, 64], [0, 3, 0, 61]])
  scores = metrics.per_image_metrics(counts)
  assert metrics.by_truth(scores, counts) == {
      "with_tumour": {"n_images": 2, "dice": pytest.approx(0.75),
                      "iou": pytest.approx((1 + 2 / 6) / 2)},
      "without_tumour": {"n_images": 2, "false_alarms": 1}}
  healthy = metrics.by_truth(metrics.per_image_metrics(counts[2:]), counts[2:])
  assert healthy["with_tumour"] == {"n_images": 0, "dice": None, "iou": None}


def test_hd95_refuses_masks_that_are_not_one_2d_size():
  with pytest.raises(ValueError, match=r"masks of shapes \(4, 4, 1\) and \(4, 4, 1\): hd95 "
                     r"takes two \(H, W\) masks"):
    metrics.hd95(np.ones((4, 4, 1)), np.ones((4, 4, 1)))


def test_a_patients_slices_are_scored_as_one_3d_mask():
  # Patient a: a found tumour and a missed one (one mask, Dice 2*4 / (2*4 + 4)); patient b: a
  # correct empty slice, which scores 1 as a slice and as a patient.
  counts = np.array([[4, 0, 0, 60], [0, 0, 4, 60], [0, 0, 0, 64]])
  assert metrics.by_group(counts, ["a", "a", "b"]) == {
      "n": 2, "dice": pytest.approx((8 / 12 + 1) / 2), "iou": pytest.approx((4 / 8 + 1) / 2)}
