"""Describe mode: the feature table of a dataset, made before training on it.

    python launch.py --mode=describe --config=configs/brain.py --workdir=OUT \\
        --config.data.root=DATA

writes into OUT:

    annotations.csv       file_name,width,height,category_id,segmentation,subset,area: one row
                          per annotation (COCO; images without one get a row with an empty
                          category) or per slice (lgg, brats: its mask as COCO RLE, empty
                          when the slice has no tumour); area in pixels at the stored size
    dataset_summary.json  per subset and in all: images, annotations per category, image
                          sizes, empty images, mask-area quantiles (foreground of the
                          configured categories, per image with any)
    dataset_summary.png   images per subset, annotations per category, mask-area histogram

Only annotation files, masks and image headers are read (of COCO images and
LGG slices the header, of BraTS slices the h5 metadata, checked as training
checks them), and neither jax nor grain is imported. Problems are listed in
the summary and the rest is described; a config training would refuse (a
category the data lack, bad BraTS channels) is an error.
"""

import collections
from collections.abc import Iterator
import csv
import json
import pathlib
from typing import Any

from absl import logging
import matplotlib.figure
import ml_collections
import numpy as np
from pycocotools import mask as mask_utils

from unet_jax import data as data_lib
from unet_jax import images as images_lib
from unet_jax import reports
from unet_jax.data import brats
from unet_jax.data import coco
from unet_jax.data import coco_json
from unet_jax.data import folders
from unet_jax.data import splits
from unet_jax.errors import UserError

CSV_FILE = "annotations.csv"
SUMMARY_FILE = "dataset_summary.json"
PLOT_FILE = "dataset_summary.png"
COLUMNS = ("file_name", "width", "height", "category_id", "segmentation", "subset", "area")
_QUANTILES = {"min": 0, "p05": 5, "p25": 25, "median": 50, "p75": 75, "p95": 95, "max": 100}


class _Image:
  """What describe learns about one image: its rows and its foreground area."""

  def __init__(self, subset: str, file_name: str, width: int, height: int):
    self.subset, self.file_name, self.width, self.height = subset, file_name, width, height
    self.rows: list[dict[str, Any]] = []
    self.foreground = 0

  def add(self, category_id: Any, segmentation: str, area: int) -> None:
    self.rows.append({"file_name": self.file_name, "width": self.width, "height": self.height,
                      "category_id": category_id, "segmentation": segmentation,
                      "subset": self.subset, "area": area})


def _rle_text(mask: np.ndarray) -> str:
  rle = mask_utils.encode(np.asfortranarray(mask))
  return json.dumps({"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                    separators=(",", ":"))


def _coco_images(data_config: ml_collections.ConfigDict, root: pathlib.Path,
                 categories: dict[str, str], problems: list[str],
                 subset_names: list[str]) -> Iterator[_Image]:
  layout = data_lib.coco_layout(data_config)
  wanted = set(data_config.category_ids)
  subset_names += coco.subset_names(root, layout)
  paths: dict[str, list[pathlib.Path]] = {}
  for subset_name in subset_names:
    subset = coco.load_subset(root, subset_name, layout)
    coco.check_category_ids(subset, data_config.category_ids)
    categories.update({str(k): v for k, v in subset.categories.items()})
    if not subset.images:  # Training stops on it.
      problems.append(f"{subset.json_path}: lists no images, so split {subset_name!r} is empty")
    problems.extend(coco.duplicate_file_names(subset))
    for image in subset.images:
      try:  # Missing, unreadable, or of another size: training refuses it.
        paths.setdefault(subset_name, []).append(coco.check_image(subset, image))
      except UserError as e:
        problems.append(str(e))
        continue
      height, width = image["height"], image["width"]
      described = _Image(subset_name, image["file_name"], width, height)
      foreground = []
      for annotation in subset.annotations[image["id"]]:
        where = f"{subset.json_path}: annotation {annotation.get('id')} of {image['file_name']}"
        # Training ignores such an annotation (coco.shapes_of): listed, never foreground.
        undeclared = coco.undeclared_category(subset, annotation, where)
        if undeclared:
          problems.append(undeclared)
        try:
          shape = coco_json.shape_of(annotation, height, width, where, problems)
        except UserError as e:
          problems.append(str(e))
          shape = None
        rle = coco_json.to_rle(shape, height, width) if shape else None
        segmentation = annotation.get("segmentation", [])
        described.add(annotation.get("category_id"),
                      json.dumps(segmentation, separators=(",", ":")),
                      int(mask_utils.area(rle)) if rle else 0)
        if rle and not undeclared and (not wanted or annotation.get("category_id") in wanted):
          foreground.append(rle)
      if not described.rows:
        described.add("", "", 0)
      if foreground:
        described.foreground = int(mask_utils.area(mask_utils.merge(foreground)))
      yield described
  for i, subset_name in enumerate(subset_names):
    for other in subset_names[i + 1:]:
      shared = coco.images_in_both(paths.get(subset_name, []), paths.get(other, []))
      if shared:
        problems.append(f"{root}: {coco.shared_images_line(subset_name, other, shared)}: "
                        "each image belongs in one split")


def _checked_mask(data_config: ml_collections.ConfigDict, root: pathlib.Path, file_name: str,
                  mask_name: str) -> np.ndarray:
  """A slice's (H, W) mask, once the slice passed the checks training makes of it."""
  if data_lib.data_format(data_config) == "lgg":
    folders.check_pair(root, file_name, mask_name)
    return images_lib.read_mask(root / mask_name)
  return brats.read_mask(root / mask_name, data_config.modalities, data_config.mask_channels)


def _slice_images(data_config: ml_collections.ConfigDict, root: pathlib.Path,
                  problems: list[str], subset_names: list[str]) -> Iterator[_Image]:
  fmt = data_lib.data_format(data_config)
  subsets = data_lib.group_subsets(data_config, root)
  subset_names += splits.ordered(set(subsets.values()))
  if fmt == "lgg":
    slices = folders.scan(root, unpaired=problems)
  else:
    brats.check_indices("modalities", data_config.modalities)
    brats.check_indices("mask_channels", data_config.mask_channels)
    slices = [(volume, name, name) for volume, name in brats.scan(root)]
  for group, file_name, mask_name in slices:
    try:
      mask = _checked_mask(data_config, root, file_name, mask_name)
    except UserError as e:  # Listed among the problems; the other slices are described.
      problems.append(str(e))
      continue
    described = _Image(subsets[group], file_name, mask.shape[1], mask.shape[0])
    described.foreground = int(mask.sum())
    if described.foreground:
      described.add(1, _rle_text(mask), described.foreground)
    else:
      described.add("", "", 0)
    yield described


class _Stats:
  """Counts over the images of one subset (or all)."""

  def __init__(self):
    self.images = self.annotations = self.empty = 0
    self.per_category: collections.Counter = collections.Counter()
    self.sizes: collections.Counter = collections.Counter()
    self.areas: list[int] = []
    self.fractions: list[float] = []

  def add(self, image: _Image) -> None:
    self.images += 1
    self.sizes[f"{image.width}x{image.height}"] += 1
    for row in image.rows:
      if row["category_id"] != "":
        self.annotations += 1
        self.per_category[str(row["category_id"])] += 1
    if image.foreground:
      self.areas.append(image.foreground)
      self.fractions.append(image.foreground / (image.width * image.height))
    else:
      self.empty += 1

  def summary(self) -> dict[str, Any]:
    def quantiles(values):
      if not values:
        return None
      points = np.percentile(values, list(_QUANTILES.values()))
      return {name: round(float(v), 6) for name, v in zip(_QUANTILES, points)}

    return {"images": self.images, "annotations": self.annotations,
            "empty_images": self.empty, "images_with_foreground": self.images - self.empty,
            "annotations_per_category": dict(sorted(self.per_category.items())),
            "image_sizes": dict(self.sizes.most_common()),
            "mask_area_pixels": quantiles(self.areas),
            "mask_area_fraction": quantiles(self.fractions)}


def _plain(text: str) -> str:
  """`text` as matplotlib shows it, not as mathtext between two $."""
  return text.replace("$", r"\$")


def _legend(ax) -> None:
  if ax.get_legend_handles_labels()[0]:  # Else matplotlib warns of an empty legend.
    ax.legend()


def _plot(path: pathlib.Path, stats: dict[str, _Stats], categories: dict[str, str]) -> None:
  names = [_plain(name) for name in stats]
  stats = dict(zip(names, stats.values()))
  fig = matplotlib.figure.Figure(figsize=(15, 4.5), layout="constrained")
  ax_images, ax_categories, ax_areas = fig.subplots(1, 3)
  x = np.arange(len(names))
  with_fg = [stats[n].images - stats[n].empty for n in names]
  ax_images.bar(x, with_fg, label="with foreground", color="tab:red")
  bars = ax_images.bar(x, [stats[n].empty for n in names], bottom=with_fg, label="empty",
                       color="tab:gray")
  ax_images.bar_label(bars, labels=[str(stats[n].images) for n in names])
  ax_images.set(xticks=x, xticklabels=names, title="Images per subset", ylabel="images")
  _legend(ax_images)
  category_ids = sorted({c for n in names for c in stats[n].per_category})
  width = 0.8 / max(1, len(names))
  for i, name in enumerate(names):
    counts = [stats[name].per_category[c] for c in category_ids]
    ax_categories.bar(np.arange(len(category_ids)) + i * width, counts, width, label=name)
  ax_categories.set(xticks=np.arange(len(category_ids)) + width * (len(names) - 1) / 2,
                    xticklabels=[_plain(f"{c} ({categories.get(c, '?')})"[:24])
                                 for c in category_ids],
                    title="Annotations per category", ylabel="annotations")
  _legend(ax_categories)
  bins = np.linspace(0, max([max(s.fractions, default=0) for s in stats.values()] + [0.01]), 31)
  for name in names:
    if stats[name].fractions:
      ax_areas.hist(stats[name].fractions, bins=bins, histtype="step", linewidth=1.5, label=name)
  ax_areas.set(title="Foreground area per image (with any)", xlabel="fraction of the image",
               ylabel="images")
  _legend(ax_areas)
  fig.savefig(path, dpi=100, format="png")


def _summary(data_config: ml_collections.ConfigDict, root: pathlib.Path,
             categories: dict[str, str], stats: dict[str, _Stats], total: _Stats,
             problems: list[str]) -> dict[str, Any]:
  fmt = data_lib.data_format(data_config)
  foreground = list(data_config.category_ids) if fmt == "coco" else []
  summary = {
      "format": fmt, "root": str(root), "foreground_category_ids": foreground or "all",
      "categories": categories,
      "subsets": {name: s.summary() for name, s in stats.items()},
      "all": total.summary(),
      "num_problems": len(problems), "problems": problems,
  }
  if fmt != "coco":
    groups = collections.Counter(data_lib.group_subsets(data_config, root).values())
    key = "patients" if fmt == "lgg" else "volumes"
    for name, s in summary["subsets"].items():
      s[key] = groups[name]
    summary["all"][key] = sum(groups.values())
  return summary


def describe(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Describes the configured dataset into `workdir` (see the module docstring).

  Returns:
    The summary written to dataset_summary.json.
  """
  out = pathlib.Path(workdir)
  out.mkdir(parents=True, exist_ok=True)
  data_config = config.data
  fmt = data_lib.data_format(data_config)
  root = data_lib.data_root(data_config, workdir)
  problems: list[str] = []
  categories: dict[str, str] = {}
  subset_names: list[str] = []
  if fmt == "coco":
    images = _coco_images(data_config, root, categories, problems, subset_names)
  else:
    images = _slice_images(data_config, root, problems, subset_names)
    categories["1"] = "tumour"
  stats: dict[str, _Stats] = collections.defaultdict(_Stats)
  total = _Stats()
  # Written aside and moved into place once all three are: a dataset or a folder that stops
  # describe leaves an earlier description whole, and nothing of this one.
  try:
    with reports.replaced_together(out, (CSV_FILE, PLOT_FILE, SUMMARY_FILE)) as aside:
      with open(aside[CSV_FILE], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for image in images:
          writer.writerows(image.rows)
          stats[image.subset].add(image)
          total.add(image)
      coco.log_problems(problems, root)
      if not total.images:
        first = f"; {len(problems)} problems, the first: {problems[0]}" if problems else ""
        raise UserError(f"data.root {root}: no images found{first}")
      stats = {name: stats[name] for name in splits.ordered(set(stats) | set(subset_names))}
      summary = _summary(data_config, root, categories, stats, total, problems)
      aside[SUMMARY_FILE].write_text(json.dumps(summary, indent=2) + "\n")
      _plot(aside[PLOT_FILE], stats, categories)
  except OSError as e:  # A folder it may not write to, a full disk.
    raise UserError(f"{e.filename or out}: {e.strerror or e}") from None
  listed = f"; {len(problems)} problems, listed in {SUMMARY_FILE}" if problems else ""
  logging.info("%s: %d images, %d annotations in %s -> %s%s", root, total.images,
               total.annotations, ", ".join(stats), out, listed)
  return summary
