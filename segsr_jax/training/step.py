"""The training step: one jitted program with explicit shardings and a donated state.

::

    step_fn = make_train_step(graphdef, step_cfg, shardings)     # jax.jit(...)
    compiled, report = compile_step(step_fn, state, frozen, batch) # lower().compile() once
    state, metrics = compiled(state, frozen, batch)

A stage whose loss needs a fixed network of its own (``decoder``: LPIPS) gets its weights as a
fourth argument, ``loss_params`` (replicated, never differentiated, never saved):
``make_train_step(..., with_loss_params=True)`` then ``compiled(state, frozen, batch,
loss_params)``.

Inside: ``accum_steps`` micro-batches run under one ``lax.scan`` (gradients summed, nothing
kept between steps), then global-norm clipping and AdamW (:mod:`.state`), the EMA, and the
NaN/Inf guard: a step whose loss or gradient norm is not finite applies nothing (params, EMA
and optimizer state come back unchanged) and reports ``finite = 0``, so the host can stop with
the last good state in hand (see ``segsr_jax.train``).
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from segsr_jax.models import remat
from segsr_jax.training import losses
from segsr_jax.training.state import (
    OptimizerConfig,
    TrainState,
    ema_update,
    make_optimizer,
    make_schedule,
)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything static about a step (part of the compiled program).

    Attributes:
      loss: the stage and its loss weights.
      optimizer: AdamW / schedule / clipping / EMA.
      accum_steps: micro-batches per step; the per-device batch of each is
        ``global batch / accum_steps / batch devices``.
    """

    loss: losses.LossConfig
    optimizer: OptimizerConfig
    accum_steps: int = 1

    def __post_init__(self):
        if self.accum_steps < 1:
            raise ValueError(f"accum_steps must be >= 1, got {self.accum_steps}")


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """Shardings of the step's arguments (pytrees of ``NamedSharding`` matching them)."""

    state: TrainState
    frozen: dict
    batch: dict
    replicated: NamedSharding

    @property
    def batch_sharding(self) -> NamedSharding:
        """The batch's sharding (any leaf's: all share the leading-axis split)."""
        return jax.tree.leaves(self.batch)[0]


def _micro_batches(batch: dict, n: int, sharding: NamedSharding | None) -> dict:
    """``[n * m, ...]`` -> ``[n, m, ...]`` keeping every micro-batch spread over the batch
    devices: example ``i * n + j`` goes to micro-batch ``j``, so each device's contiguous
    shard splits evenly into the n micro-batches (a plain reshape would put whole
    micro-batches on a few devices)."""

    def split(x):
        y = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
        if sharding is not None:
            y = jax.lax.with_sharding_constraint(
                y, NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
            )
        return y

    return jax.tree.map(split, batch)


def train_step(
    graphdef: nnx.GraphDef,
    cfg: StepConfig,
    batch_sharding: NamedSharding | None,
    state: TrainState,
    frozen: dict,
    batch: dict,
    loss_params: dict | None = None,
) -> tuple[TrainState, dict]:
    """One optimizer update (traceable; :func:`make_train_step` jits it).

    Returns ``(new_state, metrics)``; metrics are float32 scalars: the loss terms,
    ``grad_norm``, ``lr`` and ``finite`` (1.0, or 0.0 when the update was skipped).
    """
    optimizer = make_optimizer(cfg.optimizer)
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params, micro, k):
        model = nnx.merge(graphdef, params, frozen)
        # Block activations stay split over the batch devices (FSDP: kernels are gathered
        # per layer, activations are never split over channels; see models.remat).
        with remat.activation_sharding(batch_sharding):
            return losses.compute_loss(model, micro, k, cfg.loss, loss_params)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if cfg.accum_steps == 1:
        (_, metrics), grads = grad_fn(state.params, batch, key)
    else:
        micro = _micro_batches(batch, cfg.accum_steps, batch_sharding)

        def body(acc, xs):
            i, mb = xs
            (_, m), g = grad_fn(state.params, mb, jax.random.fold_in(key, i))
            return jax.tree.map(jnp.add, acc, (g, m)), None

        first = jax.tree.map(lambda x: x[0], micro)
        metric_shapes = jax.eval_shape(lambda: loss_fn(state.params, first, key)[1])
        zeros = (
            jax.tree.map(jnp.zeros_like, state.params),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes),
        )
        (grads, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(cfg.accum_steps), micro))
        grads, metrics = jax.tree.map(lambda x: x / cfg.accum_steps, (grads, metrics))

    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = ema_update(state.ema_params, params, cfg.optimizer.ema_decay, state.step)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = TrainState(
        step=state.step + 1,
        rng=state.rng,
        params=keep(params, state.params),
        ema_params=keep(ema, state.ema_params),
        opt_state=keep(opt_state, state.opt_state),
    )
    metrics = dict(
        metrics,
        grad_norm=grad_norm,
        lr=jnp.asarray(make_schedule(cfg.optimizer)(state.step), jnp.float32),
        finite=finite.astype(jnp.float32),
    )
    return new_state, jax.tree.map(lambda x: x.astype(jnp.float32), metrics)


def make_train_step(
    graphdef: nnx.GraphDef,
    cfg: StepConfig,
    shardings: StepShardings | None = None,
    with_loss_params: bool = False,
):
    """``fn(state, frozen, batch) -> (state, metrics)`` jitted; the state is donated.
    ``with_loss_params``: ``fn(state, frozen, batch, loss_params)`` (replicated).

    With ``shardings``, inputs and outputs get exactly those shardings (the state keeps its
    sharding across steps, metrics are replicated).
    """
    fn = partial(train_step, graphdef, cfg, None if shardings is None else shardings.batch_sharding)
    if not with_loss_params:
        fn = partial(fn, loss_params=None)
    if shardings is None:
        return jax.jit(fn, donate_argnums=0)
    rep = shardings.replicated
    extra = (rep,) if with_loss_params else ()
    return jax.jit(
        fn,
        in_shardings=(shardings.state, shardings.frozen, shardings.batch, *extra),
        out_shardings=(shardings.state, rep),
        donate_argnums=0,
    )


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What compiling a step cost and how much device memory it plans (bytes per device)."""

    seconds: float
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    generated_code_bytes: int

    def summary(self) -> str:
        """One human line."""
        gib = lambda n: f"{n / 2**30:.3f} GiB"
        return (
            f"compiled in {self.seconds:.1f} s; per device: arguments "
            f"{gib(self.argument_bytes)}, outputs {gib(self.output_bytes)} "
            f"({gib(self.alias_bytes)} aliased to donated inputs), temporaries "
            f"{gib(self.temp_bytes)}, code {self.generated_code_bytes / 2**20:.1f} MiB"
        )


def compile_step(fn, *args) -> tuple[jax.stages.Compiled, CompileReport]:
    """``fn.lower(*args).compile()`` (args may be arrays or ShapeDtypeStructs) and a
    :class:`CompileReport` from ``memory_analysis()``."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    get = lambda name: int(getattr(mem, name, 0) or 0) if mem is not None else 0
    return compiled, CompileReport(
        seconds=seconds,
        argument_bytes=get("argument_size_in_bytes"),
        output_bytes=get("output_size_in_bytes"),
        temp_bytes=get("temp_size_in_bytes"),
        alias_bytes=get("alias_size_in_bytes"),
        generated_code_bytes=get("generated_code_size_in_bytes"),
    )


class NonFiniteError(FloatingPointError):
    """Training produced NaN or Inf; the run stops without saving the bad state."""


def check_metrics_finite(metrics: dict, step: int, last_checkpoint: int | None) -> None:
    """Raise :class:`NonFiniteError` if the step's (host) metrics say it was not finite."""
    bad = sorted(k for k, v in metrics.items() if not np.all(np.isfinite(v)))
    if metrics.get("finite", 1.0) != 1.0 or bad:
        terms = ", ".join(f"{k}={float(v):.4g}" for k, v in sorted(metrics.items()))
        resume = (
            f"the last checkpoint is step {last_checkpoint}"
            if last_checkpoint is not None
            else "no checkpoint was written"
        )
        raise NonFiniteError(
            f"non-finite loss or gradient at step {step} ({terms}); the update was not "
            f"applied and training stopped, {resume}. Lower the learning rate, check the "
            f"data, or try float32."
        )


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(
        jnp.stack(
            [
                jnp.all(jnp.isfinite(x))
                for x in jax.tree.leaves(tree)
                if jnp.issubdtype(x.dtype, jnp.floating)
            ]
        )
    )


def check_state_finite(state: TrainState, step: int) -> None:
    """Raise :class:`NonFiniteError` if any float leaf of ``state`` holds NaN or Inf (checked
    before every save, so a bad state is never written)."""
    if not bool(jax.device_get(_all_finite((state.params, state.ema_params, state.opt_state)))):
        raise NonFiniteError(f"the train state holds NaN/Inf at step {step}; not saving it")


class PendingMetrics:
    """Per-step metrics left on device (no host sync per step) until :meth:`drain`, which
    fetches them all, applies the NaN/Inf guard to each step and returns their means."""

    def __init__(self):
        self._steps: list[tuple[int, dict]] = []
        self._since = time.perf_counter()

    def add(self, step: int, metrics: dict) -> None:
        """Keep one step's (device) metrics."""
        self._steps.append((step, metrics))

    def drain(self, last_checkpoint: int | None) -> dict[str, float]:
        """Means over the kept steps plus ``step_time`` (seconds, wall clock since the last
        drain); raises :class:`NonFiniteError` naming the first bad step."""
        if not self._steps:
            return {}
        got = jax.device_get([m for _, m in self._steps])
        for (step, _), m in zip(self._steps, got, strict=True):
            check_metrics_finite(m, step, last_checkpoint)
        means = {k: float(np.mean([m[k] for m in got])) for k in got[-1] if k != "finite"}
        now = time.perf_counter()
        means["step_time"] = (now - self._since) / len(got)
        self._steps.clear()
        self._since = now
        return means
