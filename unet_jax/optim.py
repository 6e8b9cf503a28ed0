"""The optimiser of `config.train`: Adam, AdamW or SGD, a schedule, gradient clipping."""

import ml_collections
import optax

from unet_jax.errors import UserError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "step")


def make_schedule(train: ml_collections.ConfigDict, total_steps: int,
                  steps_per_epoch: int) -> optax.Schedule:
  """constant, cosine (linear warm-up then cosine decay to 0; a run no longer than its warm-up
  only ramps up) or step (x factor every k epochs)."""
  lr = train.learning_rate
  if train.schedule == "constant":
    return optax.constant_schedule(lr)
  if train.schedule == "step":
    every = max(1, train.step_every_epochs * steps_per_epoch)
    boundaries = {k * every: train.step_factor for k in range(1, total_steps // every + 1)}
    return optax.piecewise_constant_schedule(lr, boundaries)
  if train.schedule != "cosine":
    raise UserError(f"train.schedule={train.schedule!r} is not one of {SCHEDULES}")
  warmup = train.warmup_epochs * steps_per_epoch
  if warmup > 0 and warmup >= total_steps:
    # A run no longer than its warm-up ramps at the pace a longer run does, so that its
    # steps' rates do not depend on its length (a time budget's plan trains as that many
    # epochs would from the start).
    return optax.linear_schedule(0.0, lr, warmup)
  if warmup > 0:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=total_steps)
  return optax.cosine_decay_schedule(lr, max(total_steps, 1))


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int,
                   steps_per_epoch: int) -> optax.GradientTransformation:
  """The optimiser, with gradients clipped to `train.grad_clip` global norm when > 0."""
  train = config.train
  schedule = make_schedule(train, total_steps, steps_per_epoch)
  if train.optimizer == "adam":
    optimizer = optax.adam(schedule)
  elif train.optimizer == "adamw":
    optimizer = optax.adamw(schedule, weight_decay=train.weight_decay)
  elif train.optimizer == "sgd":
    optimizer = optax.sgd(schedule, momentum=train.momentum, nesterov=True)
  else:
    raise UserError(f"train.optimizer={train.optimizer!r} is not one of {OPTIMIZERS}")
  if train.grad_clip > 0:
    optimizer = optax.chain(optax.clip_by_global_norm(train.grad_clip), optimizer)
  return optimizer
