"""Deterministic synthetic brain-MRI "phantoms" written as a COCO segmentation export.

The output mirrors the layout of the Roboflow brain-tumour export
(``ROOT/{train,valid,test}/_annotations.coco.json`` next to the PNG slices), so a
demo can train through exactly the same COCO loader as the real data without
downloading anything.
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import shutil
import socket
import zlib

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from unet_jax.errors import UserError

_FORMAT_VERSION = 1
_MARKER = "phantoms.json"
_ANNOTATIONS = "_annotations.coco.json"
_DEFAULT_SPLITS = {"train": 256, "valid": 64, "test": 64}
_CATEGORIES = [{"id": 0, "name": "tumor", "supercategory": "none"},
               {"id": 1, "name": "tumor", "supercategory": "tumor"}]


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
  """Separable Gaussian blur with edge padding (numpy only)."""
  r = max(1, int(3 * sigma + 0.5))
  k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
  k /= k.sum()
  h, w = a.shape
  p = np.pad(a, r, mode="edge")
  rows = sum(k[i] * p[i:i + h, :] for i in range(2 * r + 1))
  return sum(k[i] * rows[:, i:i + w] for i in range(2 * r + 1))


def _smooth_noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
  """Zero-mean, unit-ish amplitude noise upsampled bicubically from a coarse grid."""
  coarse = rng.standard_normal((cells, cells)).astype(np.float32)
  return np.asarray(Image.fromarray(coarse).resize((n, n), Image.BICUBIC), dtype=np.float64)


def _soft(x: np.ndarray) -> np.ndarray:
  """Soft step (about one pixel wide when ``x`` is in pixels) for anti-aliased edges."""
  return 0.5 * (1.0 + np.tanh(x))


def _rasterise(poly: list[float], n: int) -> np.ndarray:
  # Paint with pycocotools so the image agrees with what a COCO loader decodes.
  return mask_utils.decode(mask_utils.frPyObjects([poly], n, n))[:, :, 0].astype(np.float64)


def render_phantom(
    rng: np.random.Generator, image_size: int, with_tumour: bool
) -> tuple[np.ndarray, list[list[float]]]:
  """Renders one synthetic axial brain slice.

  Args:
    rng: Source of all randomness; the slice is a pure function of its state.
    image_size: Side length in pixels of the square output.
    with_tumour: Whether to paint one (occasionally two) tumours.

  Returns:
    A ``uint8`` grey image of shape ``(image_size, image_size)`` and the tumour
    polygons as flat ``[x0, y0, x1, y1, ...]`` pixel-coordinate lists, rounded to
    two decimals and exactly the ones painted (empty list when no tumour).
  """
  n = image_size
  y, x = np.mgrid[0:n, 0:n] + 0.5  # pixel centres, COCO convention

  # Head ellipse; (u, v) are head-frame pixel offsets, rho the normalised radius.
  a = n * rng.uniform(0.31, 0.38)
  b = min(a * rng.uniform(1.05, 1.22), 0.46 * n)
  cx, cy = n / 2 + rng.uniform(-0.04, 0.04, 2) * n
  cos, sin = np.cos(th := rng.uniform(-0.35, 0.35)), np.sin(th)

  def to_head(px_, py_):
    return cos * (px_ - cx) + sin * (py_ - cy), -sin * (px_ - cx) + cos * (py_ - cy)

  u, v = to_head(x, y)
  rho, phi = np.hypot(u / a, v / b), np.arctan2(v / b, u / a)
  px = (a + b) / 2  # turns rho differences into roughly pixels

  # Scalp/skull ring of angle-dependent thickness, a dark CSF gap, then brain.
  t0, p2, p3 = rng.uniform(0.07, 0.1), rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)
  gap = rng.uniform(0.025, 0.045)

  def brain_radius(ang):
    return 1 - gap - t0 * (1 + 0.25 * np.sin(2 * ang + p2) + 0.15 * np.sin(3 * ang + p3))

  brain_r = brain_radius(phi)
  head = _soft((1 - rho) * px)
  skull = head * _soft((rho - brain_r - gap) * px)
  brain = _soft((brain_r - rho) * px)

  # Grey/white matter: brighter white matter inside a wavy (gyral) boundary.
  wm_r = brain_r * rng.uniform(0.7, 0.82) * (
      1 + 0.06 * np.sin(rng.integers(7, 14) * phi + rng.uniform(0, 2 * np.pi))
      + 0.03 * np.sin(rng.integers(15, 23) * phi + rng.uniform(0, 2 * np.pi)))
  tissue = rng.uniform(0.4, 0.5) + rng.uniform(0.05, 0.12) * _soft((wm_r - rho) * px * 0.7)
  tissue += rng.uniform(0.015, 0.035) * _smooth_noise(rng, n, 6)
  tissue += rng.uniform(0.01, 0.02) * _smooth_noise(rng, n, max(8, n // 6))

  # Two mirrored crescent ventricles, and a faint midline (falx) away from them.
  vent = np.zeros_like(rho)
  sep, vc = a * rng.uniform(0.07, 0.13), b * rng.uniform(-0.12, 0.05)
  va, vb = a * rng.uniform(0.05, 0.09), b * rng.uniform(0.16, 0.28)
  tilt, bend = rng.uniform(0.15, 0.45), rng.uniform(0.2, 0.9) / vb
  for side in (-1.0, 1.0):
    du, dv = u - side * sep * rng.uniform(0.9, 1.1), v - vc
    s, c = np.sin(side * tilt), np.cos(side * tilt)
    ru, rv = c * du + s * dv, -s * du + c * dv
    ru = ru - side * 0.5 * bend * rv ** 2
    vent = np.maximum(vent, _soft((1 - np.hypot(ru / va, rv / vb)) * va))
  falx = np.exp(-(u / 0.8) ** 2) * (np.abs(v - vc) > vb * 1.3)

  def sample_centre():
    cr, ca = np.sqrt(rng.uniform(0, 0.7)) * brain_radius(ang := rng.uniform(0, 2 * np.pi)), ang
    tu, tv = cr * a * np.cos(ca), cr * b * np.sin(ca)
    return cx + cos * tu - sin * tv, cy + sin * tu + cos * tv

  def inside_brain(xs, ys):  # with a two-pixel margin, so tumours never touch the skull
    pu, pv = to_head(xs, ys)
    limit = brain_radius(np.arctan2(pv / b, pu / a)) - 2 / px
    return bool(np.all(np.hypot(pu / a, pv / b) < limit))

  polys: list[list[float]] = []
  blobs: list[tuple[float, float, float]] = []  # (x, y, max radius) of tumours placed so far
  occupied, lesion = np.zeros_like(rho), np.zeros_like(rho)
  for _ in range(int(with_tumour) + int(with_tumour and rng.random() < 0.15)):
    poly = _star_polygon(rng, n, sample_centre, inside_brain, blobs)
    if poly is not None:
      polys.append(poly)
      mask, delta = _tumour_profile(rng, poly, blobs[-1][:2], n)
      occupied, lesion = np.maximum(occupied, mask), lesion + delta

  # Tumours displace ventricles and falx instead of being painted over them.
  tissue = tissue * (1 - 0.75 * vent * (1 - occupied)) * (1 - 0.2 * falx * (1 - occupied))
  img = 0.03 + brain * (tissue + lesion) + skull * rng.uniform(0.75, 0.95)
  img += head * (1 - brain) * (1 - skull) * 0.1

  # Multiplicative smooth bias field, Rician noise, random global gain.
  img = img * np.exp(rng.uniform(0.1, 0.3) * _smooth_noise(rng, n, 3))
  sigma = rng.uniform(0.015, 0.045)
  img = np.hypot(img + sigma * rng.standard_normal((n, n)), sigma * rng.standard_normal((n, n)))
  img = img * rng.uniform(0.85, 1.0) / np.percentile(img, 99.7)
  return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), polys


def _star_polygon(rng: np.random.Generator, n: int, sample_centre, fits,
                  blobs: list[tuple[float, float, float]]) -> list[float] | None:
  """Samples a star-shaped polygon r(theta) that ``fits`` and avoids earlier ``blobs``."""
  for attempt in range(40):
    r0 = n * rng.uniform(0.04, 0.15) * 0.96 ** attempt  # shrink if big ones keep failing
    k = int(rng.integers(24, 49))
    theta = (np.arange(k) + rng.uniform(-0.3, 0.3, k)) * 2 * np.pi / k
    radial = 1 + sum(rng.uniform(0, 0.22 / h ** 0.7) * np.cos(h * theta + rng.uniform(0, 2 * np.pi))
                     for h in range(2, 6))
    r = r0 * np.maximum(radial, 0.35)
    tx, ty = sample_centre()
    xs = np.clip(np.round(tx + r * np.cos(theta), 2), 0, n)
    ys = np.clip(np.round(ty + r * np.sin(theta), 2), 0, n)
    if fits(xs, ys) and all(np.hypot(tx - bx, ty - by) > br + r.max() + 3 for bx, by, br in blobs):
      blobs.append((tx, ty, r.max()))
      return [float(val) for pt in zip(xs, ys) for val in pt]
  return None


def _tumour_profile(rng: np.random.Generator, poly: list[float], centre: tuple[float, float],
                    n: int) -> tuple[np.ndarray, np.ndarray]:
  """Soft footprint and additive intensity of the tumour rasterised from ``poly``."""
  mask = _rasterise(poly, n)
  # Mostly clear, sometimes subtle, so the task is not plain thresholding.
  contrast = rng.uniform(0.08, 0.14) if rng.random() < 0.25 else rng.uniform(0.14, 0.32)
  soft = _blur(mask, rng.uniform(0.5, 1.0))
  delta = soft
  if rng.random() < 0.35:
    # Necrotic core: a shrunken copy of the polygon, darker than tissue, leaving a bright rim.
    xs, ys, scale = np.asarray(poly[0::2]), np.asarray(poly[1::2]), rng.uniform(0.4, 0.6)
    core = [centre[0] + scale * (xs - centre[0]), centre[1] + scale * (ys - centre[1])]
    core = _blur(_rasterise(np.stack(core, 1).ravel().tolist(), n), rng.uniform(0.8, 1.5))
    delta = 1.3 * soft - rng.uniform(1.5, 2.0) * core
  if rng.random() < 0.5:
    delta = delta + rng.uniform(0.15, 0.35) * _blur(mask, rng.uniform(2.0, 4.0))  # oedema halo
  return soft, contrast * delta


def _split_coco(split: str, size: int, image_size: int, seed: int,
                tumour_fraction: float, folder: pathlib.Path) -> dict:
  """Renders one split's PNGs into ``folder`` and returns its COCO dictionary."""
  images, annotations = [], []
  # Stable across processes (unlike hash()), so each image depends only on (seed, split, index).
  split_key = zlib.crc32(split.encode())
  for index in range(size):
    rng = np.random.default_rng(np.random.SeedSequence([seed, split_key, index]))
    img, polys = render_phantom(rng, image_size, bool(rng.random() < tumour_fraction))
    name = f"phantom_{split}_{index:05d}.png"
    Image.fromarray(img).save(folder / name)
    images.append({"id": index, "file_name": name, "width": image_size, "height": image_size})
    for poly in polys:
      xs, ys = np.asarray(poly[0::2]), np.asarray(poly[1::2])
      x0, y0 = float(xs.min()), float(ys.min())
      area = abs(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))) / 2  # shoelace
      annotations.append({
          "id": len(annotations), "image_id": index, "category_id": 1,
          "segmentation": [poly], "area": round(float(area), 2),
          "bbox": [x0, y0, round(float(xs.max()) - x0, 2), round(float(ys.max()) - y0, 2)],
          "iscrowd": 0,
      })
  info = {"description": f"unet_jax synthetic brain phantoms ({split})",
          "version": str(_FORMAT_VERSION)}
  return {"info": info, "licenses": [], "categories": _CATEGORIES, "images": images,
          "annotations": annotations}


def _existing_export_ok(root: pathlib.Path, params: dict) -> bool:
  """True if ``root`` is a complete export for ``params``, False if absent or empty.

  Raises:
    UserError: ``root`` holds anything else, so writing there could destroy data.
  """
  if not root.exists():
    return False
  if not root.is_dir():
    raise UserError(f"{root}: exists and is not a directory; refusing to overwrite it")
  if not (root / _MARKER).is_file():
    if any(root.iterdir()):
      raise UserError(
          f"{root}: is not empty and is not a phantom export; refusing to overwrite it")
    return False
  try:
    stored = json.loads((root / _MARKER).read_text())
  except ValueError:
    stored = None
  if not isinstance(stored, dict) or stored.get("generator") != params["generator"]:
    raise UserError(
        f"{root}: has a {_MARKER} not written by this generator; refusing to overwrite it")
  if stored != params:
    diff = sorted(k for k in params.keys() | stored.keys() if stored.get(k) != params.get(k))
    raise UserError(f"{root}: holds a phantom export made with different parameters "
                     f"({', '.join(diff)}); delete it or use another folder")
  for split, size in params["split_sizes"].items():
    try:
      coco = json.loads((root / split / _ANNOTATIONS).read_text())
      names = [image["file_name"] for image in coco["images"]]
    except (OSError, ValueError, KeyError, TypeError):
      names = None
    if names is None or len(names) != size or not all((root / split / f).is_file() for f in names):
      raise UserError(f"{root}: phantom export is incomplete or damaged ({split}); "
                       "delete it to regenerate")
  return True


def _remove_abandoned(root: pathlib.Path) -> None:
  """Removes the temporary folders of generations killed on this host (a kill skips the
  `finally` that removes its own); other hosts' may still be writing theirs."""
  for path in root.parent.glob(f".{root.name}.partial-*@{socket.gethostname()}"):
    pid = path.name.split(".partial-", 1)[1].split("-", 1)[0]
    try:
      os.kill(int(pid), 0)
    except ProcessLookupError:
      shutil.rmtree(path, ignore_errors=True)
    except (ValueError, PermissionError):  # Not ours to judge: another user's live process.
      pass


def write_phantom_coco(root: str | os.PathLike[str], *,
                       split_sizes: dict[str, int] | None = None, image_size: int = 128,
                       seed: int = 0, tumour_fraction: float = 0.85) -> pathlib.Path:
  """Writes a synthetic brain-tumour COCO export shaped like the Roboflow one.

  Layout: ``ROOT/<split>/_annotations.coco.json`` plus ``phantom_<split>_<i:05d>.png``
  per split, and ``ROOT/phantoms.json`` recording the generation parameters. The
  export is built in a temporary sibling folder and renamed into place, so an
  interrupted run never leaves a partial dataset at ``root``. Calling again with the
  same parameters on a complete export returns at once without rewriting anything.

  Args:
    root: Destination folder; must be absent, empty, or a phantom export.
    split_sizes: Images per split; defaults to ``{"train": 256, "valid": 64, "test": 64}``.
    image_size: Side length in pixels of the square slices.
    seed: Non-negative base seed; each image depends only on (seed, split, index).
    tumour_fraction: Probability that a slice contains a tumour.

  Returns:
    ``root`` as a ``pathlib.Path``.

  Raises:
    UserError: If a parameter is invalid, or ``root`` holds anything other than a
        complete phantom export made with the same parameters.
  """
  root = pathlib.Path(root)
  split_sizes = dict(_DEFAULT_SPLITS if split_sizes is None else split_sizes)
  if image_size < 32 or seed < 0 or not 0.0 <= tumour_fraction <= 1.0:
    raise UserError(f"invalid phantom parameters: image_size={image_size}, seed={seed}, "
                     f"tumour_fraction={tumour_fraction}")
  # Split names become folder and file names, so keep them plain.
  if any(not str(k).replace("-", "_").isidentifier() or not isinstance(v, int) or v < 0
         for k, v in split_sizes.items()):
    raise UserError(f"split_sizes must map plain names to non-negative ints, got {split_sizes}")
  # Round-trip through JSON so the comparison with the stored marker is like for like.
  params = json.loads(json.dumps({
      "generator": "unet_jax.data.synthetic", "version": _FORMAT_VERSION,
      "split_sizes": split_sizes, "image_size": image_size, "seed": seed,
      "tumour_fraction": float(tumour_fraction)}))
  if _existing_export_ok(root, params):
    return root

  root.parent.mkdir(parents=True, exist_ok=True)
  _remove_abandoned(root)
  tmp = root.parent / (f".{root.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
                       f"@{socket.gethostname()}")
  tmp.mkdir()
  try:
    for split, size in split_sizes.items():
      (tmp / split).mkdir()
      coco = _split_coco(split, size, image_size, seed, tumour_fraction, tmp / split)
      (tmp / split / _ANNOTATIONS).write_text(json.dumps(coco))
    (tmp / _MARKER).write_text(json.dumps(params, indent=2) + "\n")
    try:
      if root.is_dir():
        root.rmdir()  # only ever empty here; rename cannot replace a non-empty folder
      os.rename(tmp, root)
    except OSError:
      # Another process may have finished the same export first; accept it if it matches.
      if not _existing_export_ok(root, params):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return root
