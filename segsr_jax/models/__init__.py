"""Flax NNX models: the Stable Diffusion zoo (VAE, UNet, ControlNet, CLIP text encoder),
SegFormer, and the SegSR-specific SegDM and Dual-Modality Bridge."""
