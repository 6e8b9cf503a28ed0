"""Seeded train/valid/test splits by group (patient, volume), never a group on two sides.

A run records its split when it starts (`splits.json`), and its sources keep
to that record: patients added to, or taken from, the data root later cannot
move a patient the run trained on into its valid or test split.
"""

import json
import os
import pathlib
from typing import Iterable, Mapping

import numpy as np

from unet_jax import reports
from unet_jax.errors import UserError

TRAIN, VALID, TEST = "train", "valid", "test"
SUBSETS = (TRAIN, VALID, TEST)
RECORD_FILE = "splits.json"
_FIRST = (TRAIN, VALID, "val", TEST)


def ordered(names) -> list[str]:
  """Subset names with train, valid (val) and test first, then the rest sorted."""
  names = set(names)
  return [n for n in _FIRST if n in names] + sorted(names - set(_FIRST))


def _count(fraction: float, groups: int) -> int:
  count = round(fraction * groups)
  # A split asked for gets at least one group whenever there are groups to spare.
  if fraction > 0 and count == 0 and groups >= 3:
    count = 1
  return count


def assign(groups: Iterable[str], val_fraction: float, test_fraction: float,
           seed: int, recorded: Mapping[str, str] | None = None) -> dict[str, str]:
  """Assigns each group to train, valid or test.

  The groups are sorted, then permuted by `seed`: the first go to test, the
  next to valid, the rest to train. The same names and seed give the same
  assignment on every machine. With a run's `recorded` split, each group keeps
  its recorded subset, and a group it does not hold (added since) goes to test.

  Args:
    groups: Group names (patients, volumes); duplicates are ignored.
    val_fraction: Fraction of groups held out for validation.
    test_fraction: Fraction of groups held out for testing.
    seed: Seeds the permutation.
    recorded: Group name -> subset, as a run recorded it (`read_record`).

  Returns:
    Group name -> subset name.

  Raises:
    UserError: a negative seed, fractions outside [0, 1) or leaving no group to train on.
  """
  names = sorted(set(groups))
  if seed < 0:
    raise UserError(f"data.split_seed={seed}: use 0 or more")
  if recorded is not None:
    return {name: recorded.get(name, TEST) for name in names}
  if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
    raise UserError(f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} "
                    "must be in [0, 1) and sum to less than 1")
  n_test = _count(test_fraction, len(names))
  n_val = _count(val_fraction, len(names))
  if names and n_test + n_val >= len(names):
    raise UserError(f"only {len(names)} patients/volumes: too few to hold out "
                    f"{n_val} for validation and {n_test} for testing and still train")
  order = np.random.default_rng(seed).permutation(len(names))
  subsets = [TEST] * n_test + [VALID] * n_val + [TRAIN] * (len(names) - n_test - n_val)
  return {names[i]: subset for i, subset in zip(order, subsets)}


def read_record(workdir: str | os.PathLike) -> dict[str, str] | None:
  """Group -> subset as the run in `workdir` recorded it; None where it recorded none.

  Raises:
    UserError: the record is not a split (a damaged or hand-edited file).
  """
  path = pathlib.Path(workdir) / RECORD_FILE
  try:
    text = path.read_text()
  except FileNotFoundError:
    return None
  except OSError as e:
    raise UserError(f"{path}: cannot read the run's split ({e.strerror})") from None
  try:
    by_subset = json.loads(text)
    recorded = {name: subset for subset in SUBSETS for name in by_subset.get(subset, [])}
    if not all(isinstance(name, str) for name in recorded):
      raise TypeError
  except (ValueError, TypeError, AttributeError):
    raise UserError(f"{path}: not the run's split (a JSON object of {', '.join(SUBSETS)} "
                    "lists of patients/volumes); restore it from a copy of the run") from None
  return recorded


def write_record(workdir: str | os.PathLike, assignment: Mapping[str, str]) -> None:
  """Writes `assignment` (group -> subset) as the run's split, each subset's groups sorted."""
  by_subset = {subset: sorted(g for g, s in assignment.items() if s == subset)
               for subset in SUBSETS}
  reports.write_atomic(pathlib.Path(workdir) / RECORD_FILE, json.dumps(by_subset, indent=1) + "\n")
