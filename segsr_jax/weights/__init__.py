"""Loading real diffusers / transformers checkpoints into our Flax NNX models.

Public API (no network access; every path is a local folder)::

    from segsr_jax import weights
    unet = weights.load_unet(path, dtype=jnp.float32)
    vae = weights.load_vae(path)
    cn = weights.load_controlnet(path)
    te = weights.load_text_encoder(path)
    tok = weights.load_tokenizer(path)
    seg = weights.load_segformer(path)

``path`` is either the component folder itself (with ``config.json``) or a whole diffusers
pipeline folder, in which case ``unet/``, ``vae/``, ``controlnet/``, ``text_encoder/`` and
``tokenizer/`` are used. ``dtype`` is the compute dtype; parameters are always float32.
"""

from importlib import import_module

from segsr_jax.weights.checkpoint_files import (  # noqa: F401
    CheckpointError,
    read_config,
    read_tensors,
    resolve_component,
)

_LOADERS = {
    "load_unet": "segsr_jax.weights.unet",
    "load_controlnet": "segsr_jax.weights.unet",
    "controlnet_from_unet": "segsr_jax.weights.unet",
    "load_vae": "segsr_jax.weights.vae",
    "load_text_encoder": "segsr_jax.weights.text_encoder",
    "load_tokenizer": "segsr_jax.weights.text_encoder",
    "load_segformer": "segsr_jax.weights.segformer",
}


def __getattr__(name):
    # Loaders import their model modules lazily, so `import segsr_jax.weights` stays cheap.
    if name in _LOADERS:
        return getattr(import_module(_LOADERS[name]), name)
    raise AttributeError(f"module 'segsr_jax.weights' has no attribute {name!r}")


__all__ = ["CheckpointError", "read_config", "read_tensors", "resolve_component", *_LOADERS]
