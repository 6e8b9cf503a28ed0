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
  config = default.get_config()
  config.data.image_size = 256
  config.data.channels = 1
  config.model.features = 32
  config.model.depth = 4
  config.train.epochs = 30
  config.train.batch_size = 16
  config.eval.split = "test"

  if arg == "demo":
    config.data.synthetic.enabled = True
    config.data.image_size = 64
    config.model.features = 16
    config.model.depth = 3
    config.train.epochs = 12
    config.train.batch_size = 16
    config.train.learning_rate = 3e-3
  elif arg:
    raise ValueError(f"configs/brain.py: unknown variant {arg!r}; use 'demo' or nothing.")
  return config
