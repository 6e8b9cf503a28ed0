"""Dataset sources: each split is a grain random-access source of
{"image", "mask", "file_name"} records."""

import pathlib

import ml_collections

from unet_jax.data import coco
from unet_jax.data import synthetic
from unet_jax.errors import UserError

PHANTOMS_DIR = "phantoms"

_HOW_TO_GET_DATA = (
    "download the Kaggle 'Brain Tumor Image Dataset: Semantic Segmentation' (a Roboflow "
    "COCO export with train/ valid/ test/ folders) and pass --config.data.root=DIR, or try "
    "the demo on generated phantoms: python launch.py --config=configs/brain.py:demo "
    "--workdir=runs/demo")


def data_root(data_config: ml_collections.ConfigDict, workdir: str) -> pathlib.Path:
  """The dataset root of a run, generating the phantom set when the config asks for it.

  Raises:
    UserError: no usable root, with how to get the dataset.
  """
  if data_config.root:
    root = pathlib.Path(data_config.root).expanduser()
    if not root.is_dir():
      raise UserError(f"data.root {root}: no such folder; {_HOW_TO_GET_DATA}")
    return root
  if data_config.synthetic.enabled:
    phantoms = data_config.synthetic
    return synthetic.write_phantom_coco(
        pathlib.Path(workdir) / PHANTOMS_DIR,
        split_sizes={"train": phantoms.num_train, "valid": phantoms.num_valid,
                     "test": phantoms.num_test},
        image_size=phantoms.image_size, seed=phantoms.seed)
  raise UserError(f"data.root is not set; {_HOW_TO_GET_DATA}")


def has_split(data_config: ml_collections.ConfigDict, split: str, workdir: str) -> bool:
  """Whether the configured dataset has `split`."""
  return coco.annotations_path(data_root(data_config, workdir), split).is_file()


def build_source(data_config: ml_collections.ConfigDict, split: str, workdir: str) -> coco.CocoSource:
  """The source of one split of the configured dataset.

  Raises:
    UserError: the split does not exist or its files are bad.
  """
  root = data_root(data_config, workdir)
  if not has_split(data_config, split, workdir):
    raise UserError(f"{coco.annotations_path(root, split)}: split {split!r} not found under "
                    f"data.root {root}; {_HOW_TO_GET_DATA}")
  return coco.CocoSource(root, split, data_config.image_size, data_config.channels,
                         tuple(data_config.category_ids))
