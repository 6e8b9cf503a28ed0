"""`--mode=export`: the trained model as a serialized `jax.export` artifact.

The artifact holds the computation and its weights; `unet_jax.serving`
runs it with jax alone, without the model code.
"""

import json
import pathlib

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from unet_jax import decoding
from unet_jax import evaluate
from unet_jax import model as model_lib
from unet_jax import onednn
from unet_jax import parallel
from unet_jax import steps

MODEL_FILE = "model.jax_exported"
META_FILE = "model.json"


def export(config: ml_collections.ConfigDict, workdir: str, output_dir: str | None = None,
           platforms: tuple[str, ...] = ("cpu", "cuda")) -> pathlib.Path:
  """Exports `eval.checkpoint` of the run: (N, H, W, C) images in [0, 1] -> (N, H, W) probabilities.

  The batch dimension is symbolic, so any batch size runs.

  Returns:
    The folder holding model.jax_exported and model.json.
  """
  decoding.check_decoder(config.eval.decode)  # model.json names it for serving.
  out = pathlib.Path(output_dir) if output_dir else pathlib.Path(workdir) / "export"
  state, step = evaluate.restore_state(config, workdir, parallel.make_mesh())
  variables = jax.device_get(steps.eval_variables(state))
  model = model_lib.from_config(config.model)

  def probabilities(images):
    return jax.nn.sigmoid(model_lib.tumour_logits(model.apply(variables, images, train=False)))

  size, channels = config.data.image_size, config.data.channels
  (batch,) = jax.export.symbolic_shape("batch")
  spec = jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32)
  with onednn.xla_convolutions():  # The artifact runs without our custom call.
    exported = jax.export.export(jax.jit(probabilities), platforms=platforms)(spec)

  meta = {
      "input": {"height": size, "width": size, "channels": channels, "dtype": "float32",
                "scale": "by the image type: 8-bit / 255, 16- and 32-bit integer / 65535, "
                         "float as it is; in [0, 1]",
                "resize": "bilinear to height x width"},
      "output": "tumour probability per pixel, (N, height, width)",
      "decode": config.eval.decode,
      "threshold": config.eval.threshold,
      "never_empty": config.eval.never_empty,
      "checkpoint_step": step,
      "platforms": list(platforms),
  }
  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL_FILE).write_bytes(exported.serialize())
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
  logging.info("Exported checkpoint %d of %s to %s", step, workdir, out)
  return out
