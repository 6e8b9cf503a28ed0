"""BraTS2020 h5 slices: modalities, whole-tumour masks, normalisation, split by volume."""

import json
import sys

import grain
import numpy as np
from PIL import Image
import pytest

from configs import brats as brats_config
from unet_jax import data, export, predict, serving, train
from unet_jax.data import brats
from unet_jax.errors import UserError

h5py = pytest.importorskip("h5py")


def _slice(path, volume, index):
  """A 16x16 slice: zero background, a brain square, three nested tumour regions."""
  image = np.zeros((16, 16, 4), np.float64)
  image[2:14, 2:14] = np.arange(4) * 100 + volume + np.linspace(1, 2, 12)[:, None, None]
  mask = np.zeros((16, 16, 3), np.uint8)
  if index % 2:
    mask[4:10, 4:10, 1] = 1  # the largest region
    mask[5:8, 5:8, 0] = 1
    mask[6:7, 6:7, 2] = 1
  with h5py.File(path, "w") as f:
    f["image"], f["mask"] = image, mask


def _brats(root, volumes=range(1, 11), slices=(0, 1)):
  folder = root / "BraTS2020_training_data" / "content" / "data"
  folder.mkdir(parents=True)
  for v in volumes:
    for s in slices:
      _slice(folder / f"volume_{v}_slice_{s}.h5", v, s)
  return root


def _config(root, **fields):
  config = brats_config.get_config().data
  config.root = str(root)
  config.image_size = 16
  for name, value in fields.items():
    config[name] = value
  return config


def test_whole_tumour_four_modalities_normalised(tmp_path):
  source = data.build_source(_config(_brats(tmp_path)), "train", "x")
  assert isinstance(source, grain.sources.RandomAccessDataSource)
  record = source[1]
  assert record["image"].shape == (16, 16, 4) and record["image"].dtype == np.float32
  assert record["mask"].shape == (16, 16, 1) and record["mask"].sum() == 36
  assert record["file_name"].endswith("_slice_1.h5") and record["file_name"] == source.file_names[1]
  image = record["image"]
  assert image.min() == 0 and image.max() == 1
  assert (image[:2] == 0).all()  # background stays 0
  assert source[0]["mask"].sum() == 0


def test_modalities_and_mask_channels_are_chosen(tmp_path):
  config = _config(_brats(tmp_path), modalities=(3, 1), channels=2, mask_channels=(0, 2))
  record = data.build_source(config, "train", "x")[1]
  assert record["image"].shape == (16, 16, 2) and record["mask"].sum() == 9
  config.channels = 4
  with pytest.raises(UserError, match=r"data.channels=4 but data.modalities=\(3, 1\) picks 2"):
    data.build_source(config, "train", "x")
  config.channels, config.modalities = 1, (5,)
  with pytest.raises(UserError, match=r"slice_\d\.h5: image of shape \(16, 16, 4\) does not fit"):
    data.build_source(config, "train", "x")
  with pytest.raises(UserError, match="distinct channel indices"):
    brats.BratsSource(tmp_path, "train", 16, modalities=(0, 0))


def test_split_is_by_volume(tmp_path):
  config = _config(_brats(tmp_path), val_fraction=0.2, test_fraction=0.2)
  sources = {s: data.build_source(config, s, "x") for s in ("train", "valid", "test")}
  volumes = {s: set(source.volumes) for s, source in sources.items()}
  assert [len(volumes[s]) for s in ("train", "valid", "test")] == [6, 2, 2]
  assert set.union(*volumes.values()) == {str(v) for v in range(1, 11)}
  for s, source in sources.items():
    assert len(source) == 2 * len(volumes[s])
    assert {name.split("volume_")[1].split("_")[0] for name in source.file_names} == volumes[s]
    assert source.groups == [name.split("volume_")[1].split("_")[0] for name in source.file_names]


def test_normalise_is_robust_min_max_over_brain_pixels():
  image = np.zeros((20, 20, 1))
  image[:10] = np.arange(200).reshape(10, 20, 1) + 100.0
  image[0, 0] = 1e6  # an outlier is clipped, not stretched
  out = brats.normalise(image, (1, 99))
  assert out.dtype == np.float32 and out.min() == 0 and out.max() == 1
  assert (out[10:] == 0).all() and 0.4 < out[5, 0, 0] < 0.6
  image[1, 1], image[2, 2] = np.nan, np.inf  # Corrupt voxels are background; the rest as before.
  corrupt = brats.normalise(image, (1, 99))
  assert corrupt[1, 1] == corrupt[2, 2] == 0
  np.testing.assert_allclose(corrupt[5:], out[5:], atol=0.02)


def _write(path, **datasets):
  with h5py.File(path, "w") as f:
    for name, value in datasets.items():
      f[name] = value


@pytest.mark.parametrize("datasets, problem", [
    ({"image": np.zeros((16, 16, 4))}, r"lacks its 'mask' dataset"),
    ({"mask": np.zeros((16, 16, 3))}, r"lacks its 'image' dataset"),
    ({"image": np.zeros((16, 16, 4)), "mask": np.zeros((3, 16, 16))},
     r"image of shape \(16, 16, 4\) and mask of shape \(3, 16, 16\) are not \(H, W, channels\)"),
    ({"image": np.zeros((4, 16, 16)), "mask": np.zeros((16, 16, 3))}, r"image .* are not \(H, W"),
    ({"image": np.zeros((4, 16, 16)), "mask": np.zeros((3, 16, 16))}, r"image .* are not \(H, W"),
    ({"image": np.zeros((16, 16, 4)), "mask": np.zeros((8, 8, 3))},
     r"image of 16x16 pixels but mask of 8x8; a slice's image and mask must be the same size"),
    ({"image": np.zeros((16, 16, 4)), "mask": np.zeros((16, 16))},
     r"mask of shape \(16, 16\) has no channels data.mask_channels=\(0, 1, 2\)"),
    ({"image": np.zeros((16, 16, 2)), "mask": np.zeros((16, 16, 3))},
     r"image of shape \(16, 16, 2\) does not fit data.modalities=\(0, 1, 2, 3\)"),
])
def test_bad_test_slice_stops_the_source_before_training(tmp_path, datasets, problem):
  root = _brats(tmp_path)
  config = _config(root, val_fraction=0.2, test_fraction=0.2)
  name = data.build_source(config, "test", "x").file_names[-1]
  _write(root / name, **datasets)
  data.build_source(config, "train", "x")  # Only the split's own slices are checked.
  with pytest.raises(UserError, match=rf"{name}: {problem}"):
    data.build_source(config, "test", "x")


def test_bad_files_name_the_file(tmp_path):
  root = _brats(tmp_path, volumes=[1])
  folder = root / "BraTS2020_training_data" / "content" / "data"
  (folder / "volume_1_slice_0.h5").write_bytes(b"not hdf5")
  with pytest.raises(UserError, match=r"volume_1_slice_0\.h5: not a readable HDF5 file"):
    brats.BratsSource(root, "train", 16, val_fraction=0, test_fraction=0)
  _slice(folder / "volume_1_slice_0.h5", 1, 0)
  source = brats.BratsSource(root, "train", 16, val_fraction=0, test_fraction=0)
  (folder / "volume_1_slice_1.h5").unlink()
  with pytest.raises(UserError, match=r"volume_1_slice_1\.h5: slice file not found"):
    source[1]
  (tmp_path / "copy").mkdir()
  (tmp_path / "copy" / "volume_1_slice_0.h5").write_bytes(b"")
  with pytest.raises(UserError, match="the same slice as"):
    brats.scan(tmp_path)
  with pytest.raises(UserError, match="no volume_<v>_slice_<s>.h5 files"):
    brats.scan(tmp_path / "copy" / "empty")


def test_a_new_scan_stored_channels_first_is_refused(tmp_path):
  # Predict and serving read a new scan without a mask to compare its shape with.
  _write(tmp_path / "scan.h5", image=np.zeros((4, 16, 16)))
  with pytest.raises(UserError, match=r"scan\.h5: image of shape \(4, 16, 16\) is not "
                     r"\(H, W, channels\).*store slices channels-last"):
    brats.read_image(tmp_path / "scan.h5", (0, 1, 2, 3))
  _write(tmp_path / "upright.h5", image=np.ones((16, 16, 4)))
  assert brats.read_image(tmp_path / "upright.h5", (0, 1, 2, 3)).shape == (16, 16, 4)


def test_hidden_files_are_not_slices(tmp_path):
  root = _brats(tmp_path / ".cache" / "kagglehub", volumes=[1, 2])  # A hidden root is fine.
  folder = root / "BraTS2020_training_data" / "content" / "data"
  (folder / "._volume_1_slice_0.h5").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
  (folder / ".ipynb_checkpoints").mkdir()
  _slice(folder / ".ipynb_checkpoints" / "volume_1_slice_0.h5", 1, 0)
  assert [name.rsplit("/", 1)[1] for _, name in brats.scan(root)] == [
      "volume_1_slice_0.h5", "volume_1_slice_1.h5", "volume_2_slice_0.h5", "volume_2_slice_1.h5"]
  source = data.build_source(_config(root, val_fraction=0, test_fraction=0), "train", "x")
  assert len(source) == 4 and source[3]["mask"].sum() == 36


def test_missing_h5py_says_how_to_install_it(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "h5py", None)
  with pytest.raises(UserError, match=r"pip install -e '\.\[brats\]'"):
    brats.BratsSource(tmp_path, "train", 16)


def test_a_brats_run_predicts_and_exports_from_h5_slices(tmp_path, caplog):
  """New slices (an image, no mask) are prepared exactly as training read its own."""
  root = _brats(tmp_path / "data")
  config = brats_config.get_config()
  config.data = _config(root)
  config.model.features, config.model.depth = 4, 2
  config.train.epochs, config.train.batch_size = 1, 8
  config.eval.batch_size, config.eval.num_pictures = 4, 1
  workdir = str(tmp_path / "run")
  summary = train.train_and_evaluate(config, workdir)
  # Scored per volume too, each one 3-D mask.
  assert summary["by_patient"]["n"] == len(data.build_source(config.data, "test", workdir).volumes)
  scans = tmp_path / "scans"
  scans.mkdir()
  with h5py.File(scans / "new_scan.h5", "w") as f:  # A slice of the data's shape, unlabelled.
    f["image"] = h5py.File(root / data.build_source(config.data, "test", workdir).file_names[0],
                           "r")["image"][()]
  Image.fromarray(np.zeros((16, 16), np.uint8)).save(scans / "photo.png")  # Not an input.
  rows = predict.predict(config, workdir, str(scans), str(tmp_path / "out"))
  assert [(r["file"], r["error"]) for r in rows] == [("new_scan.h5", "")]
  assert np.asarray(Image.open(tmp_path / "out" / "new_scan_mask.png")).shape == (16, 16)
  source = data.build_source(config.data, "test", workdir)
  _, model_input = predict._read_input(scans / "new_scan.h5", config.data)
  np.testing.assert_array_equal(model_input, source[0]["image"])
  export.export(config, workdir, str(tmp_path / "export"))
  meta = json.loads((tmp_path / "export" / "model.json").read_text())
  assert meta["input"]["scale"].startswith("an h5 slice's 'image' channels (0, 1, 2, 3)")
  model = serving.load(tmp_path / "export")
  predicted = np.asarray(Image.open(tmp_path / "out" / "new_scan_mask.png")) > 0
  assert 0 < predicted.sum() < predicted.size
  np.testing.assert_array_equal(model.predict_file(scans / "new_scan.h5"), predicted)
  with pytest.raises(UserError, match=r"photo\.png: not a readable HDF5 file"):
    model.predict_file(scans / "photo.png")
  # NaN voxels are background, with a warning naming the slice.
  with h5py.File(scans / "new_scan.h5", "r+") as f:
    image = f["image"][()]
    image[:2, :3] = np.nan
    f["image"][...] = image
  predict._read_input(scans / "new_scan.h5", config.data)
  assert f"{scans / 'new_scan.h5'}: 24 NaN or infinite voxels, read as background" in caplog.text
