"""Ablations: train one run per variant of a base config, then tabulate them.

`run_sweep(config, workdir)` runs a configs/ablation.py config:

    <workdir>/config.json       the ablation config
    <workdir>/phantoms/         (demo base) the one dataset every variant trains on
    <workdir>/<variant>/        a complete training run (see README: "What a run writes")
    <workdir>/ablation.csv      one row per variant: flags, params, validation and test
    <workdir>/ablation.md       Dice, img/s, wall time, status; best validation Dice first

A variant that fails with a UserError (a diverging loss, a config the data
refuses) is a row of its own, "failed: WHY", and the others still run.
"""

import copy
import csv
import importlib.util
import io
import json
import pathlib
import re
import statistics
import time
from typing import Any, Iterator

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from unet_jax import checkpoint as checkpoint_lib
from unet_jax import data as data_lib
from unet_jax import evaluate
from unet_jax import model as model_lib
from unet_jax import reports
from unet_jax import run_lock
from unet_jax import saved_config
from unet_jax import train
from unet_jax import xla_config
from unet_jax.errors import Diverged
from unet_jax.errors import UserError
from unet_jax.saved_config import CONFIG_FILE

# In a variant's folder: its score once it has finished (before: the schedule it started with).
RESULT_FILE = "ablation_result.json"
CSV_FILE = "ablation.csv"
MD_FILE = "ablation.md"
_REPO = pathlib.Path(__file__).resolve().parents[1]
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# A variant's validation at every epoch decodes as eval.* says, so unlike a resumed run, a
# sweep's started variants keep their eval.*: the table compares them alike.
_VARIANT_MAY_CHANGE = tuple(f for f in saved_config.RESUME_MAY_CHANGE if f != "eval.")
# Changed for a started variant, these make it unlike one trained so from scratch.
_SCHEDULE = ("train.epochs", "train.early_stopping_patience", "train.plateau_patience")
OK = "ok"  # The status of a variant that trained and evaluated.


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path.py` or `path.py:arg` as --config does: imports it, calls get_config([arg]).

  A relative path is looked up in the current folder, then in the repository.
  """
  path, colon, arg = spec.partition(":")
  file = pathlib.Path(path).expanduser()
  if not file.is_file() and not file.is_absolute() and (_REPO / file).is_file():
    file = _REPO / file
  if not file.is_file():
    raise UserError(f"config.base={spec!r}: no config file {path}")
  module_spec = importlib.util.spec_from_file_location(f"ablation_base_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  try:
    return module.get_config(arg) if colon else module.get_config()
  except ValueError as e:  # A config file's own word on a bad variant (`brain.py:demos`).
    raise UserError(f"config.base={spec!r}: {e}") from None


def _set(config: ml_collections.ConfigDict, path: str, value: Any, source: str) -> None:
  *parents, leaf = path.split(".")
  node = config
  for name in parents:
    node = node.get(name) if isinstance(node, ml_collections.ConfigDict) else None
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise UserError(f"{source}: the base config has no field {path}")
  try:
    node[leaf] = value
  except TypeError as e:
    raise UserError(f"{source}: {path}={value!r} has the wrong type ({e})") from None


def _leaves(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, Any]]:
  """(dotted path, value) of every leaf that is not None."""
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f"{prefix}{key}.")
    elif value is not None:
      yield f"{prefix}{key}", value


def base_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.base` with `config.overrides` applied."""
  base = load_config_file(config.base)
  # Variants compare at the same epochs; under a time budget the slower would train fewer.
  base.train.time_budget_minutes = 0.0
  for path, value in _leaves(config.overrides):
    _set(base, path, value, "config.overrides")
  return base


def variant_configs(config: ml_collections.ConfigDict,
                    base: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """The config of each variant of `config.sweep`, validated before anything trains."""
  if not config.sweep:
    raise UserError("config.sweep is empty; give at least one variant")
  variants = {}
  for name, fields in config.sweep.items():
    if not _NAME.fullmatch(name) or name in (data_lib.PHANTOMS_DIR, xla_config.CACHE_DIR):
      raise UserError(f"config.sweep: {name!r} cannot name a variant folder")
    variant = copy.deepcopy(base)
    for field, value in fields.items():
      _set(variant.model, field, value, f"config.sweep.{name}")
    model_lib.from_config(variant.model)
    variants[name] = variant
  return variants


def _read_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    return None


def _check_same_model(name: str, config: ml_collections.ConfigDict,
                      workdir: pathlib.Path) -> None:
  saved = _read_json(workdir / CONFIG_FILE)
  if saved is not None and saved.get("model") != saved_config.as_json(config)["model"]:
    raise UserError(f"{workdir} holds a run of another model than variant {name!r}; "
                    "delete it or use another --workdir")


def _has_checkpoint(workdir: pathlib.Path) -> bool:
  if not (workdir / "checkpoints").is_dir():
    return False
  checkpoints = checkpoint_lib.Checkpoints(workdir, read_only=True)
  try:
    return checkpoints.latest_step() is not None
  finally:
    checkpoints.close()


def _check_resumable(name: str, config: ml_collections.ConfigDict,
                     workdir: pathlib.Path) -> dict[str, Any] | None:
  """Refuses, before anything trains, a config that a started variant could not resume with.

  Returns:
    None for a variant not started; for a started one, the schedule fields it goes on under
    other values of: field -> the value it started with (_started_with; logged).
  """
  _check_same_model(name, config, workdir)
  if not _has_checkpoint(workdir):
    return None  # Training starts it again from scratch, under any config.
  hint = ("rerun the sweep with the variant's own values or use another --workdir (a sweep's "
          "started variants may change only their length, patience, logging, checkpointing, "
          "data.root and loader settings); to evaluate this variant at other eval.* "
          f"settings: python launch.py --mode=eval --workdir={workdir} "
          "--config.eval.FIELD=VALUE")
  try:
    saved_config.check_resumable(config, str(workdir), _VARIANT_MAY_CHANGE, hint)
  except UserError as e:
    raise UserError(f"variant {name!r}: {e}") from None
  started_with = _started_with(config, workdir)
  if started_with:
    logging.warning("Variant %s was started with %s: it goes on from there, not as a variant "
                    "trained so from its start would (its schedule differs)", name,
                    _settings(started_with))
  return started_with


def _started_with(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, Any]:
  """The schedule fields (_SCHEDULE) the run in `workdir` has other values of than `config`:
  field -> the run's value."""
  saved = saved_config.flat(_read_json(workdir / CONFIG_FILE) or {})
  now = saved_config.flat(saved_config.as_json(config))
  return {field: saved[field] for field in _SCHEDULE
          if field in saved and saved[field] != now[field]}


def _settings(fields: dict[str, Any]) -> str:
  return ", ".join(f"{field}={value}" for field, value in fields.items())


def _refusal(name: str, config: ml_collections.ConfigDict) -> str | None:
  """Why training would refuse variant `name` at once (logged), or None."""
  try:
    train.check_config(config)
  except UserError as e:
    logging.error("Variant %s fails: %s", name, e)
    return str(e)
  return None


def _settled(result: dict[str, Any], config: ml_collections.ConfigDict,
             workdir: pathlib.Path) -> bool:
  """Whether the variant, whose ablation_result.json holds `result` ({}: none), finished or
  diverged before with this config: rerunning it would only do the same again."""
  return ("wall_s" in result and ("error" not in result or result.get("diverged", False))
          and (workdir / CONFIG_FILE).is_file()
          and not saved_config.changed(config, str(workdir), saved_config.OUTCOME_NEUTRAL,
                                       but=True))


def _run_variant(name: str, config: ml_collections.ConfigDict, workdir: pathlib.Path,
                 started_with: dict[str, Any] | None) -> str | None:
  """Trains and evaluates one variant, unless it finished or diverged before with this config.

  `started_with`: None when it has not started, else the schedule it started with where it
  goes on under another (_check_resumable's).

  Returns:
    None, or why it failed: the UserError that stopped its training (logged, and kept in
    its ablation_result.json). Other errors propagate.
  """
  result = _read_json(workdir / RESULT_FILE) or {}
  if _settled(result, config, workdir):
    if "error" in result:
      logging.error("Variant %s diverged before with this config; skipped (delete %s to train "
                    "it from scratch): %s", name, workdir, result["error"])
    else:
      logging.info("Variant %s finished before; skipped.", name)
    return result.get("error")
  # The schedule it started with, kept while it goes on under another length or patience:
  # a variant extended so is not one trained so from its start. Written now, without the
  # finished result it replaces, so that a rerun after an interruption resumes it.
  record = {"variant": name}
  if started_with is not None:  # Kept from an earlier command that went on so, too.
    started_with = {**started_with, **result.get("started_with", {})}
    if started_with:
      record["started_with"] = started_with
  if jax.process_index() == 0 and workdir.is_dir():
    reports.write_atomic(workdir / RESULT_FILE, json.dumps(record) + "\n")
  # Its wall time counts the commands that trained it before, interrupted or failed.
  records = reports.read_metrics(workdir)
  start = time.perf_counter() - reports.seconds_spent(records)
  try:
    # Evaluates a run trained before, if need be; {} if it had been.
    summary = train.train_and_evaluate(config, str(workdir))
  except UserError as e:
    logging.error("Variant %s failed: %s", name, e)
    # A diverged run is not run again under the same config (_settled); any other error
    # (a file since repaired, say) is tried again.
    record.update(error=str(e), diverged=isinstance(e, Diverged))
  else:
    # Kept, as the sweep scored it: a later --mode=eval at other settings rewrites eval/<split>/.
    record["eval_dice"] = (summary["metrics"]["dice"]["mean"] if summary
                           else _sweep_dice(result, config, workdir))
  trained = reports.read_metrics(workdir) != records
  if not trained and "started_with" not in result:  # Found finished: nothing went on.
    record.pop("started_with", None)
  # One that had finished keeps its time: restoring it to find that out is not training it.
  record["wall_s"] = (time.perf_counter() - start if trained or "wall_s" not in result
                      else result["wall_s"])
  if jax.process_index() == 0:  # Whole or not at all: every process reads it for its row.
    workdir.mkdir(parents=True, exist_ok=True)
    reports.write_atomic(workdir / RESULT_FILE, json.dumps(record) + "\n")
  return record.get("error")


def _sweep_dice(result: dict[str, Any], config: ml_collections.ConfigDict,
                workdir: pathlib.Path) -> float | None:
  """The variant's evaluation Dice as the sweep scored it: kept in its result, or (a result
  written before it kept its score) read from its evaluation summary."""
  if "eval_dice" in result:
    return result["eval_dice"]
  summary = _read_json(evaluate.summary_path(config, str(workdir)))
  return summary["metrics"]["dice"]["mean"] if summary else None


def count_params(config: ml_collections.ConfigDict) -> int:
  """Parameters of the U-Net of `config` (traced, not initialised)."""
  model = model_lib.from_config(config.model)
  shape = (1, config.data.image_size, config.data.image_size, config.data.channels)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
  return sum(x.size for x in jax.tree.leaves(variables["params"]))


def swept_fields(config: ml_collections.ConfigDict) -> list[str]:
  """The config.model fields some variant sets, in the order of configs/default.py."""
  fields = {field for variant in config.sweep.values() for field in variant.keys()}
  return [field for field in model_lib.UNet.__dataclass_fields__ if field in fields]


def variant_row(name: str, config: ml_collections.ConfigDict, workdir: pathlib.Path,
                flags: list[str], status: str = OK) -> dict[str, Any]:
  """One row of the table, read from the variant's metrics.jsonl and result (or, for a result
  written before it kept its score, eval summary).

  Its measurements are left empty unless `status` is OK (e.g. "failed: WHY").
  """
  records, result, eval_dice = [], {}, None
  if status == OK:
    records, result = reports.read_metrics(workdir), _read_json(workdir / RESULT_FILE) or {}
    eval_dice = _sweep_dice(result, config, workdir)
  # The first train window includes compiling the step.
  speeds = [r["img_per_s"] for r in records if r["split"] == "train"][1:]
  best = reports.best_validation(records) or {}
  return {
      "variant": name,
      **{flag: config.model[flag] for flag in flags},
      "params": count_params(config),
      "epochs": max((r["epoch"] for r in records if r["split"] == "valid"), default=None),
      "best_epoch": best.get("epoch"),
      "val_dice": best.get("dice"),
      "val_iou": best.get("iou"),
      f"{config.eval.split}_dice": eval_dice,
      "img_per_s": statistics.median(speeds) if speeds else None,
      "wall_s": result.get("wall_s"),
      "status": (f"{status}; started with {_settings(result['started_with'])}"
                 if "started_with" in result else status),
  }


def _sort_key(row: dict[str, Any]) -> tuple[float, str]:
  return (-(row["val_dice"] if row["val_dice"] is not None else -1.0), row["variant"])


def _cell(value: Any, column: str) -> str:
  if value is None:
    return ""
  if column == "params":
    return f"{value:,}"
  if column.endswith(("_dice", "_iou")):
    return f"{value:.4f}"
  if column == "img_per_s":
    return f"{value:.1f}"
  if column == "wall_s":
    return f"{int(value) // 60}:{int(value) % 60:02d}"
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(str(v) for v in value) + ")"
  return str(value).replace("|", "\\|") if column == "status" else str(value)


def _raw(value: Any) -> Any:
  if value is None:
    return ""
  return _cell(value, "") if isinstance(value, (tuple, list)) else value


def write_tables(rows: list[dict[str, Any]], workdir: pathlib.Path, title: str) -> None:
  """ablation.csv (raw values) and ablation.md (a formatted table under `title`)."""
  if not rows:
    return
  columns = list(rows[0])
  text = io.StringIO(newline="")
  writer = csv.writer(text)
  writer.writerow(columns)
  writer.writerows([_raw(row[c]) for c in columns] for row in rows)
  reports.write_atomic(workdir / CSV_FILE, text.getvalue())
  numeric = {c for c in columns for row in rows
             if isinstance(row[c], (int, float)) and not isinstance(row[c], bool)}
  headers = [{"wall_s": "wall (m:s)", "img_per_s": "train img/s"}.get(c, c) for c in columns]
  lines = [title, "", "| " + " | ".join(headers) + " |",
           "|" + "|".join("---:" if c in numeric else "---" for c in columns) + "|"]
  lines += ["| " + " | ".join(_cell(row[c], c) for c in columns) + " |" for row in rows]
  reports.write_atomic(workdir / MD_FILE, "\n".join(lines) + "\n")


def _title(config: ml_collections.ConfigDict, base: ml_collections.ConfigDict) -> str:
  return "\n".join([
      f"# Ablation: {len(config.sweep)} variants of {config.base}",
      "",
      f"Data {base.data.root}; global batch {base.train.batch_size}, "
      f"{base.data.image_size} px, seed {base.train.seed}, on {jax.device_count()} "
      f"{jax.devices()[0].platform} device(s); epochs: those each variant trained (up to "
      f"{base.train.epochs}, or more if it had finished before). Best validation Dice "
      f"first (its epoch's IoU beside it); {base.eval.split}_dice: mean per-image Dice of the "
      f"best checkpoint on the {base.eval.split} split. Train img/s: median over the log "
      "windows after the first (which includes compilation); wall: training and evaluation. "
      "Status: ok (and the schedule it started with, if it went on under another), failed "
      "(and why; its numbers left empty) or pending (not run yet).",
  ])


def _check_before_training(variants: dict[str, ml_collections.ConfigDict],
                           base: ml_collections.ConfigDict,
                           out: pathlib.Path) -> tuple[dict[str, str], dict[str, Any]]:
  """Refuses, before anything trains or is written, a sweep some started variant could not
  resume with, or data that no variant could train on.

  Returns:
    Variant name -> why training would refuse its config (e.g. one logit per category on
    data without categories): a failed variant, not trained. And variant name -> the
    schedule it started with (_check_resumable's).
  """
  started_with = {name: _check_resumable(name, variant, out / name)
                  for name, variant in variants.items()}
  train.build_sources(base, str(out))  # The same data for every variant.
  refusals = {name: _refusal(name, variant) for name, variant in variants.items()}
  return {name: why for name, why in refusals.items() if why is not None}, started_with


def run_sweep(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """Trains and evaluates every variant of `config.sweep`, then writes the tables.

  Variants run in `workdir/<variant>/`, all on the same data, seed and budget;
  finished ones are skipped, so running it again resumes an interrupted sweep.
  A variant that fails with a UserError is a "failed" row and the others run on.

  Returns:
    The rows of the table, best validation Dice first.

  Raises:
    UserError: a config some variant could not run or resume with (before anything
      trains), or, once the tables are written, some variant failed.
  """
  with run_lock.held(workdir):  # A second sweep there would fail the variants this one trains.
    return _run_sweep(config, pathlib.Path(workdir))


def _run_sweep(config: ml_collections.ConfigDict, out: pathlib.Path) -> list[dict[str, Any]]:
  out.mkdir(parents=True, exist_ok=True)
  base = base_config(config)
  train.check_config(base)  # Wrong for every variant: an error, not a table of failures.
  # Generates the demo phantoms once, here, instead of once per variant.
  base.data.root = str(data_lib.data_root(base.data, str(out)))
  variants = variant_configs(config, base)
  refused, started_with = _check_before_training(variants, base, out)
  if jax.process_index() == 0:
    train.write_config(config, out)
  flags = swept_fields(config)
  title = _title(config, base)
  rows = {name: variant_row(name, variant, out / name, flags, "pending")
          for name, variant in variants.items()}
  for i, (name, variant) in enumerate(variants.items()):
    logging.info("Variant %d/%d: %s (%s)", i + 1, len(variants), name,
                 ", ".join(f"{k}={v}" for k, v in config.sweep[name].items()) or "base")
    error = refused.get(name) or _run_variant(name, variant, out / name, started_with[name])
    # Each variant's compiled programs would otherwise stay for the whole sweep: about 50 MiB
    # a variant of the smoke sweep's base.
    jax.clear_caches()
    rows[name] = variant_row(name, variant, out / name, flags,
                             f"failed: {error}" if error else OK)
    if jax.process_index() == 0:
      write_tables(sorted(rows.values(), key=_sort_key), out, title)
  logging.info("Ablation table: %s", out / MD_FILE)
  failed = [name for name, row in rows.items() if not row["status"].startswith(OK)]
  if failed:
    raise UserError(f"{len(failed)} of {len(rows)} variants failed ({', '.join(failed)}); "
                    f"{out / MD_FILE} and the log say why")
  return sorted(rows.values(), key=_sort_key)
