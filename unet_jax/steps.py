"""The train state and the pure, jitted steps that train, evaluate and predict with it."""

import functools
from typing import Any

import flax
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import optax

from unet_jax import cutmix as cutmix_lib
from unet_jax import losses
from unet_jax import metrics as metrics_lib
from unet_jax import model as model_lib
from unet_jax import parallel
from unet_jax import subnetworks as subnetworks_lib


class TrainState(train_state.TrainState):
  """Parameters, optimiser state, batch-norm statistics and the training controls.

  Attributes:
    batch_stats: Batch-norm running statistics (empty without batch norm).
    ema_params: Exponential moving average of the parameters, or None.
    lr_scale: Factor on every update, lowered by reduce-on-plateau.
  """

  batch_stats: Any = None
  ema_params: Any = None
  lr_scale: Any = None


def _eager_init(model: model_lib.UNet, key: jax.Array, image: jax.Array) -> Any:
  return model.init(key, image, train=False)


# Eagerly, init compiles hundreds of primitives one by one, each fully optimised (13 s for the
# brain recipe on a 2-core Zen 4, 36 s on a Zen 1). Compiled whole and unoptimised it takes 2-5 s
# and runs once; the weights differ from the eager ones by at most one float32 ulp. The eager
# one stays for jax.eval_shape, which does not take a jit with compiler_options inside it.
_jitted_init = jax.jit(_eager_init, static_argnums=0,
                       compiler_options={"xla_backend_optimization_level": 0})


def create_train_state(config: ml_collections.ConfigDict, image_shape: tuple[int, int, int],
                       tx: optax.GradientTransformation) -> TrainState:
  """Initialises the U-Net of `config.model` for (H, W, C) images.

  `tx` runs at rate 1 (`optim.make_optimizer`'s): the train step scales its updates by the
  learning rate it is given.
  """
  return _new_train_state(config, image_shape, tx, _jitted_init)


def abstract_train_state(config: ml_collections.ConfigDict, image_shape: tuple[int, int, int],
                         tx: optax.GradientTransformation, sharding: jax.sharding.Sharding
                         ) -> TrainState:
  """A restore target: `create_train_state`'s shapes and dtypes on `sharding`, nothing computed."""
  shapes = jax.eval_shape(lambda: _new_train_state(config, image_shape, tx, _eager_init))
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def _new_train_state(config: ml_collections.ConfigDict, image_shape: tuple[int, int, int],
                     tx: optax.GradientTransformation, init: Any) -> TrainState:
  model = model_lib.from_config(config.model)
  variables = init(model, jax.random.key(config.train.seed), jnp.zeros((1, *image_shape)))
  params = variables["params"]
  # The EMA starts as a copy: the train step donates the state, and a buffer held twice in it
  # cannot be donated.
  ema_params = jax.tree.map(jnp.copy, params) if config.train.ema_decay > 0 else None
  return TrainState.create(
      apply_fn=model.apply, params=params, tx=tx,
      batch_stats=variables.get("batch_stats", flax.core.FrozenDict()),
      ema_params=ema_params,
      lr_scale=jnp.ones((), jnp.float32))


def _variables(state: TrainState) -> dict[str, Any]:
  """The variables evaluation uses: the EMA parameters when kept."""
  params = state.params if state.ema_params is None else state.ema_params
  return {"params": params, "batch_stats": state.batch_stats}


def _loss_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  train = config.train
  return dict(dice_weight=train.dice_weight, bce_weight=train.bce_weight,
              lovasz_weight=train.lovasz_weight,
              smooth=train.dice_smooth, per_image=train.dice_per_image)


def _aux_logits(model_updates: dict[str, Any]) -> dict[int, jax.Array]:
  """Level -> logits of the deep-supervision heads the model sowed (none without them)."""
  sown = model_updates.get("intermediates", {})
  return {int(name.rsplit("_", 1)[1]): values[0] for name, values in sown.items()}


def train_step(state: TrainState, batch: dict[str, jax.Array], learning_rate: jax.Array, *,
               loss_options: dict[str, Any], ema_decay: float, ema_warmup: float, seed: int,
               category_weights: tuple[float, ...] = (), sam_rho: float = 0.0,
               subnetworks: int = 1, shared_input_fraction: float = 0.0, cutmix_prob: float = 0.0
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step on a (global) batch at `learning_rate` (x the state's `lr_scale`);
  returns the new state and batch metrics.

  The loss is the batch's mean, weighted by each image's category when `category_weights`
  are given (`losses.category_weights`). With `sam_rho` > 0 the step is sharpness-aware
  (`_sharpness_aware_grads`). With `subnetworks` > 1 the batch is mixed for them
  (`subnetworks.mix`) and the loss is the mean over their images. With `cutmix_prob` > 0
  images first take a box of another (`cutmix.cutmix`).
  """
  dropout_key = jax.random.fold_in(jax.random.key(seed), state.step)
  images, labels = batch["image"], batch["mask"]
  if cutmix_prob > 0:
    images, labels = cutmix_lib.cutmix(jax.random.fold_in(dropout_key, 2), images, labels,
                                       cutmix_prob)
  labels = labels[None]
  if subnetworks > 1:
    images, labels = subnetworks_lib.mix(jax.random.fold_in(dropout_key, 1), images,
                                         labels[0], subnetworks, shared_input_fraction)

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True, mixed=True,
        rngs={"dropout": dropout_key}, mutable=["batch_stats", "intermediates"])
    logits = subnetworks_lib.split_logits(logits, subnetworks)
    aux_logits = {level: subnetworks_lib.split_logits(level_logits, subnetworks)
                  for level, level_logits in _aux_logits(updates).items()}

    def member_loss(member_logits, member_aux_logits, member_labels):
      masks = losses.targets(member_labels, member_logits.shape[-1])
      return losses.deep_supervision_loss(member_logits, member_aux_logits, masks,
                                          **loss_options)

    per_image = jax.vmap(member_loss)(logits, aux_logits, labels)
    if category_weights:
      weights = jax.vmap(functools.partial(losses.category_weights, weights=category_weights))(
          labels)
      loss = jnp.sum(weights * per_image) / jnp.sum(weights)
    else:
      loss = per_image.mean()
    return loss, (logits, updates)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (logits, model_updates)), grads = grad_fn(state.params)
  if sam_rho > 0:
    grads = _sharpness_aware_grads(grad_fn, state.params, grads, sam_rho)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  updates = jax.tree.map(lambda u: u * (learning_rate * state.lr_scale), updates)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if ema is not None:
    # Warm-up as in tf.train.ExponentialMovingAverage: early on, an average reaching far back
    # holds the initial weights, which the batch-norm statistics of the live model do not fit.
    decay = jnp.minimum(ema_decay, (1.0 + state.step) / (ema_warmup + state.step))
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
  # Without batch norm flax returns an empty plain dict; keeping the state's own
  # (empty) container keeps the state's pytree, so the step does not recompile.
  batch_stats = model_updates.get("batch_stats") or state.batch_stats
  state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
                        batch_stats=batch_stats)
  # Every subnetwork's images, as one batch.
  logits, labels = (x.reshape(-1, *x.shape[2:]) for x in (logits, labels))
  dice = metrics_lib.dice_from_counts(metrics_lib.confusion_counts(
      model_lib.tumour_logits(logits)[..., None] > 0, labels > 0))
  return state, {"loss": loss, "dice": dice.mean(), "grad_norm": optax.tree.norm(grads)}


def _sharpness_aware_grads(grad_fn: Any, params: Any, grads: Any, rho: float) -> Any:
  """SAM (Foret et al., 2021): the gradient at `params` moved `rho` up their own gradient.

  That point is, to first order, the worst within `rho`; descending from it favours flat
  minima. Costs a second forward and backward pass. The batch-norm statistics and the
  reported loss stay those of `params`.
  """
  scale = rho / (optax.tree.norm(grads) + 1e-12)
  worst = jax.tree.map(lambda p, g: p + scale * g, params, grads)
  _, worst_grads = grad_fn(worst)
  return worst_grads


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, loss_options: dict[str, Any],
              tta: bool, up_down: bool) -> dict[str, jax.Array]:
  """Per-image loss and the (N, H, W) probabilities `predict_step` gives."""
  logits = state.apply_fn(_variables(state), batch["image"], train=False)
  return {
      "loss": losses.dice_bce_loss(logits, losses.targets(batch["mask"], logits.shape[-1]),
                                   **loss_options),
      "probs": _flip_averaged(state, batch["image"],
                              jax.nn.sigmoid(model_lib.tumour_logits(logits)), tta, up_down),
  }


def predict_step(state: TrainState, images: jax.Array, *, tta: bool = False,
                 up_down: bool = True) -> jax.Array:
  """(N, H, W) tumour probabilities.

  With `tta`, the probabilities of the image and of its left-right,
  up-down and double flips (each flipped back) are averaged; without
  `up_down`, of the image and its left-right flip only.
  """
  return _flip_averaged(state, images, _probs(state, images), tta, up_down)


def _probs(state: TrainState, images: jax.Array) -> jax.Array:
  logits = state.apply_fn(_variables(state), images, train=False)
  return jax.nn.sigmoid(model_lib.tumour_logits(logits))


def _flip_averaged(state: TrainState, images: jax.Array, probs: jax.Array, tta: bool,
                   up_down: bool) -> jax.Array:
  """`probs` (of `images`) averaged with the flips' as `predict_step` says."""
  if not tta:
    return probs
  flips = ((2,), (1,), (1, 2)) if up_down else ((2,),)
  total = probs
  for axes in flips:
    total += jnp.flip(_probs(state, jnp.flip(images, axes)), axes)
  return total / (1 + len(flips))


def jit_predict(mesh, tta: bool = False, up_down: bool = True):
  """`predict_step` jitted with the batch sharded over the mesh."""
  return jax.jit(functools.partial(predict_step, tta=tta, up_down=up_down),
                 in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
                 out_shardings=parallel.batch_sharded(mesh))


def jit_steps(config: ml_collections.ConfigDict, mesh) -> tuple[Any, Any]:
  """The jitted train and eval steps: batch sharded over the mesh, state replicated.

  The train step is called as `(state, batch, learning_rate)` and the eval step as
  `(state, batch)`, each batch a `parallel.device_batch`.
  """
  replicated, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  options = _loss_options(config)
  p_train = jax.jit(functools.partial(train_step, loss_options=options, seed=config.train.seed,
                                      ema_decay=config.train.ema_decay,
                                      ema_warmup=config.train.ema_warmup,
                                      category_weights=tuple(config.train.category_weights),
                                      sam_rho=config.train.sam_rho,
                                      subnetworks=config.model.subnetworks,
                                      shared_input_fraction=config.train.shared_input_fraction,
                                      cutmix_prob=(config.augment.cutmix_prob
                                                   if config.augment.enabled else 0.0)),
                    in_shardings=(replicated, sharded, replicated),
                    out_shardings=(replicated, replicated),
                    donate_argnums=0)
  # Validation loss is per image: padding must not enter a batch Dice.
  p_eval = jax.jit(functools.partial(eval_step, loss_options={**options, "per_image": True},
                                     tta=config.eval.tta, up_down=config.eval.tta_up_down),
                   in_shardings=(replicated, sharded), out_shardings=sharded)
  return p_train, p_eval
