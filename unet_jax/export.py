"""`--mode=export`: the trained model as a serialized `jax.export` artifact.

The artifact holds the computation and its weights; `unet_jax.serving`
runs it with jax alone, without the model code.
"""

import functools
import hashlib
import json
import pathlib

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from unet_jax import data as data_lib
from unet_jax import evaluate
from unet_jax import onednn
from unet_jax import parallel
from unet_jax import reports
from unet_jax import steps

MODEL_FILE = "model.jax_exported"
META_FILE = "model.json"


def _input_scale(data_config: ml_collections.ConfigDict) -> str:
  """How an image becomes the model's input values, as training read its data."""
  if data_lib.data_format(data_config) == "brats":
    low, high = data_config.clip_percentiles
    return (f"an h5 slice's 'image' channels {tuple(data_config.modalities)}, each to [0, 1] by "
            f"its {low:g}th-{high:g}th percentiles over its non-zero pixels (zeros stay 0)")
  return "by the image type: 8-bit / 255, 16- and 32-bit integer / 65535, float as it is; in [0, 1]"


def export(config: ml_collections.ConfigDict, workdir: str, output_dir: str | None = None,
           platforms: tuple[str, ...] = ("cpu", "cuda")) -> pathlib.Path:
  """Exports `eval.checkpoint` of the run: (N, H, W, C) images in [0, 1] -> (N, H, W) probabilities.

  As evaluation computes them: with `eval.tta`'s flips, and averaged with the
  runs of `eval.ensemble`. The batch dimension is symbolic, so any batch size runs.

  Returns:
    The folder holding model.jax_exported and model.json.
  """
  evaluate.check_eval_config(config.eval)  # model.json names the decoding for serving.
  evaluate.warn_untuned_threshold(config, "export")
  out = pathlib.Path(output_dir) if output_dir else pathlib.Path(workdir) / "export"
  states, step, ensemble = evaluate.restore_runs(config, workdir, parallel.make_mesh())
  # On the host: the weights become the artifact's constants, on no device's mesh.
  states = jax.device_get(states)
  predict = functools.partial(steps.predict_step, tta=config.eval.tta,
                              up_down=config.eval.tta_up_down)

  def probabilities(images):
    return evaluate.averaged(predict)(states, images)

  size, channels = config.data.image_size, config.data.channels
  (batch,) = jax.export.symbolic_shape("batch")
  spec = jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32)
  with onednn.xla_convolutions():  # The artifact runs without our custom call.
    exported = jax.export.export(jax.jit(probabilities), platforms=platforms)(spec)

  meta = {
      "input": {"height": size, "width": size, "channels": channels, "dtype": "float32",
                "scale": _input_scale(config.data), "resize": "bilinear to height x width"},
      # What serving's predict_file reads from an .h5 slice, and how it scales it.
      **({"h5_slices": {"modalities": list(config.data.modalities),
                        "clip_percentiles": list(config.data.clip_percentiles)}}
         if data_lib.data_format(config.data) == "brats" else {}),
      "output": "tumour probability per pixel, (N, height, width)",
      "tta": ("the image and its " + ("left-right, up-down and double flips"
                                      if config.eval.tta_up_down else "left-right flip")
              + ", averaged inside the model") if config.eval.tta else "none",
      "decode": config.eval.decode,
      "threshold": config.eval.threshold if config.eval.decode == "threshold" else None,
      "never_empty": config.eval.never_empty,
      "largest_component": config.eval.largest_component,
      "fill_box": config.eval.fill_box,
      "checkpoint_step": step,
      "ensemble": [{"workdir": w, "checkpoint_step": s} for w, _, s in ensemble],
      "platforms": list(platforms),
  }
  serialized = exported.serialize()
  meta["model_sha256"] = hashlib.sha256(serialized).hexdigest()  # Serving checks the pair.
  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
    # Each written whole, the model first: an export stopped between the two leaves the
    # earlier model.json, whose checksum no longer matches (serving refuses the pair).
    reports.write_atomic(out / MODEL_FILE, serialized)
    reports.write_atomic(out / META_FILE, json.dumps(meta, indent=2) + "\n")
  logging.info("Exported checkpoint %d of %s to %s", step, workdir, out)
  return out
