"""benchmarks/: a bad flag, or PyTorch missing where it is needed, ends with one line."""

import json
import pathlib
import subprocess
import sys

# Each command run in one process (jax imported once), without PyTorch; prints its exit message.
_RUN = """
import json, runpy, sys
sys.path.insert(0, "benchmarks")
sys.modules["torch"] = None
for argv in json.loads(sys.argv[1]):
  sys.argv = argv
  try:
    runpy.run_path(argv[0], run_name="__main__")
    print(json.dumps("ran"))
  except SystemExit as e:
    print(json.dumps(e.code))
"""

_TINY = ["--image_size=8", "--batch_size=1", "--features=2", "--depth=1"]
_CASES = [
    (["train_step.py", "--steps=0"], "argument --steps: 0: use 1 or more"),
    (["train_step.py", "--against_float32=1"], "would time the same step twice"),
    (["train_step.py", "--reference=torch", *_TINY], "--reference=torch needs PyTorch"),
    (["train_step.py", "--pooling=bogus", "--peak=0", *_TINY], "model.pooling='bogus'"),
    (["inference.py", "--image_size=64"], "--image_size: not taken here; use --sizes"),
    (["inference.py", "--sizes=64,x"], "argument --sizes: 'x' is not a whole number"),
    (["convolutions.py", "--image_size=8", "--depth=4"], "needs 16 or more"),
    (["convolutions.py", "--image_size=8", "--depth=1"], "convolutions.py needs PyTorch"),
    (["peak.py", "--repeats=0"], "argument --repeats: 0: use 1 or more"),
]


def test_bad_flags_end_with_one_line(run_env):
  repo = pathlib.Path(__file__).resolve().parents[1]
  argvs = [[f"benchmarks/{argv[0]}", *argv[1:]] for argv, _ in _CASES]
  result = subprocess.run([sys.executable, "-c", _RUN, json.dumps(argvs)], cwd=repo,
                          env=run_env(devices=1), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  messages = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('"')]
  assert len(messages) == len(_CASES), result.stdout
  for (argv, says), message in zip(_CASES, messages):
    assert message.startswith("error: ") and "\n" not in message, (argv, message)
    assert says in message, (argv, message)
