"""Brain-tumour MRI segmentation on the Kaggle/Roboflow COCO export.

Real data (train/ valid/ test/, each with _annotations.coco.json):

    python launch.py --config=configs/brain.py --workdir=runs/brain \
        --config.data.root=/path/to/brain-tumor-coco

Demo on generated phantoms, minutes on a 2-core CPU; reaches a mean test
Dice of about 0.9 on the phantoms:

    python launch.py --config=configs/brain.py:demo --workdir=runs/demo
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the brain recipe; `arg="demo"` gives the CPU-minutes variant."""
  # The real-data recipe is configs/default.py as it stands.
  config = default.get_config()
  if arg == "demo":
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
    raise ValueError(f"configs/brain.py: unknown variant {arg!r}; use demo, smoke or nothing.")
  return config
