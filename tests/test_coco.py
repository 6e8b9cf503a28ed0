"""The COCO source: both layouts, every geometry, image kinds and bad input."""

import json
import logging
import os

import grain
import ml_collections
import numpy as np
from PIL import ExifTags
from PIL import Image
from pycocotools import mask as mask_utils
import pytest

from configs import brain
from unet_jax import data
from unet_jax.data import coco
from unet_jax import images
from unet_jax import train
from unet_jax.errors import UserError

CATEGORIES = [{"id": 0, "name": "Tumor"}, {"id": 1, "name": "0"}, {"id": 2, "name": "1"}]


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
      "categories": CATEGORIES,
  }
  (folder / coco.ANNOTATIONS_FILE).write_text(json.dumps(coco_json))
  return tmp_path


def _one(tmp_path, annotation, size=(8, 8)):
  return coco.CocoSource(_export(tmp_path, {0: "a.png"}, [annotation], size=size), "train",
                         size[0])


def test_tumours_the_resize_empties_are_warned_of(tmp_path, caplog):
  # 64x64 images at 8x8: every 8th pixel is sampled. A 2x2 box between samples vanishes, one
  # over a sample stays, a 16x16 box is kept.
  boxes = {"a.png": [1, 1, 2, 2], "b.png": [3, 3, 2, 2], "c.png": [8, 8, 16, 16],
           "d.png": [9, 17, 3, 3]}
  root = _export(tmp_path, dict(enumerate(boxes)),
                 [{"image_id": i, "category_id": 1, "bbox": box}
                  for i, box in enumerate(boxes.values())], size=(64, 64))
  with caplog.at_level(logging.WARNING):
    source = coco.CocoSource(root, "train", 8)
  assert [int(source[i]["mask"].sum()) for i in range(4)] == [0, 1, 4, 0]
  assert ("2 images (a.png, d.png) hold tumours too small to keep a pixel at "
          "data.image_size=8: they train and score as without tumour") in caplog.text


def test_an_image_over_pillow_s_size_limit_is_too_large_not_unreadable(tmp_path, monkeypatch):
  Image.new("L", (8, 8)).save(tmp_path / "a.png")
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)  # Refused over twice this: 64 pixels.
  with pytest.raises(UserError, match=r"a\.png: too large to read safely \(Image size \(64 "
                     r"pixels\) exceeds .*; downscale it$"):
    images.read_image(tmp_path / "a.png", 1)


def test_polygon_matches_hand_drawn_mask(tmp_path):
  # A rectangle from (2, 1) to (6, 4): pixel centres x+0.5 in [2, 6], y+0.5 in [1, 4].
  polygon = [2, 1, 6, 1, 6, 4, 2, 4]
  source = _one(tmp_path, {"image_id": 0, "category_id": 1, "segmentation": [polygon],
                           "bbox": [2, 1, 4, 3]})
  expected = np.zeros((8, 8), np.uint8)
  expected[1:4, 2:6] = 1
  np.testing.assert_array_equal(source.mask(0), expected)
  np.testing.assert_array_equal(source[0]["mask"][..., 0], expected)
  assert isinstance(source, grain.sources.RandomAccessDataSource)
  assert source.file_names == ["a.png"]


def test_several_polygons_of_one_object_and_flat_polygons_merge(tmp_path):
  source = _one(tmp_path, {"image_id": 0, "category_id": 1,
                           "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2], [6, 6, 8, 6, 8, 8, 6, 8]]})
  assert source.mask(0).sum() == 8 and source.mask(0)[7, 7] and source.mask(0)[0, 0]
  flat = _one(tmp_path, {"image_id": 0, "category_id": 1, "segmentation": [0, 0, 2, 0, 2, 2]})
  assert flat.mask(0).sum() > 0


def test_categories_merge_and_bbox_only_and_rle(tmp_path):
  rle = {"size": [8, 8], "counts": [0, 2, 6, 2, 54]}  # column-major: (0,0),(1,0),(0,1),(1,1)
  root = _export(tmp_path, {0: "a.png"}, [
      {"image_id": 0, "category_id": 1, "segmentation": [], "bbox": [6, 6, 2, 2]},
      {"image_id": 0, "category_id": 2, "segmentation": rle, "bbox": [0, 0, 2, 2],
       "iscrowd": 1},
      {"image_id": 0, "category_id": 0, "bbox": [3, 3, 1, 1]},  # no segmentation key at all
  ])
  expected = np.zeros((8, 8), np.uint8)
  expected[6:8, 6:8] = 1
  expected[0:2, 0:2] = 1
  expected[3, 3] = 1
  np.testing.assert_array_equal(coco.CocoSource(root, "train", 8).mask(0), expected)
  only_two = coco.CocoSource(root, "train", 8, category_ids=(2,)).mask(0)
  assert only_two.sum() == 4 and only_two[0:2, 0:2].all()
  with pytest.raises(UserError, match=r"category_ids \[7\] are not among its categories"):
    coco.CocoSource(root, "train", 8, category_ids=(1, 7))
  # Its logit and per-category report would see no image.
  with pytest.raises(UserError, match=r"category_ids=\(1, 2, 1\): \[1\] named more than once"):
    coco.CocoSource(root, "train", 8, category_ids=(1, 2, 1))


def test_listed_categories_get_their_own_labels(tmp_path):
  root = _export(tmp_path, {0: "a.png"}, [
      {"image_id": 0, "category_id": 1, "bbox": [6, 6, 2, 2]},
      {"image_id": 0, "category_id": 2, "bbox": [0, 0, 4, 4]},
      {"image_id": 0, "category_id": 1, "bbox": [2, 2, 2, 2]},  # over category 2's box
  ])
  merged = coco.CocoSource(root, "train", 8)[0]["mask"][..., 0]
  assert set(np.unique(merged)) == {0, 1}
  labels = coco.CocoSource(root, "train", 8, category_ids=(2, 1))[0]["mask"][..., 0]
  expected = np.zeros((8, 8), np.uint8)
  expected[0:4, 0:4] = 1  # category 2, the first listed
  expected[6:8, 6:8] = expected[2:4, 2:4] = 2  # category 1; the later label wins an overlap
  np.testing.assert_array_equal(labels, expected)
  np.testing.assert_array_equal(coco.CocoSource(root, "train", 8, category_ids=(2, 1)).mask(0),
                                expected > 0)
  half = coco.CocoSource(root, "train", 4, category_ids=(2, 1))[0]["mask"][..., 0]
  assert set(np.unique(half)) == {0, 1, 2}  # resizing keeps the labels


def test_compressed_rle_string(tmp_path):
  expected = np.zeros((8, 8), np.uint8)
  expected[2:5, 3:7] = 1
  counts = mask_utils.encode(np.asfortranarray(expected))["counts"].decode("ascii")
  source = _one(tmp_path, {"image_id": 0, "category_id": 1, "iscrowd": 1,
                           "segmentation": {"size": [8, 8], "counts": counts}})
  np.testing.assert_array_equal(source.mask(0), expected)


def test_rle_of_another_size_is_refused(tmp_path):
  with pytest.raises(UserError, match=r"annotation 0 of a\.png: RLE size \[4, 4\] differs"):
    _one(tmp_path, {"image_id": 0, "category_id": 1,
                    "segmentation": {"size": [4, 4], "counts": [0, 16]}})


def test_polygon_outside_the_image_is_clipped_with_a_warning(tmp_path, caplog):
  caplog.set_level(logging.WARNING)
  # A square from (4, 4) to (12, 12) on an 8x8 image: what is inside is (4..8, 4..8).
  source = _one(tmp_path, {"image_id": 0, "category_id": 1,
                           "segmentation": [[4, 4, 12, 4, 12, 12, 4, 12]]})
  expected = np.zeros((8, 8), np.uint8)
  expected[4:, 4:] = 1
  np.testing.assert_array_equal(source.mask(0), expected)
  assert "reaches outside the 8x8 image; clipped" in caplog.text
  assert "annotation 0 of a.png" in caplog.text


def test_zero_area_polygons_are_ignored_with_a_warning(tmp_path, caplog):
  caplog.set_level(logging.WARNING)
  source = _one(tmp_path, {"image_id": 0, "category_id": 1,
                           "segmentation": [[1, 1, 5, 5, 3, 3], [1, 1, 2, 2], [0, 0, 2, 0, 2, 2]]})
  assert source.mask(0).sum() > 0  # the one real triangle is kept
  assert caplog.text.count("zero-area polygon ignored") == 2
  caplog.clear()
  bow_tie = [[1, 1, 7, 7, 7, 1, 1, 7]]  # Signed area 0, yet two triangles.
  source = _one(tmp_path / "bow_tie", {"image_id": 0, "category_id": 1, "segmentation": bow_tie})
  np.testing.assert_array_equal(source.mask(0), mask_utils.decode(
      mask_utils.merge(mask_utils.frPyObjects(bow_tie, 8, 8))))
  assert source.mask(0).sum() > 10 and not caplog.text
  caplog.clear()
  outside = coco.CocoSource(_export(tmp_path / "two", {0: "a.png", 1: "b.png"}, [
      {"image_id": 0, "category_id": 1, "segmentation": [[20, 20, 30, 20, 30, 30]]},
      {"image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4]}]), "train", 8)
  assert outside.mask(0).sum() == 0 and "lies outside the 8x8 image; ignored" in caplog.text
  # With every annotation dropped, the split has nothing to learn: refused before training.
  with pytest.raises(UserError, match=r"none of its annotations is usable, so train has no "
                     r"tumour to learn or score \(.*lies outside the 8x8 image; ignored\)"):
    _one(tmp_path, {"image_id": 0, "category_id": 1, "segmentation": [[20, 20, 30, 20, 30, 30]]})


def test_annotation_of_an_undeclared_category_is_ignored_with_a_warning(tmp_path, caplog):
  caplog.set_level(logging.WARNING)
  source = coco.CocoSource(_export(tmp_path, {0: "a.png", 1: "b.png"}, [
      {"image_id": 0, "category_id": 7, "bbox": [1, 1, 4, 4]},
      {"image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4]}]), "train", 8)
  assert source.mask(0).sum() == 0 and source.mask(1).sum() == 16
  assert "category_id 7 is not among the file's categories; ignored" in caplog.text


def test_image_without_annotation_is_a_negative(tmp_path):
  root = _export(tmp_path, {0: "a.png", 1: "b.png"},
                 [{"image_id": 0, "category_id": 1, "segmentation": [[0, 0, 4, 0, 4, 4]],
                   "bbox": [0, 0, 4, 4]}])
  source = coco.CocoSource(root, "train", image_size=4, channels=3)
  record = source[1]
  assert record["file_name"] == "b.png" and record["mask"].sum() == 0
  assert record["image"].shape == (4, 4, 3) and record["image"].dtype == np.float32
  assert record["mask"].shape == (4, 4, 1) and set(np.unique(source[0]["mask"])) <= {0, 1}


@pytest.mark.parametrize("mode, pixel, grey", [
    ("L", 255, 1.0), ("RGB", (255, 0, 0), 0.299), ("RGBA", (0, 0, 255, 0), 0.114),
    ("I;16", 65535, 1.0), ("P", 0, 0.0)])
@pytest.mark.parametrize("channels", [1, 3])
def test_image_kinds_read_as_channels(tmp_path, mode, pixel, grey, channels):
  root = _export(tmp_path, {0: "a.png"}, [])
  Image.new(mode, (8, 8), pixel).save(tmp_path / "train" / "a.png")
  image = coco.CocoSource(root, "train", 8, channels=channels)[0]["image"]
  assert image.shape == (8, 8, channels) and image.dtype == np.float32
  assert 0 <= image.min() and image.max() <= 1
  if channels == 1:
    np.testing.assert_allclose(image, grey, atol=0.01)
  if mode == "RGB" and channels == 3:
    np.testing.assert_allclose(image[0, 0], [1, 0, 0])


def test_exif_orientation_is_applied(tmp_path):
  root = _export(tmp_path, {0: "a.png", 1: "b.png"}, [], size=(8, 4))
  exif = Image.Exif()
  exif[ExifTags.Base.Orientation] = 6  # shown turned 90 degrees clockwise
  stored = np.zeros((8, 4), np.uint8)  # 4 wide, 8 high as stored
  stored[0, 0] = 255
  for name in ("a.png", "b.png"):
    Image.fromarray(stored).save(root / "train" / name, exif=exif)
  shown = images.read_image(root / "train" / "a.png", 1)[..., 0]
  assert shown.shape == (4, 8) and shown[0, 7] == 1 and shown.sum() == 1
  image, size = images.load_image(root / "train" / "b.png", 1, 8)
  assert size == (8, 4) and image.shape == (8, 8, 1)
  assert coco.CocoSource(root, "train", 8)[0]["image"].shape == (8, 8, 1)
  (root / "train" / coco.ANNOTATIONS_FILE).write_text(
      (root / "train" / coco.ANNOTATIONS_FILE).read_text().replace('"width": 8, "height": 4',
                                                                   '"width": 4, "height": 8'))
  with pytest.raises(UserError, match=r"a\.png: image is 8x4 as displayed but .* says 4x8 \(its "
                     r"EXIF orientation turns the stored 4x8 a quarter turn: annotate the image "
                     r"as displayed, or remove the orientation tag\)$"):
    coco.CocoSource(root, "train", 8)[0]


@pytest.mark.parametrize("compression", ["raw", "tiff_lzw"])
def test_a_tiff_turned_by_its_orientation_reads_upright(tmp_path, compression):
  """Pillow maps an uncompressed one's pixels as if already turned, and sizes TIFFs so."""
  shown = np.arange(4 * 6, dtype=np.uint8).reshape(4, 6) * 10  # 6 wide, 4 high as displayed
  exif = Image.Exif()
  exif[ExifTags.Base.Orientation] = 6
  path = tmp_path / "slice.tif"
  Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90).save(path, exif=exif,
                                                                   compression=compression)
  np.testing.assert_allclose(images.read_image(path, 1)[..., 0], shown / 255, atol=1e-6)
  assert images.displayed_size(path) == (6, 4) and images.load_image(path, 1, 4)[1] == (6, 4)


@pytest.mark.parametrize("mode, pixel, expected", [
    ("I", 200, 200 / 65535), ("I", 65535, 1.0), ("F", 0.25, 0.25),
    ("I", 70000, "integer pixels span \\[70000, 70000\\]"),
    ("F", 2.0, "float pixels span \\[2, 2\\]; float images must already be scaled"),
    ("F", float("nan"), "64 of its 32-bit float pixels are NaN or infinite")])
def test_wide_images_are_scaled_by_their_type(tmp_path, mode, pixel, expected):
  path = tmp_path / "slice.tif"
  Image.new(mode, (8, 8), pixel).save(path)
  for read in (lambda: images.read_image(path, 1), lambda: images.load_image(path, 1, 4)[0]):
    if isinstance(expected, str):
      with pytest.raises(UserError, match=rf"slice\.tif: .*{expected}"):
        read()
    else:
      np.testing.assert_allclose(read(), expected, rtol=1e-6)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16"])
def test_a_picture_is_the_rounded_mean_of_the_channels_read(tmp_path, mode):
  rng = np.random.default_rng(0)
  if mode == "I;16":
    image = Image.fromarray(rng.integers(0, 65536, (9, 7), dtype=np.uint16))
  else:
    image = Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).convert(mode)
  path = tmp_path / "scan.png"
  image.save(path)
  for channels in (1, 3):
    expected = (np.clip(images.read_image(path, channels).mean(-1), 0, 1) * 255).round()
    picture, _ = images.read_picture(path, channels)
    assert picture.dtype == np.uint8
    np.testing.assert_array_equal(picture, expected.astype(np.uint8))


def _single_file(tmp_path, image_dir=""):
  """One annotation file at the root; images carry their subset in extra.split."""
  folder = tmp_path / (image_dir or ".")
  folder.mkdir(parents=True, exist_ok=True)
  images = []
  for i, subset in enumerate(["train", "train", "valid", "test"]):
    Image.new("L", (8, 8), 40 * i).save(folder / f"img{i}.png")
    images.append({"id": i, "file_name": f"img{i}.png", "width": 8, "height": 8,
                   "extra": {"split": subset}})
  annotations = [{"id": 0, "image_id": 2, "category_id": 1, "bbox": [0, 0, 4, 4]}]
  (tmp_path / "all.json").write_text(json.dumps(
      {"images": images, "annotations": annotations, "categories": CATEGORIES}))
  return tmp_path


def _data_config(root, **fields):
  config = brain.get_config().data
  config.root = str(root)
  config.image_size = 8
  for name, value in fields.items():
    config[name] = value
  return config


def test_one_annotation_file_whose_images_carry_their_subset(tmp_path):
  root = _single_file(tmp_path, image_dir="pictures")
  config = _data_config(root, annotations="all.json", subset_key="extra.split",
                        image_dir="pictures")
  assert data.subset_names(config, str(tmp_path)) == ["train", "valid", "test"]
  train = data.build_source(config, "train", str(tmp_path))
  assert train.file_names == ["img0.png", "img1.png"]
  valid = data.build_source(config, "valid", str(tmp_path))
  assert len(valid) == 1 and valid[0]["mask"].sum() == 16
  assert data.has_split(config, "test", str(tmp_path))
  assert not data.has_split(config, "holdout", str(tmp_path))
  with pytest.raises(UserError, match="'holdout' not found .*; splits found: train, valid, test"):
    data.build_source(config, "holdout", str(tmp_path))
  with pytest.raises(UserError, match="no image has extra.split='holdout'; it has train, valid"):
    coco.CocoSource(root, "holdout", 8, layout=data.coco_layout(config))
  config.subset_key = "split"
  with pytest.raises(UserError, match=r"all\.json: image 'img0\.png' has no 'split' naming"):
    data.build_source(config, "train", str(tmp_path))


def test_training_warns_of_images_its_other_splits_share_with_train(tmp_path, caplog):
  config = brain.get_config()
  config.data = _data_config(_single_file(tmp_path), annotations="all.json",
                             subset_key="extra.split")
  all_json = json.loads((tmp_path / "all.json").read_text())
  for i, split in enumerate(["valid", "test", "test"]):
    all_json["images"].append({**all_json["images"][i % 2], "id": 10 + i,
                               "extra": {"split": split}})
  (tmp_path / "all.json").write_text(json.dumps(all_json))
  with caplog.at_level(logging.WARNING):
    train.build_sources(config, str(tmp_path))
  img = {i: (tmp_path / f"img{i}.png").resolve() for i in range(2)}
  assert (f"data.val_split: splits 'valid' and 'train' both list 1 image file ({img[0]}): it "
          "picks the best checkpoint partly on images the model trained on") in caplog.text
  assert (f"eval.split: splits 'test' and 'train' both list 2 image files ({img[0]}, {img[1]}): "
          "it is scored partly on images the model trained on") in caplog.text


def test_split_layout_through_build_source(tmp_path):
  root = _export(tmp_path, {0: "a.png"}, [], split="valid")
  config = _data_config(root)
  assert data.has_split(config, "valid", "unused") and not data.has_split(config, "train", "x")
  assert len(data.build_source(config, "valid", "unused")) == 1
  with pytest.raises(UserError, match=r"split 'train' not found .*; splits found: valid$"):
    data.build_source(config, "train", "unused")
  config.format = "yolo"
  with pytest.raises(UserError, match="data.format must be one of coco, lgg, brats"):
    data.build_source(config, "valid", "unused")
  config.format = "coco"
  config.image_size = 0  # Not blamed on the images ("not a readable image").
  with pytest.raises(UserError, match=r"^data\.image_size=0: .* use 1 or more$"):
    data.build_source(config, "valid", "unused")


def test_cache_dir_gives_the_same_records(tmp_path):
  root = _export(tmp_path / "data", {0: "a.png", 1: "b.png"},
                 [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4]}])
  config = _data_config(root)
  plain = data.build_source(config, "train", "unused")
  config.cache_dir = str(tmp_path / "cache")
  cached = data.build_source(config, "train", "unused")
  for i in range(2):
    for key in ("image", "mask"):
      np.testing.assert_array_equal(cached[i][key], plain[i][key])
  assert cached.file_names == plain.file_names
  assert len(list((tmp_path / "cache").glob("*/*.npy"))) == 2


@pytest.mark.parametrize("name", ["../outside.png", "/etc/passwd"])
def test_file_name_leaving_the_dataset_is_refused(tmp_path, name):
  root = _export(tmp_path, {0: "a.png"}, [])
  data_json = json.loads((root / "train" / coco.ANNOTATIONS_FILE).read_text())
  data_json["images"][0]["file_name"] = name
  (root / "train" / coco.ANNOTATIONS_FILE).write_text(json.dumps(data_json))
  Image.new("L", (8, 8)).save(tmp_path / "outside.png")
  with pytest.raises(UserError, match="leaves the dataset folder"):
    coco.CocoSource(root, "train", 8)


def test_symlinked_images_are_read_and_dot_dot_names_refused(tmp_path):
  root = _export(tmp_path / "data", {0: "a.png"}, [])
  (tmp_path / "blobs").mkdir()
  Image.new("L", (8, 8), 255).save(tmp_path / "blobs" / "1f3a", "PNG")
  os.remove(root / "train" / "a.png")
  os.symlink(tmp_path / "blobs" / "1f3a", root / "train" / "a.png")
  assert coco.CocoSource(root, "train", 8)[0]["image"].min() == 1.0
  json_path = root / "train" / coco.ANNOTATIONS_FILE
  json_path.write_text(json_path.read_text().replace('"a.png"', '"a.png/../../a.png"'))
  with pytest.raises(UserError, match="leaves the dataset folder"):
    coco.CocoSource(root, "train", 8)


def test_file_name_listed_twice_is_refused(tmp_path):
  root = _export(tmp_path, {3: "a.png", 7: "a.png"}, [])
  with pytest.raises(UserError, match=r"_annotations\.coco\.json: file_name 'a\.png' is listed "
                                      r"twice \(image ids 3 and 7\)"):
    coco.CocoSource(root, "train", 8)


def test_cache_dir_keeps_subsets_of_one_name_apart(tmp_path):
  root = _single_file(tmp_path)
  all_json = json.loads((root / "all.json").read_text())
  for image, split in zip(all_json["images"], ["valid", "test", "train", "train"]):
    image["split"] = split
  (root / "all.json").write_text(json.dumps(all_json))
  config = _data_config(root, annotations="all.json", subset_key="extra.split",
                        cache_dir=str(tmp_path / "cache"))
  data.build_source(config, "train", "unused")[0]  # caches img0.png
  config.subset_key = "split"
  cached = data.build_source(config, "train", "unused")
  config.cache_dir = ""
  plain = data.build_source(config, "train", "unused")
  assert cached.file_names == plain.file_names == ["img2.png", "img3.png"]
  np.testing.assert_array_equal(cached[0]["image"], plain[0]["image"])


def test_bad_files_name_the_file_and_the_problem(tmp_path):
  root = _export(tmp_path, {0: "a.png"}, [])
  json_path = root / "train" / coco.ANNOTATIONS_FILE

  # Each caught when the source is made, before any training: headers are read then.
  (root / "train" / "a.png").write_bytes(b"not a png")
  with pytest.raises(UserError, match=r"a\.png: not a readable image"):
    coco.CocoSource(root, "train", 8)
  os.remove(root / "train" / "a.png")
  with pytest.raises(UserError, match=r"a\.png: image file not found"):
    coco.CocoSource(root, "train", 8)
  Image.new("L", (6, 8)).save(root / "train" / "a.png")
  with pytest.raises(UserError, match=r"a\.png: image is 6x8 as displayed but .*[0-9]$"):
    coco.CocoSource(root, "train", 8)

  json_path.write_text("{not json")
  with pytest.raises(UserError, match="malformed JSON"):
    coco.CocoSource(root, "train", 8)
  json_path.write_text("[1, 2]")
  with pytest.raises(UserError, match="not a COCO export"):
    coco.CocoSource(root, "train", 8)
  json_path.write_text(json.dumps({"images": [], "annotations": [{"id": 3, "image_id": 9}]}))
  with pytest.raises(UserError, match="annotation 3 refers to unknown image id 9"):
    coco.CocoSource(root, "train", 8)
  for key, entry in (("image", {"images": [{"id": [0], "file_name": "a.png", "width": 8,
                                             "height": 8}]}),
                     ("annotation 3", {"images": [{"id": 0, "file_name": "a.png", "width": 8,
                                                   "height": 8}],
                                       "annotations": [{"id": 3, "image_id": 0,
                                                        "category_id": [1]}]}),
                     ("category 't'", {"images": [], "categories": [{"id": {}, "name": "t"}]})):
    json_path.write_text(json.dumps(entry))
    with pytest.raises(UserError, match=rf"json: {key}.* has (category_)?id .*; ids are numbers"):
      coco.CocoSource(root, "train", 8)
  json_path.write_text(json.dumps({"images": [], "annotations": []}))
  with pytest.raises(UserError, match=r"json: lists no images, so split 'train' is empty$"):
    coco.CocoSource(root, "train", 8)
  json_path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}]}))
  with pytest.raises(UserError, match="lacks id, file_name, width or height"):
    coco.CocoSource(root, "train", 8)
  with pytest.raises(UserError, match="annotation file not found"):
    coco.CocoSource(root, "valid", 8)


@pytest.mark.parametrize("annotation, problem", [
    ({"segmentation": [[1, 2, 3]]}, "not an even-length list of numbers"),
    ({"segmentation": "abc"}, "neither polygons nor RLE"),
    ({"segmentation": {"size": [8, 8], "counts": [1, 2]}}, "do not add up"),
    ({"segmentation": {"size": [8, 8], "counts": 5}}, "must be a list or a string"),
    ({"segmentation": {"size": 8, "counts": [64]}}, "RLE size 8 differs"),
    ({"segmentation": {"size": [8, 8], "counts": "`0"}}, "do not add up"),  # [16] of 64 pixels
    ({"segmentation": {"size": [8, 8], "counts": "P`"}}, "not valid COCO RLE"),  # truncated
    ({"segmentation": {"size": [8, 8], "counts": "0 1"}}, "not valid COCO RLE"),
    ({}, "no segmentation and no"),
])
def test_unreadable_geometry_names_the_annotation(tmp_path, annotation, problem):
  with pytest.raises(UserError, match=rf"_annotations\.coco\.json: annotation 0 of a\.png: "
                                      rf".*{problem}"):
    _one(tmp_path, {"image_id": 0, "category_id": 1, **annotation})


def test_every_error_is_one_line(tmp_path):
  root = _export(tmp_path, {0: "a.png"}, [])
  (root / "train" / "a.png").write_bytes(b"\x89PNG broken")
  with pytest.raises(UserError) as error:
    coco.CocoSource(root, "train", 8)[0]
  assert "\n" not in str(error.value)


def test_config_dict_layout_defaults_to_split_folders():
  config = ml_collections.ConfigDict({"format": "coco"})
  assert data.coco_layout(config) == coco.Layout()
