"""Scaling and surviving: device-count equivalence, multi-process runs, kill -9 resume,
NaN stops, early stopping and reduce-on-plateau."""

import fcntl
import json
import logging
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types

import jax
import numpy as np
import pytest

from configs import ablation as ablation_config
from unet_jax import (ablation, checkpoint, data, evaluate, optim, parallel, reports, run_lock,
                      steps, time_budget, train)
from unet_jax.data import pipeline
from unet_jax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run_steps(config, workdir, devices, count):
  mesh = parallel.make_mesh(devices)
  source = data.build_source(config.data, "train", str(workdir))
  state = jax.device_put(steps.create_train_state(config, (32, 32, 1),
                                                  optim.make_optimizer(config)),
                         parallel.replicated(mesh))
  p_train, _ = steps.jit_steps(config, mesh)
  batches = pipeline.train_batches(source, config)
  losses = []
  for step in range(count):
    rate = optim.learning_rate(config.train, step, total_steps=100, steps_per_epoch=2)
    state, metrics = p_train(state, parallel.device_batch(next(batches), mesh), rate)
    losses.append(float(metrics["loss"]))
  return jax.device_get(state.params), losses


def test_one_and_four_devices_train_alike(tiny_config, tmp_path):
  tiny_config.train.epochs = 3
  one_params, one_losses = _run_steps(tiny_config, tmp_path, jax.devices()[:1], 5)
  four_params, four_losses = _run_steps(tiny_config, tmp_path, jax.devices(), 5)
  np.testing.assert_allclose(four_losses, one_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one_params), jax.tree.leaves(four_params)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_batch_must_divide_over_devices(tiny_config, tmp_path):
  tiny_config.train.batch_size = 6
  with pytest.raises(UserError, match="does not divide evenly over 4 devices"):
    train.train_and_evaluate(tiny_config, str(tmp_path))


def test_evaluation_batch_must_divide_over_devices_before_training(tiny_config, tmp_path):
  tiny_config.eval.batch_size = 6
  with pytest.raises(UserError, match="eval.batch_size: batch size 6 does not divide evenly"):
    train.train_and_evaluate(tiny_config, str(tmp_path))
  assert not reports.read_metrics(tmp_path)  # Stopped before the first step.


def test_nan_loss_stops_naming_step_batch_and_checkpoint(tiny_config, tmp_path):
  tiny_config.train.learning_rate, tiny_config.train.schedule = 1e30, "constant"
  tiny_config.train.epochs = 3
  with pytest.raises(UserError, match=r"step 2: loss is nan on batch \[phantom_train_.*; "
                     "stopped, last good checkpoint: none saved yet"):
    train.train_and_evaluate(tiny_config, str(tmp_path / "constant"))


def test_parameters_diverged_by_an_epoch_s_last_step_are_not_saved(tiny_config, tmp_path):
  # The warm-up's rates: 0, then 5e29 at the epoch's second and last step.
  tiny_config.train.learning_rate, tiny_config.train.epochs = 1e30, 3
  with pytest.raises(UserError, match="epoch 1 validation: loss is nan after step 2; stopped, "
                     "last good checkpoint: none saved yet"):
    train.train_and_evaluate(tiny_config, str(tmp_path))
  assert not list((tmp_path / "checkpoints").glob("[0-9]*"))


def test_early_stopping_and_plateau(tiny_config, tmp_path, caplog):
  tiny_config.train.learning_rate = 1e-12  # nothing improves after the first epoch
  tiny_config.train.epochs = 6
  tiny_config.train.early_stopping_patience = 2
  tiny_config.train.plateau_patience = 1
  train.train_and_evaluate(tiny_config, str(tmp_path))
  val = [r for r in reports.read_metrics(tmp_path) if r["split"] == "valid"]
  assert [r["epoch"] for r in val] == [1, 2, 3]
  assert [r["lr_scale"] for r in val] == [1.0, 1.0, 0.5]
  # A second start, with more epochs, says it stopped early and does nothing.
  tiny_config.train.epochs = 8
  with caplog.at_level(logging.INFO):
    assert train.train_and_evaluate(tiny_config, str(tmp_path)) == {}
  assert "already finished at step 6 (stopped early); raise train.early_stopping_patience " \
         "(0: off) to train further" in caplog.text
  assert len([r for r in reports.read_metrics(tmp_path) if r["split"] == "valid"]) == 3


def _final_params(workdir):
  """The latest checkpoint's parameters, restored onto this process's first device."""
  ocp = checkpoint.ocp
  ckpt = checkpoint.Checkpoints(workdir, read_only=True)
  step = ckpt.latest_step()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        ckpt.manager.item_metadata(step)["state"])
  restored = ckpt.manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target)))
  ckpt.close()
  return step, restored["state"]["params"]


def _untimed(run):
  """metrics.jsonl's records without their speeds and times, which no two runs share."""
  return [{k: v for k, v in r.items() if k not in ("img_per_s", "train_s")}
          for r in reports.read_metrics(run)]


SMOKE = ["--config=configs/brain.py:smoke", "--config.train.epochs=4",
         "--config.eval.split=none"]  # no final evaluation: the parameters are compared


def _steps_saved(workdir):
  folder = workdir / "checkpoints"
  return [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []


@pytest.fixture
def ctrl_c_reaches_commands():
  """Commands started here take Ctrl-C as a terminal's do: a background job's (as the suite
  may run) inherit it ignored."""
  saved = signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  signal.signal(signal.SIGINT, saved)


def _start(command, workdir, run_env):
  """`command` on `workdir` in a process of its own, its output in `workdir`.log."""
  with open(f"{workdir}.log", "w") as log:
    return subprocess.Popen([*command, f"--workdir={workdir}"], cwd=REPO, env=run_env(4),
                            stdout=log, stderr=log, text=True)


def _stop_after_a_checkpoint(proc, workdir, sig):
  """Sends `sig` to `proc` once it saves a checkpoint past those it started from."""
  start = max(_steps_saved(workdir), default=0)
  deadline = time.time() + 240
  while max(_steps_saved(workdir), default=0) <= start:
    assert proc.poll() is None, "it ended before a new checkpoint"
    assert time.time() < deadline, "no new checkpoint in 240 s"
    time.sleep(0.05)
  proc.send_signal(sig)
  proc.wait(timeout=60)  # Ctrl-C exits at once, whatever threads run.


@pytest.mark.parametrize("after_s", [0.3, 1.5, 3.0])  # Imports, jax's start, the data.
@pytest.mark.usefixtures("ctrl_c_reaches_commands")
def test_ctrl_c_while_a_command_starts_exits_at_once(tmp_path, run_env, after_s):
  command = [sys.executable, str(REPO / "launch.py"), *SMOKE]
  proc = _start(command, tmp_path / "run", run_env)
  time.sleep(after_s)
  proc.send_signal(signal.SIGINT)
  code = proc.wait(timeout=20)  # It went on training, once: Python dropped the Ctrl-C.
  output = (tmp_path / "run.log").read_text()
  assert code == 130 and "Traceback" not in output, output[-2000:]
  assert output.strip().splitlines()[-1].startswith("interrupted: "), output[-2000:]


def test_a_ctrl_c_that_a_library_turned_into_its_error_is_a_ctrl_c(run_env):
  # matplotlib's renderer raised ValueError("Invalid bounding box") for a Ctrl-C within it:
  # a traceback and status 1, where the run had been stopped on purpose.
  script = textwrap.dedent("""
      import launch
      launch.flags.FLAGS(["launch.py", "--workdir=unused"])
      def drawing(argv):
        try:
          launch._on_ctrl_c(2, None)
        except KeyboardInterrupt:
          raise ValueError("Invalid bounding box")
      launch._run = drawing
      launch.main(["launch.py"])
  """)
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=run_env(1),
                          capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 130, result.stderr[-2000:]
  assert result.stderr.strip() == "interrupted: the same command resumes from the last checkpoint"


def test_a_background_job_that_ignores_ctrl_c_goes_on(tmp_path, run_env):
  # A script's `python launch.py ... &`: the script's Ctrl-C is not for it.
  command = [sys.executable, str(REPO / "launch.py"), *SMOKE, f"--workdir={tmp_path / 'run'}"]
  saved = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Inherited, as a shell's `&` sets it.
  try:
    proc = subprocess.Popen(command, cwd=REPO, env=run_env(4), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  finally:
    signal.signal(signal.SIGINT, saved)
  try:
    for _ in range(2):
      time.sleep(1.5)
      proc.send_signal(signal.SIGINT)
    time.sleep(1.5)
    assert proc.poll() is None
  finally:
    proc.kill()
    proc.wait()


def test_a_ctrl_c_python_drops_in_a_gc_callback_is_raised_again(run_env):
  # jax's garbage-collection callback runs often at start-up; a KeyboardInterrupt raised in a
  # callback is printed as "Exception ignored" and the command went on.
  script = textwrap.dedent("""
      import gc, signal, sys, time
      import launch
      # As `python launch.py` from a terminal sets them.
      sys.unraisablehook = launch._raise_dropped_interrupt
      signal.signal(signal.SIGINT, launch._on_ctrl_c)
      def callback(phase, info):
        if phase == "start" and not fired:
          fired.append(1)
          raise KeyboardInterrupt
      fired = []
      gc.callbacks.append(callback)
      try:
        gc.collect()
        time.sleep(5)
        print("went on")
      except KeyboardInterrupt:
        print("interrupted")
  """)
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=run_env(1),
                          capture_output=True, text=True, timeout=60, check=False)
  assert result.stdout.strip() == "interrupted", result.stdout + result.stderr[-2000:]


@pytest.mark.usefixtures("ctrl_c_reaches_commands")
def test_kill_then_resume_matches_uninterrupted(tmp_path, run_env):
  straight, stopped = tmp_path / "straight", tmp_path / "stopped"
  command = [sys.executable, str(REPO / "launch.py"), *SMOKE]
  # Beside the stopped runs: much of a start is single-threaded, and the machine has two cores.
  uninterrupted = _start(command, straight, run_env)
  try:
    # Ctrl-C, resumed, then kill -9 of the resumed run, resumed again: each in an epoch after
    # a checkpoint, before the last.
    for sig, code in ((signal.SIGINT, 130), (signal.SIGKILL, -signal.SIGKILL)):
      proc = _start(command, stopped, run_env)
      _stop_after_a_checkpoint(proc, stopped, sig)
      output = pathlib.Path(f"{stopped}.log").read_text()
      assert proc.returncode == code, output[-2000:]
      if sig == signal.SIGINT:
        assert output.strip().splitlines()[-1].startswith(
            "interrupted: the same command resumes")
      assert 8 not in _steps_saved(stopped), "the run finished before it was stopped"
    subprocess.run([*command, f"--workdir={stopped}"], cwd=REPO, env=run_env(4), check=True,
                   capture_output=True, timeout=300)
    assert uninterrupted.wait(timeout=300) == 0, pathlib.Path(f"{straight}.log").read_text()[-2000:]
  finally:
    uninterrupted.kill()

  step_a, params_a = _final_params(straight)
  step_b, params_b = _final_params(stopped)
  assert step_a == step_b == 8
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)
  assert _untimed(stopped) == _untimed(straight)
  assert [r["epoch"] for r in _untimed(stopped) if r["split"] == "valid"] == [1, 2, 3, 4]


def test_time_budget_plan_trains_as_that_many_epochs_and_is_kept_on_resume(
    tiny_config, tmp_path, monkeypatch, caplog):
  tiny_config.eval.split = "none"
  tiny_config.train.epochs = 2
  train.train_and_evaluate(tiny_config, str(tmp_path / "two"))
  tiny_config.train.epochs, tiny_config.train.time_budget_minutes = 4, 30.0
  monkeypatch.setattr(time_budget, "epochs_that_fit", lambda *args, **kwargs: 2)
  timed, first_epoch_seconds = [], time_budget.first_epoch_seconds
  monkeypatch.setattr(time_budget, "first_epoch_seconds",
                      lambda syncs, *args: timed.append(syncs) or first_epoch_seconds(syncs, *args))
  with caplog.at_level(logging.WARNING), jax.log_compiles():
    train.train_and_evaluate(tiny_config, str(tmp_path / "budget"))
  # An epoch of 2 steps, one log window: timed from the end of the first step, which compiles.
  assert [steps_done for steps_done, _ in timed[0]] == [1, 2]
  # The plan shortened the schedule without compiling the train step again.
  assert caplog.text.count("Compiling jit(train_step)") == 1

  assert _final_params(tmp_path / "budget")[0] == _final_params(tmp_path / "two")[0] == 4
  for a, b in zip(*(jax.tree.leaves(_final_params(tmp_path / run)[1])
                    for run in ("two", "budget"))):
    np.testing.assert_array_equal(a, b)
  assert json.loads((tmp_path / "budget/config.json").read_text())["train"]["epochs"] == 2
  logged = {r["step"]: r["learning_rate"] for r in reports.read_metrics(tmp_path / "budget")
            if r["split"] == "train"}
  assert logged == pytest.approx({step: optim.learning_rate(tiny_config.train, step - 1, 4, 2)
                                   for step in logged})
  # Half-way down a cosine over the plan's 4 steps (over train.epochs' 8, 0.93 of the peak).
  assert len(logged) == 4 and logged[4] == pytest.approx(tiny_config.train.learning_rate / 2)
  # Started again, under a budget that would now fit all four, the run keeps its plan.
  monkeypatch.setattr(time_budget, "epochs_that_fit", lambda *args, **kwargs: 4)
  assert train.train_and_evaluate(tiny_config, str(tmp_path / "budget")) == {}
  # A budget given to a run that started without one has no first epoch to plan on: said so.
  tiny_config.train.epochs = 3
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(tiny_config, str(tmp_path / "two"))
  assert "this run started without one: it trains its train.epochs=3" in caplog.text
  assert _final_params(tmp_path / "two")[0] == 6


def test_resuming_under_a_config_that_trains_something_else_is_refused(trained_copy):
  config, workdir = trained_copy
  before = (workdir / "config.json").read_text()
  config.train.epochs, config.train.learning_rate = 2, 0.1
  with pytest.raises(UserError, match=r"config.json: the run was trained with "
                     r"train.learning_rate=0.001, the config has 0.1; resume it with"):
    train.train_and_evaluate(config, str(workdir))
  assert (workdir / "config.json").read_text() == before
  # Its length, patience and evaluation may change.
  config.train.learning_rate, config.train.early_stopping_patience = 1e-3, 5
  config.eval.tta = True
  train.train_and_evaluate(config, str(workdir))
  assert [r["epoch"] for r in reports.read_metrics(workdir) if r["split"] == "valid"] == [1, 2]


def test_an_older_step_half_deleted_by_a_kill_is_removed_when_the_run_starts_again(
    trained_copy):
  config, workdir = trained_copy
  assert checkpoint.Checkpoints(workdir).latest_step() == 2
  (workdir / "checkpoints/1/state").mkdir(parents=True)  # Orbax was deleting step 1.
  (workdir / "checkpoints/1/state/data").write_bytes(b"0" * 100)
  config.train.epochs = 2
  train.train_and_evaluate(config, str(workdir))
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]


def test_a_run_stopped_in_its_final_evaluation_is_evaluated_when_started_again(trained_run,
                                                                             trained_copy):
  config, workdir = trained_copy  # Trained, with no eval/.
  summary = {**trained_run[2], "data_root": str(workdir / "phantoms")}
  assert train.train_and_evaluate(config, str(workdir)) == summary
  assert train.train_and_evaluate(config, str(workdir)) == {}  # Now nothing is left.


def test_fewer_epochs_than_the_plan_end_the_run_there(tiny_config, tmp_path, monkeypatch):
  tiny_config.eval.split = "none"
  tiny_config.train.epochs, tiny_config.train.time_budget_minutes = 3, 30.0
  monkeypatch.setattr(time_budget, "epochs_that_fit", lambda *args, **kwargs: 3)
  train.train_and_evaluate(tiny_config, str(tmp_path))
  shutil.rmtree(tmp_path / "checkpoints" / "6")  # As if stopped in the third epoch.
  tiny_config.train.epochs = 2
  train.train_and_evaluate(tiny_config, str(tmp_path))
  assert _final_params(tmp_path)[0] == 4


def test_a_missing_test_image_stops_the_run_before_training(tiny_config, tmp_path):
  root = tmp_path / "export"
  shutil.copytree(data.data_root(tiny_config.data, str(tmp_path / "phantoms")), root)
  (root / "test" / "phantom_test_00003.png").unlink()
  tiny_config.data.root, tiny_config.data.synthetic.enabled = str(root), False
  with pytest.raises(UserError, match="phantom_test_00003.png: image file not found"):
    train.train_and_evaluate(tiny_config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_budget_shorter_than_an_epoch_still_trains_one_epoch_and_evaluates(tiny_config, tmp_path):
  tiny_config.train.epochs, tiny_config.train.time_budget_minutes = 3, 1e-4
  summary = train.train_and_evaluate(tiny_config, str(tmp_path))
  assert [r["epoch"] for r in reports.read_metrics(tmp_path) if r["split"] == "valid"] == [1]
  assert summary["checkpoint_step"] == 2


def test_a_run_started_again_before_its_first_checkpoint_logs_its_steps_once(
    trained_run, tiny_config, tmp_path):
  tiny_config.eval.split = "none"  # Its final evaluation logs nothing.
  run = tmp_path / "run"
  run.mkdir()
  # A run killed in its first epoch: steps logged, no checkpoint, its last line cut short.
  (run / reports.METRICS_FILE).write_text(
      '{"step": 1, "epoch": 1, "split": "train", "loss": 9.0}\n{"step": 2, "ep')
  train.train_and_evaluate(tiny_config, str(run))
  assert _untimed(run) == _untimed(trained_run[1])


def test_a_second_run_in_the_same_folder_stops_before_it_writes(tiny_config, tmp_path):
  assert not run_lock.training(tmp_path)
  with run_lock.held(tmp_path):  # As a run training there would hold it.
    assert run_lock.training(tmp_path)  # Eval, predict and export warn.
    with pytest.raises(UserError, match="another process is training this run"):
      train.train_and_evaluate(tiny_config, str(tmp_path))
    with pytest.raises(UserError, match="another process is training this run"):
      ablation.run_sweep(ablation_config.get_config("smoke"), str(tmp_path))
  assert [p.name for p in tmp_path.iterdir()] == [run_lock.LOCK_FILE]
  assert not run_lock.training(tmp_path)
  with run_lock.held(tmp_path):  # Released when the run ends: the next one takes it.
    pass


def test_a_run_starting_while_an_eval_tests_the_lock_is_not_refused(tmp_path, monkeypatch):
  (tmp_path / run_lock.LOCK_FILE).touch()
  tester = open(tmp_path / run_lock.LOCK_FILE)
  fcntl.flock(tester, fcntl.LOCK_SH)  # run_lock.training's instant, over while the run waits.
  waits = []
  monkeypatch.setattr(run_lock, "time", types.SimpleNamespace(
      sleep=lambda seconds: waits.append(seconds) or tester.close()))
  with run_lock.held(tmp_path):  # Waits out that instant instead of refusing the run.
    assert tester.closed and len(waits) == 1


def test_keep_checkpoints_must_keep_one(tiny_config, tmp_path):
  tiny_config.train.keep_checkpoints = 0
  with pytest.raises(UserError, match="train.keep_checkpoints=0: keep at least 1"):
    train.train_and_evaluate(tiny_config, str(tmp_path))


@pytest.mark.parametrize("field", ["log_every_steps", "checkpoint_every_epochs",
                                   "step_every_epochs"])
def test_cadences_must_be_one_or_more(tiny_config, tmp_path, field):
  tiny_config.train.schedule = "step"  # Else its step_every_epochs is not used.
  setattr(tiny_config.train, field, 0)
  with pytest.raises(UserError, match=f"train.{field}=0: use 1 or more"):
    train.train_and_evaluate(tiny_config, str(tmp_path))


def test_a_run_of_no_epochs_is_an_error_not_a_finished_run(tiny_config, tmp_path):
  tiny_config.train.epochs = 0
  with pytest.raises(UserError, match="train.epochs=0: train 1 or more"):
    train.train_and_evaluate(tiny_config, str(tmp_path))


@pytest.mark.parametrize("field,value,allowed", [
    ("seed", -1, r"\[0, 4294967295\]"),  # grain's shuffle took it only with a traceback.
    ("learning_rate", 0.0, r"\(0, inf\)"),  # The weights never moved.
    ("learning_rate", -0.01, r"\(0, inf\)"),  # Gradient ascent, exit code 0.
    ("step_factor", 0.0, r"\(0, 1\]"),
    ("plateau_factor", -1.0, r"\(0, 1\]"),
    ("ema_decay", 1.5, r"\[0, 1\)"),  # The EMA stayed at the initial weights.
    ("ema_warmup", -1.0, r"\[1, inf\)"),
    ("shared_input_fraction", 2.0, r"\[0, 1\]"),
    ("bce_weight", -1.0, r"\[0, inf\)"),
    ("lovasz_weight", float("nan"), r"\[0, inf\)"),
])
def test_train_numbers_out_of_range_are_one_line_errors(tiny_config, tmp_path, field, value,
                                                       allowed):
  tiny_config.train[field] = value
  with pytest.raises(UserError, match=rf"train.{field}={value}: use a value in {allowed}"):
    train.train_and_evaluate(tiny_config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_a_loss_of_no_terms_and_weights_of_no_category_are_errors(tiny_config):
  tiny_config.train.dice_weight = tiny_config.train.bce_weight = 0.0
  with pytest.raises(UserError, match="are all 0: the loss would be 0 and nothing would train"):
    train.check_config(tiny_config)
  tiny_config.train.dice_weight = 1.0
  tiny_config.data.category_ids, tiny_config.train.category_weights = (1, 2), (0.0, 0.0)
  with pytest.raises(UserError, match=r"category_weights=\(0.0, 0.0\): weights of 0 or more, "
                                      "not all 0"):
    train.check_config(tiny_config)


def test_settings_of_another_optimizer_are_said_to_be_ignored(tiny_config, tmp_path, caplog):
  caplog.set_level(logging.WARNING)
  train.warn_of_settings(tiny_config, str(tmp_path), evaluates=True)
  assert not caplog.text
  tiny_config.train.weight_decay = 0.5
  train.warn_of_settings(tiny_config, str(tmp_path), evaluates=True)
  assert "train.weight_decay=0.5 is ignored: it is train.optimizer=adamw's" in caplog.text
  tiny_config.train.optimizer = "adamw"
  tiny_config.train.momentum = 0.5
  train.warn_of_settings(tiny_config, str(tmp_path), evaluates=True)
  assert "train.momentum=0.5 is ignored: it is train.optimizer=sgd's, and this run uses adamw" \
      in caplog.text


def test_training_on_the_split_that_picks_or_scores_is_warned_of(tiny_config, tmp_path, caplog):
  caplog.set_level(logging.WARNING)
  tiny_config.data.val_split = tiny_config.eval.split = "train"
  train.warn_of_settings(tiny_config, str(tmp_path), *train.build_sources(tiny_config,
                                                                          str(tmp_path))[2:])
  assert "data.val_split='train' is the training split: it picks the best checkpoint" \
      in caplog.text
  assert "eval.split='train' is the training split: it is scored after training" in caplog.text
  tiny_config.eval.split = "tset"
  evaluates = train.build_sources(tiny_config, str(tmp_path))[2]
  train.warn_of_settings(tiny_config, str(tmp_path), evaluates)
  assert not evaluates
  assert "No 'tset' split in the dataset (it has train, valid, test)" in caplog.text


@pytest.mark.parametrize("section,field,value", [("eval", "checkpoint", "bset"),
                                                ("eval", "num_pictures", -1),
                                                ("augment", "rotate_degrees", 200.0)])
def test_a_setting_read_later_is_refused_before_training(tiny_config, tmp_path, section, field,
                                                         value):
  tiny_config[section][field] = value
  with pytest.raises(UserError, match=f"{section}.{field}="):
    train.train_and_evaluate(tiny_config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_a_damaged_checkpoint_is_one_line_naming_it(trained_copy):
  config, workdir = trained_copy
  damaged = max((workdir / "checkpoints" / "2" / "state").rglob("*"),
                key=lambda p: p.stat().st_size if p.is_file() else 0)
  damaged.write_bytes(damaged.read_bytes()[:10])
  config.eval.split = "valid"
  with pytest.raises(UserError, match=r"checkpoints/2: unreadable checkpoint \(.*\); if its "
                                      r"files are damaged, delete that folder"):
    evaluate.evaluate(config, str(workdir))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _train_in_two_processes(command, workdir, run_env):
  """`command` as processes 0 and 1 of a run; another port if one was taken after we chose it."""
  for _ in range(3):
    address = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([*command, f"--workdir={workdir}", f"--coordinator_address={address}",
                               "--num_processes=2", f"--process_id={i}"], cwd=REPO,
                              env=run_env(1, UNET_JAX_XLA_DEFAULTS="0"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
      first = procs[0].communicate(timeout=300)[0]
      if procs[0].returncode == 0 or "Failed to add port to server" not in first:
        outputs = [first, procs[1].communicate(timeout=300)[0]]
        assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
        return
    finally:
      procs[1].kill()
  raise AssertionError("no free port for the coordinator in 3 tries")


def test_two_processes_match_one(tiny_config, tmp_path, run_env):
  # One epoch of 3 steps, global batch 8: 4 images per process. Under a time budget both
  # processes take process 0's plan at the end of the epoch, a collective they must both join.
  # They leave XLA's flags as this process has them: the same convolution kernels.
  tiny_config.data.synthetic.num_train, tiny_config.eval.split = 24, "none"
  tiny_config.train.time_budget_minutes = 60
  train.train_and_evaluate(tiny_config, str(tmp_path / "one"))
  _train_in_two_processes(
      [sys.executable, str(REPO / "launch.py"), "--config=configs/brain.py:smoke",
       "--config.train.epochs=1", "--config.data.synthetic.num_train=24",
       "--config.eval.split=none", "--config.train.time_budget_minutes=60"],
      tmp_path / "two", run_env)
  step_one, one = _final_params(tmp_path / "one")
  step_two, two = _final_params(tmp_path / "two")
  assert step_one == step_two == 3
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
