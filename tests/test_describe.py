"""Describe mode: annotations.csv, dataset_summary.json and the plot, for every format."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from pycocotools import mask as mask_utils
import pytest

from configs import brain, brats as brats_config, lgg
from unet_jax import describe
from unet_jax.errors import UserError
import test_coco
import test_folders

REPO = pathlib.Path(__file__).resolve().parents[1]


def _coco_export(tmp_path):
  root = tmp_path / "data"
  test_coco._export(root, {0: "a.png", 1: "b.png", 2: "c.png"}, [
      {"image_id": 0, "category_id": 1, "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]},
      {"image_id": 0, "category_id": 2, "bbox": [6, 6, 2, 2]},
      {"image_id": 2, "category_id": 2, "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]},
  ])
  test_coco._export(root, {0: "v.png"}, [], split="valid", size=(8, 6))
  return root


def _rows(workdir):
  with open(workdir / describe.CSV_FILE, newline="") as f:
    return list(csv.DictReader(f))


def test_coco_rows_per_annotation_with_negatives(tmp_path):
  config = brain.get_config()
  config.data.root = str(_coco_export(tmp_path))
  summary = describe.describe(config, str(tmp_path / "out"))
  rows = _rows(tmp_path / "out")
  assert list(rows[0])[:6] == ["file_name", "width", "height", "category_id", "segmentation",
                               "subset"]
  assert [(r["file_name"], r["category_id"], r["subset"]) for r in rows] == [
      ("a.png", "1", "train"), ("a.png", "2", "train"), ("b.png", "", "train"),
      ("c.png", "2", "train"), ("v.png", "", "valid")]
  assert json.loads(rows[0]["segmentation"]) == [[0, 0, 4, 0, 4, 4, 0, 4]]
  assert [r["area"] for r in rows] == ["16", "4", "0", "4", "0"]
  assert rows[-1]["width"] == "8" and rows[-1]["height"] == "6"
  train = summary["subsets"]["train"]
  assert train["images"] == 3 and train["annotations"] == 3 and train["empty_images"] == 1
  assert train["annotations_per_category"] == {"1": 1, "2": 2}
  assert train["mask_area_pixels"]["max"] == 20 and train["mask_area_pixels"]["min"] == 4
  assert summary["subsets"]["valid"]["image_sizes"] == {"8x6": 1}
  assert summary["all"]["images"] == 4 and summary["categories"]["1"] == "0"
  assert json.loads((tmp_path / "out" / describe.SUMMARY_FILE).read_text()) == summary
  assert (tmp_path / "out" / describe.PLOT_FILE).stat().st_size > 1000

  config.data.category_ids = (2,)
  summary = describe.describe(config, str(tmp_path / "only2"))
  assert summary["subsets"]["train"]["mask_area_pixels"]["max"] == 4
  assert summary["foreground_category_ids"] == [2]


def test_coco_problems_are_listed_and_the_rest_described(tmp_path):
  root = tmp_path / "data"
  test_coco._export(root, {0: "a.png", 1: "b.png", 2: "b.png"}, [
      {"image_id": 0, "category_id": 1, "segmentation": {"size": [8, 8], "counts": [1, 2]}},
      {"image_id": 0, "category_id": 2, "bbox": [6, 6, 2, 2]},
  ])
  config = brain.get_config()
  config.data.root = str(root)
  summary = describe.describe(config, str(tmp_path / "out"))
  assert [(r["file_name"], r["area"]) for r in _rows(tmp_path / "out")] == [
      ("a.png", "0"), ("a.png", "4"), ("b.png", "0"), ("b.png", "0")]
  assert summary["num_problems"] == 2
  assert "file_name 'b.png' is listed twice (image ids 1 and 2)" in summary["problems"][0]
  assert "annotation 0 of a.png: RLE counts do not add up" in summary["problems"][1]


def test_coco_annotation_of_an_undeclared_category_is_listed_not_foreground(tmp_path):
  root = tmp_path / "data"
  test_coco._export(root, {0: "a.png", 1: "b.png"}, [
      {"image_id": 0, "category_id": 1, "bbox": [0, 0, 2, 2]},
      {"image_id": 1, "category_id": 7, "bbox": [0, 0, 3, 3]},
  ])
  config = brain.get_config()
  config.data.root, config.data.category_ids = str(root), ()  # Every category is foreground.
  summary = describe.describe(config, str(tmp_path / "out"))
  assert summary["num_problems"] == 1
  assert "annotation 1 of b.png: category_id 7 is not among" in summary["problems"][0]
  # Training reads b.png as a negative: so does the summary.
  assert summary["all"]["empty_images"] == 1 and summary["all"]["mask_area_pixels"]["max"] == 4


def test_what_training_would_refuse_of_a_coco_export(tmp_path):
  root = _coco_export(tmp_path)
  (root / "train" / "b.png").write_bytes(b"not a png")
  coco = json.loads((root / "valid" / "_annotations.coco.json").read_text())
  coco["images"] = []
  (root / "valid" / "_annotations.coco.json").write_text(json.dumps(coco))
  config = brain.get_config()
  config.data.root = str(root)
  summary = describe.describe(config, str(tmp_path / "out"))
  assert summary["subsets"]["train"]["images"] == 2 and summary["subsets"]["valid"]["images"] == 0
  assert summary["num_problems"] == 2
  assert "b.png: not a readable image" in summary["problems"][0]
  assert "lists no images, so split 'valid' is empty" in summary["problems"][1]
  config.data.category_ids = (7,)
  with pytest.raises(UserError, match=r"category_ids \[7\] are not among its categories"):
    describe.describe(config, str(tmp_path / "out"))


def test_a_folder_it_cannot_write_leaves_the_earlier_description_whole(tmp_path):
  root = _coco_export(tmp_path)
  coco = json.loads((root / "train" / "_annotations.coco.json").read_text())
  coco["categories"][1]["name"] = "T1$^{gd$ core"  # Not mathtext for matplotlib.
  (root / "train" / "_annotations.coco.json").write_text(json.dumps(coco))
  config = brain.get_config()
  config.data.root = str(root)
  out = tmp_path / "out"
  describe.describe(config, str(out))
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  (out / f"{describe.PLOT_FILE}.tmp").mkdir()  # Where the picture would be written.
  config.data.category_ids = (1,)
  with pytest.raises(UserError, match=r"dataset_summary.png.tmp: Is a directory$"):
    describe.describe(config, str(out))
  assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_one_annotation_file_layout(tmp_path):
  config = brain.get_config()
  config.data.root = str(test_coco._single_file(tmp_path / "data"))
  config.data.annotations, config.data.subset_key = "all.json", "extra.split"
  summary = describe.describe(config, str(tmp_path / "out"))
  assert list(summary["subsets"]) == ["train", "valid", "test"]
  assert [r["subset"] for r in _rows(tmp_path / "out")] == ["train", "train", "valid", "test"]
  assert summary["problems"] == []
  all_json = json.loads((tmp_path / "data/all.json").read_text())
  all_json["images"].append({**all_json["images"][0], "id": 9, "extra": {"split": "test"}})
  (tmp_path / "data/all.json").write_text(json.dumps(all_json))
  summary = describe.describe(config, str(tmp_path / "out"))
  assert summary["problems"] == [
      f"{tmp_path / 'data'}: splits 'train' and 'test' both list 1 image file "
      f"({(tmp_path / 'data/img0.png').resolve()}): each image belongs in one split"]


def test_lgg_rows_per_slice_with_the_mask_as_rle(tmp_path):
  config = lgg.get_config()
  config.data.root = str(test_folders._lgg(tmp_path / "data", test_folders.PATIENTS[:5]))
  config.data.val_fraction, config.data.test_fraction = 0.2, 0.2
  summary = describe.describe(config, str(tmp_path / "out"))
  rows = _rows(tmp_path / "out")
  assert len(rows) == 15 and summary["all"]["patients"] == 5
  assert {s: summary["subsets"][s]["patients"] for s in summary["subsets"]} == {
      "train": 3, "valid": 1, "test": 1}
  with_tumour = [r for r in rows if r["category_id"]]
  assert len(with_tumour) == 10 and all(r["area"] == "32" for r in with_tumour)
  rle = json.loads(with_tumour[0]["segmentation"])
  assert mask_utils.decode(rle)[4:8, 4:12].all() and mask_utils.decode(rle).sum() == 32
  by_patient = {}
  for row in rows:
    by_patient.setdefault(row["file_name"].split("/")[0], set()).add(row["subset"])
  assert all(len(subsets) == 1 for subsets in by_patient.values())


def test_lgg_unreadable_mask_is_listed_and_the_rest_described(tmp_path):
  config = lgg.get_config()
  root = test_folders._lgg(tmp_path / "data", test_folders.PATIENTS[:2])
  broken = sorted(root.rglob("*_mask.tif"))[0]
  broken.write_bytes(b"not a tiff")
  config.data.root = str(root)
  config.data.val_fraction, config.data.test_fraction = 0.0, 0.0
  summary = describe.describe(config, str(tmp_path / "out"))
  assert len(_rows(tmp_path / "out")) == 5
  assert summary["num_problems"] == 1 and str(broken) in summary["problems"][0]


def test_lgg_slice_without_its_mask_and_mask_without_its_slice_are_listed(tmp_path):
  config = lgg.get_config()
  root = test_folders._lgg(tmp_path / "data", test_folders.PATIENTS[:2])
  masks = sorted(root.rglob("*_mask.tif"))
  masks[0].unlink()
  orphan = masks[1].with_name(masks[1].name.replace("_mask", ""))
  orphan.unlink()
  config.data.root = str(root)
  config.data.val_fraction, config.data.test_fraction = 0.0, 0.0
  summary = describe.describe(config, str(tmp_path / "out"))
  assert len(_rows(tmp_path / "out")) == 4
  image = masks[0].with_name(masks[0].name.replace("_mask", ""))
  assert sorted(summary["problems"]) == sorted([
      f"{masks[1]}: mask without its image {orphan.name}",
      f"{image}: no mask {masks[0].name} beside it"])


def test_lgg_image_training_would_refuse_is_listed(tmp_path):
  config = lgg.get_config()
  root = test_folders._lgg(tmp_path / "data", test_folders.PATIENTS[:2])
  truncated = sorted(root.rglob("*_10.tif"))[0]
  truncated.write_bytes(truncated.read_bytes()[:-100])
  config.data.root = str(root)
  config.data.val_fraction, config.data.test_fraction = 0.0, 0.0
  summary = describe.describe(config, str(tmp_path / "out"))
  assert len(_rows(tmp_path / "out")) == 5
  assert summary["num_problems"] == 1
  assert f"{truncated}: truncated" in summary["problems"][0]


def test_every_mask_unreadable_names_the_problem(tmp_path):
  config = lgg.get_config()
  root = test_folders._lgg(tmp_path / "data", test_folders.PATIENTS[:1])
  for mask in root.rglob("*_mask.tif"):
    mask.write_bytes(b"not a tiff")
  config.data.root = str(root)
  config.data.val_fraction, config.data.test_fraction = 0.0, 0.0
  with pytest.raises(ValueError, match=r"no images found; 3 problems, the first: .*_1_mask\.tif: "
                                       "not a readable image"):
    describe.describe(config, str(tmp_path / "out"))


def _brats_config(tmp_path, volumes):
  pytest.importorskip("h5py")
  import test_brats  # pylint: disable=g-import-not-at-top
  config = brats_config.get_config()
  config.data.root = str(test_brats._brats(tmp_path / "data", volumes=volumes))
  config.data.val_fraction, config.data.test_fraction = 0.0, 0.0
  return config, sorted(pathlib.Path(config.data.root).rglob("*.h5")), test_brats._write


def test_brats_2d_masks_name_the_problem(tmp_path):
  config, paths, write = _brats_config(tmp_path, volumes=[1])
  for path in paths:
    write(path, image=np.zeros((16, 16, 4)), mask=np.zeros((16, 16), np.uint8))
  with pytest.raises(ValueError, match=r"no images found; 2 problems, the first: .*slice_0\.h5: "
                                       r"mask of shape \(16, 16\) has no channels"):
    describe.describe(config, str(tmp_path / "out"))


def test_brats_channels_training_would_refuse_are_an_error(tmp_path):
  config, paths, write = _brats_config(tmp_path, volumes=[1])
  for path in paths:
    write(path, image=np.zeros((16, 16, 4)), mask=np.zeros((16, 16, 3), np.uint8))
  config.data.mask_channels = ()
  with pytest.raises(UserError, match=r"data.mask_channels must be distinct channel indices"):
    describe.describe(config, str(tmp_path / "out"))


def test_brats_slices_training_would_refuse_are_listed(tmp_path):
  config, paths, write = _brats_config(tmp_path, volumes=[1, 2])
  write(paths[0], image=np.zeros((16, 16, 4)), mask=np.zeros((3, 16, 16), np.uint8))
  write(paths[1], mask=np.zeros((16, 16, 3), np.uint8))
  summary = describe.describe(config, str(tmp_path / "out"))
  assert len(_rows(tmp_path / "out")) == 2 and summary["all"]["image_sizes"] == {"16x16": 2}
  assert summary["num_problems"] == 2
  assert f"{paths[0]}: image of shape (16, 16, 4) and mask of shape (3, 16, 16)" in (
      summary["problems"][0])
  assert f"{paths[1]}: lacks its 'image' dataset" in summary["problems"][1]


def test_brats_rows_per_slice(tmp_path):
  pytest.importorskip("h5py")
  import test_brats  # pylint: disable=g-import-not-at-top
  config = brats_config.get_config()
  config.data.root = str(test_brats._brats(tmp_path / "data", volumes=range(1, 4)))
  summary = describe.describe(config, str(tmp_path / "out"))
  rows = _rows(tmp_path / "out")
  assert len(rows) == 6 and summary["all"]["volumes"] == 3
  assert [r["area"] for r in rows if r["category_id"]] == ["36"] * 3


def test_describe_from_the_command_line(tmp_path):
  root = _coco_export(tmp_path)
  (root / "train" / "c.png").unlink()
  result = subprocess.run(
      [sys.executable, "launch.py", "--mode=describe", "--config=configs/brain.py",
       f"--workdir={tmp_path / 'out'}", f"--config.data.root={root}"],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads((tmp_path / "out" / describe.SUMMARY_FILE).read_text())
  assert summary["all"]["images"] == 3  # Training refuses it: so does the summary.
  assert summary["num_problems"] == 1 and "c.png: image file not found" in summary["problems"][0]
  assert (tmp_path / "out" / describe.CSV_FILE).is_file()


def test_describe_does_not_need_jax_or_grain(tmp_path):
  root = _coco_export(tmp_path)
  code = ("import sys; sys.modules['jax'] = None; sys.modules['grain'] = None\n"
          "from configs import brain\nfrom unet_jax import describe\n"
          f"config = brain.get_config(); config.data.root = {str(root)!r}\n"
          f"describe.describe(config, {str(tmp_path / 'out')!r})")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert (tmp_path / "out" / describe.PLOT_FILE).is_file()


def test_no_images_is_an_error(tmp_path):
  config = brain.get_config()
  root = tmp_path / "data"
  test_coco._export(root, {}, [])
  config.data.root = str(root)
  with pytest.raises(ValueError, match="no images found"):
    describe.describe(config, str(tmp_path / "out"))


def test_a_dataset_describe_refuses_leaves_no_annotations_csv(tmp_path):
  out = tmp_path / "out"
  config = brain.get_config()
  config.data.root = str(_coco_export(tmp_path))
  describe.describe(config, str(out))  # An earlier description in `out`.
  written = (out / describe.CSV_FILE).read_text()
  config = lgg.get_config()
  config.data.root = str(tmp_path / "data")  # A COCO export: no LGG slices.
  with pytest.raises(ValueError, match="no <case>_<n>_mask.tif files"):
    describe.describe(config, str(out))
  assert (out / describe.CSV_FILE).read_text() == written
  with pytest.raises(ValueError, match="no <case>_<n>_mask.tif files"):
    describe.describe(config, str(tmp_path / "new"))
  assert not list((tmp_path / "new").iterdir())
