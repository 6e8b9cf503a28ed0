"""unet_jax: a JAX/Flax U-Net for brain-tumour MRI segmentation."""

__version__ = "0.1.0"
