"""Orbax checkpoints of a run: the latest few and the best by validation Dice."""

import pathlib
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from unet_jax.errors import root_cause
from unet_jax.errors import UserError

BEST_METRIC = "val_dice"
# What a complete step's folder holds.
_STEP_FILES = ("_CHECKPOINT_METADATA", "state", "loop")


def _best_metric(metrics: dict[str, float]) -> float:
  return metrics[BEST_METRIC]


def _path_name(path: tuple[Any, ...]) -> str:
  """'params/down_0/Conv_0/kernel' for attribute, key and index paths alike."""
  parts = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
  return "/".join(str(part) for part in parts)


def named_step(which: str | int) -> int | None:
  """The step number `eval.checkpoint` names; None for best or latest.

  Raises:
    UserError: it is none of these.
  """
  if which in ("best", "latest"):
    return None
  try:
    return int(which)
  except ValueError:
    raise UserError(f"eval.checkpoint={which!r}: use best, latest or a step number") from None


def _remove_half_deleted(directory: pathlib.Path) -> None:
  """Removes what a kill left of older steps that Orbax was deleting: it lists such a step
  but, without its metadata, never deletes it again."""
  steps = {int(f.name): f for f in directory.glob("*") if f.name.isdigit() and f.is_dir()}
  complete = [step for step, folder in steps.items()
              if all((folder / name).exists() for name in _STEP_FILES)]
  for step, folder in steps.items():
    if complete and step < max(complete) and step not in complete:
      shutil.rmtree(folder, ignore_errors=True)


class Checkpoints:
  """The `checkpoints/` folder of a run.

  Saves are asynchronous (training goes on while they are written) and a
  step only becomes visible once completely written, so a killed run never
  leaves a half checkpoint that a restore would pick.
  """

  def __init__(self, workdir: str | pathlib.Path, keep_latest: int = 2, read_only: bool = False):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=keep_latest),
        checkpoint_managers.BestN(get_metric_fn=_best_metric, n=1),
    ])
    if not read_only and jax.process_index() == 0:
      _remove_half_deleted(self.directory)
    options = ocp.CheckpointManagerOptions(
        best_fn=_best_metric, best_mode="max", preservation_policy=policy,
        read_only=read_only, create=not read_only,
        save_interval_steps=0 if read_only else 1)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "loop": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, metrics: dict[str, float], loop: dict[str, Any]) -> None:
    """Saves the train state and the loop's own counters (early stopping, plateau)."""
    self.manager.save(step, metrics=metrics, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), loop=ocp.args.JsonSave(loop)))

  def resolve(self, which: str | int) -> int:
    """The step named by `eval.checkpoint`: best, latest or a step number."""
    steps = self.manager.all_steps()
    if not steps:
      raise UserError(f"{self.directory}: no checkpoint; train the run first")
    if which == "best":
      return self.manager.best_step()
    if which == "latest":
      return self.manager.latest_step()
    step = named_step(which)
    if step not in steps:
      raise UserError(f"{self.directory}: no checkpoint at step {step}; saved steps are "
                      f"{sorted(steps)}")
    return step

  def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
    """Restores `step` into the structure, shapes and shardings of `target`.

    Returns:
      The train state and the loop counters saved with it.

    Raises:
      UserError: the checkpoint was written by a model of another shape, or is damaged.
    """
    try:
      self._check_matches(step, self.manager.item_metadata(step)["state"], target)
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), loop=ocp.args.JsonRestore()))
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      # tensorstore's errors on a file come wrapped in a bare Exception; anything else (out of
      # memory, a bug) is not the files'.
      cause = root_cause(e)
      if not isinstance(cause, (OSError, ValueError)):
        raise
      reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:240]
      raise UserError(f"{self.directory}/{step}: unreadable checkpoint ({reason}); if its "
                      "files are damaged, delete that folder: training resumes from the step "
                      "before, and --config.eval.checkpoint=STEP evaluates another (saved: "
                      f"{sorted(self.manager.all_steps())})") from e
    return restored["state"], dict(restored["loop"])

  def _check_matches(self, step: int, saved: Any, target: Any) -> None:
    saved_shapes = {_path_name(path): tuple(leaf.shape)
                    for path, leaf in jax.tree_util.tree_leaves_with_path(saved)}
    target_shapes = {_path_name(path): tuple(leaf.shape)
                     for path, leaf in jax.tree_util.tree_leaves_with_path(target)}
    for key, shape in target_shapes.items():
      if saved_shapes.get(key) != shape:
        found = "missing" if key not in saved_shapes else f"shape {saved_shapes[key]}"
        self._mismatch(step, f"{key} is {found} in the checkpoint but {shape} in the model")
    for key in saved_shapes.keys() - target_shapes.keys():
      self._mismatch(step, f"{key} is in the checkpoint but not in the model")

  def _mismatch(self, step: int, what: str) -> None:
    raise UserError(f"{self.directory}/{step}: checkpoint does not match the config: {what} "
                    "(was model.*, train.ema_decay, train.optimizer or train.grad_clip changed?)")

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
