"""`train.time_budget_minutes`: the epochs that fit the budget, timed on the first epoch.

The plan is made once, at the end of a run's first epoch, so the learning-rate
schedule is that of a run given `train.epochs` = the plan from the start (with a
warm-up of an epoch or more, the first epoch's rates are the same for every length).
"""

import math

import jax
from jax.experimental import multihost_utils
import numpy as np

# Epochs on a shared 2-core VM drift over a run: on a Zen 3 they took 76-106 s against the
# first epoch's 84 s in one run (7% more on average), 66-103 s against 94 s in another
# (13% less); the plan assumes 10% more.
DRIFT = 1.1


def first_epoch_seconds(syncs: list[tuple[int, float]], loop_start: float, epoch_steps: int,
                        validation_s: float) -> float:
  """One epoch's time, training and validation, from the first epoch of a run.

  Args:
    syncs: (steps done, time) at each host sync of the first epoch: after its
      first step, which compiles the train step and is left out when there is a
      later one, and at its end.
    loop_start: the time the first step was dispatched.
    epoch_steps: train steps in an epoch.
    validation_s: the first validation's time (its compilation included, which
      leaves room for the checkpoint and the learning curve each epoch writes).
  """
  if len(syncs) > 1:
    (first_step, first_time), (last_step, last_time) = syncs[0], syncs[-1]
    train_s = (last_time - first_time) / (last_step - first_step) * epoch_steps
  else:
    train_s = syncs[-1][1] - loop_start
  return train_s + validation_s


def epochs_that_fit(budget_s: float, elapsed_s: float, epoch_s: float, final_eval_s: float,
                    epochs_done: int, max_epochs: int) -> int:
  """The epochs to train in all: those done and as many more as fit before the final evaluation.

  Each further epoch is assumed to take `DRIFT` x `epoch_s`. The result is at
  least `epochs_done` and at most `max_epochs`.
  """
  more = math.floor((budget_s - elapsed_s - final_eval_s) / (DRIFT * epoch_s))
  return min(max_epochs, epochs_done + max(more, 0))


def agreed(epochs: int) -> int:
  """Process 0's plan on every process: each times its own epoch, and all must step alike."""
  if jax.process_count() == 1:
    return epochs
  return int(multihost_utils.broadcast_one_to_all(np.int32(epochs)))
