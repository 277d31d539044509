"""A training config for tests: the tiny test model (tests/tiny_segsr.py) on 32 px synthetic
scenes. Used in-process (``get_config()``) and by the CLI tests as a config file."""

import dataclasses

from ml_collections import ConfigDict

from segsr_jax.data.synthetic import class_names
from segsr_jax.models.text_encoder import CLIPTextConfig
from segsr_jax.training.prompts import CHAR_VOCAB_SIZE
from tests.tiny_segsr import K, tiny_config


def model_config():
    """tiny_config with a text encoder for the character-level tokenizer."""
    text = dataclasses.replace(
        tiny_config().text,
        vocab_size=CHAR_VOCAB_SIZE,
        max_position_embeddings=16,
        bos_token_id=CHAR_VOCAB_SIZE - 2,
        eos_token_id=CHAR_VOCAB_SIZE - 1,
        pad_token_id=CHAR_VOCAB_SIZE - 1,
    )
    assert isinstance(text, CLIPTextConfig)
    return tiny_config(text=text, class_names=class_names(K))


def get_config(stage: str = "seg") -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.num_steps = 8
    c.dtype = "float32"
    c.model = model_config().to_dict()
    c.init_from = ""
    c.tokenizer = "char"
    c.train = ConfigDict(
        dict(
            stage=stage,
            also_train=(),
            accum_steps=1,
            remat="none",
            prompt=dict(mode="tags", text="", dropout=0.5, max_tags=2),
        )
    )
    c.loss = ConfigDict(dict(lambda_seg=1.0, lambda_lq_seg=0.0, kl_weight=1e-6))
    c.optim = ConfigDict(
        dict(learning_rate=1e-3, warmup_steps=2, schedule="constant", ema_decay=0.9)
    )
    c.data = ConfigDict(
        dict(
            source="synthetic",
            path="",
            labels="",
            num_examples=16,
            source_seed=0,
            scene_size=40,
            crop_size=32,
            scale=4,
            hflip=True,
            global_batch_size=8,
            seed=0,
            num_workers=0,
            prefetch_batches=1,
        )
    )
    c.mesh = ConfigDict(dict(data=-1, fsdp=1))
    c.sharding = ConfigDict(
        dict(
            param_axes=[(r"(unet|controlnet)/.*kernel$", ("in", "out"))],
            logical_rules=[("in", None), ("out", "fsdp")],
            min_size=2**10,
        )
    )
    c.checkpoint = ConfigDict(dict(every=4, keep_last=2, keep_every=0, async_save=True))
    c.log = ConfigDict(dict(every=1, tensorboard=True))
    c.sample = ConfigDict(
        dict(
            every=0,
            num_images=8,
            options=dict(
                sampler="ddim",
                steps=2,
                guidance=1.0,
                prompt="",
                negative_prompt="",
                color_fix="adain",
                seed=0,
            ),
        )
    )
    return c


def random_params(seed: int = 0) -> tuple:
    """``(graphdef, params)`` of the test model with numpy-random values: kernels and
    embeddings ~ N(0, 1/fan_in), biases 0, norm scales and BatchNorm variances 1. Costs no XLA
    compiles (a real initialisation compiles one program per parameter shape)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from segsr_jax.training import state as state_lib

    graphdef, abstract = nnx.split(state_lib.abstract_model(model_config(), jnp.float32))
    rng = np.random.default_rng(seed)

    def fill(path, a):
        name = path[-1].key
        if name in ("bias", "mean"):
            return np.zeros(a.shape, np.float32)
        if name in ("scale", "var"):
            return np.ones(a.shape, np.float32)
        fan_in = int(np.prod(a.shape[:-1]))
        return rng.normal(0, fan_in**-0.5, a.shape).astype(np.float32)

    return graphdef, jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(abstract))


def write_init_checkpoint(path):
    """A checkpoint folder of :func:`random_params` for ``--config.init_from``."""
    from flax import nnx

    from segsr_jax import checkpoint

    if not (path / "0").exists():
        graphdef, params = random_params()
        checkpoint.save_model(
            path, nnx.merge(graphdef, params), {"model": model_config().to_dict()}
        )
    return path
