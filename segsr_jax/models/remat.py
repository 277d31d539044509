"""Training memory: rematerialisation of the repeated blocks, and their activations' layout.

Two things happen at the boundary of every block marked with :func:`boundary` (the ResNet
and transformer blocks of the UNet, ControlNet and SegDM, and the UNet's down / mid / up
stages):

* **Rematerialisation** (``train.remat``, set on a model by :func:`set_remat`): ``blocks``
  keeps only each ResNet / transformer block's inputs for the backward pass and recomputes
  the block there (one extra forward, most activation memory gone); ``full`` does the same
  per down / mid / up *stage* of the UNet and ControlNet (fewer, bigger saved tensors;
  SegDM, which has no stages, still per block); ``none`` keeps every activation. The values
  and gradients are the same (up to float rounding): only what is stored changes.
* **Activation layout** (:func:`activation_sharding`, entered by the training step): block
  inputs and outputs are pinned to the batch sharding. With FSDP the big kernels are split
  over their output channels; without the pin XLA's partitioner may follow the kernels and
  split activations over channels, then gather them whole ("involuntary full
  rematerialization" in its log), which costs memory and time. Pinned, it gathers each
  kernel just before its layer instead: the FSDP pattern.

Nothing changes when neither is set (sampling, evaluation).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import jax
from flax import nnx
from jax.sharding import NamedSharding

POLICIES = ("none", "blocks", "full")
BLOCK, STAGE = "block", "stage"
# The SegSR modules whose blocks are rematerialised (what trains at SD-2 scale).
MODULES = ("unet", "controlnet", "segdm")

_ACTIVATIONS: contextvars.ContextVar[NamedSharding | None] = contextvars.ContextVar(
    "segsr_activation_sharding", default=None
)


@contextlib.contextmanager
def activation_sharding(sharding: NamedSharding | None):
    """Within the block (while tracing), pin block inputs and outputs whose leading axis
    divides over ``sharding``'s leading axes to ``sharding`` (None: no pinning)."""
    token = _ACTIVATIONS.set(sharding)
    try:
        yield
    finally:
        _ACTIVATIONS.reset(token)


def _pin(tree):
    sharding = _ACTIVATIONS.get()
    if sharding is None or not sharding.spec:
        return tree
    lead = sharding.spec[0]
    axes = (lead,) if isinstance(lead, str) else tuple(lead or ())
    ways = math.prod(sharding.mesh.shape[a] for a in axes)

    def pin(x):
        if isinstance(x, jax.Array) and x.ndim and x.shape[0] % ways == 0:
            return jax.lax.with_sharding_constraint(x, sharding)
        return x

    return jax.tree.map(pin, tree)


def boundary(level: str):
    """Decorate a block's ``__call__``: pin its activations (:func:`activation_sharding`) and,
    when the module's ``remat`` attribute is set (:func:`set_remat`), recompute it in the
    backward pass. Positional arguments are arrays (or tuples of them, or None); keyword
    arguments are static (e.g. an output size)."""
    if level not in (BLOCK, STAGE):
        raise ValueError(f"level {level!r}")

    def decorate(call):
        @functools.wraps(call)
        def wrapper(self, *args, **kwargs):
            args = _pin(args)
            if getattr(self, "remat", False):
                out = nnx.remat(lambda module, *a: call(module, *a, **kwargs))(self, *args)
            else:
                out = call(self, *args, **kwargs)
            return _pin(out)

        wrapper.remat_level = level
        return wrapper

    return decorate


def _level(node) -> str | None:
    """The :func:`boundary` level of a module's ``__call__`` (None: not a block)."""
    call = next(
        (c.__dict__["__call__"] for c in type(node).__mro__ if "__call__" in c.__dict__), None
    )
    return getattr(call, "remat_level", None)


def set_remat(model: nnx.Module, policy: str, modules: tuple[str, ...] = MODULES) -> None:
    """Mark ``model``'s blocks for rematerialisation by ``policy`` (see the module
    docstring), in place, inside the sub-modules ``modules`` (attributes of ``model``; others,
    e.g. a frozen VAE, are left alone). The marks are static: part of the graphdef that
    ``nnx.split`` returns afterwards, so set them before splitting."""
    if policy not in POLICIES:
        raise ValueError(f"remat {policy!r} is not one of {POLICIES}")
    for name in modules:
        part = getattr(model, name, None)
        if part is None:
            continue
        nodes = [
            (path, node)
            for path, node in nnx.iter_graph(part)
            if isinstance(node, nnx.Module) and _level(node) is not None
        ]
        stages = [path for path, node in nodes if _level(node) == STAGE]

        def in_stage(path, stages=stages):
            return any(path[: len(s)] == s for s in stages if len(s) < len(path))

        for path, node in nodes:
            if policy == "none":
                node.remat = False
            elif policy == "blocks":
                node.remat = _level(node) == BLOCK
            else:  # full: whole stages; blocks outside any stage (SegDM's) on their own
                node.remat = _level(node) == STAGE or not in_stage(path)
