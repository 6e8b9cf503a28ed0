"""Evaluation options, prediction on new images and the exported model."""

import csv
import json
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from unet_jax import evaluate, export, parallel, predict, serving, steps, train
from unet_jax.errors import UserError


@pytest.fixture
def run(trained_run):
  config, workdir, _ = trained_run
  return config.copy_and_resolve_references(), workdir


def _phantom(workdir, name="phantom_test_00000.png"):
  return workdir / "phantoms" / "test" / name


def test_eval_options_are_recorded_and_bounded(run):
  config, workdir = run
  config.eval.tune_threshold = True
  config.eval.tta = True
  config.eval.largest_component = True
  summary = evaluate.evaluate(config, str(workdir))
  assert summary["threshold"] in evaluate.THRESHOLDS
  assert summary["threshold_tuned_on"] == "valid" and summary["tta"] is True
  for name, stats in summary["metrics"].items():
    assert stats["ci95"][0] <= stats["mean"] <= stats["ci95"][1], name
  assert 0 <= summary["metrics"]["hd95"]["mean"] <= np.hypot(32, 32)
  header = (workdir / "eval/test/per_image.csv").read_text().splitlines()[0]
  assert "hd95" in header and "miou" in header


def test_tta_averages_the_flipped_predictions(run):
  config, workdir = run
  mesh = parallel.make_mesh()
  state, _ = evaluate.restore_state(config, str(workdir), mesh)
  images = np.random.default_rng(0).random((4, 32, 32, 1)).astype(np.float32)
  plain = np.asarray(steps.predict_step(state, images))
  flips = [np.flip(np.asarray(steps.predict_step(state, np.flip(images, a))), a)
           for a in ((2,), (1,), (1, 2))]
  np.testing.assert_allclose(steps.predict_step(state, images, tta=True),
                             (plain + sum(flips)) / 4, atol=1e-6)
  np.testing.assert_allclose(steps.predict_step(state, images, tta=True, up_down=False),
                             (plain + flips[0]) / 2, atol=1e-6)


def test_predict_writes_masks_overlays_and_skips_bad_files(run, tmp_path):
  config, workdir = run
  inputs = tmp_path / "in"
  inputs.mkdir()
  grey = np.asarray(Image.open(_phantom(workdir)))
  Image.fromarray(grey).save(inputs / "grey.png")
  Image.fromarray(grey).convert("RGBA").resize((50, 40)).save(inputs / "rgba.png")
  Image.fromarray(grey.astype(np.uint16) * 257).save(inputs / "deep.tif")
  Image.fromarray(grey).convert("RGB").save(inputs / "photo.jpg")
  (inputs / "broken.png").write_bytes(b"\x89PNG truncated")
  out = tmp_path / "out"
  rows = predict.predict(config, str(workdir), str(inputs), str(out))
  assert len(rows) == 5
  with open(out / "predictions.csv") as f:
    table = {r["file"]: r for r in csv.DictReader(f)}
  assert "not a readable image" in table["broken.png"]["error"]
  for stem, size in (("grey", (32, 32)), ("rgba", (50, 40)), ("deep", (32, 32)), ("photo", (32, 32))):
    mask = Image.open(out / f"{stem}_mask.png")
    assert mask.size == size and set(np.unique(mask)) <= {0, 255}
    assert Image.open(out / f"{stem}_overlay.png").size == size
    row = table[f"{stem}.{'tif' if stem == 'deep' else 'jpg' if stem == 'photo' else 'png'}"]
    assert int(row["tumour_pixels"]) == (np.asarray(mask) > 0).sum()
    assert row["mask_file"] == f"{stem}_mask.png"
  # 16-bit and 8-bit versions of one slice give the same mask.
  np.testing.assert_array_equal(np.asarray(Image.open(out / "deep_mask.png")),
                                np.asarray(Image.open(out / "grey_mask.png")))


def test_predict_refuses_to_write_among_the_images(run, tmp_path):
  config, workdir = run
  Image.open(_phantom(workdir)).save(tmp_path / "scan.png")
  with pytest.raises(UserError, match="is where the images are"):
    predict.predict(config, str(workdir), str(tmp_path / "scan.png"), str(tmp_path))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.png"]


def test_exported_model_matches_the_in_process_model(run, tmp_path):
  config, workdir = run
  folder = export.export(config, str(workdir), str(tmp_path / "export"), platforms=("cpu",))
  meta = json.loads((folder / "model.json").read_text())
  assert meta["input"] == {**meta["input"], "height": 32, "width": 32, "channels": 1}
  model = serving.load(folder)
  state, _ = evaluate.restore_state(config, str(workdir), parallel.make_mesh())
  images = np.random.default_rng(1).random((3, 32, 32, 1)).astype(np.float32)
  np.testing.assert_allclose(model(images), steps.predict_step(state, images), atol=1e-6)
  mask = model.predict_file(_phantom(workdir))
  assert mask.shape == (32, 32) and mask.dtype == bool
  with pytest.raises(ValueError, match=r"the model takes \(N, 32, 32, 1\); predict_file"):
    model(images[:, :16])


def test_export_holds_the_evaluated_weights_the_ema_and_never_empty(tiny_config, tmp_path):
  tiny_config.train.ema_decay = 0.9
  train.train_and_evaluate(tiny_config, str(tmp_path / "run"))
  state, _ = evaluate.restore_state(tiny_config, str(tmp_path / "run"), parallel.make_mesh())
  images = np.random.default_rng(1).random((3, 32, 32, 1)).astype(np.float32)
  model = serving.load(export.export(tiny_config, str(tmp_path / "run"),
                                     str(tmp_path / "export"), platforms=("cpu",)))
  np.testing.assert_allclose(model(images), steps.predict_step(state, images), atol=1e-6)
  live = steps.predict_step(state.replace(ema_params=None), images)
  assert not np.allclose(model(images), live, atol=1e-6)
  # No probability reaches a threshold of 1, yet every image holds a tumour.
  tiny_config.eval.update(threshold=1.0, never_empty=True)
  model = serving.load(export.export(tiny_config, str(tmp_path / "run"),
                                     str(tmp_path / "export"), platforms=("cpu",)))
  assert model.predict_file(_phantom(tmp_path / "run")).any()


def test_expected_dice_decoding_needs_no_threshold_and_predict_and_export_agree(run, tmp_path):
  config, workdir = run
  config.eval.decode = "expected_dice"
  config.eval.tune_threshold = True  # Ignored: nothing to tune.
  summary = evaluate.evaluate(config, str(workdir))
  assert summary["decode"] == "expected_dice"
  assert summary["threshold"] is None and summary["threshold_tuned_on"] is None
  predict.predict(config, str(workdir), str(_phantom(workdir)), str(tmp_path / "out"))
  predicted = np.asarray(Image.open(tmp_path / "out" / f"{_phantom(workdir).stem}_mask.png")) > 0
  exported = serving.load(export.export(config, str(workdir), str(tmp_path / "export"),
                                        platforms=("cpu",)))
  np.testing.assert_array_equal(exported.predict_file(_phantom(workdir)), predicted)
  assert predicted.any()


def test_unknown_decode_stops_evaluation_with_one_line(run):
  config, workdir = run
  config.eval.decode = "otsu"
  with pytest.raises(UserError, match="eval.decode='otsu' is not one of"):
    evaluate.evaluate(config, str(workdir))


def test_serving_runs_without_the_model_code():
  script = ("import sys; import unet_jax.serving; "
            "print(sorted(m for m in ('flax', 'optax', 'orbax', 'grain', 'ml_collections', "
            "'pycocotools', 'unet_jax.model', 'unet_jax.data') if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True)
  assert result.stdout.strip() == "[]"
