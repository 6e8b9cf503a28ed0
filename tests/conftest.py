"""Shared fixtures. Four fake CPU devices, set before jax starts, so every
test exercises the data-parallel path. One persistent compilation cache for
the session, in this process and in the runs tests start, so a step compiled
once (the same program: same config and shapes) is not compiled again.

The tests compile many small programs and run each a few times, so XLA
generates their code without LLVM's optimisation passes: the programs (HLO)
are the ones a run compiles, and the suite takes 0.70x the time (7 min 30 s
against 10 min 41 s on a 2-core AMD EPYC Zen 3)."""

import os
import shutil
import tempfile

_TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count=4 {_TEST_XLA_FLAGS}").strip()
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


@pytest.fixture(scope="session")
def ema_run(tmp_path_factory):
  """The tiny run with an EMA of its parameters (decay 0.9), not evaluated: (config, workdir).

  Tests that change the config work on a copy.
  """
  from unet_jax import train  # pylint: disable=g-import-not-at-top
  config = tiny_demo_config()
  config.train.ema_decay, config.eval.split = 0.9, "none"
  workdir = tmp_path_factory.mktemp("ema_run")
  train.train_and_evaluate(config, str(workdir))
  return config, workdir


@pytest.fixture(scope="session")
def other_run(tmp_path_factory):
  """Another model for ensembles of `trained_run`: seed 1, 8 features: (config, workdir).

  Tests that change the config work on a copy.
  """
  from unet_jax import train  # pylint: disable=g-import-not-at-top
  config = tiny_demo_config()
  config.train.seed, config.model.features = 1, 8
  workdir = tmp_path_factory.mktemp("other_run")
  train.train_and_evaluate(config, str(workdir))
  return config, workdir


@pytest.fixture
def trained_copy(trained_run, tmp_path):
  """`trained_run`'s folder copied without eval/, to train further: (config, workdir)."""
  config, workdir, _ = trained_run
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("eval"))
  return config.copy_and_resolve_references(), copy


@pytest.fixture(scope="session")
def run_env():
  """The environment of a process a test starts, with `devices` CPU devices (1: as training)."""
  def env(devices: int = 4, **overrides: str) -> dict[str, str]:
    count = f"--xla_force_host_platform_device_count={devices} " if devices > 1 else ""
    return {**os.environ, "XLA_FLAGS": count + _TEST_XLA_FLAGS, "JAX_PLATFORMS": "cpu",
            **overrides}
  return env
