"""grain pipelines: seeded epochs, exact resume, complete eval batches, augmentation, cache."""

import itertools
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from unet_jax.data import augment, cache, pipeline
from unet_jax.errors import UserError


class FakeSource:
  """`size` (10) 8x8 images whose pixels hold their index; a square tumour in each."""

  def __init__(self, size=10):
    self.reads, self.size = 0, size

  def __len__(self):
    return self.size

  def __getitem__(self, index):
    self.reads += 1
    mask = np.zeros((8, 8, 1), np.uint8)
    mask[2:6, 2:6] = 1
    return {"image": np.full((8, 8, 1), index / 10, np.float32), "mask": mask,
            "file_name": f"img{index}.png"}

  @property
  def file_names(self):
    return [f"img{i}.png" for i in range(self.size)]

  fingerprint = "fake source v1"


def _names(batches, count):
  return [list(b["file_name"]) for b in itertools.islice(batches, count)]


def test_epochs_are_seeded_permutations(tiny_config):
  tiny_config.train.batch_size = 4
  tiny_config.train.epochs = 3
  tiny_config.augment.enabled = False
  names = _names(pipeline.train_batches(FakeSource(), tiny_config), 6)
  assert all(len(b) == 4 for b in names)
  epochs = [sum(names[i:i + 2], []) for i in (0, 2, 4)]  # 2 full batches of 4 per epoch
  assert all(len(set(e)) == 8 for e in epochs)
  assert epochs[0] != epochs[1]
  assert names == _names(pipeline.train_batches(FakeSource(), tiny_config), 6)
  tiny_config.train.seed = 1
  assert names != _names(pipeline.train_batches(FakeSource(), tiny_config), 6)


def test_processes_split_each_epoch_s_whole_global_batches(tiny_config, monkeypatch):
  # Eleven images, global batch 4, two processes of 2 images a batch: 2 batches an epoch
  # each (not 3 and 2), the epochs' 8 images apart; the 3 left over in neither.
  tiny_config.train.batch_size, tiny_config.train.epochs = 4, 2
  tiny_config.augment.enabled = False
  monkeypatch.setattr(pipeline.jax, "process_count", lambda: 2)
  shares = []
  for process in (0, 1):
    monkeypatch.setattr(pipeline.jax, "process_index", lambda process=process: process)
    shares.append(_names(pipeline.train_batches(FakeSource(11), tiny_config), 10))
  assert [len(share) for share in shares] == [4, 4]
  for epoch in (0, 1):
    images = [name for share in shares for batch in share[2 * epoch:2 * epoch + 2]
              for name in batch]
    assert len(images) == len(set(images)) == 8


def test_resume_continues_the_same_batches(tiny_config):
  tiny_config.train.batch_size = 4
  tiny_config.train.epochs = 3
  full = list(pipeline.train_batches(FakeSource(), tiny_config))
  resumed = list(pipeline.train_batches(FakeSource(), tiny_config, start_step=3))
  assert len(full) == 6 and len(resumed) == 3
  for a, b in zip(full[3:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])  # augmentation included
    assert list(a["file_name"]) == list(b["file_name"])


def test_eval_batches_cover_every_image_once(tiny_config):
  batches = list(pipeline.eval_batches(FakeSource(), tiny_config, batch_size=4))
  assert len(batches) == 3 and all(len(b["index"]) == 4 for b in batches)
  valid = np.concatenate([b["valid"] for b in batches])
  index = np.concatenate([b["index"] for b in batches])
  assert sorted(index[valid].tolist()) == list(range(10))
  assert valid.sum() == 10


def _only(config, **probs):
  """Turns every transform off except those given, with their probabilities."""
  for name in augment.PROBABILITIES:
    config[name] = probs.get(name, 0.0)
  return config


def _square_sample(size=32):
  mask = np.zeros((size, size, 1), np.uint8)
  mask[8:20, 10:24] = 1
  return {"image": mask.astype(np.float32), "mask": mask, "file_name": "x"}


@pytest.mark.parametrize("transform", ["rotate_prob", "shift_prob", "zoom_prob"])
def test_geometric_transforms_move_image_and_mask_together(tiny_config, transform):
  config = _only(tiny_config.augment, **{transform: 1.0})
  config.rotate_degrees, config.shift_fraction, config.zoom = 20.0, 0.1, 0.2
  sample = _square_sample()
  moved = [augment.augment(sample, np.random.default_rng(s), config) for s in range(5)]
  for out in moved:
    assert set(np.unique(out["mask"])) <= {0, 1} and out["mask"].dtype == np.uint8
    image_mask = out["image"][..., 0] > 0.5
    overlap = (image_mask & (out["mask"][..., 0] > 0)).sum() / image_mask.sum()
    assert overlap > 0.9
  assert any(not np.array_equal(out["mask"], sample["mask"]) for out in moved)
  again = augment.augment(sample, np.random.default_rng(0), config)
  np.testing.assert_array_equal(again["image"], moved[0]["image"])


def test_zoom_scales_about_the_centre_and_is_off_by_default(tiny_config):
  assert tiny_config.augment.zoom_prob == 0
  config = _only(tiny_config.augment, zoom_prob=1.0)
  config.zoom = 0.3
  mask = np.zeros((64, 64, 1), np.uint8)
  mask[24:40, 20:44] = 1  # 16 x 24, centred
  sample = {"image": mask.astype(np.float32), "mask": mask, "file_name": "x"}
  factors = []
  for seed in range(6):
    out = augment.augment(sample, np.random.default_rng(seed), config)["mask"][..., 0]
    rows, cols = np.nonzero(out)
    height, width = rows.max() + 1 - rows.min(), cols.max() + 1 - cols.min()
    assert abs(height / 16 - width / 24) < 0.1  # one factor for both axes
    assert abs((rows.max() + 1 + rows.min()) / 2 - 32) <= 1  # about the centre
    assert abs((cols.max() + 1 + cols.min()) / 2 - 32) <= 1
    factors.append(width / 24)
  assert 0.7 - 0.05 <= min(factors) < 0.95 and 1.3 + 0.05 >= max(factors) > 1.05


def test_flips_are_exact_and_off_by_default(tiny_config):
  assert tiny_config.augment.hflip_prob == 0 and tiny_config.augment.vflip_prob == 0
  sample = _square_sample()
  out = augment.augment(sample, np.random.default_rng(0), _only(tiny_config.augment,
                                                                hflip_prob=1.0))
  np.testing.assert_array_equal(out["mask"], sample["mask"][:, ::-1])
  out = augment.augment(sample, np.random.default_rng(0), _only(tiny_config.augment,
                                                                vflip_prob=1.0))
  np.testing.assert_array_equal(out["image"], sample["image"][::-1])


def test_disabled_transforms_leave_the_sample_alone(tiny_config):
  sample = _square_sample()
  out = augment.augment(sample, np.random.default_rng(0), _only(tiny_config.augment))
  np.testing.assert_array_equal(out["image"], sample["image"])
  np.testing.assert_array_equal(out["mask"], sample["mask"])


def test_turning_one_transform_off_keeps_the_others_draws(tiny_config):
  sample = _square_sample()
  config = _only(tiny_config.augment, rotate_prob=1.0, brightness_prob=1.0)
  with_brightness = augment.augment(sample, np.random.default_rng(7), config)
  config.brightness_prob = 0.0
  without = augment.augment(sample, np.random.default_rng(7), config)
  np.testing.assert_array_equal(with_brightness["mask"], without["mask"])
  assert not np.array_equal(with_brightness["image"], without["image"])


def test_intensity_jitter_stays_in_range(tiny_config):
  config = _only(tiny_config.augment, brightness_prob=1.0, contrast_prob=1.0)
  config.brightness, config.contrast = 0.5, 0.5
  sample = FakeSource()[9]
  out = augment.augment(sample, np.random.default_rng(3), config)
  assert out["image"].min() >= 0 and out["image"].max() <= 1
  assert not np.array_equal(out["image"], sample["image"])
  np.testing.assert_array_equal(out["mask"], sample["mask"])


def test_gamma_bends_intensities_and_keeps_black_white_and_order(tiny_config):
  assert tiny_config.augment.gamma_prob == 0
  config = _only(tiny_config.augment, gamma_prob=1.0)
  config.gamma = 0.5
  ramp = np.linspace(0, 1, 32, dtype=np.float32)[None, :, None].repeat(32, axis=0)
  sample = {"image": ramp, "mask": _square_sample()["mask"], "file_name": "x"}
  powers = set()
  for seed in range(4):
    out = augment.augment(sample, np.random.default_rng(seed), config)
    row = out["image"][0, :, 0]
    assert row[0] == 0 and row[-1] == pytest.approx(1) and np.all(np.diff(row) > 0)
    np.testing.assert_array_equal(out["mask"], sample["mask"])
    power = np.log(row[16]) / np.log(ramp[0, 16, 0])  # image ** g, read back.
    np.testing.assert_allclose(row[1:-1], ramp[0, 1:-1, 0]**power, rtol=1e-4)
    assert 0.5 <= power <= 1.5
    powers.add(round(float(power), 3))
  assert len(powers) == 4


def test_noise_is_zero_mean_and_at_most_its_strength(tiny_config):
  assert tiny_config.augment.noise_prob == 0
  config = _only(tiny_config.augment, noise_prob=1.0)
  config.noise = 0.1
  grey = np.full((64, 64, 1), 0.5, np.float32)
  sample = {"image": grey, "mask": np.zeros((64, 64, 1), np.uint8), "file_name": "x"}
  stds = []
  for seed in range(6):
    out = augment.augment(sample, np.random.default_rng(seed), config)
    change = out["image"] - grey
    assert abs(change.mean()) < 0.01 and out["mask"].sum() == 0
    stds.append(change.std())
  assert max(stds) < 0.1 * 1.1 and min(stds) < max(stds) / 1.5  # Strength drawn per sample.


@pytest.mark.parametrize("field, value, message", [
    ("gamma", 1.0, "augment.gamma=1.0 is not in [0, 1)"),
    ("zoom", -0.1, "augment.zoom=-0.1 is not in [0, 1)"),
    ("contrast", 1.2, "augment.contrast=1.2 is not in [0, 1)"),
    ("noise_prob", 1.5, "augment.noise_prob=1.5 is not a probability"),
    ("noise", -0.05, "augment.noise=-0.05 is not in [0, 1]"),
    ("rotate_degrees", float("nan"), "augment.rotate_degrees=nan is not in [0, 180]"),
    ("shift_fraction", 4.0, "augment.shift_fraction=4.0 is not in [0, 0.5]"),  # 4% is 0.04.
    ("zoom", float("nan"), "augment.zoom=nan is not in [0, 1)"),
])
def test_bad_augment_settings_are_one_line_errors(tiny_config, field, value, message):
  tiny_config.augment[field] = value
  with pytest.raises(UserError, match=re.escape(message)):
    pipeline.train_batches(FakeSource(), tiny_config)
  tiny_config.augment.enabled = False  # Not read when augmentation is off.
  pipeline.train_batches(FakeSource(), tiny_config)


def test_worker_processes_give_the_same_batches(tiny_config):
  tiny_config.train.batch_size = 4
  tiny_config.train.epochs = 1
  in_process = list(pipeline.train_batches(FakeSource(), tiny_config))
  tiny_config.data.num_workers = 1
  with_worker = list(pipeline.train_batches(FakeSource(), tiny_config))
  assert len(in_process) == len(with_worker) == 2
  for a, b in zip(in_process, with_worker):
    np.testing.assert_array_equal(a["image"], b["image"])
    assert list(a["file_name"]) == list(b["file_name"])


class BrokenSource(FakeSource):

  def __getitem__(self, index):
    raise UserError(f"img{index}.png: not a readable image")


@pytest.mark.parametrize("field", ["prefetch", "num_workers"])
def test_negative_loader_settings_are_one_line_errors(tiny_config, field):
  tiny_config.data[field] = -1
  with pytest.raises(UserError, match=rf"^data\.{field}=-1: use 0 or more$"):
    next(pipeline.eval_batches(FakeSource(), tiny_config, batch_size=4))


def test_bad_file_in_a_worker_is_still_a_user_error(tiny_config):
  tiny_config.train.batch_size = 4
  tiny_config.data.num_workers = 1
  with pytest.raises(UserError, match="not a readable image"):
    next(pipeline.train_batches(BrokenSource(), tiny_config))


def test_cache_serves_samples_from_disk(tmp_path):
  source = FakeSource()
  cached = cache.CachedSource(source, tmp_path / "cache")
  first = [cached[i] for i in range(10)]
  assert source.reads == 10 and len(list(cached.folder.glob("*.npy"))) == 10
  again = cache.CachedSource(source, tmp_path / "cache")
  for i, record in enumerate(first):
    hit = again[i]
    np.testing.assert_array_equal(hit["image"], record["image"])
    np.testing.assert_array_equal(hit["mask"], record["mask"])
    assert hit["mask"].dtype == np.uint8 and hit["file_name"] == f"img{i}.png"
  assert source.reads == 10 and again.file_names == source.file_names
  (cached.folder / "0000003.npy").write_bytes(b"truncated")
  np.testing.assert_array_equal(again[3]["image"], first[3]["image"])
  assert source.reads == 11


def test_cache_folder_follows_the_source(tmp_path):
  first = cache.CachedSource(FakeSource(), tmp_path)
  other = FakeSource()
  other.fingerprint = "fake source, other size"
  assert cache.CachedSource(other, tmp_path).folder != first.folder


def test_input_pipeline_benchmark_memory_mode_runs(run_env):
  """`benchmarks/input_pipeline.py --synthetic=...`, as the README gives it, at a tiny size."""
  repo = pathlib.Path(__file__).resolve().parents[1]
  result = subprocess.run(
      [sys.executable, "benchmarks/input_pipeline.py", "--synthetic=8,16", "--synthetic_size=32",
       "--batch_size=4", "--num_workers=0"], cwd=repo, env=run_env(devices=1),
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  record = json.loads(result.stdout.strip().splitlines()[-1])
  assert [run["images"] for run in record["runs"]] == [8, 16]


@pytest.mark.parametrize("flags, says", [
    (["--synthetic=8,x"], "phantom counts are whole numbers"),
    (["--synthetic=8", "--batch_size=0"], "--batch_size=0"),
    # The run of 2 phantoms fails, in its own process: its error comes through.
    (["--synthetic=2", "--batch_size=4", "--split=valid"], "fewer than one batch of 4"),
])
def test_input_pipeline_benchmark_errors_are_one_line(run_env, flags, says):
  repo = pathlib.Path(__file__).resolve().parents[1]
  result = subprocess.run(
      [sys.executable, "benchmarks/input_pipeline.py", "--synthetic_size=32", "--num_workers=0",
       *flags], cwd=repo, env=run_env(devices=1), capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
  assert says in result.stderr


_STOPPED_WITH_WORKERS = """
import multiprocessing, os, sys
from configs import brain
from unet_jax import data
from unet_jax.data import pipeline

if __name__ == "__main__":
  config = brain.get_config("smoke")
  config.data.num_workers = 2
  batches = pipeline.train_batches(data.build_source(config.data, "train", sys.argv[1]), config)
  next(batches)
  print(*(worker.pid for worker in multiprocessing.active_children()), flush=True)
  os._exit(130)  # As launch.py exits on Ctrl-C: at once, nothing cleaned up.
"""


def test_loader_workers_end_with_the_run_they_load_for(tmp_path, run_env):
  repo = pathlib.Path(__file__).resolve().parents[1]
  script = tmp_path / "stopped.py"  # A script, as launch.py: its workers are spawned.
  script.write_text(_STOPPED_WITH_WORKERS)
  result = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=repo,
                          env={**run_env(devices=1), "PYTHONPATH": str(repo)},
                          capture_output=True, text=True, timeout=120)  # Workers left: hangs.
  workers = [int(pid) for pid in result.stdout.split()]
  assert result.returncode == 130 and len(workers) == 2, result.stderr[-2000:]
  for _ in range(50):  # Each checks on its parent every second.
    alive = [pid for pid in workers if pathlib.Path(f"/proc/{pid}").exists()]
    if not alive:
      break
    time.sleep(0.1)
  for pid in alive:  # Not left running, whatever the test finds.
    os.kill(pid, signal.SIGKILL)
  assert not alive
