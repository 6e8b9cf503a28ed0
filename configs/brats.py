"""Whole-tumour segmentation on BraTS2020 training slices stored as h5 (Kaggle, awsaf49).

Each `volume_<v>_slice_<s>.h5` holds "image" (240, 240, 4: the four MRI
modalities) and "mask" (240, 240, 3: the tumour regions). The input is all four
modalities, each slice scaled to [0, 1] per channel (robust min-max over brain
pixels); the target is the whole tumour (the union of the three regions).
Volumes are split 80/10/10 into train, valid and test (seeded by
data.split_seed). Needs the optional extra: pip install -e '.[brats]'.

    python launch.py --config=configs/brats.py --workdir=runs/brats \
        --config.data.root=/path/to/BraTS2020_training_data/content/data
    # two modalities only; data.channels must match:
    python launch.py --config=configs/brats.py --workdir=runs/brats_2 \
        --config.data.root=... --config.data.modalities='(0,3)' --config.data.channels=2

Many slices near the top and bottom of each volume hold no brain or no tumour;
per-image Dice scores an empty slice predicted empty as 1, so read the
summary's Dice together with its pooled Dice, its `with_tumour` Dice (the
tumour slices alone) and its `by_patient` Dice (each volume's slices one 3-D
mask, at data.image_size). Not yet measured with this code:
2D U-Nets on BraTS whole tumour typically reach a Dice of about 0.85-0.9.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the BraTS recipe; `arg="smoke"` shrinks it to a quick check of a dataset."""
  config = default.get_config()
  config.data.format = "brats"
  config.data.image_size = 240
  config.data.channels = 4
  config.train.epochs = 20
  config.train.batch_size = 32

  if arg == "smoke":
    config.data.image_size = 64
    config.model.features = 8
    config.model.depth = 3
    config.train.epochs = 1
  elif arg:
    raise ValueError(f"configs/brats.py: unknown variant {arg!r}; use 'smoke' or nothing.")
  return config
