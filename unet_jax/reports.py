"""What a run writes for people: metrics.jsonl, the learning curve and prediction grids."""

import contextlib
import io
import json
import pathlib
from typing import Any, Iterator, Sequence

from absl import logging
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "learning_curve.png"


def write_atomic(path: pathlib.Path, data: str | bytes | bytearray) -> None:
  """Writes `data` to `path` whole or not at all: a reader, or a kill, never sees half of it."""
  tmp = path.with_name(path.name + ".tmp")
  if isinstance(data, str):
    tmp.write_text(data)
  else:
    tmp.write_bytes(data)
  tmp.replace(path)


@contextlib.contextmanager
def replaced_together(folder: pathlib.Path,
                      names: Sequence[str]) -> Iterator[dict[str, pathlib.Path]]:
  """Paths aside (name -> folder/name.tmp) to write a set of files to; on leaving without
  an error they replace the earlier set at once, the last name (which marks the set done)
  removed first and put in place last. A name not written this time leaves none of the
  earlier set. Stopped before, the earlier set stays whole; the paths aside are removed."""
  aside = {name: folder / f"{name}.tmp" for name in names}
  try:
    yield aside
    (folder / names[-1]).unlink(missing_ok=True)
    for name, path in aside.items():
      if path.exists():
        path.replace(folder / name)
      else:
        (folder / name).unlink(missing_ok=True)
  finally:
    for path in aside.values():
      with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def save_png(fig, path: str | pathlib.Path, dpi: int) -> None:
  """Saves `fig` to `path` as a PNG, whole or not at all (`write_atomic`), and closes it."""
  png = io.BytesIO()
  fig.savefig(png, dpi=dpi, format="png")
  plt.close(fig)
  write_atomic(pathlib.Path(path), png.getvalue())


def append_metrics(workdir: str | pathlib.Path, record: dict[str, Any]) -> None:
  """Appends one {"step", "epoch", "split", ...} record to metrics.jsonl."""
  with open(pathlib.Path(workdir) / METRICS_FILE, "a") as f:
    f.write(json.dumps(record) + "\n")


def read_metrics(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
  """The records of metrics.jsonl up to its first line that is not JSON (a line cut short by
  a kill): a resumed run truncates the file there."""
  path = pathlib.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  records = []
  for number, line in enumerate(path.read_text().splitlines(), 1):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if line.strip():
        logging.warning("%s: line %d is not JSON; it and any after it are left out", path,
                        number)
        break
  return records


def truncate_metrics(workdir: str | pathlib.Path, last_step: int) -> list[dict[str, Any]]:
  """Drops records logged after `last_step`, the step a run (re)starts from (0: all).

  Returns:
    The records kept.
  """
  path = pathlib.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  records = [r for r in read_metrics(workdir) if r["step"] <= last_step]
  write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
  return records


def seconds_spent(records: list[dict[str, Any]]) -> float:
  """The wall seconds the run's commands have trained it, to its last validation record."""
  val = [r for r in records if r["split"] == "valid"]
  return val[-1].get("train_s", 0.0) if val else 0.0


def best_validation(records: list[dict[str, Any]]) -> dict[str, Any] | None:
  """The validation record of highest Dice; of equal ones the latest, as Orbax's best step."""
  val = [r for r in records if r["split"] == "valid"]
  return max(reversed(val), key=lambda r: r["dice"]) if val else None


def plot_learning_curve(workdir: str | pathlib.Path) -> pathlib.Path:
  """Train/val loss and val Dice per epoch, best epoch marked; returns the PNG path."""
  records = read_metrics(workdir)
  train_loss: dict[int, list[float]] = {}
  for r in records:
    if r["split"] == "train":
      train_loss.setdefault(r["epoch"], []).append(r["loss"])
  val = [r for r in records if r["split"] == "valid"]
  best = best_validation(records)

  fig, (loss_ax, dice_ax) = plt.subplots(1, 2, figsize=(10, 4))
  epochs = sorted(train_loss)
  loss_ax.plot(epochs, [np.mean(train_loss[e]) for e in epochs], "o-", label="train")
  loss_ax.plot([r["epoch"] for r in val], [r["loss"] for r in val], "s-", label="validation")
  loss_ax.set(title="Loss (Dice + BCE)", xlabel="epoch", ylabel="loss")
  loss_ax.legend()
  dice_ax.plot([r["epoch"] for r in val], [r["dice"] for r in val], "s-", color="C1",
               label="validation Dice")
  if best:
    dice_ax.axvline(best["epoch"], color="grey", linestyle="--",
                    label=f"best: epoch {best['epoch']}, Dice {best['dice']:.3f}")
  dice_ax.set(title="Validation Dice (mean per image)", xlabel="epoch", ylabel="Dice", ylim=(0, 1))
  dice_ax.legend(loc="lower right")
  for ax in (loss_ax, dice_ax):
    ax.grid(alpha=0.3)
  fig.tight_layout()
  path = pathlib.Path(workdir) / CURVE_FILE
  save_png(fig, path, dpi=100)
  return path


def plot_predictions(path: str | pathlib.Path, images: np.ndarray, masks: np.ndarray,
                     probs: np.ndarray, predicted: np.ndarray, predicted_title: str,
                     titles: Sequence[str]) -> None:
  """One row per image: image | ground truth | probability | predicted mask | overlay.

  Args:
    path: PNG to write.
    images: (N, H, W, C) in [0, 1].
    masks: (N, H, W) ground truth.
    probs: (N, H, W) tumour probabilities.
    predicted: (N, H, W) predicted masks, as scored.
    predicted_title: Heading of their column (how they were made).
    titles: One row title per image (file name and score).
  """
  columns = ("image", "ground truth", "probability", predicted_title,
             "overlay (green: truth, red: prediction)")
  fig, axes = plt.subplots(len(images), 5, figsize=(15, 3.1 * len(images)), squeeze=False)
  for row, (image, mask, prob, binary, title) in enumerate(
      zip(images, masks, probs, predicted, titles)):
    grey = image.mean(-1)
    overlay = np.stack([grey] * 3, axis=-1) * 0.7
    overlay[..., 1] += 0.3 * mask
    overlay[..., 0] += 0.3 * binary
    panels = (grey, mask, prob, binary, np.clip(overlay, 0, 1))
    for col, panel in enumerate(panels):
      ax = axes[row, col]
      ax.imshow(panel, cmap="gray" if col != 2 else "magma", vmin=0, vmax=1)
      ax.set_xticks([])
      ax.set_yticks([])
      if row == 0:
        ax.set_title(columns[col], fontsize=10)
    axes[row, 0].set_ylabel(title, fontsize=8)
  fig.tight_layout()
  save_png(fig, path, dpi=80)
