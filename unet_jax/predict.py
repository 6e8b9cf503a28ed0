"""Inference on new images: masks at the original size, overlays and a CSV summary."""

import csv
import io
import pathlib
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
from PIL import Image
from scipy import ndimage

from unet_jax import data as data_lib
from unet_jax import evaluate
from unet_jax import images as images_lib
from unet_jax import parallel
from unet_jax import reports
from unet_jax.data import brats
from unet_jax.errors import some_of
from unet_jax.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif")
SLICE_SUFFIXES = (".h5",)  # What a BraTS run predicts from.
CSV_FILE = "predictions.csv"
PENDING = "not predicted: the command stopped before this file"
CSV_FIELDS = ("file", "mask_file", "tumour_pixels", "tumour_fraction", "max_probability",
              "error")


def list_inputs(input_path: str | pathlib.Path,
                suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[pathlib.Path]:
  """The file itself, or the files of the `suffixes` directly inside a folder, sorted; hidden
  files (".name", macOS's "._name") are left out, and what else is left out is logged."""
  path = pathlib.Path(input_path)
  if path.is_file():
    return [path]
  if not path.is_dir():
    raise UserError(f"{path}: no such file or folder")
  try:
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
  except OSError as e:
    raise UserError(f"--input={path}: cannot read the folder ({e.strerror})") from None
  files = [p for p in entries if p.is_file() and p.suffix.lower() in suffixes]
  stems = {p.stem for p in files}
  # A patient folder of the LGG layout holds each slice's mask beside it: not an input.
  masks = [p for p in files if p.stem.endswith("_mask") and p.stem[:-len("_mask")] in stems]
  if masks:
    logging.warning("%s: %d files are masks beside their images (<name>_mask beside <name>) "
                    "and are left out: %s", path, len(masks), some_of([p.name for p in masks]))
    files = [p for p in files if p not in set(masks)]
  kept = set(files) | set(masks)
  others = [p.name + ("/" if p.is_dir() else "") for p in entries if p not in kept]
  if others:
    logging.warning("%s: %d entries are not image files (%s) and are left out: %s", path,
                    len(others), ", ".join(suffixes), some_of(others, shown=5))
  if not files:
    raise UserError(f"{path}: no image files ({', '.join(suffixes)}) in this folder")
  return files


def _check_output(out: pathlib.Path, files: list[pathlib.Path], stems: list[str]) -> None:
  """Refuses an output folder where predict would mix with, or overwrite, other files."""
  if out.resolve() in {f.parent.resolve() for f in files}:
    raise UserError(f"--output={out} is where the images are: the masks would mix with "
                    "them (and could overwrite one); give another folder")
  ours = _listed_outputs(out)
  for name in (CSV_FILE, *(f"{stem}_{kind}.png" for stem in stems for kind in ("mask", "overlay"))):
    if (out / name).exists() and name not in ours:
      raise UserError(f"--output={out} holds {name}, which predict would overwrite; give an "
                      "empty or new folder")


def _listed_outputs(out: pathlib.Path) -> set[str]:
  """The files an earlier predict into `out` wrote, or was writing when stopped: its CSV and
  the masks and overlays the CSV lists, which a new predict there may write over."""
  path = out / CSV_FILE
  if not path.is_file():
    return set()
  try:
    with open(path, newline="") as f:
      reader = csv.DictReader(f)
      rows = list(reader)
    ours = reader.fieldnames == list(CSV_FIELDS)
  except (OSError, UnicodeDecodeError, csv.Error):
    ours = False
  if not ours:
    return set()  # Not predict's CSV: nothing in the folder is known to be predict's.
  masks = {row["mask_file"] for row in rows if row["mask_file"].endswith("_mask.png")}
  return {CSV_FILE, *masks, *(m[:-len("_mask.png")] + "_overlay.png" for m in masks)}


def overlay(grey: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """uint8 RGB picture of a uint8 (H, W) grey image: the tumour tinted red and outlined."""
  # Each grey level's tint, looked up, a channel at a time: no float or index array of the
  # tumour's pixels, which for a 6000x6000 scan would take hundreds of MB.
  levels = np.arange(256, dtype=np.float32)[:, None]
  tinted = (0.55 * levels + 0.45 * np.array([255, 0, 0], np.float32)).round().astype(np.uint8)
  rgb = np.empty((*grey.shape, 3), np.uint8)
  for channel in range(3):
    rgb[..., channel] = np.where(mask, tinted[grey, channel], grey)
  rgb[mask & ~ndimage.binary_erosion(mask)] = (255, 26, 26)
  return rgb


def output_stems(files: list[pathlib.Path]) -> list[str]:
  """Each file's output name: its stem, or its name with dots as underscores when an earlier
  file took the stem (scan.jpg and scan.png: scan, scan_png)."""
  taken, stems = set(), []
  for path in files:
    stem = path.stem if path.stem not in taken else path.name.replace(".", "_")
    taken.add(stem)
    stems.append(stem)
  return stems


def predict(config: ml_collections.ConfigDict, workdir: str, input_path: str,
            output_dir: str) -> list[dict[str, Any]]:
  """Predicts every image at `input_path` with the run's `eval.checkpoint`.

  Writes OUT/<name>_mask.png (0/255, original size), OUT/<name>_overlay.png
  and OUT/predictions.csv (one row per file, in order). A file that cannot be
  read is reported in the CSV and the log, and skipped.

  Returns:
    The CSV rows.

  Raises:
    UserError: no file could be read (after writing the CSV that says why).
  """
  evaluate.check_eval_config(config.eval)
  evaluate.warn_untuned_threshold(config, "predict")
  brats_slices = data_lib.data_format(config.data) == "brats"
  files = list_inputs(input_path, SLICE_SUFFIXES if brats_slices else IMAGE_SUFFIXES)
  stems = output_stems(files)
  out = pathlib.Path(output_dir)
  _check_output(out, files, stems)
  mesh = parallel.make_mesh()
  predict_fn, state, step, ensemble = evaluate.restore_predictor(config, workdir, mesh)
  rows, named = [], list(zip(files, stems))
  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
    # Lists what it will write, so the same command rerun after a stop may write over it.
    _write_csv(out, [{"file": path.name, "mask_file": f"{stem}_mask.png", "error": PENDING}
                     for path, stem in named])
  threshold = config.eval.threshold
  logging.info("Predicting %d images with checkpoint %d of %s%s", len(files), step, workdir,
               f" and {len(ensemble)} more runs averaged" if ensemble else "")

  for start in range(0, len(files), config.eval.batch_size):
    batch_files = named[start:start + config.eval.batch_size]
    loaded, errors = {}, {}  # path -> (grey picture, model input); path -> why it was skipped
    for path, _ in batch_files:
      try:
        loaded[path] = _read_input(path, config.data)
      except UserError as e:
        logging.warning("skipped: %s", e)
        errors[path] = str(e)
    if loaded:
      inputs = np.stack([model_input for _, model_input in loaded.values()])
      probs = dict(zip(loaded, evaluate.predict_padded(predict_fn, state, inputs,
                                                       config.eval.batch_size, mesh)))
    for path, stem in batch_files:
      rows.append({"file": path.name, "error": errors[path]} if path in errors else
                  _write_prediction(path, stem, loaded[path][0], probs[path], out, threshold,
                                    config))

  if jax.process_index() == 0:
    _write_csv(out, rows)
  written = sum(not r.get("error") for r in rows)
  logging.info("Wrote %d predictions (%d skipped) to %s", written, len(rows) - written, out)
  if not written:
    raise UserError(f"{input_path}: none of the {len(rows)} files could be read "
                    f"({out / CSV_FILE} says why)")
  return rows


def _read_input(path: pathlib.Path, data_config: ml_collections.ConfigDict
                ) -> tuple[np.ndarray, np.ndarray]:
  """The image at its own size as uint8 grey (for the overlay) and the model's input,
  prepared exactly as training prepared its images."""
  size = data_config.image_size
  if data_lib.data_format(data_config) == "brats":
    stored = brats.read_image(path, data_config.modalities)
    broken = np.count_nonzero(~np.isfinite(stored))
    if broken:
      logging.warning("%s: %d NaN or infinite voxels, read as background", path, broken)
    image = brats.normalise(stored, data_config.clip_percentiles)
    return ((image.mean(-1) * 255).round().astype(np.uint8),
            images_lib.resize_image(image, size))
  model_input, _ = images_lib.load_image(path, data_config.channels, size)
  # A batch of float32 pictures of 6000x6000 scans holds gigabytes; uint8 grey, 1 byte a pixel.
  grey, brightest = images_lib.read_picture(path, data_config.channels)
  if brightest is not None:
    _warn_if_dark(path, brightest)
  return grey, model_input


def _warn_if_dark(path: pathlib.Path, brightest: float) -> None:
  """Warns of a 16- or 32-bit image far darker than full scale: a 12-bit scan saved in a
  16-bit file."""
  if 0 < brightest <= 1 / 16:
    logging.warning("%s: its brightest pixel is %.4f of full scale (a 12-bit scan in a 16-bit "
                    "file reads so): the model sees it that dark; scale it as the training "
                    "images were", path, brightest)


def _write_csv(out: pathlib.Path, rows: list[dict[str, Any]]) -> None:
  text = io.StringIO(newline="")
  writer = csv.DictWriter(text, CSV_FIELDS, restval="")
  writer.writeheader()
  writer.writerows(rows)
  reports.write_atomic(out / CSV_FILE, text.getvalue())


def _write_prediction(path: pathlib.Path, stem: str, grey: np.ndarray, prob: np.ndarray,
                      out: pathlib.Path, threshold: float, config: ml_collections.ConfigDict
                      ) -> dict[str, Any]:
  """Decodes one image's probabilities at its own size, writes its mask and overlay; its row."""
  height, width = grey.shape
  prob = np.asarray(Image.fromarray(prob).resize((width, height), Image.Resampling.BILINEAR))
  mask = evaluate.binarise(prob, threshold, config.eval)
  if jax.process_index() == 0:  # Every process has every prediction: one writes them.
    Image.fromarray(mask.astype(np.uint8) * 255).save(out / f"{stem}_mask.png")
    Image.fromarray(overlay(grey, mask)).save(out / f"{stem}_overlay.png")
  return {"file": path.name, "mask_file": f"{stem}_mask.png", "tumour_pixels": int(mask.sum()),
          "tumour_fraction": round(float(mask.mean()), 6),
          "max_probability": round(float(prob.max()), 6), "error": ""}
