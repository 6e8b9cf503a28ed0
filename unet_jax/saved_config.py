"""A config file that loads a run's own saved config: `saved_config.py:WORKDIR`.

launch.py uses it as the default `--config` of the eval and predict modes,
so `--config.*` overrides still apply to the run's config.
"""

import json
import pathlib

import ml_collections

CONFIG_FILE = "config.json"


def get_config(workdir: str) -> ml_collections.ConfigDict:
  path = pathlib.Path(workdir) / CONFIG_FILE
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except FileNotFoundError:
    raise SystemExit(f"error: {path}: no saved config; is {workdir} a trained run "
                     "(or pass --config)?") from None
  except json.JSONDecodeError as e:
    raise SystemExit(f"error: {path}: malformed JSON ({e})") from None
