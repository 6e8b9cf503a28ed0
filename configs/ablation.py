"""Ablation over the U-Net's flags: one training run per variant, then a table.

    python launch.py --config=configs/ablation.py --workdir=runs/ablation

trains every variant of `sweep` with the `base` recipe (the demo on
generated phantoms by default: the phantoms are generated once, in
runs/ablation/phantoms, and every variant trains on them with the same seed
and budget) into runs/ablation/<variant>/, then writes
runs/ablation/ablation.md and ablation.csv, best validation Dice first. The
13 default variants take about 3 minutes each on an idle 2-core CPU (66
minutes in all on a busy one). Running the command again skips finished
variants, so an interrupted sweep resumes; it may not change the variants'
overrides, eval.* included, beyond their length, patience, logging,
checkpointing, data.root and loader settings. A variant that fails (a NaN loss, a config the
data refuses) is a "failed" row, the others still run, and the command then
exits non-zero. On the demo (one seed, so gaps under about 0.03 are noise)
the batch-norm variants reach a validation Dice of 0.81-0.85; group norm
0.73, layer norm 0.71, no norm 0.52.

On real data, with the full recipe:

    python launch.py --config=configs/ablation.py --workdir=runs/ablation_brain \
        --config.base=configs/brain.py --config.overrides.data.root=DATA

`--config.overrides.<field>=VALUE` sets any field of configs/default.py in
every variant (a misspelt field is an error). A variant is a set of
`config.model` fields; `--config.sweep.<variant>.<field>=VALUE` changes one
the variant sets, and `--config.sweep="{'a': {}, 'b': {'pooling': 'avg'}}"`
replaces the sweep (the way to give a variant another field).

The smoke variant (two variants, tiny phantoms and budget) finishes in a
minute or two:

    python launch.py --config=configs/ablation.py:smoke --workdir=/tmp/ablation_smoke
"""

import ml_collections
from ml_collections import config_dict

from configs import default


def _placeholders(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The fields of `config`, typed, all None (None leaves are not applied)."""
  out = ml_collections.ConfigDict()
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      out[key] = _placeholders(value)
    else:
      out[key] = config_dict.placeholder(object if value is None else config.get_type(key))
  return out


def _pooling_by_activation() -> dict[str, dict[str, str]]:
  return {f"{pooling}_{activation}": {"pooling": pooling, "activation": activation}
          for pooling in ("max", "avg", "conv", "dilated_conv")
          for activation in ("relu", "gelu")}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the default sweep; `arg="smoke"` gives two variants at a tiny budget."""
  config = ml_collections.ConfigDict()
  # Config file of every variant, path.py or path.py:arg (loaded like --config).
  config.base = "configs/brain.py:demo"
  # Fields of configs/default.py set in every variant (None: the base's value).
  config.overrides = _placeholders(default.get_config())
  # Variant name -> config.model fields it changes; the base is max_relu. One
  # factor at a time around it, except pooling x activation. A single dilation
  # rate, so the sweep works with a base of any depth.
  config.sweep = ml_collections.ConfigDict({
      **_pooling_by_activation(),
      "dilation_2": {"dilation": 2},
      "norm_group": {"norm": "group"},
      "norm_layer": {"norm": "layer"},
      "norm_none": {"norm": "none"},
      "bilinear": {"upsampling": "bilinear"},
  })

  if arg == "smoke":
    tiny = config.overrides
    tiny.data.image_size = 32
    tiny.data.prefetch = 1
    tiny.data.synthetic.image_size = 32
    tiny.data.synthetic.num_train = 16
    tiny.data.synthetic.num_valid = 8
    tiny.data.synthetic.num_test = 8
    tiny.model.features = 4
    tiny.model.depth = 2
    tiny.train.epochs = 2
    tiny.train.batch_size = 8
    tiny.train.log_every_steps = 1
    tiny.eval.batch_size = 8
    tiny.eval.num_pictures = 2
    config.sweep = ml_collections.ConfigDict({
        "max_relu": {},
        "avg_gelu": {"pooling": "avg", "activation": "gelu"},
    })
  elif arg:
    raise ValueError(f"configs/ablation.py: unknown variant {arg!r}; use 'smoke' or nothing.")
  return config
