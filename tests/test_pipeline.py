"""grain pipelines: seeded epochs, exact resume, complete eval batches, augmentation."""

import itertools

import numpy as np

from unet_jax.data import augment, pipeline


class FakeSource:
  """Ten 8x8 images whose pixels hold their index; a square tumour in each."""

  def __len__(self):
    return 10

  def __getitem__(self, index):
    mask = np.zeros((8, 8, 1), np.uint8)
    mask[2:6, 2:6] = 1
    return {"image": np.full((8, 8, 1), index / 10, np.float32), "mask": mask,
            "file_name": f"img{index}.png"}


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


def test_augmentation_moves_image_and_mask_together(tiny_config):
  config = tiny_config.augment
  config.geometric_prob, config.intensity_prob = 1.0, 0.0
  config.rotate_degrees, config.shift_fraction = 5.0, 0.1
  mask = np.zeros((32, 32, 1), np.uint8)
  mask[8:20, 10:24] = 1
  sample = {"image": mask.astype(np.float32), "mask": mask, "file_name": "x"}
  moved = [augment.augment(sample, np.random.default_rng(s), config) for s in range(5)]
  for out in moved:
    assert set(np.unique(out["mask"])) <= {0, 1} and out["mask"].dtype == np.uint8
    image_mask = out["image"][..., 0] > 0.5
    overlap = (image_mask & (out["mask"][..., 0] > 0)).sum() / image_mask.sum()
    assert overlap > 0.9
  assert any(not np.array_equal(out["mask"], mask) for out in moved)
  again = augment.augment(sample, np.random.default_rng(0), config)
  np.testing.assert_array_equal(again["image"], moved[0]["image"])


def test_intensity_jitter_stays_in_range(tiny_config):
  config = tiny_config.augment
  config.geometric_prob, config.intensity_prob = 0.0, 1.0
  sample = FakeSource()[9]
  out = augment.augment(sample, np.random.default_rng(3), config)
  assert out["image"].min() >= 0 and out["image"].max() <= 1
  np.testing.assert_array_equal(out["mask"], sample["mask"])
