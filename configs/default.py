"""Every configuration field, with its default.

Other configs start from `get_config()` here and change what their recipe
needs. Run a config with:

    python launch.py --config=configs/brain.py --workdir=runs/brain
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the default configuration; it has no variants (`default.py:ARG`)."""
  if arg is not None:
    raise ValueError(f"configs/default.py: unknown variant {arg!r}; it has none.")
  config = ml_collections.ConfigDict()

  config.data = data = ml_collections.ConfigDict()
  data.format = "coco"  # Dataset layout: coco, lgg (patient folders of .tif) or brats (.h5).
  data.root = ""  # Dataset root, e.g. a COCO export with train/ valid/ test/ folders.
  data.image_size = 256  # Images and masks are resized to this square size.
  data.channels = 1  # Input channels: 1 grey or 3 RGB; brats: len(data.modalities).
  data.train_split = "train"  # Split the model is trained on.
  data.val_split = "valid"  # Split that picks the best checkpoint.
  # COCO: which categories are foreground, and where the annotations are.
  data.category_ids = ()  # COCO categories that are foreground; () merges all.
  data.annotations = ""  # One COCO file for all splits (relative to root); "": split folders.
  data.subset_key = "subset"  # With data.annotations: image key naming its split ("a.b" nests).
  data.image_dir = ""  # With data.annotations: folder of the images; "": the file's folder.
  # lgg and brats: patients / volumes are split, seeded; none is ever on two sides.
  data.val_fraction = 0.1  # Fraction of patients (volumes) in the valid split.
  data.test_fraction = 0.1  # Fraction of patients (volumes) in the test split.
  data.split_seed = 0  # Seeds that split; keep it fixed across runs you compare.
  # brats: channels of the h5 "image" and "mask" datasets.
  data.modalities = (0, 1, 2, 3)  # Image channels used as input (data.channels of them).
  data.mask_channels = (0, 1, 2)  # Mask channels merged into foreground; all: whole tumour.
  data.clip_percentiles = (0.5, 99.5)  # Per-slice robust min-max to [0, 1] over brain pixels.
  # Input pipeline.
  data.num_workers = 0  # grain worker processes (0 decodes in the main process).
  data.prefetch = 4  # Batches read ahead of the train step.
  data.cache_dir = ""  # Cache decoded, resized samples here as .npy files ("": off).
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
  augment.rotate_degrees = 5.0  # Uniform rotation in [-x, x] degrees...
  augment.rotate_prob = 0.5  # ...applied with this probability.
  augment.shift_fraction = 0.04  # Uniform shift in [-x, x] of the image size...
  augment.shift_prob = 0.5
  augment.zoom = 0.1  # Uniform zoom factor in [1 - x, 1 + x] about the centre...
  augment.zoom_prob = 0.0  # ...applied with this probability; off by default.
  augment.brightness = 0.1  # Additive jitter in [-x, x] (images are in [0, 1])...
  augment.brightness_prob = 0.5
  augment.contrast = 0.1  # Multiplicative jitter in [1 - x, 1 + x] about the mean...
  augment.contrast_prob = 0.5
  augment.gamma = 0.3  # Gamma (image ** g) with g uniform in [1 - x, 1 + x]...
  augment.gamma_prob = 0.0  # ...applied with this probability; off by default.
  augment.noise = 0.05  # Gaussian noise of a standard deviation uniform in [0, x]...
  augment.noise_prob = 0.0  # ...applied with this probability; off by default.
  augment.hflip_prob = 0.0  # Left-right flips; off for brain MRI by default.
  augment.vflip_prob = 0.0  # Up-down flips; off by default.
  # CutMix: a box of the batch's image before it, labels and all, pasted into an image.
  augment.cutmix_prob = 0.0  # Off by default.

  config.model = model = ml_collections.ConfigDict()
  # Channels of the first level, doubling at each level down; or depth + 1 counts, one per
  # level (the bottleneck last), --config.model.features='(16,32,64,256,512)'.
  model.features = ml_collections.FieldReference(32, field_type=object)
  model.depth = 4  # Number of down-sampling steps.
  # Down-sampling: max, avg, conv (strided 3x3) or dilated_conv (strided 3x3, dilation 2).
  model.pooling = "max"
  model.activation = "relu"  # relu, leaky_relu, gelu, silu or elu.
  model.leaky_slope = 0.01  # Negative slope of leaky_relu.
  # 3x3 conv dilation: one rate, or depth + 1 rates (one per level, the bottleneck last),
  # --config.model.dilation='(1,1,2,2,4)'; typed object so that both are accepted.
  model.dilation = ml_collections.FieldReference(1, field_type=object)
  model.norm = "batch"  # Normalisation after each conv: batch, group, layer, none.
  model.upsampling = "transpose"  # transpose (2x2 conv) or bilinear (+ 3x3 conv).
  model.dropout = 0.0  # Dropout rate in the bottleneck and decoder.
  model.residual = False  # Residual double-conv blocks (1x1 projection when widths differ).
  model.attention = False  # Attention gates on the skip connections (Oktay et al. 2018).
  model.deep_supervision = False  # 1x1 heads on the coarser decoder levels, in the loss too.
  # Logit channels: 1, the tumour (categories merged); or one per data.category_ids (COCO),
  # each trained on its category, the tumour being the most likely one.
  model.out_channels = 1
  model.coord_channels = False  # Two more input channels: each pixel's row and column.
  model.bottleneck_heads = 0  # >0: self-attention over the bottleneck, with this many heads.
  # >1: space-to-depth, the U-Net at 1/patch_size of data.image_size, each patch's pixels
  # its input channels, a logit per pixel out: finer input at about the same compute.
  model.patch_size = 1
  # MIMO: this many subnetworks in the one U-Net, an ensemble at about one model's cost;
  # each trains on its own images, at evaluation they see the same and are averaged.
  model.subnetworks = 1
  model.dtype = "float32"  # Compute dtype: float32 or bfloat16 (params stay float32).

  config.train = train = ml_collections.ConfigDict()
  train.epochs = 30  # Passes over the training split.
  # Train only the epochs that fit this many minutes of training and final evaluation,
  # timed on the first epoch (0: off, train.epochs always; Training in the README).
  train.time_budget_minutes = 0.0
  train.batch_size = 16  # Global batch, split over all devices.
  train.seed = 0  # Seeds initialisation, shuffling, augmentation and dropout.
  train.optimizer = "adam"  # adam, adamw or sgd (Nesterov momentum).
  train.learning_rate = 1e-3  # Peak learning rate.
  train.weight_decay = 0.0  # Decoupled weight decay of adamw.
  train.momentum = 0.9  # Momentum of sgd.
  train.schedule = "cosine"  # constant, cosine (warm-up then decay to 0) or step.
  # Linear warm-up of the cosine schedule; a run no longer than it ends before the peak.
  train.warmup_epochs = 1
  train.step_every_epochs = 10  # step schedule: multiply the rate by step_factor this often.
  train.step_factor = 0.1
  train.plateau_patience = 0  # Epochs without a lower val loss before the rate drops (0: off).
  train.plateau_factor = 0.5  # Rate multiplier on a plateau.
  train.grad_clip = 0.0  # Clip gradients to this global norm (0: off).
  # Sharpness-aware steps: the gradient taken this far (L2) up itself (0: off; a second pass).
  train.sam_rho = 0.0
  # model.subnetworks > 1: the fraction of each batch's images all subnetworks see at once.
  train.shared_input_fraction = 0.5
  # Evaluate an EMA of the parameters with this decay (0: off); the decay at step t is
  # min(ema_decay, (1 + t) / (ema_warmup + t)): with the default 10 it reaches 0.999 at
  # step 8990; with 2, at step 998, the plain average of all steps till then; 1: no warm-up.
  train.ema_decay = 0.0
  train.ema_warmup = 10.0
  train.early_stopping_patience = 0  # Epochs without a better val Dice before stopping (0: off).
  train.dice_weight = 1.0  # Weight of the soft Dice loss.
  train.bce_weight = 1.0  # Weight of the sigmoid binary cross-entropy.
  # COCO: each image's loss weighs category_weights[k] when data.category_ids[k] covers most
  # of its tumour (the batch's weighted mean); (): every image alike.
  train.category_weights = ()
  train.lovasz_weight = 0.0  # Weight of the Lovasz hinge, a surrogate of 1 - IoU (0: off).
  train.dice_smooth = 1.0  # Smoothing term of the soft Dice.
  train.dice_per_image = True  # Dice per image (True) or over the whole batch (False).
  train.log_every_steps = 10  # Train loss is written to metrics.jsonl this often.
  train.keep_checkpoints = 2  # Latest checkpoints kept, 1 or more (the best is always kept).
  # Save this often (and always at the end, and at each best validation Dice so far).
  train.checkpoint_every_epochs = 1

  config.eval = eval_config = ml_collections.ConfigDict()
  eval_config.split = "test"  # Split evaluated by --mode=eval and after training.
  eval_config.checkpoint = "best"  # best, latest or a step number.
  # How a probability map becomes a mask: "threshold" (eval.threshold, or the
  # tuned one) or "expected_dice" (per image, the mask of highest expected
  # Dice; no threshold).
  eval_config.decode = "threshold"
  eval_config.threshold = 0.5  # Probability above which a pixel is tumour.
  eval_config.tune_threshold = False  # decode=threshold: pick it by Dice on data.val_split.
  eval_config.tta = False  # Average the probabilities of the image and its flips...
  eval_config.tta_up_down = True  # ...up-down ones too (False: left-right only).
  eval_config.largest_component = False  # Keep only the largest predicted tumour blob.
  eval_config.fill_box = False  # Fill each blob's bounding box (for box annotations).
  # When nothing passes the threshold, take the region above half the highest
  # probability: for data where every image holds a tumour.
  eval_config.never_empty = False
  # Comma-separated workdirs of other runs on the same data whose best checkpoints
  # join this run's: the probabilities of all are averaged (an ensemble).
  eval_config.ensemble = ""
  eval_config.batch_size = 16  # Global evaluation batch.
  eval_config.num_pictures = 6  # Rows in predictions.png (0: none written).
  return config
