"""Inference on new images: masks at the original size, overlays and a CSV summary."""

import csv
import pathlib
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
from PIL import Image
from scipy import ndimage

from unet_jax import evaluate
from unet_jax import images as images_lib
from unet_jax import parallel
from unet_jax import steps
from unet_jax.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
CSV_FIELDS = ("file", "mask_file", "tumour_pixels", "tumour_fraction", "max_probability",
              "error")


def list_inputs(input_path: str | pathlib.Path) -> list[pathlib.Path]:
  """The image file itself, or the image files directly inside a folder, sorted."""
  path = pathlib.Path(input_path)
  if path.is_file():
    return [path]
  if path.is_dir():
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if files:
      return files
    raise UserError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
  raise UserError(f"{path}: no such file or folder")


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """uint8 RGB picture: the image in grey, the tumour tinted red and outlined."""
  grey = image.mean(-1) if image.ndim == 3 else image
  rgb = np.repeat(grey[..., None], 3, axis=-1)
  rgb[mask] = 0.55 * rgb[mask] + 0.45 * np.array([1.0, 0.0, 0.0])
  rgb[mask & ~ndimage.binary_erosion(mask)] = (1.0, 0.1, 0.1)
  return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def _output_stem(path: pathlib.Path, taken: set[str]) -> str:
  stem = path.stem if path.stem not in taken else path.name.replace(".", "_")
  taken.add(stem)
  return stem


def predict(config: ml_collections.ConfigDict, workdir: str, input_path: str,
            output_dir: str) -> list[dict[str, Any]]:
  """Predicts every image at `input_path` with the run's `eval.checkpoint`.

  Writes OUT/<name>_mask.png (0/255, original size), OUT/<name>_overlay.png
  and OUT/predictions.csv. A file that cannot be read is reported in the CSV
  and the log, and skipped.

  Returns:
    The CSV rows.
  """
  if config.eval.decode == "threshold" and config.eval.tune_threshold:
    logging.warning("predict uses eval.threshold=%g, not a tuned one (eval/<split>/summary.json "
                    "has those; pass --config.eval.threshold)", config.eval.threshold)
  files = list_inputs(input_path)
  out = pathlib.Path(output_dir)
  if out.resolve() in {f.parent.resolve() for f in files}:
    raise UserError(f"--output={output_dir} is where the images are: the masks would mix with "
                    "them (and could overwrite one); give another folder")
  out.mkdir(parents=True, exist_ok=True)
  mesh = parallel.make_mesh()
  state, step = evaluate.restore_state(config, workdir, mesh)
  predict_fn = steps.jit_predict(mesh, tta=config.eval.tta, up_down=config.eval.tta_up_down)
  size, threshold = config.data.image_size, config.eval.threshold
  logging.info("Predicting %d images with checkpoint %d of %s", len(files), step, workdir)

  rows, taken = [], set()
  for start in range(0, len(files), config.eval.batch_size):
    loaded = []
    for path in files[start:start + config.eval.batch_size]:
      try:
        # The model sees the image exactly as training prepared it.
        model_input, _ = images_lib.load_image(path, config.data.channels, size)
        loaded.append((path, images_lib.read_image(path, config.data.channels), model_input))
      except UserError as e:
        logging.warning("skipped: %s", e)
        rows.append({"file": path.name, "error": str(e)})
    if not loaded:
      continue
    batch = np.stack([model_input for _, _, model_input in loaded])
    sharded, count = parallel.put_global_batch(batch, mesh)
    probs = parallel.to_host(predict_fn(state, sharded))[:count]
    for (path, image, _), prob in zip(loaded, probs):
      height, width = image.shape[:2]
      prob = np.asarray(Image.fromarray(prob).resize((width, height), Image.Resampling.BILINEAR))
      mask = evaluate.binarise(prob, threshold, config.eval)
      stem = _output_stem(path, taken)
      if jax.process_index() == 0:  # Every process has every prediction: one writes them.
        Image.fromarray(mask.astype(np.uint8) * 255).save(out / f"{stem}_mask.png")
        Image.fromarray(overlay(image, mask)).save(out / f"{stem}_overlay.png")
      rows.append({"file": path.name, "mask_file": f"{stem}_mask.png",
                   "tumour_pixels": int(mask.sum()),
                   "tumour_fraction": round(float(mask.mean()), 6),
                   "max_probability": round(float(prob.max()), 6), "error": ""})

  if jax.process_index() == 0:
    with open(out / "predictions.csv", "w", newline="") as f:
      writer = csv.DictWriter(f, CSV_FIELDS, restval="")
      writer.writeheader()
      writer.writerows(rows)
  logging.info("Wrote %d predictions (%d skipped) to %s", sum(not r.get("error") for r in rows),
               sum(bool(r.get("error")) for r in rows), out)
  return rows
