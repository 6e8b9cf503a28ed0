"""Every configuration field, with its default.

Other configs start from `get_config()` here and change what their recipe
needs. Run a config with:

    python launch.py --config=configs/brain.py --workdir=runs/brain
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default configuration."""
  config = ml_collections.ConfigDict()

  config.data = data = ml_collections.ConfigDict()
  data.root = ""  # Dataset root: a COCO export with train/ valid/ test/ folders.
  data.image_size = 256  # Images and masks are resized to this square size.
  data.channels = 1  # 1: grey input, 3: RGB input.
  data.category_ids = ()  # COCO categories that are foreground; () merges all.
  data.train_split = "train"  # Split the model is trained on.
  data.val_split = "valid"  # Split that picks the best checkpoint.
  data.num_workers = 0  # grain worker processes (0 decodes in the main process).
  data.prefetch = 4  # Batches read ahead of the train step.
  # Synthetic phantoms, written to <workdir>/phantoms when data.root is "".
  data.synthetic = ml_collections.ConfigDict()
  data.synthetic.enabled = False  # Without a data.root, train on phantoms.
  data.synthetic.image_size = 128  # Size the phantom slices are drawn at.
  data.synthetic.num_train = 256  # Phantom slices per split...
  data.synthetic.num_valid = 64
  data.synthetic.num_test = 64
  data.synthetic.seed = 0  # Phantoms are a pure function of this seed.

  config.augment = augment = ml_collections.ConfigDict()
  augment.enabled = True  # Training only; image and mask move together.
  augment.rotate_degrees = 5.0  # Uniform rotation in [-x, x] degrees.
  augment.shift_fraction = 0.04  # Uniform shift in [-x, x] of the image size.
  augment.geometric_prob = 0.5  # Probability of rotating and shifting a sample.
  augment.brightness = 0.1  # Additive jitter in [-x, x] (images are in [0, 1]).
  augment.contrast = 0.1  # Multiplicative jitter in [1 - x, 1 + x] about the mean.
  augment.intensity_prob = 0.5  # Probability of brightness/contrast jitter.
  augment.hflip_prob = 0.0  # Left-right flips; off for brain MRI by default.

  config.model = model = ml_collections.ConfigDict()
  model.features = 32  # Width of the first level; doubles at each level down.
  model.depth = 4  # Number of down-sampling steps.
  # Down-sampling: max, avg, conv (strided 3x3) or dilated_conv (strided 3x3, dilation 2).
  model.pooling = "max"
  model.activation = "relu"  # relu, leaky_relu, gelu, silu or elu.
  model.leaky_slope = 0.01  # Negative slope of leaky_relu.
  # 3x3 conv dilation: one rate (2) or depth + 1 rates, one per level, bottleneck last
  # (--config.model.dilation='(1,1,2,2,4)').
  model.dilation = ml_collections.FieldReference(1, field_type=object)
  model.norm = "batch"  # Normalisation after each conv: batch, group, layer, none.
  model.upsampling = "transpose"  # transpose (2x2 conv) or bilinear (+ 3x3 conv).
  model.dropout = 0.0  # Dropout rate in the bottleneck and decoder.
  model.residual = False  # Residual double-conv blocks (1x1 projection when widths differ).
  model.attention = False  # Attention gates on the skip connections (Oktay et al. 2018).
  model.out_channels = 1  # Logit channels; training is binary, so 1 (one sigmoid logit).
  model.dtype = "float32"  # Compute dtype: float32 or bfloat16 (params stay float32).

  config.train = train = ml_collections.ConfigDict()
  train.epochs = 30  # Passes over the training split.
  train.batch_size = 16  # Global batch, split over all devices.
  train.seed = 0  # Seeds initialisation, shuffling, augmentation and dropout.
  train.learning_rate = 1e-3  # Peak Adam learning rate.
  train.warmup_epochs = 1  # Linear warm-up, then cosine decay to zero.
  train.weight_decay = 0.0  # Decoupled weight decay (AdamW when > 0).
  train.dice_weight = 1.0  # Weight of the soft Dice loss.
  train.bce_weight = 1.0  # Weight of the sigmoid binary cross-entropy.
  train.log_every_steps = 10  # Train loss is written to metrics.jsonl this often.
  train.keep_checkpoints = 2  # Latest checkpoints kept (the best is always kept).

  config.eval = eval_config = ml_collections.ConfigDict()
  eval_config.split = "test"  # Split evaluated by --mode=eval and after training.
  eval_config.checkpoint = "best"  # best, latest or a step number.
  eval_config.threshold = 0.5  # Probability above which a pixel is tumour.
  eval_config.tune_threshold = False  # Pick the threshold with the best Dice on data.val_split.
  eval_config.tta = False  # Average the probabilities of the image and its flips.
  eval_config.largest_component = False  # Keep only the largest predicted tumour blob.
  eval_config.batch_size = 16  # Global evaluation batch.
  eval_config.num_pictures = 6  # Rows in predictions.png.
  return config
