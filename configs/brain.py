"""Brain-tumour MRI segmentation on the Kaggle/Roboflow COCO export.

The default is the CPU recipe (train/ valid/ [test/], each with
_annotations.coco.json):

    python launch.py --config=configs/brain.py --workdir=runs/brain \
        --config.data.root=/path/to/brain-tumor-coco --config.eval.split=valid

On a 2-core Intel Xeon with AMX, 50 epochs: 55 min 32 s for training and evaluation
(about 9 of them sharing the cores with the test suite); valid (429 slices)
mean per-image Dice 0.787, IoU 0.685, pooled Dice 0.795, HD95 6.1 px at
128x128; by category, "0" 0.725 and "1" 0.847 (README, Results; every run
behind each choice in docs/brain_ablations.md). The time depends on the CPU:
on a 2-core AMD EPYC Zen 4 (AVX-512) 43 min 20 s, valid Dice 0.785 (pooled
0.793); on a third-generation one (Zen 3, AVX2 only) 50 epochs would take
about 1 h 15 min, so the recipe's time budget (`train.time_budget_minutes`,
58) planned 33 on the first epoch: 46 min 1 s, valid Dice 0.778, pooled 0.790;
a first-generation one runs the train step 3.2x slower than the Xeon, about
1 h 50 min for the 50 epochs, and the budget would cut them to about 24
(`--config.train.time_budget_minutes=0` trains all 50). On a CPU with AMX,
`--config.model.dtype=bfloat16` trains it in about half the time: valid Dice
0.780 in 23 min 40 s on a 2-core Xeon (seed 1: 0.775; the two averaged with
`eval.ensemble`: 0.789); on the Zen 4, 29 min 13 s and valid Dice 0.787
(seeds 1-4: 0.780, 0.784, 0.777, 0.780; two averaged, 51 min for both
trained side by side, one per core: 0.786-0.7998, mean 0.792).
Only an ensemble passed 0.80: eight 50-epoch runs (three of them width 32)
averaged with `--mode=eval --config.eval.ensemble=RUN2,...` reach 0.805
(pooled 0.811), from about 6 hours of training.

`:full` is the accelerator recipe: 512x512, width 64, bfloat16, 100 epochs
(24 epochs on one H200: valid Dice 0.703, under-trained; README, Results).

Demo on generated phantoms, minutes on a 2-core CPU; reaches a mean test
Dice of about 0.9 on the phantoms:

    python launch.py --config=configs/brain.py:demo --workdir=runs/demo
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the brain recipe; `arg` picks a variant: full, demo or smoke."""
  config = default.get_config()
  if arg in (None, "", "full"):
    _brain_recipe(config)
  if arg == "full":
    config.data.image_size = 512
    config.data.num_workers = 8
    config.model.features = 64
    config.model.dtype = "bfloat16"
    config.train.epochs = 100
    config.train.time_budget_minutes = 0.0
    config.train.batch_size = config.eval.batch_size = 32
  elif arg == "demo":
    config.data.synthetic.enabled = True
    config.data.image_size = 64
    config.model.features = 16
    config.model.depth = 3
    config.train.epochs = 12
    config.train.learning_rate = 3e-3
  elif arg == "smoke":  # Seconds: a tiny U-Net on 32x32 phantoms, for tests and CI.
    config.data.synthetic.enabled = True
    config.data.image_size = config.data.synthetic.image_size = 32
    config.data.synthetic.num_train = 16
    config.data.synthetic.num_valid = config.data.synthetic.num_test = 8
    config.model.features, config.model.depth = 4, 2
    config.train.epochs, config.train.batch_size = 2, 8
    config.train.log_every_steps = 1
    config.eval.batch_size, config.eval.num_pictures = 8, 2
    config.data.prefetch = 1
  elif arg:
    raise ValueError(f"configs/brain.py: unknown variant {arg!r}; use full, demo, smoke or "
                     "nothing.")
  return config


def _brain_recipe(config: ml_collections.ConfigDict) -> None:
  """The choices measured on the export's valid split (README, Results)."""
  config.data.image_size = 128
  # The export's two tumour categories: one mask for training, scored apart too.
  config.data.category_ids = (1, 2)
  config.model.features = 16
  # No flips, in training or at evaluation: the export's category "0" lies left of centre in
  # 70% of the slices, and flips would teach the model that both sides are alike.
  config.augment.hflip_prob = 0.0
  config.eval.tta = False
  config.train.epochs = 50
  # On a CPU too slow for 50 epochs in the hour, as many as fit (timed on the first epoch):
  # the 2 minutes left are for the process's start and drift beyond the plan's margin.
  config.train.time_budget_minutes = 58.0
  # Validation and evaluation use the parameters' EMA; under the default warm-up its decay
  # is (1 + t) / (10 + t) throughout (0.998 at the last step), 0.999 never reached.
  config.train.ema_decay = 0.999
  # Per image, the mask of highest expected Dice: no threshold to tune on valid.
  config.eval.decode = "expected_dice"
  # Every image of this export holds one tumour.
  config.eval.largest_component = True
  config.eval.never_empty = True
