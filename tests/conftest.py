"""Shared fixtures. Four fake CPU devices, set before jax starts, so every
test exercises the data-parallel path. One persistent compilation cache for
the session, in this process and in the runs tests start, so a step compiled
once (the same program: same config and shapes) is not compiled again."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_COMPILATION_CACHE = tempfile.TemporaryDirectory(prefix="unet_jax_tests_")
os.environ["UNET_JAX_CACHE_DIR"] = _COMPILATION_CACHE.name

import pytest  # pylint: disable=g-import-not-at-top

from configs import brain  # pylint: disable=g-import-not-at-top
from unet_jax import xla_config  # pylint: disable=g-import-not-at-top

xla_config.enable_compilation_cache(_COMPILATION_CACHE.name)


def tiny_demo_config():
  """configs/brain.py:smoke, one epoch: two steps of a tiny U-Net on 32x32 phantoms."""
  config = brain.get_config("smoke")
  config.train.epochs = 1
  return config


@pytest.fixture
def tiny_config():
  return tiny_demo_config()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
  """A two-step run (16 phantoms, global batch 8 over 4 devices): (config, workdir, summary).

  Tests that change the config work on a copy.
  """
  from unet_jax import train  # pylint: disable=g-import-not-at-top
  config = tiny_demo_config()
  workdir = tmp_path_factory.mktemp("run")
  summary = train.train_and_evaluate(config, str(workdir))
  return config, workdir, summary
