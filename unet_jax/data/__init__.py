"""Dataset sources: each split is a grain random-access source of
{"image", "mask", "file_name"} records, chosen by `data.format`.

- "coco": a COCO export (`coco.py`), the default;
- "lgg": one folder per patient of `<case>_<n>.tif` / `<case>_<n>_mask.tif` (`folders.py`);
- "brats": BraTS2020 `volume_<v>_slice_<s>.h5` slices (`brats.py`).

Importing this package does not import grain or jax (describe mode runs without them).
"""

import pathlib

from absl import logging
import ml_collections

from unet_jax.data import brats
from unet_jax.data import cache
from unet_jax.data import coco
from unet_jax.data import folders
from unet_jax.data import splits
from unet_jax.data import synthetic
from unet_jax.errors import some_of
from unet_jax.errors import UserError

PHANTOMS_DIR = "phantoms"
FORMATS = ("coco", "lgg", "brats")

_HOW_TO_GET_DATA = {
    "coco": ("download the Kaggle 'Brain Tumor Image Dataset: Semantic Segmentation' (a "
             "Roboflow COCO export with train/ valid/ test/ folders) and pass "
             "--config.data.root=DIR, or try the demo on generated phantoms: python launch.py "
             "--config=configs/brain.py:demo --workdir=runs/demo"),
    "lgg": ("download the Kaggle 'Brain MRI segmentation' set (mateuszbuda/lgg-mri-segmentation) "
            "and pass --config.data.root=DIR/kaggle_3m (the folder of patient folders)"),
    "brats": ("download the Kaggle BraTS2020 training slices as h5 "
              "(awsaf49/brats2020-training-data) and pass --config.data.root=DIR"),
}


def data_format(data_config: ml_collections.ConfigDict) -> str:
  """The configured format; runs saved before formats existed are COCO."""
  fmt = data_config.get("format", "coco")
  if fmt not in FORMATS:
    raise UserError(f"data.format must be one of {', '.join(FORMATS)}, got {fmt!r}")
  return fmt


def data_root(data_config: ml_collections.ConfigDict, workdir: str) -> pathlib.Path:
  """The dataset root of a run, generating the phantom set when the config asks for it.

  Raises:
    UserError: no usable root, with how to get the dataset.
  """
  fmt = data_format(data_config)
  if data_config.root:
    root = pathlib.Path(data_config.root).expanduser()
    if not root.is_dir():
      raise UserError(f"data.root {root}: no such folder; {_HOW_TO_GET_DATA[fmt]}")
    return root
  if fmt == "coco" and data_config.synthetic.enabled:
    phantoms = data_config.synthetic
    return synthetic.write_phantom_coco(
        pathlib.Path(workdir) / PHANTOMS_DIR,
        split_sizes={"train": phantoms.num_train, "valid": phantoms.num_valid,
                     "test": phantoms.num_test},
        image_size=phantoms.image_size, seed=phantoms.seed)
  raise UserError(f"data.root is not set; {_HOW_TO_GET_DATA[fmt]}")


def coco_layout(data_config: ml_collections.ConfigDict) -> coco.Layout:
  return coco.Layout(data_config.get("annotations", ""), data_config.get("subset_key", "subset"),
                     data_config.get("image_dir", ""))


def _groups(data_config: ml_collections.ConfigDict, root: pathlib.Path) -> list[str]:
  """The patients (lgg) or volumes (brats) under `root`."""
  if data_format(data_config) == "lgg":
    # Unpaired files left out: the sources refuse them, and describe lists them.
    return [p for p, _, _ in folders.scan(root, unpaired=[])]
  return [v for v, _ in brats.scan(root)]


def group_subsets(data_config: ml_collections.ConfigDict, root: pathlib.Path,
                  workdir: str | None = None) -> dict[str, str]:
  """Patient (lgg) or volume (brats) -> subset: as the run in `workdir` recorded them when it
  started (those added since: test), else as the configured split assigns them."""
  return _assigned(data_config, root, splits.read_record(workdir) if workdir else None)


def _assigned(data_config: ml_collections.ConfigDict, root: pathlib.Path,
              recorded: dict[str, str] | None) -> dict[str, str]:
  return splits.assign(_groups(data_config, root), data_config.val_fraction,
                       data_config.test_fraction, data_config.split_seed, recorded)


def record_splits(data_config: ml_collections.ConfigDict, workdir: str) -> None:
  """Records the run's patients or volumes by subset (`splits.json`; COCO splits are folders).

  A resume adds those new under `data.root` (as test) and keeps those gone from it: a patient
  trained on stays recorded as trained on.
  """
  if data_format(data_config) != "coco":
    recorded = splits.read_record(workdir)
    assigned = _assigned(data_config, data_root(data_config, workdir), recorded)
    splits.write_record(workdir, {**assigned, **(recorded or {})})


def _warn_added(groups: list[str], recorded: dict[str, str], workdir: str) -> None:
  """Warns of the test split's groups that the run's record does not hold."""
  added = [g for g in groups if g not in recorded]
  if added:
    logging.warning("%s: %d patients/volumes under data.root were not there when the run "
                    "started (%s); never trained on, they are evaluated as test",
                    pathlib.Path(workdir) / splits.RECORD_FILE, len(added), some_of(added))


def subset_names(data_config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """The subsets (splits) the configured dataset has, train, valid and test first."""
  root = data_root(data_config, workdir)
  if data_format(data_config) == "coco":
    return coco.subset_names(root, coco_layout(data_config))
  present = set(group_subsets(data_config, root, workdir).values())
  return [s for s in splits.SUBSETS if s in present]


def has_split(data_config: ml_collections.ConfigDict, split: str, workdir: str) -> bool:
  """Whether the configured dataset has `split`."""
  if data_format(data_config) == "coco":
    return coco.has_subset(data_root(data_config, workdir), split, coco_layout(data_config))
  return split in subset_names(data_config, workdir)


def _coco_source(data_config: ml_collections.ConfigDict, split: str,
                 root: pathlib.Path) -> coco.CocoSource:
  layout = coco_layout(data_config)
  if not coco.has_subset(root, split, layout):
    found = ", ".join(coco.subset_names(root, layout))
    hint = f"splits found: {found}" if found else _HOW_TO_GET_DATA["coco"]
    raise UserError(f"{coco.annotations_path(root, split, layout)}: split {split!r} not found "
                    f"under data.root {root}; {hint}")
  return coco.CocoSource(root, split, data_config.image_size, data_config.channels,
                         tuple(data_config.category_ids), layout)


def build_source(data_config: ml_collections.ConfigDict, split: str, workdir: str):
  """The source of one split of the configured dataset.

  Returns:
    A grain random-access source with `file_names` (index order), cached on
    disk under `data.cache_dir` when that is set.

  Raises:
    UserError: the split does not exist, its files are bad, or `data.image_size` is not
      positive.
  """
  fmt = data_format(data_config)
  if data_config.image_size < 1:
    raise UserError(f"data.image_size={data_config.image_size}: images are resized to this "
                    "square size in pixels; use 1 or more")
  root = data_root(data_config, workdir)
  recorded = None if fmt == "coco" else splits.read_record(workdir)
  if fmt == "coco":
    source = _coco_source(data_config, split, root)
  elif fmt == "lgg":
    source = folders.FolderSource(root, split, data_config.image_size, data_config.channels,
                                  data_config.val_fraction, data_config.test_fraction,
                                  data_config.split_seed, recorded)
  else:
    if data_config.channels != len(data_config.modalities):
      raise UserError(f"data.channels={data_config.channels} but data.modalities="
                      f"{tuple(data_config.modalities)} picks {len(data_config.modalities)}; "
                      "make them agree")
    source = brats.BratsSource(root, split, data_config.image_size, data_config.modalities,
                               data_config.mask_channels, data_config.clip_percentiles,
                               data_config.val_fraction, data_config.test_fraction,
                               data_config.split_seed, recorded)
  if recorded is not None and split == splits.TEST:
    _warn_added(source.patients if fmt == "lgg" else source.volumes, recorded, workdir)
  if data_config.get("cache_dir", ""):
    source = cache.CachedSource(source, data_config.cache_dir)
  return source
