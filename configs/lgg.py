"""Lower-grade glioma FLAIR segmentation on the Kaggle LGG MRI set (mateuszbuda).

The set is one folder per patient (110 patients, 3,929 slices of 256x256,
3 channels: pre-contrast, FLAIR, post-contrast), each slice `<case>_<n>.tif`
beside its mask `<case>_<n>_mask.tif`. Patients are split 80/10/10 into
train, valid and test (seeded by data.split_seed), never one on two sides:

    python launch.py --config=configs/lgg.py --workdir=runs/lgg \
        --config.data.root=/path/to/lgg-mri-segmentation/kaggle_3m
    python launch.py --mode=describe --config=configs/lgg.py --workdir=runs/lgg_data \
        --config.data.root=/path/to/lgg-mri-segmentation/kaggle_3m

About two thirds of the slices have no tumour; per-image Dice scores those
as 1 when the model predicts nothing, so read the summary's Dice together with
its pooled Dice, its `with_tumour` Dice (the tumour slices alone), its
`without_tumour` false alarms and its `by_patient` Dice (each patient's slices
one 3-D mask). Not yet measured with this code: published U-Nets
on this set report a mean Dice of about 0.8 on tumour slices.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the LGG recipe; `arg="smoke"` shrinks it to a quick check of a dataset."""
  config = default.get_config()
  config.data.format = "lgg"
  config.data.image_size = 256
  config.data.channels = 3

  if arg == "smoke":
    config.data.image_size = 64
    config.model.features = 8
    config.model.depth = 3
    config.train.epochs = 1
  elif arg:
    raise ValueError(f"configs/lgg.py: unknown variant {arg!r}; use 'smoke' or nothing.")
  return config
