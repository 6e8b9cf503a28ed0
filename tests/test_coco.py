"""The COCO source: rasterisation, merging, negatives and bad input."""

import json
import os

import numpy as np
from PIL import Image
import pytest

from unet_jax.data import coco
from unet_jax.errors import UserError


def _export(tmp_path, images, annotations, split="train", size=(8, 8)):
  """Writes a COCO split with black PNGs named in `images` (id -> file name)."""
  folder = tmp_path / split
  folder.mkdir(parents=True, exist_ok=True)
  for name in images.values():
    Image.new("L", size).save(folder / name)
  coco_json = {
      "images": [{"id": i, "file_name": n, "width": size[0], "height": size[1]}
                 for i, n in images.items()],
      "annotations": [{"id": k, "iscrowd": 0, **a} for k, a in enumerate(annotations)],
      "categories": [{"id": 0, "name": "Tumor"}, {"id": 1, "name": "0"}, {"id": 2, "name": "1"}],
  }
  (folder / coco.ANNOTATIONS_FILE).write_text(json.dumps(coco_json))
  return tmp_path


def test_polygon_matches_hand_drawn_mask(tmp_path):
  # A rectangle from (2, 1) to (6, 4): pixel centres x+0.5 in [2, 6], y+0.5 in [1, 4].
  polygon = [2, 1, 6, 1, 6, 4, 2, 4]
  root = _export(tmp_path, {0: "a.png"}, [{"image_id": 0, "category_id": 1,
                                           "segmentation": [polygon], "bbox": [2, 1, 4, 3]}])
  expected = np.zeros((8, 8), np.uint8)
  expected[1:4, 2:6] = 1
  source = coco.CocoSource(root, "train", image_size=8)
  np.testing.assert_array_equal(source.mask(0), expected)
  np.testing.assert_array_equal(source[0]["mask"][..., 0], expected)


def test_categories_merge_and_bbox_only_and_rle(tmp_path):
  rle = {"size": [8, 8], "counts": [0, 2, 6, 2, 54]}  # column-major: (0,0),(1,0),(0,1),(1,1)
  root = _export(tmp_path, {0: "a.png"}, [
      {"image_id": 0, "category_id": 1, "segmentation": [], "bbox": [6, 6, 2, 2]},
      {"image_id": 0, "category_id": 2, "segmentation": rle, "bbox": [0, 0, 2, 2],
       "iscrowd": 1},
  ])
  expected = np.zeros((8, 8), np.uint8)
  expected[6:8, 6:8] = 1
  expected[0:2, 0:2] = 1
  np.testing.assert_array_equal(coco.CocoSource(root, "train", 8).mask(0), expected)
  only_two = coco.CocoSource(root, "train", 8, category_ids=(2,)).mask(0)
  assert only_two.sum() == 4 and only_two[0:2, 0:2].all()


def test_image_without_annotation_is_a_negative(tmp_path):
  root = _export(tmp_path, {0: "a.png", 1: "b.png"},
                 [{"image_id": 0, "category_id": 1, "segmentation": [[0, 0, 4, 0, 4, 4]],
                   "bbox": [0, 0, 4, 4]}])
  source = coco.CocoSource(root, "train", image_size=4, channels=3)
  record = source[1]
  assert record["file_name"] == "b.png" and record["mask"].sum() == 0
  assert record["image"].shape == (4, 4, 3) and record["image"].dtype == np.float32
  assert record["mask"].shape == (4, 4, 1) and set(np.unique(source[0]["mask"])) <= {0, 1}


def test_sixteen_bit_images_scale_to_unit_range(tmp_path):
  root = _export(tmp_path, {0: "a.png"}, [])
  Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(tmp_path / "train" / "a.png")
  image = coco.CocoSource(root, "train", 8)[0]["image"]
  np.testing.assert_allclose(image, 1.0)


@pytest.mark.parametrize("name", ["../outside.png", "/etc/passwd"])
def test_file_name_leaving_the_dataset_is_refused(tmp_path, name):
  root = _export(tmp_path, {0: "a.png"}, [])
  data = json.loads((root / "train" / coco.ANNOTATIONS_FILE).read_text())
  data["images"][0]["file_name"] = name
  (root / "train" / coco.ANNOTATIONS_FILE).write_text(json.dumps(data))
  Image.new("L", (8, 8)).save(tmp_path / "outside.png")
  with pytest.raises(UserError, match="leaves the dataset folder"):
    coco.CocoSource(root, "train", 8)[0]


def test_symlink_out_of_the_dataset_is_refused(tmp_path):
  root = _export(tmp_path / "data", {0: "a.png"}, [])
  Image.new("L", (8, 8)).save(tmp_path / "secret.png")
  os.remove(root / "train" / "a.png")
  os.symlink(tmp_path / "secret.png", root / "train" / "a.png")
  with pytest.raises(UserError, match="leaves the dataset folder"):
    coco.CocoSource(root, "train", 8)[0]


def test_bad_files_name_the_file_and_the_problem(tmp_path):
  root = _export(tmp_path, {0: "a.png"}, [])
  json_path = root / "train" / coco.ANNOTATIONS_FILE

  (root / "train" / "a.png").write_bytes(b"not a png")
  with pytest.raises(UserError, match=r"a\.png: not a readable image"):
    coco.CocoSource(root, "train", 8)[0]
  os.remove(root / "train" / "a.png")
  with pytest.raises(UserError, match=r"a\.png: image file not found"):
    coco.CocoSource(root, "train", 8)[0]
  Image.new("L", (6, 8)).save(root / "train" / "a.png")
  with pytest.raises(UserError, match="image is 6x8 but"):
    coco.CocoSource(root, "train", 8)[0]

  json_path.write_text("{not json")
  with pytest.raises(UserError, match="malformed JSON"):
    coco.CocoSource(root, "train", 8)
  json_path.write_text("[1, 2]")
  with pytest.raises(UserError, match="not a COCO export"):
    coco.CocoSource(root, "train", 8)
  json_path.write_text(json.dumps({"images": [], "annotations": [{"id": 3, "image_id": 9}]}))
  with pytest.raises(UserError, match="unknown image id 9"):
    coco.CocoSource(root, "train", 8)
  with pytest.raises(UserError, match="annotation file not found"):
    coco.CocoSource(root, "valid", 8)
