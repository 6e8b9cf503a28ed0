"""The training loop: `train_and_evaluate(config, workdir)`."""

import dataclasses
import json
import math
import pathlib
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from configs import default as default_config
from unet_jax import checkpoint as checkpoint_lib
from unet_jax import data as data_lib
from unet_jax import evaluate
from unet_jax import optim
from unet_jax import parallel
from unet_jax import reports
from unet_jax import run_lock
from unet_jax import saved_config
from unet_jax import steps
from unet_jax import time_budget
from unet_jax.data import augment as augment_lib
from unet_jax.data import coco
from unet_jax.data import pipeline
from unet_jax.errors import Diverged
from unet_jax.errors import EmptySplit
from unet_jax.errors import UserError


def write_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  reports.write_atomic(workdir / saved_config.CONFIG_FILE,
                       json.dumps(config.to_dict(), indent=2, default=list) + "\n")


@dataclasses.dataclass
class LoopCounters:
  """What early stopping and reduce-on-plateau remember; checkpointed with the model."""

  best_dice: float = -1.0
  epochs_since_best_dice: int = 0
  best_loss: float | None = None
  epochs_since_best_loss: int = 0
  stopped_early: bool = False
  planned_epochs: int = 0  # The epochs train.time_budget_minutes left room for (0: no plan).

  def observe(self, val: dict[str, float], train: ml_collections.ConfigDict) -> tuple[bool, bool]:
    """Takes one validation; returns (lower the learning rate, stop training)."""
    if val["dice"] > self.best_dice:
      self.best_dice, self.epochs_since_best_dice = val["dice"], 0
    else:
      self.epochs_since_best_dice += 1
    if self.best_loss is None or val["loss"] < self.best_loss:
      self.best_loss, self.epochs_since_best_loss = val["loss"], 0
    else:
      self.epochs_since_best_loss += 1
    plateau = 0 < train.plateau_patience <= self.epochs_since_best_loss
    if plateau:
      self.epochs_since_best_loss = 0
    self.stopped_early = 0 < train.early_stopping_patience <= self.epochs_since_best_dice
    return plateau, self.stopped_early


def _progress(step: int, total: int, width: int = 20) -> str:
  done = int(width * step / total)
  return f"[{'#' * done}{'.' * (width - done)}] {100 * step / total:3.0f}%"


def time_left(epoch_ends: list[float], epochs_left: int) -> str:
  """Estimates the rest of training from the epochs timed so far in this process.

  Args:
    epoch_ends: `time.perf_counter()` at the start of the loop, then at each
      epoch's end (validation included).
    epochs_left: epochs still to train.

  Returns:
    E.g. "about 1 h 42 min left". The first epoch, which compiles the steps,
    is left out of the average once a second one has ended.
  """
  timed = epoch_ends[1:] if len(epoch_ends) > 2 else epoch_ends
  seconds = (timed[-1] - timed[0]) / (len(timed) - 1) * epochs_left
  hours, minutes = divmod(round(seconds / 60), 60)
  return f"about {hours} h {minutes} min left" if hours else f"about {minutes} min left"


def _check_finite(window: list[dict[str, float]], names: list[Any], first_step: int,
                  checkpoints: checkpoint_lib.Checkpoints) -> None:
  """Stops the run on a NaN or infinite loss, naming the step, its images, the last checkpoint."""
  for offset, metrics in enumerate(window):
    if not math.isfinite(metrics["loss"]):
      files = ", ".join(str(n) for n in list(names[offset])[:8])
      _stop_diverged(f"step {first_step + offset}: loss is {metrics['loss']} on batch [{files}]",
                     checkpoints)


def _stop_diverged(what: str, checkpoints: checkpoint_lib.Checkpoints) -> None:
  """Raises Diverged: `what`, and the last checkpoint saved, which is the last good one."""
  checkpoints.wait()
  last = checkpoints.latest_step()
  where = f"{checkpoints.directory}/{last}" if last is not None else "none saved yet"
  raise Diverged(f"{what}; stopped, last good checkpoint: {where} (try a lower "
                 "train.learning_rate or train.grad_clip)")


def check_config(config: ml_collections.ConfigDict) -> None:
  """The checks of a config's values that need no data read: batches that split over the
  devices and the rest of eval.* (first used after an epoch); loader settings of 0 or more;
  at least one checkpoint kept; one epoch or more; logging, checkpoint and step-schedule
  cadences of 1 or more; one logit, or one loss weight, per category needs that many COCO
  categories; train.* numbers and augment.* strengths in their ranges."""
  try:
    pipeline.local_batch_size(config.train.batch_size)
  except UserError as e:
    raise UserError(f"train.batch_size: {e}") from None
  evaluate.check_eval_config(config.eval)
  pipeline.check_loader(config.data)
  keep = config.train.keep_checkpoints
  if keep < 1:
    raise UserError(f"train.keep_checkpoints={keep}: keep at least 1 (the latest, which a "
                    "resumed run starts from; the best is kept besides)")
  if config.train.epochs < 1:
    raise UserError(f"train.epochs={config.train.epochs}: train 1 or more")
  cadences = [("log_every_steps", "steps"), ("checkpoint_every_epochs", "epochs")]
  if config.train.schedule == "step":
    cadences.append(("step_every_epochs", "epochs"))
  for name, unit in cadences:
    every = config.train[name]
    if every < 1:
      raise UserError(f"train.{name}={every}: use 1 or more (how many {unit} apart)")
  categories, fmt = tuple(config.data.category_ids), data_lib.data_format(config.data)
  got = f"(got data.format={fmt!r}, data.category_ids={categories})"
  channels = config.model.out_channels
  if channels != 1 and (fmt != "coco" or channels != len(categories)):
    raise UserError(f"model.out_channels={channels}: one logit per category needs a COCO "
                    f"dataset and as many data.category_ids {got}; use 1 for one tumour logit")
  weights = tuple(config.train.category_weights)
  if weights and (fmt != "coco" or len(weights) != len(categories)):
    raise UserError(f"train.category_weights={weights}: one weight per category needs a COCO "
                    f"dataset and as many data.category_ids {got}; use () to weigh images alike")
  if weights and not (min(weights) >= 0 and sum(weights) > 0):
    raise UserError(f"train.category_weights={weights}: weights of 0 or more, not all 0")
  _check_train_values(config.train)
  if config.augment.enabled:
    augment_lib.check(config.augment)


# train.* numbers and the range each must lie in: (low, low allowed, high, high allowed).
_TRAIN_RANGES = {
    "seed": (0, True, 2**32 - 1, True),  # What grain's shuffle takes.
    "learning_rate": (0, False, math.inf, False),
    "step_factor": (0, False, 1, True),
    "plateau_factor": (0, False, 1, True),
    "weight_decay": (0, True, math.inf, False),
    "momentum": (0, True, 1, False),
    "grad_clip": (0, True, math.inf, False),
    "sam_rho": (0, True, math.inf, False),
    "shared_input_fraction": (0, True, 1, True),
    "ema_decay": (0, True, 1, False),
    "ema_warmup": (1, True, math.inf, False),
    "dice_weight": (0, True, math.inf, False),
    "bce_weight": (0, True, math.inf, False),
    "lovasz_weight": (0, True, math.inf, False),
    "dice_smooth": (0, True, math.inf, False),
}


def _check_train_values(train_cfg: ml_collections.ConfigDict) -> None:
  """Refuses a train.* number out of its range (a NaN too), and a loss of no term."""
  for name, (low, with_low, high, with_high) in _TRAIN_RANGES.items():
    value = train_cfg[name]
    above = value >= low if with_low else value > low
    below = value <= high if with_high else value < high
    if not (above and below):  # NaN fails both.
      brackets = ("[" if with_low else "(", "]" if with_high else ")")
      raise UserError(f"train.{name}={value}: use a value in {brackets[0]}{low}, "
                      f"{'inf' if high == math.inf else high}{brackets[1]}")
  if train_cfg.dice_weight + train_cfg.bce_weight + train_cfg.lovasz_weight == 0:
    raise UserError("train.dice_weight, train.bce_weight and train.lovasz_weight are all 0: "
                    "the loss would be 0 and nothing would train")


def warn_of_settings(config: ml_collections.ConfigDict, workdir: str, evaluates: bool) -> None:
  """Warns of what a run's settings do that its user may not expect: train.weight_decay or
  train.momentum set for an optimizer that has none; validation or the final evaluation on
  the training split; no `eval.split` (`evaluates`, from build_sources) to evaluate."""
  train_cfg, defaults = config.train, default_config.get_config().train
  for name, optimizer in (("weight_decay", "adamw"), ("momentum", "sgd")):
    if train_cfg.optimizer != optimizer and train_cfg[name] != defaults[name]:
      logging.warning("train.%s=%g is ignored: it is train.optimizer=%s's, and this run uses %s",
                      name, train_cfg[name], optimizer, train_cfg.optimizer)
  trained_on = config.data.train_split
  for field, split, role in (("data.val_split", config.data.val_split, "picks the best checkpoint"),
                             ("eval.split", config.eval.split, "is scored after training")):
    if split == trained_on:
      logging.warning("%s=%r is the training split: it %s on images the model trained on",
                      field, split, role)
  if not evaluates:
    logging.warning("No %r split in the dataset (it has %s): no final evaluation (eval.split)",
                    config.eval.split, ", ".join(data_lib.subset_names(config.data, workdir)))


def build_sources(config: ml_collections.ConfigDict, workdir: str) -> tuple[Any, Any, bool]:
  """The train and validation sources, and whether the data has `eval.split` (then checked too).

  Raises:
    UserError: a split is missing or its files are bad.
  """
  train_source = data_lib.build_source(config.data, config.data.train_split, workdir)
  val_source = data_lib.build_source(config.data, config.data.val_split, workdir)
  _warn_of_shared_images(train_source, val_source, "data.val_split", "picks the best checkpoint")
  evaluates = data_lib.has_split(config.data, config.eval.split, workdir)
  if evaluates and config.eval.split != config.data.val_split:
    # Its files and annotations checked now, not after the hours of training.
    try:
      eval_source = data_lib.build_source(config.data, config.eval.split, workdir)
      _warn_of_shared_images(train_source, eval_source, "eval.split", "is scored")
    except EmptySplit as e:  # As a missing one (data.synthetic.num_test=0 writes it empty).
      logging.warning("%s: no final evaluation", e)
      evaluates = False
  return train_source, val_source, evaluates


def _warn_of_shared_images(train_source: Any, other_source: Any, field: str, role: str) -> None:
  """Warns when another split of a COCO export lists images of the training split (LGG and
  BraTS are split by patient and volume)."""
  train_source, other_source = (getattr(s, "source", s) for s in (train_source, other_source))
  if not hasattr(train_source, "paths") or train_source.split == other_source.split:
    return  # The same split is warned of with the settings.
  shared = coco.images_in_both(train_source.paths, other_source.paths)
  if shared:
    logging.warning("%s: %s: it %s partly on images the model trained on", field,
                    coco.shared_images_line(other_source.split, train_source.split, shared),
                    role)


def _plan_epochs(config: ml_collections.ConfigDict, workdir: pathlib.Path, started: float,
                 epoch_ends: list[float], first_epoch_syncs: list[tuple[int, float]],
                 epoch_steps: int) -> int:
  """The epochs `train.time_budget_minutes` leaves room for, timed on the first; logged, saved."""
  train_cfg, now = config.train, epoch_ends[-1]
  validation_s = now - first_epoch_syncs[-1][1]
  epoch_s = time_budget.first_epoch_seconds(first_epoch_syncs, epoch_ends[0], epoch_steps,
                                            validation_s)
  # The final evaluation restores a checkpoint and decodes, scores and draws the split:
  # about twice a validation pass.
  epochs = time_budget.agreed(time_budget.epochs_that_fit(
      60 * train_cfg.time_budget_minutes, now - started, epoch_s, 2 * validation_s,
      epochs_done=1, max_epochs=train_cfg.epochs))
  logging.info("Time budget %g min: %d of %d epochs fit (%.0f s gone by the end of the first, "
               "about %.0f s an epoch)", train_cfg.time_budget_minutes, epochs, train_cfg.epochs,
               now - started, epoch_s)
  if epochs < train_cfg.epochs and jax.process_index() == 0:
    write_config(_with_epochs(config, epochs), workdir)
  return epochs


def _with_epochs(config: ml_collections.ConfigDict, epochs: int) -> ml_collections.ConfigDict:
  """`config` as the run trains it: `train.epochs` the time budget's plan, when there is one."""
  if epochs == config.train.epochs:
    return config
  planned = config.copy_and_resolve_references()
  planned.train.epochs = epochs
  return planned


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`, then evaluates its best checkpoint.

  Holds the folder's lock throughout: a second run started there stops at once.

  Returns:
    The evaluation summary of `config.eval.split`; {} when that split does
    not exist or the run had already finished.
  """
  if config.data.root:  # Saved as an absolute path: eval and predict run from any folder.
    config = config.copy_and_resolve_references()
    config.data.root = str(pathlib.Path(config.data.root).expanduser().absolute())
  with run_lock.held(workdir):
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  started = time.perf_counter()
  workdir_path = pathlib.Path(workdir)
  workdir_path.mkdir(parents=True, exist_ok=True)
  train_cfg = config.train
  check_config(config)
  mesh = parallel.make_mesh()
  train_source, val_source, evaluates = build_sources(config, workdir)
  warn_of_settings(config, workdir, evaluates)
  epoch_steps = pipeline.steps_per_epoch(len(train_source), train_cfg.batch_size)
  image_shape = (config.data.image_size, config.data.image_size, config.data.channels)

  state = jax.device_put(steps.create_train_state(config, image_shape,
                                                 optim.make_optimizer(config)),
                         parallel.replicated(mesh))
  checkpoints = checkpoint_lib.Checkpoints(workdir, keep_latest=train_cfg.keep_checkpoints)
  counters = LoopCounters()
  start_step = checkpoints.latest_step() or 0
  if start_step:
    saved_config.check_resumable(config, workdir)
    state, saved_counters = checkpoints.restore(start_step, state)
    counters = LoopCounters(**saved_counters)
    logging.info("Resumed from step %d", start_step)
  spent_before = 0.0  # By the commands that trained it before; process 0 logs it.
  if jax.process_index() == 0:  # A run killed before its first checkpoint logged steps too.
    spent_before = reports.seconds_spent(reports.truncate_metrics(workdir, start_step))
  budgeted = train_cfg.time_budget_minutes > 0
  epochs = train_cfg.epochs
  if budgeted and counters.planned_epochs:  # Kept, unless train.epochs is now lower.
    epochs = min(counters.planned_epochs, train_cfg.epochs)
  elif budgeted and start_step:
    logging.warning("train.time_budget_minutes is planned on a run's first epoch, and this run "
                    "started without one: it trains its train.epochs=%d", epochs)
  if epochs != train_cfg.epochs:
    logging.info("Keeping the time budget's plan of %d epochs, made when the run started.",
                 epochs)
  total_steps, planned = epochs * epoch_steps, _with_epochs(config, epochs)
  stopped = counters.stopped_early and (
      0 < train_cfg.early_stopping_patience <= counters.epochs_since_best_dice)
  if start_step >= total_steps or stopped:
    more_epochs = (("set train.time_budget_minutes=0 and " if budgeted else "")
                   + "raise train.epochs")
    if stopped:  # Its patience, not its length, ended it; past its length too, both.
      further = "raise train.early_stopping_patience (0: off)" + (
          f", and {more_epochs}," if start_step >= total_steps else "")
    else:
      further = more_epochs
    logging.info("%s already finished at step %d%s; %s to train further.",
                 workdir, start_step, " (stopped early)" if stopped else "", further)
    checkpoints.close()
    if not evaluates or evaluate.summary_path(config, workdir).is_file():
      return {}
    logging.info("Its final evaluation had not finished: evaluating.")
    return evaluate.evaluate(config, workdir)
  if jax.process_index() == 0:
    write_config(planned, workdir_path)
    data_lib.record_splits(config.data, workdir)
    # An earlier finish's evaluation is not this one's: without it, a run stopped before its
    # final evaluation evaluates when started again.
    evaluate.summary_path(config, workdir).unlink(missing_ok=True)
  logging.info("Training %d steps (%d epochs of %d), global batch %d on %d devices",
               total_steps, epochs, epoch_steps, train_cfg.batch_size, jax.device_count())
  planning = budgeted and not start_step

  p_train, p_eval = steps.jit_steps(config, mesh)
  batches = pipeline.train_batches(train_source, planned, start_step)
  window_start, window, names = time.perf_counter(), [], []
  epoch_ends, first_epoch_syncs = [window_start], []
  for step in range(start_step, total_steps):
    batch = next(batches)
    rate = optim.learning_rate(train_cfg, step, total_steps, epoch_steps)
    state, step_metrics = p_train(state, parallel.device_batch(batch, mesh), rate)
    window.append(step_metrics)
    names.append(batch["file_name"])
    epoch, end_of_epoch = step // epoch_steps + 1, (step + 1) % epoch_steps == 0
    logs = (step + 1) % train_cfg.log_every_steps == 0 or end_of_epoch
    if planning and step == start_step and not logs:
      # The plan times the steps after this one, which compiles: a small split's epoch of one
      # log window had been timed as its compile (14x too long).
      jax.block_until_ready(step_metrics)
      first_epoch_syncs.append((step + 1, time.perf_counter()))
    if logs:
      host = parallel.to_host(window)
      _check_finite(host, names, step + 2 - len(host), checkpoints)
      record = {"step": step + 1, "epoch": epoch, "split": "train",
                **{k: float(np.mean([m[k] for m in host])) for k in host[0]},
                "learning_rate": rate * float(state.lr_scale),
                "img_per_s": (len(host) * train_cfg.batch_size
                              / (time.perf_counter() - window_start))}
      logging.info("%s step %d/%d epoch %d: loss %.4f dice %.3f (%.1f img/s)",
                   _progress(step + 1, total_steps), step + 1, total_steps, epoch,
                   record["loss"], record["dice"], record["img_per_s"])
      if jax.process_index() == 0:
        reports.append_metrics(workdir, record)
      window_start, window, names = time.perf_counter(), [], []
      if planning:
        first_epoch_syncs.append((step + 1, window_start))
    if not end_of_epoch:
      continue

    val = evaluate.validate(p_eval, state, val_source, config, mesh)
    if not math.isfinite(val["loss"]):  # The epoch's last steps diverged: not saved.
      _stop_diverged(f"epoch {epoch} validation: loss is {val['loss']} after step {step + 1}",
                     checkpoints)
    lower_rate, stop = counters.observe(val, train_cfg)
    val["lr_scale"] = float(state.lr_scale)
    epoch_ends.append(time.perf_counter())
    if planning:
      planning = False
      epochs = _plan_epochs(config, workdir_path, started, epoch_ends, first_epoch_syncs,
                            epoch_steps)
      counters.planned_epochs, total_steps = epochs, epochs * epoch_steps
    logging.info("epoch %d validation: loss %.4f dice %.4f iou %.4f (%s)", epoch, val["loss"],
                 val["dice"], val["iou"], time_left(epoch_ends, epochs - epoch))
    if lower_rate:
      state = state.replace(lr_scale=state.lr_scale * train_cfg.plateau_factor)
      logging.info("validation loss plateaued: learning rate scaled to %.3g",
                   float(state.lr_scale))
    # Every epoch that equals or beats the best is saved, whatever the cadence: Orbax's best
    # is the latest of equal ones, as the learning curve marks it.
    best_yet = val["dice"] >= counters.best_dice
    # Logged before its checkpoint is saved: a run resumed from that checkpoint keeps the
    # records up to its step and would not log this epoch's again.
    if jax.process_index() == 0:
      reports.append_metrics(workdir, {"step": step + 1, "epoch": epoch, "split": "valid", **val,
                                       "train_s": spent_before + epoch_ends[-1] - started})
    if (epoch % train_cfg.checkpoint_every_epochs == 0 or best_yet or step + 1 == total_steps
        or stop):
      checkpoints.save(step + 1, state, {checkpoint_lib.BEST_METRIC: val["dice"]},
                       dataclasses.asdict(counters))
    if jax.process_index() == 0:
      reports.plot_learning_curve(workdir)
    if stop:
      logging.info("Early stopping: no better validation Dice for %d epochs (best %.4f).",
                   counters.epochs_since_best_dice, counters.best_dice)
    if stop or step + 1 == total_steps:
      break
    window_start = time.perf_counter()
  checkpoints.wait()
  checkpoints.close()
  if evaluates:
    return evaluate.evaluate(config, workdir)
  logging.info("No %r split in the dataset; skipped the final evaluation (another split: "
               "python launch.py --mode=eval --workdir=%s --config.eval.split=%s)",
               config.eval.split, workdir, config.data.val_split)
  return {}
