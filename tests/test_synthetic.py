"""Tests for the synthetic phantom COCO export (unet_jax.data.synthetic)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from unet_jax.data.synthetic import render_phantom, write_phantom_coco

SIZE = 64
SPLITS = {"train": 8, "valid": 4, "test": 4}


def _write(root, **kwargs):
  params = {"split_sizes": SPLITS, "image_size": SIZE, "seed": 0, "tumour_fraction": 0.85}
  params.update(kwargs)
  return write_phantom_coco(root, **params)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
  return _write(tmp_path_factory.mktemp("phantoms") / "brain")


def _files(root):
  return {p.relative_to(root).as_posix(): p.read_bytes()
          for p in sorted(root.rglob("*")) if p.is_file()}


def _ring(mask, width=3):
  grown = mask.copy()
  for _ in range(width):
    padded = np.pad(grown, 1)
    grown = (padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1]
             | padded[1:-1, :-2] | padded[1:-1, 2:])
  return grown & ~mask


def test_layout_and_coco_json(export):
  assert sorted(p.name for p in export.iterdir()) == ["phantoms.json", "test", "train", "valid"]
  for split, size in SPLITS.items():
    raw = json.loads((export / split / "_annotations.coco.json").read_text())
    assert set(raw) == {"info", "licenses", "categories", "images", "annotations"}
    assert raw["categories"] == [{"id": 0, "name": "tumor", "supercategory": "none"},
                                 {"id": 1, "name": "tumor", "supercategory": "tumor"}]
    coco = COCO(str(export / split / "_annotations.coco.json"))
    assert sorted(coco.getImgIds()) == list(range(size))
    assert sorted(coco.getAnnIds()) == list(range(len(raw["annotations"])))
    for img in raw["images"]:
      assert img["file_name"] == f"phantom_{split}_{img['id']:05d}.png"
      assert (img["width"], img["height"]) == (SIZE, SIZE)
      png = Image.open(export / split / img["file_name"])
      assert png.mode == "L" and png.size == (SIZE, SIZE)
    for ann in raw["annotations"]:
      assert ann["category_id"] == 1 and ann["iscrowd"] == 0
      (poly,) = ann["segmentation"]
      assert len(poly) % 2 == 0 and len(poly) >= 6
      assert all(round(c, 2) == c and 0 <= c <= SIZE for c in poly)
      x, y, w, h = ann["bbox"]
      assert x == min(poly[0::2]) and y == min(poly[1::2]) and w > 0 and h > 0
      assert 0 < ann["area"] <= w * h
      # The stored area is the polygon's; it should agree with the decoded mask.
      mask = coco.annToMask(ann)
      assert abs(mask.sum() - ann["area"]) <= 0.25 * ann["area"] + 4


def test_polygons_mark_bright_tumours(export):
  lifts = []
  for split in SPLITS:
    raw = json.loads((export / split / "_annotations.coco.json").read_text())
    names = {im["id"]: im["file_name"] for im in raw["images"]}
    for ann in raw["annotations"]:
      img = np.asarray(Image.open(export / split / names[ann["image_id"]]), dtype=np.float64)
      rle = mask_utils.frPyObjects(ann["segmentation"], SIZE, SIZE)
      mask = mask_utils.decode(mask_utils.merge(rle)).astype(bool)
      lifts.append(img[mask].mean() - img[_ring(mask)].mean())
  assert len(lifts) >= 5
  assert np.mean(lifts) > 10  # grey levels, on average clearly brighter than the surrounding tissue
  assert np.mean(np.array(lifts) > 0) >= 0.8


def test_negatives_have_no_annotations(export):
  negatives = 0
  for split in SPLITS:
    raw = json.loads((export / split / "_annotations.coco.json").read_text())
    annotated = {ann["image_id"] for ann in raw["annotations"]}
    negatives += sum(im["id"] not in annotated for im in raw["images"])
  assert negatives >= 1


def test_render_phantom_direct():
  img, polys = render_phantom(np.random.default_rng(3), SIZE, with_tumour=False)
  assert img.dtype == np.uint8 and img.shape == (SIZE, SIZE) and polys == []
  assert img.std() > 10  # a head on a dark background, not a blank image
  img, polys = render_phantom(np.random.default_rng(3), SIZE, with_tumour=True)
  assert 1 <= len(polys) <= 2 and all(24 <= len(p) // 2 <= 48 for p in polys)


def test_deterministic_per_seed(export, tmp_path):
  again = _write(tmp_path / "again")
  assert _files(again) == _files(export)
  other = _write(tmp_path / "other", seed=1)
  theirs, ours = _files(other), _files(export)
  assert theirs["train/phantom_train_00000.png"] != ours["train/phantom_train_00000.png"]
  assert theirs["train/_annotations.coco.json"] != ours["train/_annotations.coco.json"]


def test_image_depends_only_on_seed_split_index(export, tmp_path):
  bigger = _write(tmp_path / "bigger", split_sizes={"valid": 6, "train": 10})
  for name in ("train/phantom_train_00007.png", "valid/phantom_valid_00003.png"):
    assert _files(bigger)[name] == _files(export)[name]


def test_second_call_does_not_rewrite(tmp_path):
  root = _write(tmp_path / "ds")
  stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
  assert _write(tmp_path / "ds") == root
  assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps
  assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temporary folder left behind


def test_different_parameters_raise(tmp_path):
  root = _write(tmp_path / "ds")
  with pytest.raises(ValueError, match="different parameters.*seed"):
    _write(root, seed=5)
  with pytest.raises(ValueError, match=str(root)):
    _write(root, image_size=32)


def test_non_phantom_folder_raises(tmp_path):
  root = tmp_path / "user_data"
  root.mkdir()
  (root / "notes.txt").write_text("keep me")
  with pytest.raises(ValueError, match="not a phantom export"):
    _write(root)
  assert [p.name for p in root.iterdir()] == ["notes.txt"]
  (root / "phantoms.json").write_text("{}")  # a marker someone else wrote is not ours either
  with pytest.raises(ValueError, match="not written by this generator"):
    _write(root)


def test_empty_existing_folder_is_filled(tmp_path):
  root = tmp_path / "empty"
  root.mkdir()
  _write(root, split_sizes={"train": 2})
  assert (root / "phantoms.json").is_file() and len(list((root / "train").glob("*.png"))) == 2


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
  import unet_jax.data.synthetic as synthetic

  calls = []

  def failing(rng, image_size, with_tumour):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return render_phantom(rng, image_size, with_tumour)

  monkeypatch.setattr(synthetic, "render_phantom", failing)
  with pytest.raises(KeyboardInterrupt):
    _write(tmp_path / "ds")
  assert list(tmp_path.iterdir()) == []


def test_a_killed_generations_folder_is_removed_by_the_next(tmp_path):
  # A kill skips the `finally` that removes it; a live process's is left to it.
  host = socket.gethostname()
  dead = subprocess.Popen([sys.executable, "-c", ""])
  dead.wait()
  killed = tmp_path / f".ds.partial-{dead.pid}-0a1b2c3d@{host}"
  writing = tmp_path / f".ds.partial-{os.getpid()}-0a1b2c3d@{host}"
  elsewhere = tmp_path / f".ds.partial-{dead.pid}-0a1b2c3d@another-host"
  for folder in (killed, writing, elsewhere):
    (folder / "train").mkdir(parents=True)
  _write(tmp_path / "ds")
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ds", writing.name,
                                                                elsewhere.name])
