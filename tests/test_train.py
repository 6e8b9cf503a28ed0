"""Training end to end on four fake CPU devices, checkpoints and the command line."""

import contextlib
import csv
import fcntl
import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import matplotlib.figure
import numpy as np
import optax
import pytest

from configs import default
from unet_jax import checkpoint as checkpoint_lib
from unet_jax import (data, evaluate, export, losses, metrics, optim, parallel, reports, serving,
                      run_lock, steps, time_budget, train)
from unet_jax.data import pipeline
from unet_jax.data import synthetic
from unet_jax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def trained(trained_run):
  config, workdir, summary = trained_run
  return config.copy_and_resolve_references(), workdir, summary


def test_two_steps_on_four_devices_write_the_run(trained):
  assert jax.device_count() == 4
  config, workdir, summary = trained
  for name in ("config.json", "metrics.jsonl", "learning_curve.png", "eval/test/summary.json",
               "eval/test/per_image.csv", "eval/test/predictions.png"):
    assert (workdir / name).is_file(), name
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
  train_records = [r for r in reports.read_metrics(workdir) if r["split"] == "train"]
  assert [r["step"] for r in train_records] == [1, 2]
  assert summary["n_images"] == 8 and summary["checkpoint_step"] == 2
  assert 0 <= summary["metrics"]["dice"]["mean"] <= 1
  found, healthy = summary["with_tumour"], summary["without_tumour"]
  assert found["n_images"] + healthy["n_images"] == 8 and 0 <= found["dice"] <= 1
  assert "by_patient" not in summary  # COCO slices name no patient.
  rows = (workdir / "eval/test/per_image.csv").read_text().splitlines()
  assert len(rows) == 9 and rows[0].startswith("file_name,dice,iou")
  assert json.loads((workdir / "config.json").read_text())["model"]["features"] == 4


def test_time_left_averages_the_epochs_after_the_compiling_one():
  # Loop start, then epochs ending at 100 s (compiling), 130 s and 160 s: 30 s an epoch.
  assert train.time_left([0.0, 100.0, 130.0, 160.0], epochs_left=130) == "about 1 h 5 min left"
  assert train.time_left([0.0, 100.0], epochs_left=3) == "about 5 min left"
  assert train.time_left([0.0, 100.0, 130.0], epochs_left=0) == "about 0 min left"


def test_first_epoch_time_leaves_out_the_compiling_span():
  # Syncs after 10 steps (compiled) at 50 s, then 20 and 25 steps at 60 and 65 s: 1 s a step.
  syncs = [(10, 50.0), (20, 60.0), (25, 65.0)]
  assert time_budget.first_epoch_seconds(syncs, 0.0, 25, validation_s=5.0) == 30.0
  assert time_budget.first_epoch_seconds([(25, 40.0)], 0.0, 25, validation_s=5.0) == 45.0


def test_epochs_that_fit_the_budget():
  # 600 s, 100 gone, 20 kept for the final evaluation: 480 s at 1.1 x 40 s an epoch, 10 more.
  fit = functools.partial(time_budget.epochs_that_fit, 600.0, 100.0, 40.0, 20.0, 1)
  assert fit(max_epochs=50) == 11
  assert fit(max_epochs=5) == 5
  assert time_budget.epochs_that_fit(60.0, 100.0, 40.0, 20.0, 1, 50) == 1  # over already


@pytest.mark.parametrize("warmup_epochs", [1, 3])
def test_schedule_rates_do_not_depend_on_the_run_length_within_the_warm_up(warmup_epochs):
  # A time budget's plan is made after the first epoch, under the schedule of train.epochs.
  config = default.get_config()
  config.train.warmup_epochs, steps_per_epoch = warmup_epochs, 4
  rates = {epochs: [optim.learning_rate(config.train, t, epochs * steps_per_epoch,
                                        steps_per_epoch)
                    for t in range(warmup_epochs * steps_per_epoch)]
           for epochs in (1, 2, 5, 50)}
  for epochs, epoch_rates in rates.items():
    n = min(epochs, warmup_epochs) * steps_per_epoch
    np.testing.assert_allclose(epoch_rates[:n], rates[50][:n], rtol=1e-6, err_msg=f"{epochs}")
  np.testing.assert_allclose(rates[1][:2], [0.0, 1e-3 / (warmup_epochs * steps_per_epoch)],
                             rtol=1e-6)


@pytest.mark.parametrize("schedule, warmup_epochs", [("cosine", 0), ("cosine", 1), ("step", 0),
                                                     ("constant", 0)])
def test_schedule_rates_are_optax_schedules(schedule, warmup_epochs):
  config = default.get_config()
  config.train.update(schedule=schedule, warmup_epochs=warmup_epochs, step_every_epochs=2)
  steps_per_epoch, total = 3, 20
  optax_schedule = {
      "constant": optax.constant_schedule(1e-3),
      "step": optax.piecewise_constant_schedule(1e-3, {6: 0.1, 12: 0.1, 18: 0.1}),
      "cosine": (optax.warmup_cosine_decay_schedule(0.0, 1e-3, 3, total) if warmup_epochs
                 else optax.cosine_decay_schedule(1e-3, total))}[schedule]
  np.testing.assert_allclose(
      [optim.learning_rate(config.train, t, total, steps_per_epoch) for t in range(total + 2)],
      [float(optax_schedule(t)) for t in range(total + 2)], rtol=1e-5, atol=1e-12)


def test_restored_checkpoint_gives_the_same_validation_numbers(trained):
  config, workdir, _ = trained
  logged = [r for r in reports.read_metrics(workdir) if r["split"] == "valid"][-1]
  config.eval.split = "valid"
  summary = evaluate.evaluate(config, str(workdir))
  assert summary["metrics"]["dice"]["mean"] == pytest.approx(logged["dice"], abs=1e-9)
  assert summary["metrics"]["iou"]["mean"] == pytest.approx(logged["iou"], abs=1e-9)


def test_no_pictures_asked_writes_the_rest(trained):
  config, workdir, _ = trained
  config.eval.split = "valid"
  evaluate.evaluate(config, str(workdir))
  assert (workdir / "eval/valid/predictions.png").is_file()
  config.eval.num_pictures = 0  # Nor an earlier evaluation's left beside this one's summary.
  summary = evaluate.evaluate(config, str(workdir))
  assert summary["n_images"] == 8 and (workdir / "eval/valid/per_image.csv").is_file()
  assert not (workdir / "eval/valid/predictions.png").exists()


def _with_split_emptied(config, workdir: pathlib.Path, split: str, copy: pathlib.Path):
  """`config` on a copy of the run's phantoms whose `split` lists no image."""
  shutil.copytree(data.data_root(config.data, str(workdir)), copy)
  annotations_file = copy / split / "_annotations.coco.json"
  coco = json.loads(annotations_file.read_text())
  coco["images"], coco["annotations"] = [], []
  annotations_file.write_text(json.dumps(coco))
  config.data.root, config.data.synthetic.enabled = str(copy), False
  return config


def test_a_split_without_images_is_an_error_not_a_nan_score(trained, tiny_config, tmp_path):
  config, workdir, _ = trained
  phantoms = config.copy_and_resolve_references()
  config = _with_split_emptied(config, workdir, "test", tmp_path / "data")
  with pytest.raises(UserError, match=r"lists no images, so split 'test' is empty"):
    evaluate.evaluate(config, str(workdir))
  # Training stops before its first step, not after it with NaN validation scores.
  config = _with_split_emptied(tiny_config, workdir, "valid", tmp_path / "data2")
  with pytest.raises(UserError, match=r"lists no images, so split 'valid' is empty"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "metrics.jsonl").exists()
  # An empty test split is as a missing one: the run trains, with no final evaluation.
  config = _with_split_emptied(phantoms, workdir, "test", tmp_path / "data3")
  assert train.train_and_evaluate(config, str(tmp_path / "run")) == {}
  assert (tmp_path / "run" / "checkpoints").is_dir() and not (tmp_path / "run" / "eval").exists()


def test_an_evaluation_stopped_midway_leaves_the_earlier_one_whole(trained, monkeypatch):
  config, workdir, _ = trained
  config.eval.split = "valid"
  evaluate.evaluate(config, str(workdir))
  out = workdir / "eval/valid"
  earlier = {name: (out / name).read_bytes()
             for name in ("summary.json", "per_image.csv", "predictions.png")}
  def stopped(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(reports, "plot_predictions", stopped)
  config.eval.threshold = 0.3  # Other scores: the per-image ones were rewritten in place.
  with pytest.raises(KeyboardInterrupt):
    evaluate.evaluate(config, str(workdir))
  assert {name: (out / name).read_bytes() for name in earlier} == earlier
  assert not list(out.glob("*.tmp"))


def test_a_learning_curve_stopped_while_drawn_leaves_the_earlier_one(tmp_path, monkeypatch):
  for epoch in (1, 2):
    reports.append_metrics(tmp_path, {"step": epoch, "epoch": epoch, "split": "train",
                                      "loss": 1 / epoch})
    reports.append_metrics(tmp_path, {"step": epoch, "epoch": epoch, "split": "valid",
                                      "loss": 1 / epoch, "dice": epoch / 4})
  path = reports.plot_learning_curve(tmp_path)
  earlier = path.read_bytes()
  def cut_short(self, fname, **kwargs):  # Half a PNG written, to a file or a path.
    if hasattr(fname, "write"):
      fname.write(earlier[:100])
    else:
      pathlib.Path(fname).write_bytes(earlier[:100])
    raise KeyboardInterrupt
  monkeypatch.setattr(matplotlib.figure.Figure, "savefig", cut_short)
  with pytest.raises(KeyboardInterrupt):
    reports.plot_learning_curve(tmp_path)
  assert path.read_bytes() == earlier


def test_picture_titles_name_the_slice_not_its_folders():
  """LGG and BraTS names start with their folders: cut there, every row read alike."""
  assert evaluate._short_name("TCGA_EZ_7264_20010816/TCGA_EZ_7264_20010816_12.tif") == (
      "TCGA_EZ_7264_20010816_12.tif")
  assert evaluate._short_name("2256_jpg.rf.3afd7903eafb0c5d8c2a2dd5ad5e0f3c.jpg") == (
      "2256_jpg.rf.3\u2026d5ad5e0f3c.jpg")


def test_two_evaluations_of_a_split_write_their_files_one_after_the_other(trained, monkeypatch):
  """An eval command beside training's final evaluation: each writes its three files whole."""
  config, workdir, _ = trained
  config.eval.split = "valid"
  free_while_writing = []
  def another_writer_may_start(path=None, *args, **kwargs):
    if path is not None and str(path).endswith(".png.tmp"):
      pathlib.Path(path).touch()  # As plot_predictions writes it.
    with open(workdir / "eval/valid" / run_lock.WRITER_LOCK_FILE) as lock:
      try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        free_while_writing.append(True)
      except BlockingIOError:
        free_while_writing.append(False)
  monkeypatch.setattr(reports, "plot_predictions", another_writer_may_start)
  replaced_together = reports.replaced_together
  @contextlib.contextmanager
  def put_in_place(folder, names):
    with replaced_together(folder, names) as aside:
      yield aside
    another_writer_may_start()  # The files, the summary among them, just put in place.
  monkeypatch.setattr(reports, "replaced_together", put_in_place)
  evaluate.evaluate(config, str(workdir))
  assert free_while_writing == [False, False]  # Pictures, then the summary.
  another_writer_may_start()
  assert free_while_writing[-1]  # Free once the evaluation is written.


def test_a_run_trained_further_then_stopped_before_evaluating_evaluates(trained_run, trained_copy,
                                                                        monkeypatch):
  config, workdir = trained_copy
  first = workdir / "eval/test/summary.json"  # The first finish's evaluation.
  first.parent.mkdir(parents=True)
  first.write_text(json.dumps(trained_run[2]))
  config.train.epochs = 2
  def stopped(*args, **kwargs):
    raise KeyboardInterrupt
  with monkeypatch.context() as patch:
    patch.setattr(evaluate, "evaluate", stopped)
    with pytest.raises(KeyboardInterrupt):
      train.train_and_evaluate(config, str(workdir))
  # The first finish's summary does not stand for the longer run's evaluation.
  summary = train.train_and_evaluate(config, str(workdir))
  assert summary and summary == json.loads(first.read_text())
  assert summary["checkpoint_step"] == 4


def test_validation_decodes_as_evaluation_does(trained):
  config, workdir, _ = trained
  config.eval.update(split="valid", tta=True, tta_up_down=False, decode="expected_dice",
                     largest_component=True, never_empty=True)
  mesh = parallel.make_mesh()
  state, _ = evaluate.restore_state(config, str(workdir), mesh)
  source = data.build_source(config.data, "valid", str(workdir))
  _, p_eval = steps.jit_steps(config, mesh)
  val = evaluate.validate(p_eval, state, source, config, mesh)
  summary = evaluate.evaluate(config, str(workdir))
  assert val["dice"] == pytest.approx(summary["metrics"]["dice"]["mean"], abs=1e-9)
  assert val["iou"] == pytest.approx(summary["metrics"]["iou"]["mean"], abs=1e-9)
  logged = [r for r in reports.read_metrics(workdir) if r["split"] == "valid"][-1]
  assert val["loss"] == pytest.approx(logged["loss"], rel=1e-5)  # The loss ignores decoding.
  assert val["dice"] != pytest.approx(logged["dice"], abs=1e-3)  # Logged at threshold 0.5.


def test_an_ensemble_scores_the_runs_averaged_probabilities(trained, other_run, tmp_path):
  config, workdir, _ = trained
  other_config, other = other_run  # Another model (8 features), saved with it.
  config.eval.split = "valid"
  mesh = parallel.make_mesh()
  source = data.build_source(config.data, "valid", str(workdir))
  predict = steps.jit_predict(mesh)
  probabilities = evaluate._probabilities  # pylint: disable=protected-access
  probs, labels = [], {}
  for run_config, run in ((config, workdir), (other_config, other)):
    state, _ = evaluate.restore_state(run_config, str(run), mesh)
    run_probs = {}
    for index, p, label in probabilities(predict, state, source, config, mesh):
      run_probs[index], labels[index] = p, label
    probs.append(run_probs)
  masks = np.stack([evaluate.binarise((probs[0][i] + probs[1][i]) / 2, config.eval.threshold,
                                      config.eval) for i in sorted(labels)])
  truth = np.stack([labels[i] > 0 for i in sorted(labels)])
  dice = metrics.per_image_metrics(metrics.confusion_counts(masks, truth))["dice"]

  config.eval.ensemble = f" {other} ,"
  summary = evaluate.evaluate(config, str(workdir))
  assert summary["ensemble"] == [{"workdir": str(other), "checkpoint_step": 2}]
  assert summary["metrics"]["dice"]["mean"] == pytest.approx(np.mean(dice), abs=1e-9)
  assert json.loads((workdir / "eval/valid_ensemble/summary.json").read_text()) == summary
  own = workdir / "eval/valid/summary.json"  # The run's own, if evaluated, stays.
  assert not own.exists() or json.loads(own.read_text())["ensemble"] == []
  assert not np.allclose(probs[0][0], probs[1][0])  # The two runs do differ.

  # A run on other images is refused, naming it.
  saved = json.loads((other / "config.json").read_text())
  saved["data"]["image_size"] = 64
  (tmp_path / "other64").mkdir()
  (tmp_path / "other64" / "config.json").write_text(json.dumps(saved))
  config.eval.ensemble = str(tmp_path / "other64")
  with pytest.raises(UserError, match="other64 was trained with data.image_size=64, this run "
                                      "with 32"):
    evaluate.evaluate(config, str(workdir))
  config.eval.ensemble = f"{other},{tmp_path / 'typo'}"
  with pytest.raises(UserError, match="typo is not a trained run"):
    evaluate.evaluate(config, str(workdir))


def test_checkpoint_of_another_model_is_a_clear_error(trained):
  config, workdir, _ = trained
  config.model.features = 8
  with pytest.raises(UserError, match="checkpoint does not match the config"):
    evaluate.evaluate(config, str(workdir))


def test_checkpoint_of_a_model_computing_otherwise_is_a_clear_error(trained):
  config, workdir, _ = trained
  config.model.activation = "gelu"  # The same parameters, another function.
  with pytest.raises(UserError, match=r"config.json: checkpoint does not match the config: "
                     r"trained with model.activation='relu', the config has 'gelu'"):
    evaluate.evaluate(config, str(workdir))
  config.model.activation, config.model.dtype = "relu", "bfloat16"  # Only the compute dtype.
  config.eval.split = "valid"
  assert evaluate.evaluate(config, str(workdir))["n_images"] == 8


def test_evaluation_restores_whatever_optimiser_and_ema_the_run_trained_with(
    ema_run, tmp_path):
  config, workdir = ema_run
  config = config.copy_and_resolve_references()
  config.eval.split = "valid"
  trained_as = evaluate.evaluate(config, str(workdir))["metrics"]
  config.train.update(ema_decay=0.0, optimizer="sgd", grad_clip=1.0)
  assert evaluate.evaluate(config, str(workdir))["metrics"] == trained_as
  # Checkpoints moved without their run's config.json are restored as the config says.
  shutil.copytree(workdir / "checkpoints", tmp_path / "moved" / "checkpoints")
  with pytest.raises(UserError, match="checkpoints/2: checkpoint does not match the config: "
                                      "opt_state/.* is missing in the checkpoint"):
    evaluate.evaluate(config, str(tmp_path / "moved"))


def test_every_best_epoch_is_saved_whatever_the_cadence(tmp_path, tiny_config):
  tiny_config.train.update(epochs=3, checkpoint_every_epochs=100, keep_checkpoints=10)
  train.train_and_evaluate(tiny_config, str(tmp_path))
  val = [r for r in reports.read_metrics(tmp_path) if r["split"] == "valid"]
  bests = [r["step"] for k, r in enumerate(val) if r["dice"] >= max(v["dice"] for v in val[:k + 1])]
  saved = checkpoint_lib.Checkpoints(tmp_path, read_only=True)
  assert set(bests) | {val[-1]["step"]} == set(saved.manager.all_steps())
  assert saved.resolve("best") == bests[-1] == reports.best_validation(val)["step"]


def test_best_validation_is_the_latest_of_equal_ones():
  records = [{"split": "valid", "epoch": e, "step": 2 * e, "dice": d}
             for e, d in ((1, 0.5), (2, 0.7), (3, 0.7), (4, 0.6))]
  records.insert(1, {"split": "train", "epoch": 2, "step": 3, "loss": 0.1})
  assert reports.best_validation(records)["epoch"] == 3
  assert reports.best_validation(records[1:2]) is None


def test_finished_run_is_not_trained_again(trained):
  config, workdir, _ = trained
  before = (workdir / "metrics.jsonl").read_text()
  assert train.train_and_evaluate(config, str(workdir)) == {}
  assert (workdir / "metrics.jsonl").read_text() == before


def test_ema_of_the_parameters_follows_each_step(tiny_config, tmp_path):
  # The decay min(ema_decay, (1 + t) / (ema_warmup + t)): the warm-up's 1/2 at step 0, then
  # the cap, 0.6 (not 2/3), at step 1. At a constant rate, so the first step moves too.
  config = tiny_config
  config.train.update(ema_decay=0.6, ema_warmup=2.0, schedule="constant", learning_rate=0.01)
  mesh = parallel.make_mesh()
  initial = steps.create_train_state(config, (32, 32, 1), optim.make_optimizer(config))
  state = jax.device_put(initial, parallel.replicated(mesh))
  p_train, _ = steps.jit_steps(config, mesh)
  batches = pipeline.train_batches(data.build_source(config.data, "train", str(tmp_path)),
                                   config)
  params = ema = jax.device_get(initial.params)
  for decay in (0.5, 0.6):
    state, _ = p_train(state, parallel.device_batch(next(batches), mesh), 0.01)
    before, params = params, jax.device_get(state.params)
    assert not all(np.allclose(a, b) for a, b in zip(*map(jax.tree.leaves, (before, params))))
    ema = jax.tree.map(lambda e, p, d=decay: d * e + (1 - d) * p, ema, params)
    for got, want in zip(*map(jax.tree.leaves, (jax.device_get(state.ema_params), ema))):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def _sgd_at_rate_0_1(config, tmp_path):
  """Plain SGD at rate 0.1 on `config`: (mesh, initial state, its parameters, first batch)."""
  config.train.optimizer, config.train.momentum, config.train.schedule = "sgd", 0.0, "constant"
  config.train.learning_rate = 0.1
  initial = steps.create_train_state(config, (32, 32, 1), optim.make_optimizer(config))
  batch = next(pipeline.train_batches(data.build_source(config.data, "train", str(tmp_path)),
                                      config))
  return parallel.make_mesh(), initial, jax.device_get(initial.params), batch


def test_sharpness_aware_step_descends_from_the_perturbed_parameters(tiny_config, tmp_path):
  config = tiny_config
  config.train.sam_rho = 0.5
  mesh, initial, start, batch = _sgd_at_rate_0_1(config, tmp_path)

  def loss_fn(params):
    logits, updates = initial.apply_fn({"params": params, "batch_stats": initial.batch_stats},
                                       batch["image"], train=True, mutable=["batch_stats"])
    return losses.dice_bce_loss(logits, batch["mask"] > 0).mean(), updates["batch_stats"]

  # Jitted: op by op, the reference would compile each of the U-Net's ops on its own.
  value_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (loss, batch_stats), grads = value_and_grad(start)
  scale = 0.5 / np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
  worst = jax.tree.map(lambda p, g: p + scale * g, start, grads)
  _, worst_grads = value_and_grad(worst)
  p_train, _ = steps.jit_steps(config, mesh)
  state, metrics = p_train(jax.device_put(initial, parallel.replicated(mesh)),
                           parallel.device_batch(batch, mesh), 0.1)
  assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-5)
  moved = jax.device_get(state.params)
  for got, p, g in zip(*map(jax.tree.leaves, (moved, start, worst_grads))):
    np.testing.assert_allclose(got, p - 0.1 * g, rtol=1e-4, atol=1e-6)
  plain = jax.tree.map(lambda p, g: p - 0.1 * g, start, grads)
  assert not all(np.allclose(a, b, rtol=1e-4, atol=1e-6)
                 for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(plain)))
  # The statistics are those of the unperturbed parameters.
  for got, want in zip(*map(jax.tree.leaves, (jax.device_get(state.batch_stats), batch_stats))):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_subnetworks_step_on_the_mean_of_their_losses(tiny_config, tmp_path):
  config = tiny_config
  # Every image shared: each subnetwork's loss is on the batch's own images.
  config.model.subnetworks, config.train.shared_input_fraction = 2, 1.0
  mesh, initial, start, batch = _sgd_at_rate_0_1(config, tmp_path)

  def loss_fn(params):
    logits, _ = initial.apply_fn({"params": params, "batch_stats": initial.batch_stats},
                                 np.concatenate([batch["image"]] * 2, axis=-1), train=True,
                                 mixed=True, mutable=["batch_stats"])
    return sum(losses.dice_bce_loss(logits[..., m:m + 1], batch["mask"] > 0).mean()
               for m in range(2)) / 2

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(start)
  p_train, _ = steps.jit_steps(config, mesh)
  state, metrics = p_train(jax.device_put(initial, parallel.replicated(mesh)),
                           parallel.device_batch(batch, mesh), 0.1)
  assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-5)
  for got, p, g in zip(*map(jax.tree.leaves, (jax.device_get(state.params), start, grads))):
    np.testing.assert_allclose(got, p - 0.1 * g, rtol=1e-4, atol=1e-6)


def test_cutmix_mixes_the_training_batch_when_augmenting(tiny_config, tmp_path):
  config = tiny_config
  config.augment.cutmix_prob = 1.0
  mesh, initial, start, batch = _sgd_at_rate_0_1(config, tmp_path)
  logits, _ = jax.jit(functools.partial(initial.apply_fn, train=True, mutable=["batch_stats"]))(
      {"params": start, "batch_stats": initial.batch_stats}, batch["image"])
  unmixed = float(losses.dice_bce_loss(logits, batch["mask"] > 0).mean())
  losses_seen, on_host = [], jax.device_get(initial)  # The step donates the state it is given.
  for enabled in (True, False):
    config.augment.enabled = enabled
    p_train, _ = steps.jit_steps(config, mesh)
    _, metrics = p_train(jax.device_put(on_host, parallel.replicated(mesh)),
                         parallel.device_batch(batch, mesh), 0.1)
    losses_seen.append(float(metrics["loss"]))
  mixed, without_augmentation = losses_seen
  assert mixed != pytest.approx(unmixed, rel=1e-3)
  assert without_augmentation == pytest.approx(unmixed, rel=1e-5)


def test_deep_supervision_trains_the_coarse_heads(tiny_config, tmp_path):
  tiny_config.model.deep_supervision = True
  mesh = parallel.make_mesh()
  initial = steps.create_train_state(tiny_config, (32, 32, 1),
                                     optim.make_optimizer(tiny_config))
  start = jax.device_get(initial.params)
  state = jax.device_put(initial, parallel.replicated(mesh))
  p_train, p_eval = steps.jit_steps(tiny_config, mesh)
  source = data.build_source(tiny_config.data, "train", str(tmp_path))
  batch = parallel.device_batch(next(pipeline.train_batches(source, tiny_config)), mesh)
  state, metrics = p_train(state, batch, tiny_config.train.learning_rate)
  assert np.isfinite(metrics["loss"])
  moved = jax.device_get(state.params["aux_head_1"]["kernel"])
  assert not np.allclose(moved, start["aux_head_1"]["kernel"])
  # Validation runs on the model with the extra heads.
  out = p_eval(state, parallel.device_batch(next(pipeline.eval_batches(source, tiny_config, 8)),
                                            mesh))
  assert np.isfinite(jax.device_get(out["loss"])).all()


def _two_category_phantoms(config, workdir: pathlib.Path) -> pathlib.Path:
  """The phantom export with every second image's tumour in a category 2."""
  root = data.data_root(config.data, str(workdir))
  for annotations_file in root.glob("*/_annotations.coco.json"):
    coco = json.loads(annotations_file.read_text())
    coco["categories"].append({"id": 2, "name": "other", "supercategory": "tumor"})
    for annotation in coco["annotations"]:
      annotation["category_id"] = 1 + annotation["image_id"] % 2
    annotations_file.write_text(json.dumps(coco))
  return root


def test_one_logit_per_category_trains_and_scores_their_union(tiny_config, tmp_path):
  config = tiny_config
  config.data.root = str(_two_category_phantoms(config, tmp_path / "data"))
  config.data.category_ids, config.model.out_channels = (1, 2), 2
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["n_images"] == 8 and 0 <= summary["metrics"]["dice"]["mean"] <= 1
  rows = list(csv.DictReader(open(tmp_path / "run" / "eval" / "test" / "per_image.csv")))
  assert [result["name"] for result in summary["by_category"].values()] == ["tumor", "other"]
  for category, result in summary["by_category"].items():
    mine = [float(row["dice"]) for row in rows if row["category"] == category]
    assert result["n_images"] == len(mine) > 0
    assert result["dice"] == pytest.approx(np.mean(mine), abs=1e-6)
  state, _ = evaluate.restore_state(config, str(tmp_path / "run"), parallel.make_mesh())
  assert jax.device_get(state.params["head"]["kernel"]).shape[-1] == 2
  images = np.random.default_rng(1).random((3, 32, 32, 1)).astype(np.float32)
  assert state.ema_params is None  # So the parameters are the ones predicted with.
  logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, images,
                          train=False)
  probs = steps.predict_step(state, images)
  np.testing.assert_allclose(probs, jax.nn.sigmoid(logits.max(axis=-1)), atol=1e-6)
  exported = serving.load(export.export(config, str(tmp_path / "run"), str(tmp_path / "export"),
                                        platforms=("cpu",)))
  np.testing.assert_allclose(exported(images), probs, atol=1e-6)
  config.data.category_ids = (1,)
  with pytest.raises(UserError, match=r"model.out_channels=2: one logit per category needs "
                     r"a COCO dataset and as many data.category_ids"):
    train.train_and_evaluate(config, str(tmp_path / "other"))


def test_category_weights_make_the_loss_a_weighted_mean(tiny_config, tmp_path):
  config = tiny_config
  config.data.root = str(_two_category_phantoms(config, tmp_path / "data"))
  config.data.category_ids, config.train.category_weights = (1, 2), (3.0, 1.0)
  mesh = parallel.make_mesh()
  state = jax.device_put(steps.create_train_state(config, (32, 32, 1),
                                                  optim.make_optimizer(config)),
                         parallel.replicated(mesh))
  source = data.build_source(config.data, "train", str(tmp_path))
  batch = next(pipeline.train_batches(source, config))
  logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                          batch["image"], train=True, mutable=["batch_stats"])[0]
  per_image = np.asarray(losses.dice_bce_loss(logits, batch["mask"] > 0))
  weights = np.where(batch["mask"].max(axis=(1, 2, 3)) == 1, 3.0, 1.0)
  assert 0 < (weights == 3).sum() < len(weights)  # Both categories are in the batch.
  p_train, _ = steps.jit_steps(config, mesh)
  _, metrics = p_train(state, parallel.device_batch(batch, mesh), config.train.learning_rate)
  assert float(metrics["loss"]) == pytest.approx(
      np.sum(weights * per_image) / np.sum(weights), rel=1e-5)
  assert float(metrics["loss"]) != pytest.approx(per_image.mean(), rel=1e-3)
  config.train.category_weights = (3.0,)
  with pytest.raises(UserError, match=r"train.category_weights=\(3.0,\): one weight per "
                     r"category needs a COCO dataset and as many data.category_ids"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.fixture
def launch(run_env):
  """launch.py with the given flags, in a process of its own: the completed process."""
  def run(*args):
    return subprocess.run([sys.executable, str(REPO / "launch.py"), *args], cwd=REPO,
                          env=run_env(), capture_output=True, text=True, timeout=300)
  return run


def test_eval_mode_uses_the_saved_config_with_overrides(trained, launch):
  _, workdir, _ = trained
  result = launch("--mode=eval", f"--workdir={workdir}", "--config.eval.split=valid",
                   "--config.eval.checkpoint=latest")
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads((workdir / "eval/valid/summary.json").read_text())
  assert summary["n_images"] == 8 and summary["checkpoint_step"] == 2


def test_command_line_errors_are_one_line(tmp_path, launch):
  result = launch("--config=configs/brain.py", f"--workdir={tmp_path}",
                   f"--config.data.root={tmp_path / 'missing'}")
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1].startswith("error: data.root")
  assert "configs/brain.py:demo" in result.stderr
  assert tmp_path.is_dir() and not (tmp_path / "compile_cache").exists()  # the user's folder
  result = launch("--config=configs/brain.py", f"--workdir={tmp_path / 'new' / 'run'}",
                  f"--config.data.root={tmp_path / 'missing'}")
  assert result.returncode != 0 and not (tmp_path / "new").exists()  # nothing left behind
  result = launch("--mode=eval", "--config=configs/brain.py:smoke", f"--workdir={tmp_path / 'new'}")
  assert result.stderr.strip().splitlines()[-1].endswith("no checkpoint; train the run first")
  assert not (tmp_path / "new").exists()  # Not even the phantoms it would evaluate on.
  (tmp_path / "a_file").touch()
  for args, line in (
      (["--config=configs/brain.py", "--config.model.widht=3"],
       "error: the config has no field 'widht'"),
      (["--config=configs/brain.py", "--config.train.epoch=3"],
       "error: the config has no field 'epoch' (did you mean \"epochs\"?)"),
      (["--config=configs/nope.py"],
       "error: --config: [Errno 2] No such file or directory: 'configs/nope.py'"),
      (["--config=configs/brain.py:demoo"], "error: configs/brain.py: unknown variant 'demoo'"),
      (["--config=configs/default.py:demo"],
       "error: configs/default.py: unknown variant 'demo'; it has none."),
      (["--config=configs/brain.py", "--config.train.epochs=abc"],
       "error: flag --config.train.epochs=abc: invalid literal"),
      (["--config=configs/brain.py:smoke", f"--workdir={tmp_path / 'a_file'}"],
       f"error: --workdir={tmp_path / 'a_file'} is a file; give a folder"),
      (["--config=configs/brain.py:smoke", "--config.train.batch_size=0"],
       "error: train.batch_size: batch size 0: use 1 or more"),
      (["--config=configs/brain.py:smoke", "--config.model.pooling=maxx"],
       "error: model.pooling='maxx' is not one of"),
      ([f"--config={tmp_path / 'run' / 'config.json'}"],
       f"error: --config={tmp_path / 'run' / 'config.json'}: not a config file (path.py"),
      (["--config=configs/brain.py:smoke", f"--workdir={tmp_path / 'a_file' / 'run'}"],
       f"error: --workdir={tmp_path / 'a_file' / 'run'}: cannot write there (Not a directory")):
    result = launch(f"--workdir={tmp_path / 'run'}", *args)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(line), result.stderr[-500:]
    assert not (tmp_path / "run").exists()  # Not even the phantoms generated before the error.


def test_a_workdir_under_home_is_there_not_in_a_folder_named_tilde(tmp_path, run_env):
  result = subprocess.run(
      [sys.executable, str(REPO / "launch.py"), "--mode=eval", "--config=configs/brain.py:smoke",
       "--workdir=~/run"], cwd=REPO, env=run_env(HOME=str(tmp_path)), capture_output=True,
      text=True, timeout=300)
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: {tmp_path / 'run' / 'checkpoints'}: no checkpoint; train the run first")
  assert not (REPO / "~").exists()


def test_a_relative_data_root_is_saved_absolute(tiny_config, tmp_path, monkeypatch):
  synthetic.write_phantom_coco(tmp_path / "data", split_sizes={"train": 8, "valid": 4},
                               image_size=32, seed=0)
  monkeypatch.chdir(tmp_path)
  config = tiny_config
  config.data.root, config.eval.split = "data", "none"
  train.train_and_evaluate(config, "run")
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["data"]["root"] == str(tmp_path / "data")  # Eval finds it from any folder.
  assert config.data.root == "data"  # The caller's config is left as it was.


def test_missing_flags_are_one_line_not_the_help(tmp_path, launch):
  workdir = tmp_path / "run"
  for args, line in (
      ([], "error: --config is required in --mode=train"),
      (["--mode=describe"], "error: --config is required in --mode=describe"),
      (["--config.data.root=DATA"],
       "error: --config is required in --mode=train (its --config.* fields are set on it)"),
      (["--config=configs/brain.py:smoke", "runs/x"], "error: unexpected arguments: ['runs/x']"),
      (["--mode=predict", "--config=configs/brain.py:smoke", f"--output={tmp_path / 'out'}"],
       "error: --mode=predict needs --input=IMAGE_OR_FOLDER and --output=FOLDER"),
      (["--config=configs/brain.py:smoke", "--num_processes=2"],
       "error: --num_processes=2: coordinator_address should be defined. "
       "(--coordinator_address=HOST:PORT of process 0, or $JAX_COORDINATOR_ADDRESS)"),
      (["--config=configs/brain.py:smoke", "--num_processes=2", "--process_id=2",
        "--coordinator_address=localhost:1234"],
       "error: --process_id=2: use 0 to --num_processes - 1 (1)")):
    result = launch(f"--workdir={workdir}", *args)
    assert result.returncode != 0 and result.stderr.strip() == line, result.stderr[-2000:]
    assert not workdir.exists()
  result = subprocess.run(
      [sys.executable, str(REPO / "launch.py"), "--config=configs/brain.py:smoke",
       f"--workdir={workdir}"], cwd=REPO, env={**os.environ, "JAX_NUM_PROCESSES": "two"},
      capture_output=True, text=True, timeout=300)
  assert result.stderr.strip() == "error: $JAX_NUM_PROCESSES='two': not an integer"
