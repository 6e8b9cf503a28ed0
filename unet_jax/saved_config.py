"""A config file that loads a run's own saved config: `saved_config.py:WORKDIR`.

launch.py uses it as the default `--config` of the modes that work on a
trained run, so `--config.*` overrides still apply. The saved values are laid
over today's defaults, so a run saved before a field existed still loads.
"""

import json
import pathlib

import ml_collections

from configs import default
from unet_jax.errors import UserError

CONFIG_FILE = "config.json"


def _overlay(base: ml_collections.ConfigDict, saved: dict) -> None:
  for key, value in saved.items():
    if isinstance(value, dict) and isinstance(base.get(key), ml_collections.ConfigDict):
      _overlay(base[key], value)
    else:
      base[key] = tuple(value) if isinstance(value, list) else value


def load(workdir: str) -> ml_collections.ConfigDict:
  """The config saved in `workdir`, laid over today's defaults.

  Raises:
    UserError: no saved config there, or a malformed one.
  """
  path = pathlib.Path(workdir) / CONFIG_FILE
  try:
    saved = json.loads(path.read_text())
  except FileNotFoundError:
    raise UserError(f"{path}: no saved config; {workdir} is not a trained run") from None
  except json.JSONDecodeError as e:
    raise UserError(f"{path}: malformed JSON ({e})") from None
  config = default.get_config()
  _overlay(config, saved)
  return config


def get_config(workdir: str) -> ml_collections.ConfigDict:
  # Read while the flags are parsed, before launch.py reports UserErrors: exit with the line.
  try:
    return load(workdir)
  except UserError as e:
    raise SystemExit(f"error: {e} (or pass --config)") from None
