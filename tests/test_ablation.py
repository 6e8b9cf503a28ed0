"""Ablation sweeps: configs, resuming, the table, and the smoke sweep end to end."""

import csv
import json
import os
import pathlib
import statistics
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import pytest

from configs import ablation as ablation_config
from configs import brain
from unet_jax import ablation
from unet_jax import reports
from unet_jax import run_lock
from unet_jax import saved_config
from unet_jax import train
from unet_jax.errors import Diverged
from unet_jax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
# config_flags imports config files with a loader that Python deprecates; not our call.
_LOAD_MODULE = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")


def _no_training(*args, **kwargs):
  raise AssertionError(f"trained {args}, {kwargs}")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, run_env):
  """`launch.py --config=configs/ablation.py:smoke`: 2 variants, 4 steps each on 16 phantoms."""
  workdir = tmp_path_factory.mktemp("ablation")
  result = subprocess.run(
      [sys.executable, str(REPO / "launch.py"), "--config=configs/ablation.py:smoke",
       f"--workdir={workdir}"], cwd=REPO, env=run_env(), capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def _csv_rows(workdir):
  with open(workdir / ablation.CSV_FILE) as f:
    return list(csv.DictReader(f))


def test_smoke_sweep_trains_every_variant_on_one_dataset(smoke):
  config = ablation_config.get_config("smoke")
  # No compile_cache/: the tests share one cache elsewhere (conftest.py).
  assert sorted(os.listdir(smoke)) == sorted(
      ["ablation.csv", "ablation.md", "config.json", "phantoms", run_lock.LOCK_FILE, *config.sweep])
  for name, fields in config.sweep.items():
    saved = json.loads((smoke / name / "config.json").read_text())
    assert saved["data"]["root"] == str(smoke / "phantoms")
    assert saved["data"]["image_size"] == 32 and saved["train"]["epochs"] == 2
    assert saved["model"] == {**saved["model"], **fields.to_dict()}
    assert not (smoke / name / "phantoms").exists()
    assert (smoke / name / "eval/test/summary.json").is_file()
    summary = json.loads((smoke / name / "eval/test/summary.json").read_text())
    result = json.loads((smoke / name / ablation.RESULT_FILE).read_text())
    assert result["eval_dice"] == summary["metrics"]["dice"]["mean"]


def test_smoke_table_reads_the_runs(smoke):
  rows = _csv_rows(smoke)
  assert list(rows[0]) == ["variant", "pooling", "activation", "params", "epochs",
                           "best_epoch", "val_dice", "val_iou", "test_dice", "img_per_s", "wall_s",
                           "status"]
  assert sorted(r["variant"] for r in rows) == ["avg_gelu", "max_relu"]
  assert [float(r["val_dice"]) for r in rows] == sorted(
      (float(r["val_dice"]) for r in rows), reverse=True)
  for row in rows:
    run = smoke / row["variant"]
    records = reports.read_metrics(run)
    best = max(reversed([r for r in records if r["split"] == "valid"]), key=lambda r: r["dice"])
    assert float(row["val_dice"]) == pytest.approx(best["dice"])
    assert float(row["val_iou"]) == pytest.approx(best["iou"])
    assert int(row["best_epoch"]) == best["epoch"]
    assert int(row["epochs"]) == 2
    summary = json.loads((run / "eval/test/summary.json").read_text())
    assert float(row["test_dice"]) == pytest.approx(summary["metrics"]["dice"]["mean"])
    speeds = [r["img_per_s"] for r in records if r["split"] == "train"]
    assert len(speeds) == 4
    assert float(row["img_per_s"]) == pytest.approx(statistics.median(speeds[1:]))
    trained_s = [r["train_s"] for r in records if r["split"] == "valid"]
    assert 0 < trained_s[0] < trained_s[1] < float(row["wall_s"])
    # Width 4, depth 2, batch norm; pooling and activation add no parameters.
    assert int(row["params"]) == 7_477
    assert row["status"] == "ok"
  md = (smoke / ablation.MD_FILE).read_text()
  assert "| variant | pooling | activation | params |" in md
  assert md.count("\n| ") == 1 + len(rows)


def test_the_sweep_folder_is_not_a_run_to_evaluate(smoke):
  workdir = smoke
  with pytest.raises(UserError, match=f"{workdir} is an ablation sweep; give one of its "
                     f"variants, --workdir={workdir}/<variant>"):
    saved_config.load(str(workdir))
  assert saved_config.load(str(workdir / "max_relu")).model.pooling == "max"


def test_rerun_skips_finished_variants_and_resumes_the_rest(smoke, monkeypatch):
  config = ablation_config.get_config("smoke")
  before = _csv_rows(smoke)
  monkeypatch.setattr(train, "train_and_evaluate", _no_training)
  rows = ablation.run_sweep(config, str(smoke))
  assert [r["variant"] for r in rows] == [r["variant"] for r in before]
  assert _csv_rows(smoke) == before
  config.overrides.train.log_every_steps = 2  # Changes nothing a finished variant computes.
  ablation.run_sweep(config, str(smoke))
  assert _csv_rows(smoke) == before
  # Fewer epochs: restored, found finished, not trained: its wall time is what it was.
  monkeypatch.undo()
  config.overrides.train.epochs = 1
  ablation.run_sweep(config, str(smoke))
  assert [r["wall_s"] for r in _csv_rows(smoke)] == [r["wall_s"] for r in before]
  config = ablation_config.get_config("smoke")

  # An interrupted variant (no result file yet) is run again; train resumes it.
  (smoke / "max_relu" / ablation.RESULT_FILE).unlink()
  calls = []
  monkeypatch.setattr(train, "train_and_evaluate", lambda c, w: calls.append(w) or {})
  ablation.run_sweep(config, str(smoke))
  assert calls == [str(smoke / "max_relu")]
  # Its wall time counts the interrupted command's training too.
  result = json.loads((smoke / "max_relu" / ablation.RESULT_FILE).read_text())
  assert result["wall_s"] >= reports.seconds_spent(reports.read_metrics(smoke / "max_relu")) > 0


def test_a_changed_variant_model_is_an_error_before_training(smoke, monkeypatch):
  config = ablation_config.get_config("smoke")
  config.sweep.max_relu = {"pooling": "conv"}
  monkeypatch.setattr(train, "train_and_evaluate", _no_training)
  with pytest.raises(UserError, match="another model than variant 'max_relu'"):
    ablation.run_sweep(config, str(smoke))


def _outputs(workdir):
  return {name: (workdir / name).read_bytes()
          for name in (ablation.CSV_FILE, ablation.MD_FILE, "config.json")}


@pytest.mark.parametrize("override,value,message", [
    ("data", {"image_size": 48}, r"data.image_size=32, the config has 48"),
    # Validation at every epoch decodes as eval.* says: the table would mix settings.
    ("eval", {"threshold": 0.2}, r"eval.threshold=0.5, the config has 0.2; .* python launch.py "
     r"--mode=eval --workdir=\S+/(max_relu|avg_gelu) --config.eval.FIELD=VALUE"),
])
def test_a_changed_override_is_refused_before_anything_trains_or_is_written(
    smoke, monkeypatch, override, value, message):
  config = ablation_config.get_config("smoke")
  config.overrides[override].update(value)
  config.sweep = {"a_new": {}, **config.sweep.to_dict()}  # A new variant, trained first.
  before = _outputs(smoke)
  monkeypatch.setattr(train, "train_and_evaluate", _no_training)
  with pytest.raises(UserError, match=r"^variant '(max_relu|avg_gelu)': .*" + message):
    ablation.run_sweep(config, str(smoke))
  assert _outputs(smoke) == before
  assert not (smoke / "a_new").exists()


def _fake_training(calls, bug=False):
  """train_and_evaluate that writes the run's config, then fails as its variant's name says."""
  def fake(config, workdir):
    name = pathlib.Path(workdir).name
    calls.append(name)
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    train.write_config(config, pathlib.Path(workdir))
    if name == "diverges":
      raise Diverged("step 3: loss is nan on batch [a.png]; stopped")
    if name == "broken":
      raise RuntimeError("a bug") if bug else UserError("b.png: cannot decode")
    return {}
  return fake


def test_a_variant_extended_after_it_started_is_marked_and_resumed_after_a_stop(
    tmp_path, monkeypatch):
  config = ablation_config.get_config("smoke")
  config.sweep = {"only": {}}
  calls = []

  def fake(variant, workdir, stop=False):
    """Trains one more epoch, as train_and_evaluate would (config.json first)."""
    calls.append(variant.train.epochs)
    pathlib.Path(workdir).mkdir(exist_ok=True)
    train.write_config(variant, pathlib.Path(workdir))
    if stop:
      raise KeyboardInterrupt
    epoch = len(calls)
    reports.append_metrics(workdir, {"step": epoch, "epoch": epoch, "split": "valid",
                                     "dice": 0.5, "iou": 0.4, "train_s": float(epoch)})
    return {}

  monkeypatch.setattr(train, "train_and_evaluate", fake)
  ablation.run_sweep(config, str(tmp_path))
  assert _csv_rows(tmp_path)[0]["status"] == "ok"
  monkeypatch.setattr(ablation, "_has_checkpoint", lambda workdir: True)
  config.overrides.train.epochs = 4
  monkeypatch.setattr(train, "train_and_evaluate", lambda c, w: fake(c, w, stop=True))
  with pytest.raises(KeyboardInterrupt):  # Stopped after it saved its new epochs.
    ablation.run_sweep(config, str(tmp_path))
  monkeypatch.setattr(train, "train_and_evaluate", fake)
  ablation.run_sweep(config, str(tmp_path))  # Not mistaken for the finished 2-epoch run.
  assert calls == [2, 4, 4]
  for _ in range(2):  # Finished now: skipped, still marked.
    ablation.run_sweep(config, str(tmp_path))
    assert calls == [2, 4, 4]
    assert _csv_rows(tmp_path)[0]["status"] == "ok; started with train.epochs=2"


def test_failed_variants_are_rows_and_the_others_run(tmp_path, monkeypatch):
  config = ablation_config.get_config("smoke")
  config.sweep = {"diverges": {"norm": "none"}, "broken": {}, "fine": {"pooling": "avg"},
                  "refused": {"out_channels": 2}}
  calls = []
  monkeypatch.setattr(train, "train_and_evaluate", _fake_training(calls))
  failed = r"^3 of 4 variants failed \(broken, diverges, refused\)"
  with pytest.raises(UserError, match=failed):
    ablation.run_sweep(config, str(tmp_path))
  assert calls == ["broken", "diverges", "fine"]  # The data refuses two logits up front.
  rows = {row["variant"]: row for row in _csv_rows(tmp_path)}
  assert rows["fine"]["status"] == "ok"
  assert rows["diverges"]["status"] == "failed: step 3: loss is nan on batch [a.png]; stopped"
  assert rows["broken"]["status"] == "failed: b.png: cannot decode"
  assert rows["refused"]["status"].startswith("failed: model.out_channels=2: one logit per")
  assert rows["diverges"]["val_dice"] == "" and rows["diverges"]["params"]
  assert "failed: step 3: loss is nan" in (tmp_path / ablation.MD_FILE).read_text()

  # A divergence would come back under the same config: only the other failure is retried.
  calls.clear()
  with pytest.raises(UserError, match=failed):
    ablation.run_sweep(config, str(tmp_path))
  assert calls == ["broken"]
  assert _csv_rows(tmp_path) == list(rows.values())
  # Under another config (no checkpoint, so anything may change) the divergence is retried.
  config.overrides.train.learning_rate = 1e-4
  calls.clear()
  with pytest.raises(UserError, match=failed):
    ablation.run_sweep(config, str(tmp_path))
  assert calls == ["broken", "diverges", "fine"]
  # Bugs are not results.
  monkeypatch.setattr(train, "train_and_evaluate", _fake_training(calls, bug=True))
  with pytest.raises(RuntimeError, match="a bug"):
    ablation.run_sweep(config, str(tmp_path))


def test_a_config_wrong_for_every_variant_stops_the_sweep_before_anything(tmp_path,
                                                                          monkeypatch):
  config = ablation_config.get_config("smoke")
  config.overrides.train.keep_checkpoints = 0
  monkeypatch.setattr(train, "train_and_evaluate", _no_training)
  with pytest.raises(UserError, match="train.keep_checkpoints=0: keep at least 1"):
    ablation.run_sweep(config, str(tmp_path))
  assert [p.name for p in tmp_path.iterdir()] == [run_lock.LOCK_FILE]


def test_the_sweep_config_in_another_mode_is_one_line(tmp_path, run_env):
  for mode, hint in (("eval", f"one of its variants without --config, --workdir={tmp_path}/"
                              "<variant>"),
                     ("describe", "its base config, --config=configs/brain.py:demo")):
    result = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), f"--mode={mode}",
         "--config=configs/ablation.py:smoke", f"--workdir={tmp_path}"],
        cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stderr.strip() == (
        "error: --config is an ablation sweep, which only --mode=train runs; for "
        f"--mode={mode} give {hint}"), result.stderr[-2000:]


def test_launch_exits_non_zero_when_a_variant_failed(tmp_path, run_env):
  result = subprocess.run(
      [sys.executable, str(REPO / "launch.py"), "--config=configs/ablation.py:smoke",
       f"--workdir={tmp_path}", "--config.sweep={'two_logits': {'out_channels': 2}}"],
      cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert "Variant two_logits fails: model.out_channels=2" in result.stderr
  assert result.stderr.splitlines()[-1].startswith(
      "error: 1 of 1 variants failed (two_logits); ")
  assert [row["variant"] for row in _csv_rows(tmp_path)] == ["two_logits"]


# ---------------------------------------------------------------------------
# Configs, without training.


def test_default_sweep_covers_pooling_by_activation_dilation_norm_upsampling():
  sweep = ablation_config.get_config().sweep
  grid = {(v.get("pooling", "max"), v.get("activation", "relu")) for v in sweep.values()
          if set(v.keys()) <= {"pooling", "activation"}}
  assert grid == {(p, a) for p in ("max", "avg", "conv", "dilated_conv") for a in ("relu", "gelu")}
  assert {"dilation", "norm", "upsampling"} <= {k for v in sweep.values() for k in v.keys()}
  assert len(sweep) <= 15  # About 3 CPU minutes each on the demo.
  # Every variant builds, on the demo and on the full recipe (another depth).
  for base in (brain.get_config("demo"), brain.get_config()):
    assert len(ablation.variant_configs(ablation_config.get_config(), base)) == len(sweep)


def _parse(monkeypatch, *overrides, spec="configs/ablation.py"):
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", lock_config=True, flag_values=flag_values)
  argv = ["launch.py", f"--config={REPO / spec}", *overrides]
  monkeypatch.setattr(sys, "argv", argv)
  flag_values(argv)
  return flag_values.config


@_LOAD_MODULE
def test_base_and_overrides_from_the_command_line(monkeypatch, tmp_path):
  config = _parse(monkeypatch, "--config.base=configs/brain.py",
                  f"--config.overrides.data.root={tmp_path}", "--config.overrides.train.epochs=3",
                  "--config.overrides.model.dilation=(1,1,2,2,4)",
                  "--config.overrides.train.learning_rate=1")
  base = ablation.base_config(config)
  assert base.data.root == str(tmp_path) and not base.data.synthetic.enabled
  assert base.train.epochs == 3 and base.model.dilation == (1, 1, 2, 2, 4)
  assert base.train.learning_rate == 1.0 and base.data.image_size == 128  # The CPU recipe.
  assert ablation.base_config(_parse(monkeypatch)).data.synthetic.enabled  # The demo.
  with pytest.raises(AttributeError, match="widht"):
    _parse(monkeypatch, "--config.overrides.model.widht=3")


def test_base_config_is_found_from_any_folder(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  assert ablation.load_config_file("configs/brain.py:demo").model.features == 16
  assert ablation.load_config_file(str(REPO / "configs/brain.py")).model.features == 16
  with pytest.raises(UserError, match="no config file"):
    ablation.load_config_file("configs/missing.py")
  with pytest.raises(UserError, match="unknown variant 'demos'"):
    ablation.load_config_file("configs/brain.py:demos")


@pytest.mark.parametrize("sweep,message", [
    ({"a": {"poling": "avg"}}, "config.sweep.a: the base config has no field poling"),
    ({"a": {"pooling": "median"}}, "model.pooling='median'"),
    ({"a": {"depth": "deep"}}, "wrong type"),
    ({"phantoms": {}}, "cannot name a variant folder"),
    ({"compile_cache": {}}, "cannot name a variant folder"),
    ({}, "sweep is empty"),
])
def test_bad_sweeps_are_clear_errors(sweep, message):
  config = ablation_config.get_config()
  config.sweep = sweep
  with pytest.raises(UserError, match=message):
    ablation.variant_configs(config, brain.get_config("demo"))


def test_table_from_run_files(tmp_path):
  config = ablation_config.get_config("smoke")
  config.sweep = {"good": {"dilation": (1, 2, 2)}, "bad": {}, "failed": {}, "unfinished": {}}
  base = ablation.base_config(config)
  variants = ablation.variant_configs(config, base)
  flags_ = ablation.swept_fields(config)
  assert flags_ == ["dilation"]
  for name, dice in (("good", (0.5, 0.7)), ("bad", (0.4, 0.3)), ("failed", (0.8, 0.9))):
    run = tmp_path / name
    run.mkdir()
    for step, speed in enumerate((1.0, 30.0, 10.0, 20.0)):
      reports.append_metrics(run, {"step": step + 1, "epoch": 1, "split": "train",
                                   "loss": 1.0, "img_per_s": speed})
    for epoch, d in enumerate(dice):
      reports.append_metrics(run, {"step": 4 * epoch + 4, "epoch": epoch + 1, "split": "valid",
                                   "loss": 1.0, "dice": d, "iou": d - 0.1})
    (run / "eval/test").mkdir(parents=True)
    (run / "eval/test/summary.json").write_text(json.dumps({"metrics": {"dice": {"mean": 0.6}}}))
    (run / ablation.RESULT_FILE).write_text(json.dumps({"wall_s": 125.0}))
  # The score the sweep kept, not a later --mode=eval's at other settings.
  (tmp_path / "bad" / ablation.RESULT_FILE).write_text(json.dumps({"eval_dice": 0.55}))
  status = {"failed": "failed: loss is nan | inf", "unfinished": "pending"}
  rows = sorted((ablation.variant_row(n, v, tmp_path / n, flags_, status.get(n, "ok"))
                 for n, v in variants.items()),
                key=ablation._sort_key)  # pylint: disable=protected-access
  # A failed variant's numbers are not results, whatever its files say.
  assert [r["variant"] for r in rows] == ["good", "bad", "failed", "unfinished"]
  good = rows[0]
  assert good["dilation"] == (1, 2, 2) and good["best_epoch"] == 2
  assert good["epochs"] == 2
  assert good["val_dice"] == 0.7 and good["val_iou"] == pytest.approx(0.6)
  assert good["test_dice"] == 0.6 and good["img_per_s"] == 20.0 and good["wall_s"] == 125.0
  assert rows[1]["test_dice"] == 0.55
  for row in rows[2:]:
    assert all(row[c] is None for c in ("epochs", "val_dice", "test_dice", "img_per_s", "wall_s"))
  ablation.write_tables(rows, tmp_path, "# title")
  md = (tmp_path / ablation.MD_FILE).read_text().splitlines()
  assert md[0] == "# title"
  assert md[2] == ("| variant | dilation | params | epochs | best_epoch | val_dice | val_iou "
                   "| test_dice | train img/s | wall (m:s) | status |")
  assert md[4].startswith("| good | (1,2,2) | ") and md[4].endswith(
      "| 2 | 2 | 0.7000 | 0.6000 | 0.6000 | 20.0 | 2:05 | ok |")
  assert md[6].startswith("| failed | 1 |") and md[6].endswith(
      "|  |  |  |  |  |  |  | failed: loss is nan \\| inf |")
  assert md[7].startswith("| unfinished | 1 |") and md[7].endswith(
      "|  |  |  |  |  |  |  | pending |")
  assert _csv_rows(tmp_path)[0]["dilation"] == "(1,2,2)"
