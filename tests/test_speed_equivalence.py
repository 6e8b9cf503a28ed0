"""unet_jax.layers' faster lowerings compute what flax's layers compute.

The 2x2 stride-2 transposed convolution as a matmul and a pixel shuffle,
2x2 max pooling as a reshape and a max with select-and-scatter's gradient,
1x1 convolutions as a matmul and one-channel convolutions as a sum of taps.
These tests pin that each gives the same parameters (names, shapes, initial
values), the same outputs and the same gradients as flax's ConvTranspose /
max_pool / Conv, alone and inside the U-Net, so checkpoints and results do
not depend on the lowering. Also: unet_jax.xla_config's flag merging and
compilation cache.
"""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax import layers
from unet_jax import model as model_lib
from unet_jax import xla_config


def _allclose(a, b, rtol=1e-5, atol=1e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                       rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize("shape,features", [((2, 5, 7, 3), 4), ((1, 8, 8, 16), 8)])
def test_conv_transpose_2x2_matches_flax(shape, features):
  x = jax.random.normal(jax.random.key(0), shape)
  ref = nn.ConvTranspose(features, (2, 2), strides=(2, 2))
  new = layers.ConvTranspose(features, (2, 2), strides=(2, 2))
  v_ref = ref.init(jax.random.key(1), x)
  v_new = new.init(jax.random.key(1), x)
  # Same parameter names, shapes and initial values.
  assert jax.tree.structure(v_ref) == jax.tree.structure(v_new)
  _allclose(v_ref, v_new, rtol=0, atol=0)
  _allclose(ref.apply(v_ref, x), new.apply(v_ref, x))

  def loss(module):
    return lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))

  _allclose(jax.grad(loss(ref), argnums=(0, 1))(v_ref, x),
            jax.grad(loss(new), argnums=(0, 1))(v_ref, x))


def test_conv_transpose_falls_back_outside_2x2():
  x = jax.random.normal(jax.random.key(0), (1, 4, 4, 2))
  ref = nn.ConvTranspose(3, (3, 3), strides=(2, 2))
  new = layers.ConvTranspose(3, (3, 3), strides=(2, 2))
  v = ref.init(jax.random.key(1), x)
  _allclose(ref.apply(v, x), new.apply(v, x), rtol=0, atol=0)


def _same_as_flax_conv(x, *args, **kwargs):
  ref, new = nn.Conv(*args, **kwargs), layers.Conv(*args, **kwargs)
  v_ref, v_new = ref.init(jax.random.key(1), x), new.init(jax.random.key(1), x)
  assert jax.tree.structure(v_ref) == jax.tree.structure(v_new)
  _allclose(v_ref, v_new, rtol=0, atol=0)

  def loss(module):
    return lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))

  for fn in (lambda f: f, jax.jit):
    _allclose(fn(ref.apply)(v_ref, x), fn(new.apply)(v_ref, x))
    _allclose(fn(jax.grad(loss(ref), argnums=(0, 1)))(v_ref, x),
              fn(jax.grad(loss(new), argnums=(0, 1)))(v_ref, x), rtol=1e-4)


@pytest.mark.parametrize("features,kwargs", [
    (1, {}), (5, {"use_bias": False}), (3, {"padding": "VALID"})])
def test_pointwise_conv_matches_flax(features, kwargs):
  x = jax.random.normal(jax.random.key(0), (2, 6, 5, 4))
  _same_as_flax_conv(x, features, (1, 1), **kwargs)


@pytest.mark.parametrize("size,dilation,use_bias", [((3, 3), 1, False), ((3, 3), 2, True),
                                                    ((5, 3), 1, True)])
def test_single_channel_conv_matches_flax(size, dilation, use_bias):
  x = jax.random.normal(jax.random.key(0), (2, 9, 7, 1))
  _same_as_flax_conv(x, 4, size, padding="SAME", kernel_dilation=dilation, use_bias=use_bias)


@pytest.mark.parametrize("shape,kwargs", [
    ((1, 6, 6, 2), {}),  # Two input channels.
    ((1, 6, 6, 1), {"strides": (2, 2)}),
    ((1, 6, 6, 1), {"padding": "VALID"})])
def test_conv_falls_back_to_flax_elsewhere(shape, kwargs):
  x = jax.random.normal(jax.random.key(0), shape)
  ref, new = nn.Conv(3, (3, 3), **kwargs), layers.Conv(3, (3, 3), **kwargs)
  v = ref.init(jax.random.key(1), x)
  _allclose(ref.apply(v, x), new.apply(v, x), rtol=0, atol=0)


def test_max_pool_2x2_is_bitwise_flax_with_ties():
  # Rounded, rectified values: many windows hold several equal maxima.
  x = jax.nn.relu(jnp.round(jax.random.normal(jax.random.key(0), (2, 8, 6, 3)) * 1.5))
  g = jax.random.normal(jax.random.key(1), (2, 4, 3, 3))

  def reference(x):
    return nn.max_pool(x, (2, 2), strides=(2, 2))

  for fn in (lambda f: f, jax.jit):
    y_ref, vjp_ref = jax.vjp(fn(reference), x)
    y_new, vjp_new = jax.vjp(fn(layers.max_pool_2x2), x)
    np.testing.assert_array_equal(y_ref, y_new)
    np.testing.assert_array_equal(vjp_ref(g)[0], vjp_new(g)[0])


def test_max_pool_falls_back_on_odd_sizes():
  x = jax.random.normal(jax.random.key(0), (1, 5, 4, 2))
  np.testing.assert_array_equal(nn.max_pool(x, (2, 2), strides=(2, 2)),
                                layers.max_pool(x, (2, 2), strides=(2, 2)))


def test_unet_train_step_math_unchanged(monkeypatch):
  model = model_lib.UNet(features=4, depth=2)
  size = 16
  images = jax.random.uniform(jax.random.key(0), (2, size, size, 1))
  masks = (jax.random.uniform(jax.random.key(1), (2, size, size, 1)) > 0.7).astype(jnp.float32)

  def run():
    variables = model.init(jax.random.key(2), images, train=False)

    def loss(params):
      logits, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                    images, train=True, mutable=["batch_stats"])
      return jnp.mean(optax_bce(logits, masks)), (logits, updates)

    @jax.jit
    def step(variables):
      (value, (logits, updates)), grads = jax.value_and_grad(loss, has_aux=True)(
          variables["params"])
      return value, logits, updates, grads, model.apply(variables, images, train=False)

    return (variables, *step(variables))

  ours = run()
  monkeypatch.setattr(layers, "ConvTranspose", nn.ConvTranspose)
  monkeypatch.setattr(layers, "max_pool", nn.max_pool)
  monkeypatch.setattr(layers, "Conv", nn.Conv)
  flax_lowering = run()
  assert jax.tree.structure(flax_lowering[0]) == jax.tree.structure(ours[0])
  _allclose(flax_lowering[0], ours[0], rtol=0, atol=0)  # Same parameters, same initial values.
  _allclose(flax_lowering[1:], ours[1:], rtol=1e-4, atol=1e-5)


def optax_bce(logits, labels):
  return jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def test_merge_flags_keeps_the_users_setting():
  merged = xla_config.merge_flags("--xla_force_host_platform_device_count=4 --a=1",
                                  ("--a=2", "--b=3"))
  assert merged.split() == ["--xla_force_host_platform_device_count=4", "--a=1", "--b=3"]


def test_cpu_flags_can_be_switched_off(monkeypatch):
  monkeypatch.setenv("UNET_JAX_XLA_DEFAULTS", "0")
  assert xla_config.cpu_flags() == ()


def test_cache_dir_is_the_workdirs_unless_set(monkeypatch):
  monkeypatch.delenv("UNET_JAX_CACHE_DIR", raising=False)
  assert xla_config.cache_dir_for("runs/a") == os.path.join("runs/a", "compile_cache")
  monkeypatch.setenv("UNET_JAX_CACHE_DIR", "/shared/cache")
  assert xla_config.cache_dir_for("runs/a") == "/shared/cache"


_CACHED_RUN = """
import os
import jax, jax.numpy as jnp
from unet_jax import xla_config
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None)
xla_config.configure(os.environ["UNET_JAX_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
print(float(jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((8, 8))).sum()), len(hits))
"""


def test_second_run_loads_from_the_compilation_cache(tmp_path):
  env = {**os.environ, "UNET_JAX_CACHE_DIR": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  runs = [subprocess.run([sys.executable, "-c", _CACHED_RUN], env=env, cwd=root, check=True,
                         capture_output=True, text=True).stdout.split() for _ in range(2)]
  assert runs[0][0] == runs[1][0]
  assert runs[0][1] == "0" and int(runs[1][1]) >= 1
  assert os.listdir(tmp_path / "cache")


_FAULTS_PER_CALL = """
import resource
from unet_jax import xla_config
xla_config.keep_freed_memory()
import jax, jax.numpy as jnp
# A 64 MiB temporary per call, as a train step's activations: over the 32 MiB above which
# glibc maps every block.
f = jax.jit(lambda x: (jnp.tanh(jnp.outer(x, x)) @ x).sum())
x = jnp.ones(4096)
for _ in range(5):  # The heap grows to hold the temporaries of overlapping calls.
  f(x).block_until_ready()
for _ in range(10):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc settings")
@pytest.mark.parametrize("keep", ["1", "0"])
def test_steps_reuse_their_temporaries_instead_of_faulting_them_in(keep):
  env = {**os.environ, "UNET_JAX_KEEP_FREED_MEMORY": keep, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": ""}  # One device, as training on a CPU.
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  faults = [int(n) for n in subprocess.run([sys.executable, "-c", _FAULTS_PER_CALL], env=env,
                                            cwd=root, check=True, capture_output=True,
                                            text=True).stdout.split()]
  temp_pages = 64 * 2**20 // 4096
  # The fewest faults of ten calls: the host may now and then take back a freed
  # block (some calls here faulted it all in again), but without the setting no
  # call ever finds it kept.
  if keep == "1":
    assert min(faults) < temp_pages // 4
  else:  # glibc's default: the temporary is mapped and faulted in afresh each call.
    assert min(faults) > temp_pages * 3 // 4
