"""unet_jax command line: train, evaluate (and more) U-Nets from a config.

    python launch.py --config=configs/brain.py:demo --workdir=runs/demo
    python launch.py --mode=eval --workdir=runs/demo --config.eval.split=valid
"""

import _thread
import importlib
import os
import re
import shutil
import signal
import sys
import threading


def _exit_interrupted(what: str) -> None:
  """Ctrl-C's end: one line and status 130, at once. A normal exit may wait forever on a
  data-loader thread; a run survives a kill at any moment (checkpoints appear only once
  complete), so nothing is lost."""
  print(f"interrupted: {what}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(130)


_ctrl_c = threading.Event()  # Set by the handler once main runs.


def _on_ctrl_c(signum, frame) -> None:
  """Ctrl-C once main runs: it unwinds the command, and is remembered (main says so)."""
  del signum, frame
  _ctrl_c.set()
  raise KeyboardInterrupt


def _raise_dropped_interrupt(unraisable) -> None:
  """Python drops an exception raised in a garbage-collection callback (jax has one), a Ctrl-C
  that landed there too, and the command went on: raise it again, outside the callback."""
  if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
    threading.Timer(0.01, _thread.interrupt_main).start()
  else:
    sys.__unraisablehook__(unraisable)


# Not in grain's workers, which run this file as __mp_main__, nor where Ctrl-C is ignored (a
# script's background job: the script's Ctrl-C is not for it).
_CATCHES_CTRL_C = (__name__ == "__main__"
                   and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN)
if _CATCHES_CTRL_C:
  # Until main runs: Ctrl-C among the imports and the config's loading.
  signal.signal(signal.SIGINT, lambda signum, frame: _exit_interrupted("nothing was started"))
  sys.unraisablehook = _raise_dropped_interrupt
  # Its exit at once leaves the loader workers' semaphores and shared memory to
  # multiprocessing's resource tracker (started with these options), which frees them; not
  # worth a warning of each kind after every Ctrl-C.
  sys.warnoptions.append("ignore:resource_tracker:UserWarning")

from unet_jax import xla_config  # pylint: disable=g-bad-import-order,wrong-import-position

xla_config.keep_freed_memory()  # Before any library starts a thread.

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from unet_jax.errors import root_cause  # pylint: disable=g-import-not-at-top,wrong-import-position


def _env_int(name: str, default: int) -> int:
  """An integer environment variable (the multi-host flags' defaults), or a one-line exit."""
  value = os.environ.get(name, str(default))
  try:
    return int(value)
  except ValueError:
    sys.exit(f"error: ${name}={value!r}: not an integer")


_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path.py or path.py:arg).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: every output goes here.",
                               required=True)
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "predict", "export", "describe"],
                          "What to do.")
_INPUT = flags.DEFINE_string("input", None, "predict: an image file or a folder of images.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
    "Multi-host: host:port of process 0 (default $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", _env_int("JAX_NUM_PROCESSES", 1),
    "Multi-host: number of processes (default $JAX_NUM_PROCESSES or 1).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", _env_int("JAX_PROCESS_ID", 0),
    "Multi-host: this process's index (default $JAX_PROCESS_ID or 0).")
_OUTPUT = flags.DEFINE_string("output", None, "predict: output folder (required); "
                              "export: output folder (default WORKDIR/export).")


class _OnlyOurInfo(logging.logging.Filter):
  """Keeps library INFO chatter (orbax, grain, jax) out of the run's log, and orbax's
  warning that the checkpoints evaluation opens read-only are read-only."""

  def filter(self, record):
    if "/orbax/" in record.pathname and record.getMessage().startswith("Given directory is read"):
      return False
    return record.levelno > logging.logging.INFO or not any(
        lib in record.pathname for lib in ("/orbax/", "/grain/", "/jax/", "/jaxlib/"))


SAVED_CONFIG_MODES = ("eval", "predict", "export")


def _flag_value(argv: list[str], name: str) -> str | None:
  """The value `argv` gives flag --`name` (before absl parses it), or None."""
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _argv_with_home(argv: list[str]) -> list[str]:
  """`--workdir=~/runs` as the shell leaves it (it expands no ~ after `=`): the home folder, as
  data.root's ~ is, not a folder named ~ in the current one."""
  out = []
  for arg in argv:
    name, eq, value = arg.partition("=")
    if eq and name in ("--workdir", "--output", "--input") and value.startswith("~"):
      arg = f"{name}={os.path.expanduser(value)}"
    out.append(arg)
  return out


def _argv_with_saved_config(argv: list[str]) -> list[str]:
  """Without --config, these modes use the run's own saved config."""
  workdir = _flag_value(argv, "workdir")
  if (_flag_value(argv, "mode") not in SAVED_CONFIG_MODES
      or _flag_value(argv, "config") is not None or workdir is None):
    return argv
  import unet_jax.saved_config  # pylint: disable=g-import-not-at-top
  return [argv[0], f"--config={unet_jax.saved_config.__file__}:{workdir}", *argv[1:]]


def _train(config, workdir):
  if "sweep" in config:  # configs/ablation.py: one training run per variant.
    from unet_jax import ablation  # pylint: disable=g-import-not-at-top
    ablation.run_sweep(config, workdir)
    return
  from unet_jax import train  # pylint: disable=g-import-not-at-top
  train.train_and_evaluate(config, workdir)


def _eval(config, workdir):
  from unet_jax import evaluate  # pylint: disable=g-import-not-at-top
  evaluate.evaluate(config, workdir)


def _predict(config, workdir):
  from unet_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  if not _INPUT.value or not _OUTPUT.value:
    raise UserError("--mode=predict needs --input=IMAGE_OR_FOLDER and --output=FOLDER")
  from unet_jax import predict  # pylint: disable=g-import-not-at-top
  predict.predict(config, workdir, _INPUT.value, _OUTPUT.value)


def _export(config, workdir):
  from unet_jax import export  # pylint: disable=g-import-not-at-top
  export.export(config, workdir, _OUTPUT.value)


def _describe(config, workdir):
  from unet_jax import describe  # pylint: disable=g-import-not-at-top
  describe.describe(config, workdir)


# Mode name -> runner(config, workdir). Modules are imported once the flags are parsed, so
# that --help answers without starting jax.
RUNNERS = {"train": _train, "eval": _eval, "predict": _predict, "export": _export,
           "describe": _describe}
MODE_MODULES = {"train": ("unet_jax.ablation", "unet_jax.train"), "eval": ("unet_jax.evaluate",),
                "predict": ("unet_jax.predict",), "export": ("unet_jax.export",),
                "describe": ("unet_jax.describe",)}


def main(argv):
  try:
    _run(argv)
  except KeyboardInterrupt:
    _exit_interrupted(_again())
  except (Exception, SystemExit):  # pylint: disable=broad-exception-caught
    # A C extension (matplotlib's renderer, an image decoder) turns a Ctrl-C within it into
    # an error of its own, or ours calls the image it was reading unreadable: still a Ctrl-C.
    if _ctrl_c.is_set():
      _exit_interrupted(_again())
    raise


def _again() -> str:
  return "the same command " + ("resumes from the last checkpoint" if _MODE.value == "train"
                                else "starts it again")


def _import_mode_modules() -> None:
  """Imports what --mode runs, then lets Ctrl-C unwind the command (its cleanup runs) and
  says so, whatever error it became.

  Until then the start-up handler exits: a KeyboardInterrupt raised inside a C extension's
  import (jaxlib's) crashed Python or came out as an ImportError with a traceback.
  """
  for name in MODE_MODULES[_MODE.value]:
    importlib.import_module(name)
  if _CATCHES_CTRL_C:
    signal.signal(signal.SIGINT, _on_ctrl_c)


def _run(argv):
  # One line, as every other mistake on the command line (absl's UsageError adds the help).
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    sys.exit(f"error: --config is required in --mode={_MODE.value}")
  try:
    "train" in _CONFIG.value  # ml_collections reports a config file it failed to load on use.
  except OSError as e:
    sys.exit(f"error: --config: {_one_line(e)}")
  if "sweep" in _CONFIG.value and _MODE.value != "train":  # configs/ablation.py
    sys.exit(f"error: --config is an ablation sweep, which only --mode=train runs; for "
             f"--mode={_MODE.value} give " + (
                 f"its base config, --config={_CONFIG.value.base}" if _MODE.value == "describe"
                 else f"one of its variants without --config, --workdir="
                 f"{os.path.join(_WORKDIR.value, '<variant>')}"))
  for name, folder in (("workdir", _WORKDIR.value), ("output", _OUTPUT.value)):
    if folder and os.path.exists(folder) and not os.path.isdir(folder):
      sys.exit(f"error: --{name}={folder} is a file; give a folder")
  processes, process_id = _NUM_PROCESSES.value, _PROCESS_ID.value
  if processes > 1 and not 0 <= process_id < processes:
    sys.exit(f"error: --process_id={process_id}: use 0 to --num_processes - 1 ({processes - 1})")
  _import_mode_modules()
  logging.get_absl_handler().addFilter(_OnlyOurInfo())
  from unet_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  workdir = _WORKDIR.value
  made = [path for path in (_topmost_missing(workdir), os.path.join(workdir, xla_config.CACHE_DIR))
          if path and not os.path.exists(path)]
  if _MODE.value != "describe":  # describe reads files only; it never starts jax
    from unet_jax import parallel  # pylint: disable=g-import-not-at-top
    # predict and export write to --output alone: the run's folder may be read-only.
    use_cache = _MODE.value in ("train", "eval") or "UNET_JAX_CACHE_DIR" in os.environ
    xla_config.configure(xla_config.cache_dir_for(_WORKDIR.value) if use_cache else "off")
    try:
      parallel.initialize_distributed(_COORDINATOR.value, processes, process_id)
    except ValueError as e:  # No coordinator given, nor found in a cluster's environment.
      _remove_unused(made, workdir)
      sys.exit(f"error: --num_processes={processes}: {_one_line(e)} (--coordinator_address="
               "HOST:PORT of process 0, or $JAX_COORDINATOR_ADDRESS)")
  if _MODE.value in SAVED_CONFIG_MODES:
    from unet_jax import run_lock  # pylint: disable=g-import-not-at-top
    if run_lock.training(workdir):
      logging.warning("%s is training now: its checkpoints are read as they stand, and its "
                      "final evaluation will rewrite eval/", workdir)
  try:
    RUNNERS[_MODE.value](_CONFIG.value, _WORKDIR.value)
  except UserError as e:
    _remove_unused(made, workdir)
    sys.exit(f"error: {e}")
  except OSError as e:  # --workdir or --output (or a folder above it) cannot be made or written.
    folder = _folder_named_by(e)
    if folder is None:
      raise
    _remove_unused(made, workdir)
    sys.exit(f"error: --{folder}: cannot write there ({e.strerror}: {e.filename})")


def _folder_named_by(error: OSError) -> str | None:
  """The flag, as "workdir=DIR" or "output=DIR", whose folder (or one above it) `error` names."""
  if not isinstance(error.filename, str):
    return None
  path = os.path.abspath(error.filename)
  for name, folder in (("workdir", _WORKDIR.value), ("output", _OUTPUT.value)):
    if folder and (path == os.path.abspath(folder) or
                   os.path.abspath(folder).startswith(path.rstrip(os.sep) + os.sep)):
      return f"{name}={folder}"
  return None


def _topmost_missing(path: str) -> str | None:
  """The outermost folder of `path` that does not exist yet (None when `path` exists)."""
  path, top = os.path.abspath(path), None
  while not os.path.exists(path):
    path, top = os.path.dirname(path), path
  return top


def _remove_unused(made: list[str], workdir: str) -> None:
  """Removes the folders a failed command made (the workdir and its parents, its compilation
  cache) if the workdir holds nothing else: an error before any output leaves no trace. The
  demo's phantoms, generated before the model's fields are checked, are no output."""
  from unet_jax.data import PHANTOMS_DIR  # pylint: disable=g-import-not-at-top
  left = {xla_config.CACHE_DIR, PHANTOMS_DIR}
  if _MODE.value != "describe":  # Processes share the workdir: one removes.
    import jax  # pylint: disable=g-import-not-at-top
    from unet_jax import run_lock  # pylint: disable=g-import-not-at-top
    if jax.process_index() != 0:
      return
    left.add(run_lock.LOCK_FILE)
  if os.path.isdir(workdir) and set(os.listdir(workdir)) <= left:
    for path in made:
      shutil.rmtree(path, ignore_errors=True)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag, --config file, variant or field one line, not a
  traceback (ml_collections puts one in its messages)."""
  config = _flag_value(argv, "config")
  if config is None and any(arg.startswith("--config.") for arg in argv):
    # Else absl calls the first override an unknown flag.
    sys.exit(f"error: --config is required in --mode={_flag_value(argv, 'mode') or 'train'} "
             "(its --config.* fields are set on it)")
  if config and not config.partition(":")[0].endswith(".py"):  # It would be run as Python.
    sys.exit(f"error: --config={config}: not a config file (path.py or path.py:arg); without "
             "--config, --mode=eval, predict and export read the run's own config.json")
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, OSError) as e:
    sys.exit(f"error: {_one_line(e)}")


def _one_line(error: BaseException) -> str:
  """The line of a flag or config error that says what is wrong."""
  if isinstance(error, flags.Error) and "Traceback" not in str(error):
    return str(error).splitlines()[0]
  cause = root_cause(error)
  if isinstance(cause, KeyError):  # A --config.* field the config does not have.
    hint = re.search(r'Did you mean "\w+"', str(error))
    return f"the config has no field {cause}" + (f" ({hint.group(0).lower()}?)" if hint else "")
  return [line.strip() for line in str(cause).splitlines() if line.strip()][-1]


if __name__ == "__main__":
  sys.argv = _argv_with_saved_config(_argv_with_home(sys.argv))
  app.run(main, flags_parser=_parse_flags)
