"""The controlled benchmark where the segmentation is needed (``segsr_jax.data.aliased``):
four textures of period 4 px that the x4 degradation averages to the same grey, told apart in
the LQ only by a weak colour cue. The miniature experiment's stages and arms
(``configs/tiny.py``) on these scenes, with the photo architecture (no self-attention at full
latent resolution: faster on a CPU) and 4 classes::

    python -m segsr_jax.train --config configs/aliased.py:vae   --workdir runs/aliased/vae
    python -m segsr_jax.train --config configs/aliased.py:sr    --workdir runs/aliased/sr
    python -m segsr_jax.train --config configs/aliased.py:seg   --workdir runs/aliased/seg
    python -m segsr_jax.train --config configs/aliased.py:ARM   --workdir runs/aliased/ARM
    python -m segsr_jax.train --config configs/aliased.py:segmenter \\
        --workdir runs/aliased/segmenter

ARM is ``sronly``, ``prior`` or ``joint``; a second training run of an arm adds
``--config.seed=1 --config.data.seed=1`` and writes ``runs/aliased/ARM_s1``. ``prior+levels``
and ``joint+levels`` are the design variant in which the bridge's segmentation stream also
enters every UNet level (``BridgeConfig.level_channels``; its heads start at zero on top of
the ``seg`` checkpoint); ``joint+estimate`` adds that the stream reads SegDM's clean
estimate instead of the noisy ``S_t`` (``BridgeConfig.seg_source``).
``scripts/tiny_experiment.py --benchmark aliased`` samples and scores them
(``docs/experiment/aliased/``). Built to need semantics: it tests the mechanism, it is not
evidence on real photos.
"""

import dataclasses

from ml_collections import ConfigDict

from configs import photo, tiny
from segsr_jax.data.aliased import CLASS_NAMES
from segsr_jax.models.controlnet import residual_channels

RUNS = "runs/aliased"
# Steps per run (tiny's learning rates, batch and schedule otherwise).
STEPS = {"vae": 1200, "sr": 2000, "seg": 1000, "joint": 800, "sronly": 800, "prior": 800}
# Design variants (ARM+VARIANT): the segmentation stream at every UNet level ("levels"), and
# that stream reading SegDM's clean estimate rather than the noisy S_t ("estimate", which
# needs SegDM: joint only).
VARIANTS = (("prior", "levels"), ("joint", "levels"), ("joint", "estimate"))


def get_config(name: str = "vae") -> ConfigDict:
    """The run ``name``: ``vae``, ``sr``, ``seg``, an arm (``sronly``, ``prior``, ``joint``),
    an arm's design variant ``ARM+VARIANT`` (:data:`VARIANTS`) or the evaluation
    ``segmenter``."""
    name, plus, variant = name.partition("+")
    if plus and (name, variant) not in VARIANTS:
        raise ValueError(
            f"unknown aliased run {name}+{variant}; variants: "
            + ", ".join(f"{a}+{v}" for a, v in VARIANTS)
        )
    c = tiny.get_config(name)
    model = photo.model_config(CLASS_NAMES)
    if variant:
        bridge = dataclasses.replace(
            model.bridge,
            level_channels=residual_channels(model.controlnet),
            seg_source="estimate" if variant == "estimate" else "state",
        )
        model = dataclasses.replace(model, bridge=bridge)
    c.model = model.to_dict()
    if c.init_from:
        c.init_from = c.init_from.replace("runs/tiny/", f"{RUNS}/")
    if name in STEPS:
        c.num_steps = c.optim.decay_steps = STEPS[name]
        if c.sample.every:
            c.sample.every = STEPS[name]
    c.data.source = "aliased"
    return c
