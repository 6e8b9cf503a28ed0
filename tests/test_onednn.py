"""oneDNN convolutions: the same mathematics as XLA's, and used only where they are right."""

import json
import pathlib
import subprocess
import sys
import textwrap

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax import export
from unet_jax import layers
from unet_jax import model as model_lib
from unet_jax import onednn
from unet_jax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]


def _assert_close(got, want, rtol=1e-4):
  want = np.asarray(want)
  np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=rtol * np.abs(want).max())


# Relative tolerance of each dtype: float32's summation order; bfloat16's rounding of the
# result (8 bits of mantissa), which oneDNN and XLA both do once, after summing in float32.
RTOL = {"float32": 1e-4, "bfloat16": 2**-7}


def _skip_without_kernels(dtype):
  if np.dtype(dtype) not in onednn.cpu_dtypes():
    pytest.skip(f"oneDNN has no {dtype} kernels on this CPU (no AVX-512)")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [
    # N, H, W, Cin, Cout, KH, KW, dilation
    (1, 8, 8, 4, 4, 3, 3, 1),
    (2, 9, 7, 3, 5, 3, 3, 2),  # odd sizes: XLA puts the odd padding pixel at the end
    (8, 17, 15, 16, 32, 3, 3, 2),
    (2, 16, 16, 64, 8, 3, 3, 4),
    (2, 11, 9, 8, 12, 5, 3, 1),
])
def test_conv_and_its_gradients_match_xla(shape, dtype):
  _skip_without_kernels(dtype)
  n, h, w, cin, cout, kh, kw, dilation = shape
  keys = jax.random.split(jax.random.key(sum(shape)), 3)
  x = jax.random.normal(keys[0], (n, h, w, cin)).astype(dtype)
  kernel = (jax.random.normal(keys[1], (kh, kw, cin, cout)) / np.sqrt(kh * kw * cin)).astype(dtype)
  dy = jax.random.normal(keys[2], (n, h, w, cout)).astype(dtype)

  def value_and_vjp(conv):
    y, vjp = jax.vjp(lambda x, k: conv(x, k, dilation), x, kernel)
    return (y, *vjp(dy))

  got = jax.jit(lambda: value_and_vjp(onednn.conv))()
  want = jax.jit(lambda: value_and_vjp(onednn.xla_conv))()
  for name, a, b in zip(("y", "dx", "dkernel"), got, want):
    assert a.shape == b.shape and a.dtype == b.dtype == dtype, name
    _assert_close(a.astype(np.float32), b.astype(np.float32), RTOL[dtype])


def test_convolutions_without_an_optimised_onednn_kernel_are_xlas():
  # oneDNN's reference kernel for a dilated kernel's gradient on an 800x800 image, 64
  # channels, took minutes where XLA's took seconds: that gradient alone goes to XLA.
  x, kernel = jnp.ones((1, 800, 800, 64)), jnp.ones((3, 3, 64, 64))
  hlo = jax.jit(jax.grad(lambda x, k: onednn.conv(x, k, 2).sum(), argnums=(0, 1))).lower(
      x, kernel).as_text()
  assert "unet_onednn_conv_bwd_data" in hlo
  assert "unet_onednn_conv_bwd_weights" not in hlo


def test_xlas_stand_ins_compute_the_same_gradients(monkeypatch):
  keys = jax.random.split(jax.random.key(0), 3)
  x, dy = jax.random.normal(keys[0], (2, 9, 7, 3)), jax.random.normal(keys[1], (2, 9, 7, 5))
  kernel = jax.random.normal(keys[2], (3, 3, 3, 5))
  want = jax.vjp(lambda x, k: onednn.xla_conv(x, k, 2), x, kernel)[1](dy)
  for missing in range(3):  # Forward, data gradient, kernel gradient.
    monkeypatch.setattr(onednn, "_optimised", lambda kind, *_, m=missing: kind != m)
    got = jax.jit(lambda: jax.vjp(lambda x, k: onednn.conv(x, k, 2), x, kernel)[1](dy))()
    for a, b in zip(got, want):
      _assert_close(a, b)


def test_conv_refuses_mixed_or_other_dtypes():
  x = jnp.ones((1, 4, 4, 2))
  with pytest.raises(ValueError, match="float32 or bfloat16 x and kernel of one dtype"):
    onednn.conv(x, jnp.ones((3, 3, 2, 2), jnp.bfloat16))
  with pytest.raises(ValueError, match="float16"):
    onednn.conv(x.astype(jnp.float16), jnp.ones((3, 3, 2, 2), jnp.float16))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(2, 9, 7, 3), (8, 32, 32, 16)])
def test_batch_norm_layer_matches_flax_in_training(monkeypatch, shape, dtype):
  _skip_without_kernels(dtype)
  keys = jax.random.split(jax.random.key(sum(shape)), 3)
  x = (jax.random.normal(keys[0], shape) * 3 + 1).astype(dtype)
  dy = jax.random.normal(keys[1], shape).astype(dtype)
  ours = layers.BatchNorm(momentum=0.9, dtype=dtype)
  flax_bn = nn.BatchNorm(momentum=0.9, dtype=dtype)
  variables = flax_bn.init(keys[2], x, use_running_average=False)
  monkeypatch.setattr(onednn, "wanted", lambda: True)
  assert jax.tree.map(jnp.shape, ours.init(keys[2], x, use_running_average=False)) == \
      jax.tree.map(jnp.shape, variables)
  params = {"scale": jnp.linspace(0.5, 2, shape[-1]), "bias": jnp.linspace(-1, 1, shape[-1])}

  def step(module):
    def apply(params, x):
      y, updates = module.apply({**variables, "params": params}, x, use_running_average=False,
                                mutable=["batch_stats"])
      return y, updates["batch_stats"]
    y, vjp, stats = jax.vjp(apply, params, x, has_aux=True)
    return stats, y, vjp(dy)
  assert "unet_onednn_batch_norm_bwd" in jax.jit(lambda: step(ours)).lower().as_text()
  got = jax.jit(lambda: step(ours))()
  want = jax.jit(lambda: step(flax_bn))()
  # Running statistics (float32), output, and the gradients of the parameters and the input.
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == b.dtype
    _assert_close(a.astype(np.float32), b.astype(np.float32), RTOL[dtype])


def test_batch_norm_without_a_dtype_computes_as_flax_does(monkeypatch):
  # flax computes bfloat16 input in float32 (promoted with its parameters): not oneDNN's
  # bfloat16 kernel, even where there is one.
  monkeypatch.setattr(onednn, "takes", lambda dtype: True)
  x = jnp.ones((2, 4, 4, 8), jnp.bfloat16)
  for module in (layers.BatchNorm(), nn.BatchNorm()):
    def train_step(m=module):
      variables = m.init(jax.random.key(0), x, use_running_average=False)
      return m.apply(variables, x, use_running_average=False, mutable=["batch_stats"])[0]
    assert jax.eval_shape(train_step).dtype == jnp.float32, module


def test_an_empty_batch_gives_what_flax_gives(monkeypatch):
  # oneDNN refuses zero-sized tensors; XLA returns empty results and zero kernel gradients.
  monkeypatch.setattr(onednn, "wanted", lambda: True)
  x = jnp.zeros((0, 8, 8, 4))
  for ours, theirs in ((layers.Conv(8, (3, 3)), nn.Conv(8, (3, 3))),
                       (layers.BatchNorm(use_running_average=False),
                        nn.BatchNorm(use_running_average=False))):
    variables = theirs.init(jax.random.key(0), jnp.ones((1, 8, 8, 4)))

    def loss(params, module):
      y = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])[0]
      return y.sum(), y.shape
    got = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)(variables["params"], ours)
    want = jax.grad(loss, has_aux=True)(variables["params"], theirs)
    assert got[1] == want[1]
    for a, b in zip(jax.tree.leaves(got[0]), jax.tree.leaves(want[0])):
      np.testing.assert_array_equal(a, b)

def test_flip_tta_of_a_unet_matches_xla(monkeypatch):
  # XLA runs the two flip branches on two threads at once, and they share the
  # cached primitives: without the lock in onednn_conv.cc they corrupted each
  # other (errors of 0.2 in probabilities of at most 0.3 at this size).
  unet = model_lib.UNet(features=16, depth=4)
  images = jax.random.uniform(jax.random.key(0), (16, 128, 128, 1))
  # The parameters' shapes do not depend on the image size.
  variables = jax.jit(lambda key: unet.init(key, images[:1, :16, :16], train=False))(
      jax.random.key(1))

  def tta():  # A new function each time: jit must trace it afresh.
    def logits(variables, images):
      apply = lambda x: unet.apply(variables, x, train=False)
      return apply(images) + jnp.flip(apply(jnp.flip(images, 2)), 2)
    return jax.jit(logits).lower(variables, images)

  monkeypatch.setattr(onednn, "wanted", lambda: False)
  want = tta().compile()(variables, images)
  monkeypatch.setattr(onednn, "wanted", lambda: True)
  lowered = tta()
  assert "@unet_onednn_conv_fwd(" in lowered.as_text()  # Not a silent fall back to XLA.
  on_onednn = lowered.compile()
  for _ in range(3):
    _assert_close(on_onednn(variables, images), want)


def test_conv_is_deterministic():
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 16))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 16, 16))
  grad = jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.tanh(onednn.conv(x, k, 1))), argnums=(0, 1)))
  first, second = grad(x, kernel), grad(x, kernel)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)


def test_unet_loss_and_gradients_match_xla(monkeypatch):
  unet = model_lib.UNet(features=8, depth=3, dilation=(1, 1, 2, 2))
  images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 1))
  variables = unet.init(jax.random.key(1), images, train=False)

  def loss_and_grads():
    def loss(params):
      logits, _ = unet.apply({**variables, "params": params}, images, train=True,
                             mutable=["batch_stats"])
      return jnp.mean(jax.nn.sigmoid(logits) ** 2)
    return jax.jit(jax.value_and_grad(loss))(variables["params"])

  monkeypatch.setattr(onednn, "wanted", lambda: False)
  want = loss_and_grads()
  calls = []
  monkeypatch.setattr(onednn, "wanted", lambda: calls.append(1) or True)
  got = loss_and_grads()
  assert calls, "no convolution went to oneDNN"
  _assert_close(got[0], want[0])
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    _assert_close(a, b, rtol=1e-3)


def test_a_bfloat16_unet_trains_its_convolutions_and_batch_norm_on_onednn(monkeypatch):
  _skip_without_kernels("bfloat16")
  unet = model_lib.UNet(features=8, depth=2, dtype="bfloat16")
  images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 1))
  monkeypatch.setattr(onednn, "wanted", lambda: True)
  variables = unet.init(jax.random.key(1), images, train=False)

  def loss(params):
    logits, _ = unet.apply({**variables, "params": params}, images, train=True,
                           mutable=["batch_stats"])
    return jnp.mean(jax.nn.sigmoid(logits) ** 2)
  hlo = jax.jit(jax.grad(loss)).lower(variables["params"]).as_text()
  calls = [line for line in hlo.splitlines() if "stablehlo.custom_call @unet_onednn" in line]
  for target in ("conv_fwd", "conv_bwd_data", "conv_bwd_weights", "batch_norm_fwd",
                 "batch_norm_bwd"):
    assert any(f"@unet_onednn_{target}(" in line and "bf16" in line for line in calls), target


def test_without_avx512_bfloat16_models_keep_xla_kernels(run_env):
  # ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN act as on a CPU without AVX-512, where it
  # creates no bfloat16 primitive: such a model must train on XLA's kernels instead.
  script = textwrap.dedent('''
      import os
      import jax, jax.numpy as jnp, numpy as np
      from unet_jax import model as model_lib, onednn
      from unet_jax.errors import UserError
      assert onednn.cpu_dtypes() == (np.dtype("float32"),), onednn.cpu_dtypes()
      images = jnp.ones((2, 8, 8, 1))
      for dtype, on_onednn in (("bfloat16", False), ("float32", True)):
        unet = model_lib.UNet(features=4, depth=1, dtype=dtype)
        variables = jax.jit(lambda key: unet.init(key, images, train=False))(jax.random.key(0))
        def loss(params):
          logits, _ = unet.apply({**variables, "params": params}, images, train=True,
                                 mutable=["batch_stats"])
          return jnp.mean(logits.astype(jnp.float32) ** 2)
        grad = jax.jit(jax.grad(loss)).lower(variables["params"])
        assert ("unet_onednn" in grad.as_text()) == on_onednn, dtype
        if not on_onednn:  # It trains, on XLA's kernels.
          assert np.isfinite(jax.tree.leaves(grad.compile()(variables["params"]))[0]).all()
      x, scale = jnp.ones((1, 4, 4, 2), jnp.bfloat16), jnp.ones((2,))
      for call in (lambda: onednn.conv(x, jnp.ones((3, 3, 2, 2), jnp.bfloat16)),
                   lambda: onednn.batch_norm(x, scale, scale, 1e-5)):
        try:
          call()
          raise AssertionError("no error")
        except ValueError as e:
          assert "no bfloat16 kernels on this CPU" in str(e), e
      os.environ["UNET_JAX_CONV"] = "onednn"
      try:
        onednn.takes(jnp.bfloat16)
        raise AssertionError("no error")
      except UserError as e:
        assert "UNET_JAX_CONV=onednn: oneDNN has no bfloat16 kernels" in str(e), e
      ''')
  env = run_env(1, UNET_JAX_CONV="auto", ONEDNN_MAX_CPU_ISA="AVX2")
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]


def test_a_primitive_runs_on_threads_other_than_the_one_that_made_it(run_env):
  """XLA runs a custom call on any of its threads. oneDNN's own scratchpad is the creating
  thread's: on another, the dilated kernel's gradient (a gemm convolution) wrote through a
  null one and the process died (a segfault) at a random step of a dilated model."""
  script = textwrap.dedent("""
      import threading
      import jax, jax.numpy as jnp, numpy as np
      from unet_jax import onednn
      x = jax.random.normal(jax.random.key(0), (2, 12, 12, 16))
      kernel = jax.random.normal(jax.random.key(1), (3, 3, 16, 16))
      grad = jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.sin(onednn.conv(x, k, 2))), (0, 1)))
      first = jax.block_until_ready(grad(x, kernel))  # Its primitives made on this thread.
      for _ in range(3):
        out = []
        thread = threading.Thread(target=lambda: out.append(jax.block_until_ready(
            grad(x, kernel))))
        thread.start()
        thread.join()
        for a, b in zip(first, out[0]):
          np.testing.assert_array_equal(a, b)
      """)
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=run_env(1),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, (result.returncode, result.stderr[-3000:])


def test_several_devices_keep_xla(monkeypatch):
  assert jax.device_count() == 4
  monkeypatch.setenv("UNET_JAX_CONV", "auto")
  assert not onednn.wanted()
  monkeypatch.setenv("UNET_JAX_CONV", "onednn")
  with pytest.raises(UserError, match="needs one CPU device"):
    onednn.wanted()
  monkeypatch.setenv("UNET_JAX_CONV", "fast")
  with pytest.raises(UserError, match="UNET_JAX_CONV='fast'"):
    onednn.wanted()


def test_missing_compiler_is_a_clear_error(monkeypatch, tmp_path):
  monkeypatch.setenv("UNET_JAX_BUILD_DIR", str(tmp_path))
  monkeypatch.setenv("CXX", f"{tmp_path / 'no-such-compiler'} -O2")  # A compiler and flags.
  with pytest.raises(UserError, match=r"no C\+\+ compiler '[^ ]*no-such-compiler' to build"):
    onednn.library_path()


def test_a_run_on_one_cpu_device_trains_on_onednn_and_exports_without_it(tmp_path, run_env):
  env = run_env(1, UNET_JAX_CONV="onednn")
  workdir = tmp_path / "run"
  launch = [sys.executable, str(REPO / "launch.py"), f"--workdir={workdir}"]
  subprocess.run([*launch, "--config=configs/brain.py:smoke", "--config.train.epochs=1"],
                 cwd=REPO, env={**env, "JAX_DUMP_IR_TO": str(tmp_path / "ir")}, check=True,
                 capture_output=True, timeout=300)
  subprocess.run([*launch, "--mode=export"], cwd=REPO, env=env, check=True, capture_output=True,
                 timeout=300)
  summary = json.loads((workdir / "eval/test/summary.json").read_text())
  assert summary["n_images"] == 8 and 0 <= summary["metrics"]["dice"]["mean"] <= 1
  # The programs it ran: not a silent fall back to XLA.
  train_step = "".join(p.read_text() for p in (tmp_path / "ir").glob("*_jit_train_step_*"))
  for target in ("conv_fwd", "conv_bwd_data", "conv_bwd_weights", "batch_norm_fwd"):
    assert f"@unet_onednn_{target}(" in train_step, target
  # The artifact runs on machines without our library: XLA's convolutions only.
  exported = jax.export.deserialize((workdir / "export" / export.MODEL_FILE).read_bytes())
  module = exported.mlir_module()
  assert "stablehlo.convolution" in module and "unet_onednn" not in module


def test_exports_trace_xla_convolutions(monkeypatch):
  monkeypatch.setenv("UNET_JAX_CONV", "onednn")
  with onednn.xla_convolutions():
    assert not onednn.wanted()
  with pytest.raises(UserError):  # four devices here
    onednn.wanted()
