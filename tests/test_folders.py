"""The LGG layout: patient folders of <case>_<n>.tif slices beside <case>_<n>_mask.tif."""

import json
import shutil
import struct

import grain
import numpy as np
from PIL import Image
import pytest

from configs import lgg
from unet_jax import data, evaluate, images, train
from unet_jax.data import folders, splits
from unet_jax.errors import UserError

PATIENTS = [f"TCGA_CS_{4941 + i}_19960909" for i in range(10)]


def _lgg(root, patients=PATIENTS, slices=(1, 2, 10)):
  """Writes 16x16 RGB slices; slice n of patient p has a square tumour when n is even."""
  for p, patient in enumerate(patients):
    folder = root / "kaggle_3m" / patient
    folder.mkdir(parents=True)
    for n in slices:
      image = np.full((16, 16, 3), 10 * p + n, np.uint8)
      mask = np.zeros((16, 16), np.uint8)
      if n % 2 == 0:
        mask[4:8, 4:12] = 255
        image[4:8, 4:12] = 250
      Image.fromarray(image).save(folder / f"{patient}_{n}.tif")
      Image.fromarray(mask).save(folder / f"{patient}_{n}_mask.tif")
  return root / "kaggle_3m"


def _config(root, **fields):
  config = lgg.get_config().data
  config.root = str(root)
  config.image_size = 8
  for name, value in fields.items():
    config[name] = value
  return config


def test_slices_masks_and_names(tmp_path):
  root = _lgg(tmp_path)
  source = data.build_source(_config(root), "train", str(tmp_path))
  assert isinstance(source, folders.FolderSource)
  assert isinstance(source, grain.sources.RandomAccessDataSource)
  patient = source.patients[0]
  assert source.file_names[:3] == [f"{patient}/{patient}_{n}.tif" for n in (1, 2, 10)]
  record = source[1]
  assert record["image"].shape == (8, 8, 3) and record["image"].dtype == np.float32
  assert record["mask"].shape == (8, 8, 1) and record["mask"].dtype == np.uint8
  assert set(np.unique(record["mask"])) == {0, 1} and record["mask"].sum() == 8
  assert source[0]["mask"].sum() == 0 and record["file_name"] == source.file_names[1]
  assert 0 <= record["image"].min() and record["image"].max() <= 1


def test_split_is_by_patient_seeded_and_complete(tmp_path):
  root = _lgg(tmp_path)
  config = _config(root, val_fraction=0.2, test_fraction=0.2)
  sources = {s: data.build_source(config, s, "x") for s in ("train", "valid", "test")}
  patients = {s: set(source.patients) for s, source in sources.items()}
  assert [len(patients[s]) for s in ("train", "valid", "test")] == [6, 2, 2]
  assert set.union(*patients.values()) == set(PATIENTS)
  assert sum(len(source) for source in sources.values()) == 3 * len(PATIENTS)
  for s, source in sources.items():
    assert {name.split("/")[0] for name in source.file_names} == patients[s]
    assert source.groups == [name.split("/")[0] for name in source.file_names]
  assert data.build_source(config, "test", "x").patients == sources["test"].patients
  config.split_seed = 1
  assert set(data.build_source(config, "test", "x").patients) != patients["test"]
  assert data.subset_names(config, "x") == ["train", "valid", "test"]
  config.test_fraction = 0.0
  assert not data.has_split(config, "test", "x")
  with pytest.raises(UserError, match="no patients in split 'test'"):
    data.build_source(config, "test", "x")


def test_fractions_that_leave_nothing_to_train_on(tmp_path):
  root = _lgg(tmp_path, patients=PATIENTS[:2])
  with pytest.raises(UserError, match="only 2 patients/volumes: too few"):
    data.build_source(_config(root, val_fraction=0.4, test_fraction=0.4), "train", "x")
  with pytest.raises(UserError, match="must be in"):
    data.build_source(_config(root, val_fraction=1.5), "train", "x")
  with pytest.raises(UserError, match="data.split_seed=-1: use 0 or more"):
    data.build_source(_config(root, split_seed=-1), "train", "x")


def test_bad_layouts_name_the_file(tmp_path):
  root = _lgg(tmp_path, patients=PATIENTS[:3])
  first = root / PATIENTS[0]
  (first / f"{PATIENTS[0]}_2.tif").rename(first / "elsewhere.tif")
  with pytest.raises(UserError, match=rf"{PATIENTS[0]}_2_mask\.tif: mask without its image"):
    folders.scan(root)
  (first / f"{PATIENTS[0]}_2_mask.tif").unlink()
  with pytest.raises(UserError, match=r"elsewhere\.tif: no mask elsewhere_mask\.tif beside it"):
    folders.scan(root)
  (first / "elsewhere.tif").unlink()
  copy = root / "copy" / PATIENTS[1]
  copy.mkdir(parents=True)
  Image.new("L", (16, 16)).save(copy / "a.tif")
  Image.new("L", (16, 16)).save(copy / "a_mask.tif")
  with pytest.raises(UserError, match=f"patient '{PATIENTS[1]}' is in two folders"):
    folders.scan(root)
  with pytest.raises(UserError, match="no <case>_<n>_mask.tif files"):
    folders.scan(tmp_path / "kaggle_3m" / PATIENTS[2] / "nothing-here")


def _truncate(path):
  path.write_bytes(path.read_bytes()[:-100])


def _not_an_image(path):
  path.write_bytes(b"II*\x00 broken tiff")


def _bad_next_page(path):
  # The first page intact, its next-page pointer aimed at zeros: a page without dimensions.
  data = bytearray(path.read_bytes())
  first = struct.unpack_from("<I", data, 4)[0]
  entries = struct.unpack_from("<H", data, first)[0]
  with Image.open(path) as img:
    pixels = img.tile[0].offset
  struct.pack_into("<I", data, first + 2 + 12 * entries, pixels)
  path.write_bytes(bytes(data))


def _resize(path):
  Image.new("L", (16, 8)).save(path)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize("damaged, damage, named, problem", [
    ("image", _truncate, "image", r"truncated: \d+ bytes, but its pixel data ends at byte \d+"),
    ("mask", _truncate, "mask", "truncated"),
    ("image", _not_an_image, "image", "not a readable image"),
    ("mask", _not_an_image, "mask", "not a readable image"),
    ("image", _bad_next_page, "image", "not a readable image"),
    ("mask", _bad_next_page, "mask", "not a readable image"),
    ("mask", _resize, "mask", "mask is 16x8 but its image is 16x16"),
    ("image", _resize, "mask", "mask is 16x16 but its image is 16x8"),
])
def test_bad_test_slice_stops_the_source_before_training(tmp_path, damaged, damage, named,
                                                         problem):
  root = _lgg(tmp_path)
  config = _config(root, val_fraction=0.2, test_fraction=0.2)
  image = data.build_source(config, "test", "x").file_names[-1]
  names = {"image": image, "mask": image.replace(".tif", "_mask.tif")}
  damage(root / names[damaged])
  data.build_source(config, "train", "x")  # Only the split's own slices are checked.
  with pytest.raises(UserError, match=rf"{names[named]}: {problem}"):
    data.build_source(config, "test", "x")


def test_a_bug_while_an_image_is_open_is_not_called_the_file_s_fault(tmp_path):
  path = tmp_path / "a.tif"
  Image.new("L", (8, 8)).save(path)
  with pytest.raises(TypeError, match="bug"):
    with images._opened(path):
      raise TypeError("bug")


def test_a_file_damaged_after_the_check_is_named_when_read(tmp_path):
  root = _lgg(tmp_path, patients=PATIENTS[:1])
  source = folders.FolderSource(root, "train", 8, val_fraction=0, test_fraction=0)
  _resize(root / source.file_names[1])
  with pytest.raises(UserError, match=r"_2_mask\.tif: mask is 16x16 but its image is 16x8"):
    source[1]
  with pytest.raises(UserError, match="channels must be 1 or 3"):
    folders.FolderSource(root, "train", 8, channels=4)


def test_hidden_files_are_not_slices(tmp_path):
  root = _lgg(tmp_path / ".cache" / "kagglehub", PATIENTS[:2])  # A hidden root is fine.
  folder = root / PATIENTS[0]
  for name in (f"._{PATIENTS[0]}_1.tif", f"._{PATIENTS[0]}_1_mask.tif"):
    (folder / name).write_bytes(b"\x00\x05\x16\x07 AppleDouble")
  (folder / ".ipynb_checkpoints").mkdir()
  Image.new("RGB", (16, 16)).save(folder / ".ipynb_checkpoints" / "x_1.tif")
  Image.new("L", (16, 16)).save(folder / ".ipynb_checkpoints" / "x_1_mask.tif")
  assert [image.rsplit("/", 1)[1] for _, image, _ in folders.scan(root)] == [
      f"{p}_{n}.tif" for p in PATIENTS[:2] for n in (1, 2, 10)]
  source = data.build_source(_config(root, val_fraction=0, test_fraction=0), "train", "x")
  assert len(source) == 6 and source[1]["mask"].sum() == 8


def _mask_file(path, mode, values, palette=None):
  """Writes a 16x16 mask: values[0] everywhere, values[k] on row block k."""
  mask = Image.new(mode, (16, 16), values[0])
  for k, value in enumerate(values[1:], start=1):
    mask.paste(value, (0, 4 * k, 16, 4 * k + 2))
  if palette:
    mask.putpalette(palette)
  mask.save(path)


@pytest.mark.parametrize("mode, values, rows", [
    ("L", (0, 2), 2), ("L", (0, 1, 2, 4), 6), ("I;16", (0, 3), 2), ("L", (0, 255, 100), 2),
    ("P", (0, 1), 2), ("RGB", (0, (128, 0, 0)), 2)])
def test_label_and_palette_masks_are_foreground_where_not_zero(tmp_path, mode, values, rows):
  root = _lgg(tmp_path, patients=PATIENTS[:1])
  source = folders.FolderSource(root, "train", 16, val_fraction=0, test_fraction=0)
  palette = [0, 0, 0, 128, 0, 0] if mode == "P" else None  # index 1 is dark red
  _mask_file(root / source.file_names[0].replace(".tif", "_mask.tif"), mode, values, palette)
  assert source.mask(0).sum() == rows * 16 and source[0]["mask"].sum() == rows * 16


def test_a_run_keeps_its_split_when_patients_are_added_or_removed(tmp_path):
  """Evaluating on a data root that changed since training never tests a trained patient."""
  root = _lgg(tmp_path, slices=(2,))
  config = lgg.get_config("smoke")
  config.data = _config(root, image_size=16)
  config.model.features, config.model.depth = 4, 2
  config.train.batch_size = config.eval.batch_size = 4
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  recorded = json.loads((tmp_path / "run" / splits.RECORD_FILE).read_text())
  assert sorted(sum(recorded.values(), [])) == PATIENTS and len(recorded["test"]) == 1
  # One trained patient gone, one new: a fresh split of the ten would move others around.
  shutil.rmtree(root / recorded["train"][0])
  _lgg(tmp_path, patients=["TCGA_HT_9999_20000101"], slices=(2,))
  assert data.build_source(config.data, "test", "elsewhere").patients != recorded["test"]
  test = data.build_source(config.data, "test", workdir)
  assert test.patients == sorted(recorded["test"] + ["TCGA_HT_9999_20000101"])
  assert data.build_source(config.data, "valid", workdir).patients == recorded["valid"]
  data.record_splits(config.data, workdir)  # As a resume does: the gone patient stays trained.
  again = json.loads((tmp_path / "run" / splits.RECORD_FILE).read_text())
  assert again["train"] == recorded["train"] and "TCGA_HT_9999_20000101" in again["test"]
  (tmp_path / "run" / splits.RECORD_FILE).write_text("[1, 2]")
  with pytest.raises(UserError, match=r"splits.json: not the run's split"):
    evaluate.evaluate(config, workdir)


def test_linked_patient_folders_are_followed_once_and_a_dangling_link_named(tmp_path):
  """A subset made of links to patient folders is a dataset; a link loop ends."""
  root = _lgg(tmp_path, patients=PATIENTS[:3], slices=(1,))
  subset = tmp_path / "subset"
  subset.mkdir()
  for patient in PATIENTS[:2]:
    (subset / patient).symlink_to(root / patient)
  (subset / PATIENTS[0] / "loop").symlink_to(subset)
  assert [p for p, _, _ in folders.scan(subset)] == PATIENTS[:2]
  (subset / PATIENTS[2]).mkdir()
  (subset / PATIENTS[2] / f"{PATIENTS[2]}_1.tif").symlink_to(tmp_path / "gone.tif")
  with pytest.raises(UserError, match=r"_1.tif: a link to .*gone.tif, which does not exist"):
    folders.scan(subset)
