"""The train state: a plain pytree of the trainable params, their EMA and optimizer state.

The model's variables are split once, by the stage, into

* **trainable** params (``TrainState.params``): updated by AdamW, averaged into
  ``TrainState.ema_params``, the only leaves with optimizer state and gradients;
* **frozen** variables (everything else, SegFormer's BatchNorm statistics included): passed to
  the step as a separate argument, never differentiated, never updated.

Both are pure nested dicts (``nnx.to_pure_dict`` layout, float32), so they shard by path and
save with Orbax as they are; ``nnx.merge(graphdef, params, frozen)`` rebuilds the model
inside the jitted step.

Stages: ``vae`` the autoencoder (from-scratch configs); ``decoder`` only its decoder (the
latent space stays); ``sr`` the ControlNet (its
conditioning embedding is inside it); ``seg`` SegDM; ``joint`` ControlNet + SegDM + bridge.
``also_train`` adds whole modules (a from-scratch config trains the UNet in ``sr``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from segsr_jax.models.segsr import SegSR, SegSRConfig, ShapeOnlyRngs

# What each stage trains: SegSR attributes, or dotted paths below one (``vae.decoder``).
STAGE_MODULES = {
    "vae": ("vae",),
    "decoder": ("vae.decoder", "vae.post_quant_conv"),
    "sr": ("controlnet",),
    "seg": ("segdm",),
    "joint": ("controlnet", "segdm", "bridge"),
    "prior": ("controlnet", "bridge"),
    "segmenter": ("segformer",),
}
MODULES = ("vae", "text_encoder", "unet", "controlnet", "segformer", "segdm", "bridge")
SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warm-up, gradient clipping and an EMA (by default SeeSR's training
    values: lr 5e-5 after 500 warm-up steps, betas (0.9, 0.999), weight decay 1e-2, clip 1.0).

    Attributes:
      learning_rate: peak learning rate.
      warmup_steps: linear warm-up from 0.
      schedule: after warm-up, ``constant`` or ``cosine`` decay to
        ``learning_rate * end_factor`` at ``decay_steps`` (counted from step 0).
      b1, b2, eps, weight_decay: AdamW (decay applies to every trainable leaf, as torch's).
      grad_clip: global-norm clip (0: none).
      ema_decay: EMA decay, warmed up as ``min(ema_decay, (1 + n) / (10 + n))``.
      lr_multipliers: ``{module: factor}`` scaling the learning rate (and decay) of a SegSR
        module's updates, e.g. ``{"bridge": 10.0}`` for zero-initialised heads that must open
        within a short stage; stored as sorted ``(module, factor)`` pairs.
    """

    learning_rate: float = 5e-5
    warmup_steps: int = 500
    schedule: str = "constant"
    decay_steps: int = 0
    end_factor: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    lr_multipliers: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        pairs = dict(self.lr_multipliers)
        unknown = sorted(set(pairs) - set(MODULES))
        if unknown:
            raise ValueError(
                f"lr_multipliers names unknown module(s) {unknown}; choose from {MODULES}"
            )
        object.__setattr__(
            self, "lr_multipliers", tuple(sorted((k, float(v)) for k, v in pairs.items()))
        )
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is not one of {SCHEDULES}")
        if self.schedule == "cosine" and self.decay_steps <= self.warmup_steps:
            raise ValueError("a cosine schedule needs decay_steps > warmup_steps")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Learning rate as a function of the update count."""
    warm = optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.learning_rate)
    else:
        after = optax.cosine_decay_schedule(
            cfg.learning_rate, cfg.decay_steps - cfg.warmup_steps, alpha=cfg.end_factor
        )
    return optax.join_schedules([warm, after], [cfg.warmup_steps])


def scale_modules(factors: dict[str, float]) -> optax.GradientTransformation:
    """Multiply the updates of the top-level modules named in ``factors`` (params are
    ``{module: tree}`` dicts); stateless."""

    def update(updates, state, params=None):
        del params
        return {
            k: jax.tree.map(lambda u, f=factors[k]: u * f, v) if k in factors else v
            for k, v in updates.items()
        }, state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW with :func:`make_schedule`, then the per-module
    learning-rate multipliers (only when some are set, so the optimizer state of runs without
    them keeps its structure)."""
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(
        optax.adamw(
            make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    )
    if cfg.lr_multipliers:
        parts.append(scale_modules(dict(cfg.lr_multipliers)))
    return parts[0] if len(parts) == 1 else optax.chain(*parts)


def trainable_filter(stage: str, also_train: tuple[str, ...] = ()):
    """The nnx filter of the params a stage trains (``nnx.Param`` leaves of its modules)."""
    if stage not in STAGE_MODULES:
        raise ValueError(f"stage {stage!r} is not one of {tuple(STAGE_MODULES)}")
    unknown = sorted(set(also_train) - set(MODULES))
    if unknown:
        raise ValueError(f"also_train names unknown module(s) {unknown}; choose from {MODULES}")
    prefixes = [
        tuple(n.split(".")) for n in dict.fromkeys(STAGE_MODULES[stage] + tuple(also_train))
    ]
    # Paths start at the SegSR attribute (vae, unet, ...): match whole leading elements only.
    return nnx.All(nnx.Param, lambda path, _: any(tuple(path[: len(p)]) == p for p in prefixes))


def split_model(model: SegSR, stage: str, also_train: tuple[str, ...] = ()):
    """``model -> (graphdef, trainable params, frozen variables)``, both pure dicts."""
    graphdef, params, frozen = nnx.split(model, trainable_filter(stage, also_train), ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)


def merge_trees(a: dict, b: dict) -> dict:
    """Deep union of two nested dicts with disjoint leaves (trainable + frozen = the model's
    full ``nnx.to_pure_dict`` layout, as checkpoints store it)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge_trees(out[k], v) if k in out else v
    return out


def take_like(full: dict, like: dict) -> dict:
    """The sub-tree of ``full`` with the keys of ``like`` (inverse of :func:`merge_trees`)."""
    return {k: take_like(full[k], v) if isinstance(v, dict) else full[k] for k, v in like.items()}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a training step updates; donated to and returned by the step.

    Attributes:
      step: int32 ``[]``, the number of updates applied.
      rng: uint32 key data; step ``n`` draws from ``fold_in(rng, n)``, so the key needs no
        carrying and a resumed run draws exactly what an uninterrupted one would.
      params: trainable params (pure dict, float32 master weights).
      ema_params: their exponential moving average (same tree).
      opt_state: the optimizer state of ``params`` only.
    """

    step: jax.Array
    rng: jax.Array
    params: dict
    ema_params: dict
    opt_state: optax.OptState


def init_train_state(
    params: dict, optimizer: optax.GradientTransformation, seed: int
) -> TrainState:
    """A fresh state at step 0 (traceable, so ``jax.eval_shape`` gives the abstract one)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(seed)),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.init(params),
    )


def ema_update(ema: dict, params: dict, decay: float, step: jax.Array) -> dict:
    """``ema <- d * ema + (1 - d) * params`` with ``d = min(decay, (1 + n) / (10 + n))``."""
    n = step.astype(jnp.float32)
    d = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
    return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


FROZEN_DTYPES = ("float32", "bfloat16")


def frozen_storage(abstract_frozen: dict, frozen_dtype: str) -> dict:
    """The frozen variables as training stores them: with ``frozen_dtype="bfloat16"`` every
    floating leaf of rank >= 2 (conv kernels, dense and embedding matrices: nearly all of the
    bytes) is held in bfloat16; rank 0/1 leaves (biases, norm scales, BatchNorm statistics)
    stay float32. Frozen weights get no gradient or optimizer update, so halving them only
    rounds what the bf16 compute casts them to anyway; for SD-2 it frees 2.6 GB per model copy
    (see benchmarks/RESULTS.md, SD-2 smoke run).

    Args:
      abstract_frozen: pure-dict tree of ShapeDtypeStructs (or arrays: only shape/dtype read).
      frozen_dtype: ``float32`` (unchanged) or ``bfloat16``.

    Returns:
      the same tree of ``jax.ShapeDtypeStruct`` (shardings kept) with storage dtypes.
    """
    if frozen_dtype not in FROZEN_DTYPES:
        raise ValueError(f"train.frozen_dtype must be one of {FROZEN_DTYPES}, got {frozen_dtype!r}")

    def leaf(x):
        low = frozen_dtype == "bfloat16" and x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating)
        dtype = jnp.bfloat16 if low else x.dtype
        return jax.ShapeDtypeStruct(x.shape, dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(leaf, abstract_frozen)


def cast_like(tree: dict, abstract: dict, shardings: dict) -> dict:
    """``tree`` cast leaf by leaf to the dtypes of ``abstract`` in one jitted call that donates
    its input (the float32 copy is freed as the bfloat16 one is made), placed by ``shardings``."""
    fn = jax.jit(
        lambda t: jax.tree.map(lambda x, a: x.astype(a.dtype), t, abstract),
        out_shardings=shardings,
        donate_argnums=0,
    )
    return fn(tree)


def count_params(tree) -> int:
    """Number of scalars in a tree of arrays (or ShapeDtypeStructs)."""
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def trainable_modules(stage: str, also_train: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The SegSR attributes a stage trains, in order."""
    return tuple(dict.fromkeys(STAGE_MODULES[stage] + tuple(also_train)))


def abstract_model(model_config: SegSRConfig, dtype) -> SegSR:
    """The model with ShapeDtypeStruct leaves: shapes and structure, no weights."""
    return nnx.eval_shape(lambda: SegSR(model_config, dtype=dtype, rngs=ShapeOnlyRngs()))


# Zero-initialised heads a run may add to its init_from checkpoint's model (they start at zero,
# as they would from scratch): the bridge's per-level heads (BridgeConfig.level_channels).
NEW_ZERO_HEADS = ("bridge/level_out/",)


def initial_params(
    model_config: SegSRConfig,
    dtype,
    stage: str,
    also_train: tuple[str, ...],
    seed: int,
    init_from: str | None,
    shardings: tuple[dict, dict],
):
    """``(trainable params, frozen variables)`` of a new run, placed by ``shardings``.

    With ``init_from`` (a checkpoint folder: a converted model or a previous stage's run)
    the params are restored from it, EMA put over params, straight into the sharded layout
    (a paper-scale model never exists unsharded on one device); heads the checkpoint lacks
    that start at zero anyway (:data:`NEW_ZERO_HEADS`) are zeros. Otherwise (from-scratch
    configs, small models) they are initialised eagerly from ``seed`` -- every process gets
    the same values -- and placed: jitting the initialisers would cost a long compile.
    """
    from segsr_jax import checkpoint, parallel

    if init_from:
        full = merge_trees(*shardings)
        model, _ = checkpoint.restore_model(
            init_from,
            lambda _: SegSR(model_config, dtype=dtype, rngs=ShapeOnlyRngs()),
            shardings=lambda target: take_like(full, target),
            may_lack=lambda path: path.startswith(NEW_ZERO_HEADS),
        )
        _, params, frozen = split_model(model, stage, also_train)
        return params, frozen
    # XLA's RngBitGenerator ("rbg") initialisers compile ~3x faster than threefry's, and there
    # is one small program per parameter shape; the values are the same on every process.
    model = SegSR(model_config, dtype=dtype, rngs=nnx.Rngs(jax.random.key(seed, impl="rbg")))
    _, params, frozen = split_model(model, stage, also_train)
    return parallel.place((params, frozen), shardings)


def checkpoint_items(state: TrainState, frozen: dict) -> dict:
    """What a training checkpoint stores (see
    :class:`segsr_jax.training.checkpointer.TrainCheckpointer`): the full model (trainable +
    frozen), the EMA, the optimizer state, step and RNG."""
    return {
        "params": merge_trees(state.params, frozen),
        "ema_params": state.ema_params,
        "opt_state": state.opt_state,
        "train": {"step": state.step, "rng": state.rng},
    }


def restore_targets(
    abstract_state: TrainState,
    abstract_frozen: dict,
    state_shardings: TrainState,
    frozen_shardings: dict,
) -> dict:
    """:func:`checkpoint_items` as sharded ShapeDtypeStructs: the target a resume restores
    straight into."""
    shapes = checkpoint_items(abstract_state, abstract_frozen)
    shardings = checkpoint_items(state_shardings, frozen_shardings)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
    )


def from_checkpoint_items(
    items: dict, like_params: dict, like_frozen: dict
) -> tuple[TrainState, dict]:
    """Inverse of :func:`checkpoint_items`: ``(state, frozen)``."""
    state = TrainState(
        step=items["train"]["step"],
        rng=items["train"]["rng"],
        params=take_like(items["params"], like_params),
        ema_params=items["ema_params"],
        opt_state=items["opt_state"],
    )
    return state, take_like(items["params"], like_frozen)
