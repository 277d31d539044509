"""segsr_jax: SegSR diffusion super-resolution guided by semantic segmentation, in JAX / Flax NNX.

Image layout everywhere is NHWC. Pixel range: images entering the VAE are float in [-1, 1];
images on disk and in the data pipeline are uint8 RGB.
"""

__version__ = "0.1.0"
