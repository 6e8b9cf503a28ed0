"""The optimiser of `config.train` (Adam, AdamW or SGD, gradient clipping) and its rate schedule."""

import math

import jax
import ml_collections
import optax

from unet_jax.errors import UserError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "step")


def learning_rate(train: ml_collections.ConfigDict, step: int, total_steps: int,
                  steps_per_epoch: int) -> float:
  """The rate of step `step` (from 0) of a run of `total_steps`: constant, cosine (linear
  warm-up, then cosine decay to 0) or step (x `step_factor` every `step_every_epochs`).

  Computed on the host and given to each train step, so that a time budget's plan, which
  shortens the run after its first epoch, does not compile the step again.
  """
  peak = train.learning_rate
  if train.schedule == "constant":
    return peak
  if train.schedule == "step":
    every = max(1, train.step_every_epochs * steps_per_epoch)
    return peak * train.step_factor ** (min(step, total_steps) // every)
  warmup = train.warmup_epochs * steps_per_epoch
  if step < warmup:
    # At the pace of a longer run even when the run is no longer than its warm-up, so that
    # a step's rate does not depend on the run's length until the warm-up ends.
    return peak * step / warmup
  if warmup >= total_steps:
    return peak
  decay_steps = total_steps - warmup
  return peak * 0.5 * (1 + math.cos(math.pi * min(step - warmup, decay_steps) / decay_steps))


def _unit_rate(count: jax.Array) -> float:
  """The optimiser's own rate: 1, the train step scales its updates by `learning_rate`.

  A schedule rather than a constant keeps the optimiser's state (its step count) as
  checkpoints hold it.
  """
  del count
  return 1.0


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optimiser at rate 1 (see `learning_rate`), with gradients clipped to
  `train.grad_clip` global norm when > 0."""
  train = config.train
  if train.schedule not in SCHEDULES:
    raise UserError(f"train.schedule={train.schedule!r} is not one of {SCHEDULES}")
  if train.optimizer == "adam":
    optimizer = optax.adam(_unit_rate)
  elif train.optimizer == "adamw":
    optimizer = optax.adamw(_unit_rate, weight_decay=train.weight_decay)
  elif train.optimizer == "sgd":
    optimizer = optax.sgd(_unit_rate, momentum=train.momentum, nesterov=True)
  else:
    raise UserError(f"train.optimizer={train.optimizer!r} is not one of {OPTIMIZERS}")
  if train.grad_clip > 0:
    optimizer = optax.chain(optax.clip_by_global_norm(train.grad_clip), optimizer)
  return optimizer
