"""Seeded train/valid/test splits by group (patient, volume), never a group on two sides."""

from typing import Iterable

import numpy as np

from unet_jax.errors import UserError

TRAIN, VALID, TEST = "train", "valid", "test"
SUBSETS = (TRAIN, VALID, TEST)
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
           seed: int) -> dict[str, str]:
  """Assigns each group to train, valid or test.

  The groups are sorted, then permuted by `seed`: the first go to test, the
  next to valid, the rest to train. The same names and seed give the same
  assignment on every machine.

  Args:
    groups: Group names (patients, volumes); duplicates are ignored.
    val_fraction: Fraction of groups held out for validation.
    test_fraction: Fraction of groups held out for testing.
    seed: Seeds the permutation.

  Returns:
    Group name -> subset name.

  Raises:
    UserError: fractions outside [0, 1) or leaving no group to train on.
  """
  names = sorted(set(groups))
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
