"""Evaluation options, prediction on new images and the exported model."""

import csv
import json
import logging
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from unet_jax import data, evaluate, export, parallel, predict, serving, steps
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


def test_a_validation_split_without_tumour_tunes_nothing_and_is_warned_of(trained_copy,
                                                                          caplog):
  config, workdir = trained_copy
  valid_json = workdir / "phantoms/valid/_annotations.coco.json"
  valid_json.write_text(json.dumps({**json.loads(valid_json.read_text()), "annotations": []}))
  config.data.root, config.data.synthetic.enabled = str(workdir / "phantoms"), False
  config.eval.update(tune_threshold=True, threshold=0.4)
  mesh = parallel.make_mesh()
  state, _ = evaluate.restore_state(config, str(workdir), mesh)
  source = data.build_source(config.data, "valid", str(workdir))
  with caplog.at_level(logging.WARNING):
    evaluate.validate(steps.jit_steps(config, mesh)[1], state, source, config, mesh)
    summary = evaluate.evaluate(config, str(workdir))
  assert ("data.val_split='valid' has no tumour pixel at data.image_size=32: its Dice rewards "
          "only predicting nothing") in caplog.text
  assert "so the best threshold would be one that predicts nothing; eval.threshold=0.4 kept" in (
      caplog.text)
  assert summary["threshold"] == 0.4


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


def test_predict_writes_masks_overlays_and_skips_bad_files(run, tmp_path, monkeypatch):
  config, workdir = run
  restore_predictor, shapes = evaluate.restore_predictor, []
  def recording_shapes(*args):
    predict_fn, *rest = restore_predictor(*args)
    return (lambda state, images: shapes.append(images.shape) or predict_fn(state, images),
            *rest)
  monkeypatch.setattr(evaluate, "restore_predictor", recording_shapes)
  inputs = tmp_path / "in"
  inputs.mkdir()
  grey = np.asarray(Image.open(_phantom(workdir)))
  Image.fromarray(grey).save(inputs / "grey.png")
  Image.fromarray(grey).convert("RGBA").resize((50, 40)).save(inputs / "rgba.png")
  Image.fromarray(grey.astype(np.uint16) * 257).save(inputs / "deep.tif")
  Image.fromarray(grey).convert("RGB").save(inputs / "photo.jpg")
  Image.fromarray(grey).save(inputs / "web.webp", lossless=True)
  (inputs / "broken.png").write_bytes(b"\x89PNG truncated")
  out = tmp_path / "out"
  rows = predict.predict(config, str(workdir), str(inputs), str(out))
  assert len(rows) == 6
  with open(out / "predictions.csv") as f:
    table = {r["file"]: r for r in csv.DictReader(f)}
  assert "not a readable image" in table["broken.png"]["error"]
  for stem, size in (("grey", (32, 32)), ("rgba", (50, 40)), ("deep", (32, 32)),
                     ("photo", (32, 32))):
    mask = Image.open(out / f"{stem}_mask.png")
    assert mask.size == size and set(np.unique(mask)) <= {0, 255}
    assert Image.open(out / f"{stem}_overlay.png").size == size
    row = table[f"{stem}.{'tif' if stem == 'deep' else 'jpg' if stem == 'photo' else 'png'}"]
    assert int(row["tumour_pixels"]) == (np.asarray(mask) > 0).sum()
    assert row["mask_file"] == f"{stem}_mask.png"
  # 16-bit, lossless WebP and 8-bit versions of one slice give the same mask.
  for stem in ("deep", "web"):
    np.testing.assert_array_equal(np.asarray(Image.open(out / f"{stem}_mask.png")),
                                  np.asarray(Image.open(out / "grey_mask.png")))
  # The 5 readable files in evaluation's batch shape: compiled once, whatever the count.
  assert shapes == [(config.eval.batch_size, 32, 32, 1)]


def test_serving_refuses_the_model_of_another_export(run, tmp_path):
  config, workdir = run
  first = export.export(config, str(workdir), str(tmp_path / "first"), platforms=("cpu",))
  config.eval.tta = True
  second = export.export(config, str(workdir), str(tmp_path / "second"), platforms=("cpu",))
  # As an export stopped between its two files leaves them.
  shutil.copy(second / "model.jax_exported", first / "model.jax_exported")
  with pytest.raises(ValueError, match="model.json does not describe model.jax_exported"):
    serving.load(first)
  model = serving.load(second)
  size = config.data.image_size
  probs = model(np.zeros((1, size, size, 1), np.float32))
  probs[probs < 0.5] = 0  # Writable, as numpy's own arrays are.
  with pytest.raises(FileNotFoundError, match=r"run\d*: no model.json; give an export's folder"):
    serving.load(workdir)


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
  with pytest.raises(ValueError, match=r"images of uint8: the model takes floats in \[0, 1\]"):
    model((images * 255).astype(np.uint8))


def test_export_holds_the_evaluated_weights_the_ema_and_never_empty(ema_run, tmp_path):
  config, workdir = ema_run
  config = config.copy_and_resolve_references()
  state, _ = evaluate.restore_state(config, str(workdir), parallel.make_mesh())
  images = np.random.default_rng(1).random((3, 32, 32, 1)).astype(np.float32)
  model = serving.load(export.export(config, str(workdir), str(tmp_path / "export"),
                                     platforms=("cpu",)))
  np.testing.assert_allclose(model(images), steps.predict_step(state, images), atol=1e-6)
  live = steps.predict_step(state.replace(ema_params=None), images)
  assert not np.allclose(model(images), live, atol=1e-6)
  # No probability reaches a threshold of 1, yet every image holds a tumour.
  config.eval.update(threshold=1.0, never_empty=True)
  model = serving.load(export.export(config, str(workdir), str(tmp_path / "export"),
                                     platforms=("cpu",)))
  assert model.predict_file(_phantom(workdir)).any()


def test_expected_dice_decoding_needs_no_threshold_and_predict_and_export_agree(run, tmp_path,
                                                                              caplog):
  config, workdir = run
  config.eval.decode = "expected_dice"
  config.eval.tune_threshold = True  # Ignored, with a warning: nothing to tune.
  ignored = "eval.threshold and eval.tune_threshold are ignored"
  summary = evaluate.evaluate(config, str(workdir))
  assert summary["decode"] == "expected_dice"
  assert summary["threshold"] is None and summary["threshold_tuned_on"] is None
  assert caplog.text.count(ignored) == 1
  config.eval.tune_threshold = False
  config.eval.threshold = 0.9
  predict.predict(config, str(workdir), str(_phantom(workdir)), str(tmp_path / "out"))
  predicted = np.asarray(Image.open(tmp_path / "out" / f"{_phantom(workdir).stem}_mask.png")) > 0
  exported = serving.load(export.export(config, str(workdir), str(tmp_path / "export"),
                                        platforms=("cpu",)))
  assert caplog.text.count(ignored) == 3  # predict's and export's.
  assert exported.meta["threshold"] is None
  np.testing.assert_array_equal(exported.predict_file(_phantom(workdir)), predicted)
  assert predicted.any()


def test_unknown_decode_stops_evaluation_with_one_line(run):
  config, workdir = run
  config.eval.decode = "otsu"
  before = (workdir / "eval/test/summary.json").read_text()
  with pytest.raises(UserError, match="eval.decode='otsu' is not one of"):
    evaluate.evaluate(config, str(workdir))
  assert (workdir / "eval/test/summary.json").read_text() == before  # Not lost to a typo.


def test_serving_runs_without_the_model_code():
  script = ("import sys; import unet_jax.serving; "
            "print(sorted(m for m in ('flax', 'optax', 'orbax', 'grain', 'ml_collections', "
            "'pycocotools', 'unet_jax.model', 'unet_jax.data') if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True)
  assert result.stdout.strip() == "[]"


def test_export_and_predict_compute_as_evaluation_tta_post_processing_and_ensemble(
    run, other_run, tmp_path):
  config, workdir = run
  other_config, other = other_run  # Another model: 8 features.
  config.eval.update(tta=True, tta_up_down=False, decode="expected_dice",
                     largest_component=True, fill_box=True, ensemble=str(other))
  folder = export.export(config, str(workdir), str(tmp_path / "export"), platforms=("cpu",))
  meta = json.loads((folder / "model.json").read_text())
  assert meta["largest_component"] and meta["fill_box"]
  assert meta["tta"] == "the image and its left-right flip, averaged inside the model"
  assert meta["ensemble"] == [{"workdir": str(other), "checkpoint_step": 2}]

  mesh = parallel.make_mesh()
  states = [evaluate.restore_state(c, str(w), mesh)[0]
            for c, w in ((config, workdir), (other_config, other))]
  images = np.random.default_rng(1).random((3, 32, 32, 1)).astype(np.float32)
  expected = sum(steps.predict_step(s, images, tta=True, up_down=False) for s in states) / 2
  model = serving.load(folder)
  np.testing.assert_allclose(model(images), expected, atol=1e-6)
  assert model(images[:0]).shape == (0, 32, 32)

  phantoms = sorted((workdir / "phantoms" / "test").glob("*.png"))[:4]
  predict.predict(config, str(workdir), str(phantoms[0].parent), str(tmp_path / "out"))
  for phantom in phantoms:
    predicted = np.asarray(Image.open(tmp_path / "out" / f"{phantom.stem}_mask.png")) > 0
    np.testing.assert_array_equal(model.predict_file(phantom), predicted)
    # One box: the post-processing was applied.
    rows, cols = np.flatnonzero(predicted.any(1)), np.flatnonzero(predicted.any(0))
    assert predicted.sum() == (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)


def test_predict_lists_files_in_order_and_guards_its_output(run, tmp_path):
  config, workdir = run
  inputs, out = tmp_path / "in", tmp_path / "out"
  (inputs / "sub").mkdir(parents=True)
  image = Image.open(_phantom(workdir))
  # c_mask.png: a mask beside its image (an LGG patient folder), not an input.
  for name in ("a.png", "c.png", "c_mask.png", ".hidden.png", "._a.png", "sub/d.png"):
    image.save(inputs / name)
  (inputs / "b.png").write_bytes(b"not a png")
  (inputs / "notes.txt").write_text("notes")
  pages = [image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
  pages[0].save(inputs / "stack.tif", save_all=True, append_images=pages[1:])
  pages[0].save(inputs / "loop.gif", save_all=True, append_images=pages[1:])
  pages[0].save(inputs / "loop.png", save_all=True, append_images=pages[1:])
  rows = predict.predict(config, str(workdir), str(inputs), str(out))
  assert [r["file"] for r in rows] == ["a.png", "b.png", "c.png", "loop.gif", "loop.png",
                                       "stack.tif"]
  assert [bool(r["error"]) for r in rows] == [False, True, False, True, True, True]
  assert "a GIF of 2 frames" in rows[3]["error"]
  assert "a PNG of 2 frames" in rows[4]["error"]
  assert "a TIFF of 2 pages" in rows[5]["error"]
  assert sorted(p.name for p in out.iterdir()) == [
      "a_mask.png", "a_overlay.png", "c_mask.png", "c_overlay.png", "predictions.csv"]
  predict.predict(config, str(workdir), str(inputs), str(out))  # Its own output: written over.
  # Stopped after its first mask, the same command may still write over its folder.
  stopped = tmp_path / "stopped"
  real_write = predict._write_prediction  # pylint: disable=protected-access
  def write_one_then_stop(*args):
    real_write(*args)
    raise KeyboardInterrupt
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(predict, "_write_prediction", write_one_then_stop)
    with pytest.raises(KeyboardInterrupt):
      predict.predict(config, str(workdir), str(inputs), str(stopped))
  assert (stopped / "a_mask.png").is_file()
  assert len(predict.predict(config, str(workdir), str(inputs), str(stopped))) == 6

  # A folder of other files that predict would overwrite is refused before anything is written.
  truths = tmp_path / "truths"
  truths.mkdir()
  image.save(truths / "a_mask.png")
  with pytest.raises(UserError, match="holds a_mask.png, which predict would overwrite"):
    predict.predict(config, str(workdir), str(inputs), str(truths))
  assert [p.name for p in truths.iterdir()] == ["a_mask.png"]
  # Nor does an earlier prediction there (c.png's) make the user's a_mask.png predict's.
  predict.predict(config, str(workdir), str(inputs / "c.png"), str(truths))
  with pytest.raises(UserError, match="holds a_mask.png, which predict would overwrite"):
    predict.predict(config, str(workdir), str(inputs), str(truths))
  # Nothing readable: the CSV says why, and the command fails.
  with pytest.raises(UserError, match="none of the 1 files could be read"):
    predict.predict(config, str(workdir), str(inputs / "b.png"), str(tmp_path / "none"))
  assert "not a readable image" in (tmp_path / "none" / "predictions.csv").read_text()


def test_predict_and_export_write_nothing_into_the_run(run, tmp_path, run_env):
  _, workdir = run
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("compile_cache"))
  before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
  env = {k: v for k, v in run_env().items() if k != "UNET_JAX_CACHE_DIR"}
  for args in (["--mode=predict", f"--input={_phantom(copy)}", f"--output={tmp_path / 'out'}"],
               ["--mode=export", f"--output={tmp_path / 'export'}"]):
    result = subprocess.run([sys.executable, "launch.py", f"--workdir={copy}", *args],
                            cwd=pathlib.Path(__file__).parents[1], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
  assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before
  assert (tmp_path / "out" / f"{_phantom(copy).stem}_mask.png").is_file()
  assert (tmp_path / "export" / export.MODEL_FILE).is_file()


@pytest.mark.parametrize("field, value, problem", [
    ("decode", "expected_dic", "eval.decode='expected_dic' is not one of"),
    ("threshold", 2.0, r"eval.threshold=2.0: a probability, in \[0, 1\]"),
    ("batch_size", 0, "eval.batch_size: "),
])
def test_a_bad_eval_value_stops_predict_before_it_writes(run, tmp_path, field, value, problem):
  config, workdir = run
  out = tmp_path / "out"
  predict.predict(config, str(workdir), str(_phantom(workdir)), str(out))
  before = (out / "predictions.csv").read_text()
  config.eval[field] = value
  with pytest.raises(UserError, match=problem):
    predict.predict(config, str(workdir), str(_phantom(workdir)), str(out))
  assert (out / "predictions.csv").read_text() == before  # The earlier prediction's, whole.


def test_a_12_bit_scan_in_a_16_bit_file_is_predicted_with_a_warning(run, tmp_path, caplog):
  config, workdir = run
  scan = np.asarray(Image.open(_phantom(workdir)).convert("L"), np.uint16) * 16  # max 4080
  Image.fromarray(scan).save(tmp_path / "scan.png")
  rows = predict.predict(config, str(workdir), str(tmp_path / "scan.png"), str(tmp_path / "out"))
  assert rows[0]["error"] == ""
  assert re.search(r"scan.png: its brightest pixel is 0\.0[0-6]\d+ of full scale", caplog.text)
  # An 8-bit file as dark is no 12-bit scan: no such warning.
  Image.fromarray((scan // 257).astype(np.uint8)).save(tmp_path / "dim.png")
  predict.predict(config, str(workdir), str(tmp_path / "dim.png"), str(tmp_path / "out_dim"))
  assert "dim.png: its brightest pixel" not in caplog.text
