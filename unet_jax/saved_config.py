"""A config file that loads a run's own saved config: `saved_config.py:WORKDIR`.

launch.py uses it as the default `--config` of the modes that work on a
trained run, so `--config.*` overrides still apply. The saved values are laid
over today's defaults, so a run saved before a field existed still loads.
"""

import json
import pathlib
from typing import Any, Callable

import ml_collections

from configs import default
from unet_jax.errors import UserError

CONFIG_FILE = "config.json"

# What a resumed run may change: its length and patience, how often it logs and saves, its
# evaluation and where its data lives; not what it trains or how.
RESUME_MAY_CHANGE = ("train.epochs", "train.time_budget_minutes", "train.early_stopping_patience",
                     "train.plateau_patience", "train.log_every_steps", "train.keep_checkpoints",
                     "train.checkpoint_every_epochs", "eval.", "data.root", "data.num_workers",
                     "data.prefetch", "data.cache_dir")
RESUME_HINT = ("resume it with its own values or use another --workdir (a resumed run may change "
               "only its length, patience, logging, checkpointing, eval.* and data.root)")
# What never changes what a run computes: how often it logs and checkpoints, where it reads.
OUTCOME_NEUTRAL = ("train.log_every_steps", "train.keep_checkpoints",
                   "train.checkpoint_every_epochs", "data.root", "data.num_workers",
                   "data.prefetch", "data.cache_dir")
# What decides the function a checkpoint computes, beside its parameters' shapes (its
# compute dtype may change: the parameters are float32 either way).
_MODEL_FIELDS = ("model.", "data.image_size", "data.channels")


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
  if isinstance(saved, dict) and "sweep" in saved:  # configs/ablation.py's: no model of its own.
    raise UserError(f"{path}: {workdir} is an ablation sweep; give one of its variants, "
                    f"--workdir={pathlib.Path(workdir) / '<variant>'}")
  config = default.get_config()
  _overlay(config, saved)
  return config


def as_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`config` as its config.json holds it (tuples as lists)."""
  return json.loads(json.dumps(config.to_dict(), default=list))


def flat(tree: dict, prefix: str = "") -> dict[str, Any]:
  """A config.json's tree as {dotted name: value}."""
  leaves = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      leaves.update(flat(value, f"{prefix}{key}."))
    else:
      leaves[prefix + key] = value
  return leaves


def _first_difference(config: ml_collections.ConfigDict, workdir: str,
                      compared: Callable[[str], bool]) -> str | None:
  """"KEY=SAVED, the config has NOW" for the first compared field that differs from the
  config saved in `workdir` (None when all agree or nothing is saved there)."""
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.is_file():
    return None
  try:
    saved = flat(json.loads(path.read_text()))
  except json.JSONDecodeError as e:
    raise UserError(f"{path}: malformed JSON ({e})") from None
  now = flat(as_json(config))
  differ = [key for key, value in saved.items() if compared(key) and now.get(key, value) != value]
  if not differ:
    return None
  more = f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
  return f"{differ[0]}={saved[differ[0]]!r}, the config has {now[differ[0]]!r}{more}"


def check_resumable(config: ml_collections.ConfigDict, workdir: str,
                    may_change: tuple[str, ...] = RESUME_MAY_CHANGE,
                    hint: str = RESUME_HINT) -> None:
  """Refuses to resume the run in `workdir` under a config that trains something else.

  Args:
    config: the config to resume it with.
    workdir: the run; nothing is checked when it has no saved config.
    may_change: the fields that may differ from the saved config: dotted names, or prefixes
      ending in "." for a whole group.
    hint: what the user can do instead, the end of the error.

  Raises:
    UserError: a field outside `may_change` differs, naming it and both values.
  """
  difference = changed(config, workdir, may_change, but=True)
  if difference:
    raise UserError(f"{pathlib.Path(workdir) / CONFIG_FILE}: the run was trained with "
                    f"{difference}; {hint}")


def changed(config: ml_collections.ConfigDict, workdir: str, fields: tuple[str, ...],
            but: bool = False) -> str | None:
  """"KEY=SAVED, the config has NOW" for the first of `fields` (dotted names, or prefixes
  ending in ".") that differs from the run's saved config, or (`but`) of all other fields;
  None when they agree or nothing is saved."""
  return _first_difference(config, workdir, lambda key: key.startswith(fields) != but)


def check_same_model(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses to restore the run in `workdir` into a model that computes something else."""
  difference = _first_difference(config, workdir,
                                 lambda key: key.startswith(_MODEL_FIELDS) and key != "model.dtype")
  if difference:
    raise UserError(f"{pathlib.Path(workdir) / CONFIG_FILE}: checkpoint does not match the "
                    f"config: trained with {difference} (without --config, a run's own is used)")


def get_config(workdir: str) -> ml_collections.ConfigDict:
  # Read while the flags are parsed, before launch.py reports UserErrors: exit with the line.
  try:
    return load(workdir)
  except UserError as e:
    raise SystemExit(f"error: {e} (or pass --config)") from None
