"""The one-scan sampler: drivers agree, compile once, zero bridge = SRDM only, sharding, tiling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from segsr_jax import parallel
from segsr_jax.diffusion import plans, samplers, sampling
from segsr_jax.diffusion.schedules import NoiseConfig, alphas_cumprod
from tests.tiny_segsr import tiny_model


def perturb(model, seed=0, scale=0.05, only=None):
    """Add seeded noise to every Param (zero-initialised ones included) of ``model`` (or of
    its sub-module ``only``), in place."""
    target = getattr(model, only) if only else model
    state = nnx.state(target, nnx.Param)
    rng = np.random.default_rng(seed)
    # Host-side noise: no per-shape XLA compiles (eager jax.random would compile each).
    noisy = jax.tree.map(
        lambda x: jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape), x.dtype), state
    )
    nnx.update(target, noisy)
    return model


def _inputs(model, b=1, hw=(32, 32), seed=0):
    r = np.random.default_rng(seed)
    lq = jnp.asarray(r.uniform(-1, 1, (b, *hw, 3)), jnp.float32)
    ids = jnp.asarray(r.integers(3, 60, (b, 8)), jnp.int32)
    ctx = model.encode_prompts(ids)
    uctx = model.encode_prompts(jnp.zeros((b, 8), jnp.int32))
    return lq, ctx, uctx


@pytest.fixture(scope="module")
def coupled():
    """A tiny SegSR with every weight perturbed, so the bridge couples the two models."""
    return perturb(tiny_model(0), seed=1)


def test_scan_equals_python_loop(coupled):
    plan = plans.make_plan((32, 32), 2, tile=8, overlap=4, tiles_per_call=2)
    assert len(plan.tiles) > 1
    sched = samplers.make_schedule("dpmpp_2m", 3)
    lq, ctx, uctx = _inputs(coupled)
    key = jax.random.key(3)
    g, st = nnx.split(coupled)
    scan = sampling.make_sample_fn(g, plan)(st, lq, ctx, uctx, 4.0, sched, key)
    loop = sampling.sample_loop(coupled, plan, lq, ctx, uctx, 4.0, sched, key)
    np.testing.assert_allclose(scan.latent, loop.latent, atol=1e-5)
    np.testing.assert_allclose(scan.image, loop.image, atol=1e-5)
    np.testing.assert_array_equal(scan.labels, loop.labels)


def test_compiles_once_for_images_of_one_shape(coupled):
    """The production sampler (make_sample_fn, as Restorer and Validator build it) traces and
    compiles once for two batches of one shape."""
    plan = plans.make_plan((16, 16), 2, tile=96, guidance=False)
    g, st = nnx.split(coupled)
    fn = sampling.make_sample_fn(g, plan)
    sched = samplers.make_schedule("ddpm", 2)
    outs = []
    for seed in (0, 1):
        lq, ctx, _ = _inputs(coupled, hw=(16, 16), seed=seed)
        outs.append(fn(st, lq, ctx, None, 1.0, sched, jax.random.key(seed)).image)
    assert fn._cache_size() == 1
    assert not np.allclose(outs[0], outs[1])


def test_zero_bridge_gives_exactly_the_srdm_only_result():
    model = tiny_model(0)
    perturb(model, seed=2, only="controlnet")
    perturb(model, seed=3, only="segdm")
    assert not jnp.any(model.bridge.c_out.kernel[...])  # the bridge is untrained
    plan = plans.make_plan((16, 16), 2, tile=96)
    sched = samplers.make_schedule("ddpm", 3)
    lq, ctx, uctx = _inputs(model, hw=(16, 16))
    key = jax.random.key(5)
    g, st = nnx.split(model)
    out = sampling.make_sample_fn(g, plan)(st, lq, ctx, uctx, 3.0, sched, key)

    # SRDM alone: ControlNet conditioned on concat(Z_lq, 0), same noise stream, no SegDM.
    z_lq = model.vae.encode_latent(lq)
    k_z, _, key_loop = jax.random.split(key, 3)
    z = samplers.initial_latent(
        z_lq, jax.random.normal(k_z, z_lq.shape), alphas_cumprod(NoiseConfig()), 999
    )
    state = samplers.init_state(z)
    cond = jnp.concatenate([z_lq, jnp.zeros((*z_lq.shape[:3], 2))], axis=-1)
    for i in range(len(sched)):
        s = jax.tree.map(lambda a, i=i: a[i], sched)
        t = jnp.full((2,), s.timestep)
        z2, c2 = jnp.concatenate([state.x] * 2), jnp.concatenate([cond] * 2)
        ctx2 = jnp.concatenate([uctx, ctx])
        down, mid = model.controlnet(z2, t, ctx2, c2)
        eps_u, eps_c = jnp.split(model.unet(z2, t, ctx2, down, mid), 2)
        key_loop, k_noise = jax.random.split(key_loop)
        state = samplers.sr_step(
            s.sr, state, eps_u + 3.0 * (eps_c - eps_u), jax.random.normal(k_noise, z.shape)
        )
    # Two different XLA programs: equal up to float32 rounding (measured 1.3e-5 on values ~5).
    scale = float(jnp.abs(state.x).max())
    assert float(jnp.abs(out.latent - state.x).max()) <= 1e-5 * scale

    # Within one program the SR result is bitwise independent of SegDM while the bridge is 0.
    perturb(model, seed=9, only="segdm")
    g, st = nnx.split(model)
    other = sampling.make_sample_fn(g, plan)(st, lq, ctx, uctx, 3.0, sched, key)
    np.testing.assert_array_equal(np.asarray(other.image), np.asarray(out.image))
    assert not np.array_equal(np.asarray(other.labels), np.asarray(out.labels))

    # ... and a trained (non-zero) bridge does change the SR result.
    perturb(model, seed=4, only="bridge")
    g, st = nnx.split(model)
    coupled = sampling.make_sample_fn(g, plan)(st, lq, ctx, uctx, 3.0, sched, key)
    assert float(jnp.abs(coupled.latent - out.latent).max()) > 1e-3


def test_sharded_on_eight_devices_equals_single_device(coupled):
    mesh = parallel.make_mesh()
    assert mesh.shape["data"] == 8
    plan = plans.make_plan((16, 16), 2, tile=96)
    sched = samplers.make_schedule("ddim", 2)
    lq, ctx, uctx = _inputs(coupled, b=8, hw=(16, 16))
    g, st = nnx.split(coupled)
    key = jax.random.key(0)
    sharded = sampling.make_sample_fn(g, plan, mesh)(st, lq, ctx, uctx, 2.0, sched, key)
    assert len(sharded.image.sharding.device_set) == 8
    single = sampling.make_sample_fn(g, plan)(
        jax.device_put(st, jax.devices()[0]), lq, ctx, uctx, 2.0, sched, key
    )
    np.testing.assert_allclose(np.asarray(sharded.image), np.asarray(single.image), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(sharded.labels), np.asarray(single.labels))


def _seam_ratio(latent, plan):
    """Mean |horizontal + vertical gradient| on the latent rows/columns where a tile ends,
    divided by its mean elsewhere (1.0 = seams are invisible in the gradients)."""
    x = np.asarray(latent, np.float64)
    gx = np.abs(np.diff(x, axis=2)).mean(axis=(0, 1, 3))  # [w-1]: between col j and j+1
    gy = np.abs(np.diff(x, axis=1)).mean(axis=(0, 2, 3))
    th, tw = plan.tile
    cols = sorted({ox + tw - 1 for _, ox in plan.origins if ox + tw < plan.shape[1]})
    rows = sorted({oy + th - 1 for oy, _ in plan.origins if oy + th < plan.shape[0]})
    other_c = np.delete(gx, cols)
    other_r = np.delete(gy, rows)
    return (gx[cols].mean() + gy[rows].mean()) / (other_c.mean() + other_r.mean())


def test_tiled_agrees_with_untiled_and_has_no_seams(coupled):
    lq, ctx, uctx = _inputs(coupled, hw=(48, 48))
    sched = samplers.make_schedule("ddim", 3)
    key = jax.random.key(11)
    g, st = nnx.split(coupled)
    whole = plans.make_plan((48, 48), 2, tile=96)
    tiled = plans.make_plan((48, 48), 2, tile=12, overlap=6, tiles_per_call=3)
    assert len(whole.tiles) == 1 and len(tiled.tiles) == 9
    a = sampling.make_sample_fn(g, whole)(st, lq, ctx, uctx, 2.0, sched, key)
    b = sampling.make_sample_fn(g, tiled)(st, lq, ctx, uctx, 2.0, sched, key)
    scale = float(jnp.abs(a.latent).max())
    rel = float(jnp.abs(a.latent - b.latent).max()) / scale
    # Random weights, GroupNorm statistics per 12x12 tile and a receptive field cut at tile
    # borders: measured max 0.21 of the latent's scale, mean 0.034 (ddim, 3 steps).
    assert rel < 0.4, rel
    assert float(jnp.abs(a.latent - b.latent).mean()) / scale < 0.06
    # Seam energy: gradients along tile borders vs elsewhere, measured 1.035 tiled and 1.033
    # untiled on the same positions: the blending leaves no visible seam.
    assert _seam_ratio(b.latent, tiled.tiles) < 1.25
    assert abs(_seam_ratio(a.latent, tiled.tiles) - 1.0) < 0.25


def test_seg_prior_modes_and_label_trajectory(coupled):
    """``none`` ignores the bridge and SegDM, ``fixed`` feeds the LQ segmenter's map and keeps
    it, ``diffusion`` records SegDM's argmax after every step and returns the argmax of its
    class probabilities averaged over the steps."""
    sched = samplers.make_schedule("ddim", 3)
    lq, ctx, _ = _inputs(coupled, hw=(16, 16))
    key = jax.random.key(7)
    g, st = nnx.split(coupled)

    fns = {}  # one compile per mode: the parameter changes below reuse it

    def run(state, prior):
        if prior not in fns:
            plan = plans.make_plan(
                (16, 16), 2, tile=96, guidance=False, seg_prior=prior, record_labels=True
            )
            fns[prior] = sampling.make_sample_fn(g, plan)
        return fns[prior](state, lq, ctx, None, 1.0, sched, key)

    full = run(st, "diffusion")
    assert full.trajectory.shape == (1, 3, 8, 8) and full.trajectory.dtype == jnp.uint8
    plan = plans.make_plan((16, 16), 2, tile=96, guidance=False)
    step = jax.jit(lambda c, s: sampling.reverse_step(coupled, plan, cond, c, s))
    cond, carry, _ = jax.jit(lambda: sampling._prepare(coupled, plan, lq, ctx, None, 1.0, key))()
    probs = []
    for i in range(len(sched)):
        carry = step(carry, jax.tree.map(lambda a, i=i: a[i], sched))
        probs.append(jax.nn.softmax(carry.seg_logits, -1))
        np.testing.assert_array_equal(full.trajectory[:, i], jnp.argmax(carry.seg_logits, -1))
    np.testing.assert_array_equal(full.labels, jnp.argmax(sum(probs), -1))
    assert not np.array_equal(full.labels, full.trajectory[:, -1])  # the mean is not the last
    assert plans.make_plan((16, 16), 2).record_labels is False
    # seg_map "last": the last step's map, the same run otherwise.
    last_plan = plans.make_plan((16, 16), 2, tile=96, guidance=False, seg_map="last")
    last = sampling.make_sample_fn(g, last_plan)(st, lq, ctx, None, 1.0, sched, key)
    np.testing.assert_array_equal(last.labels, full.trajectory[:, -1])
    np.testing.assert_array_equal(np.asarray(last.latent), np.asarray(full.latent))

    fixed = run(st, "fixed")
    np.testing.assert_array_equal(fixed.labels, fixed.lq_labels)
    np.testing.assert_array_equal(
        fixed.trajectory, np.repeat(np.asarray(fixed.lq_labels)[:, None], 3, 1)
    )
    none = run(st, "none")
    for other in (fixed, full):
        assert float(jnp.abs(other.latent - none.latent).max()) > 1e-4

    # "none" is SRDM alone: bitwise independent of the bridge and SegDM; "fixed" of SegDM's
    # denoiser (it only uses SegDM's label embedding, to embed the fixed map).
    def scaled(names, keep=()):
        def f(path, x):
            keys = [str(getattr(q, "key", getattr(q, "name", q))) for q in path]
            return x * 1.5 if keys[0] in names and not set(keys) & set(keep) else x

        return jax.tree_util.tree_map_with_path(f, st)

    np.testing.assert_array_equal(
        np.asarray(run(scaled(("bridge", "segdm")), "none").latent), np.asarray(none.latent)
    )
    np.testing.assert_array_equal(
        np.asarray(run(scaled(("segdm",), keep=("label_embedding",)), "fixed").latent),
        np.asarray(fixed.latent),
    )
    assert not np.array_equal(
        np.asarray(run(scaled(("segdm",)), "fixed").latent), np.asarray(fixed.latent)
    )
    with pytest.raises(ValueError, match="seg_prior"):
        plans.make_plan((16, 16), 2, seg_prior="oracle")


def _scan_eqn(jaxpr):
    """The outermost ``scan`` equation of a jaxpr (the sampler's loop over the schedule)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            return eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", None)
            if inner is not None and hasattr(inner, "eqns"):
                found = _scan_eqn(inner)
                if found is not None:
                    return found
    return None


def test_bf16_sampler_casts_weights_once_before_the_scan(monkeypatch):
    """A bfloat16 model's float32 weights are cast before the scan, not at every step, and
    the result is the same as casting them inside each layer."""
    from segsr_jax.models import layers
    from segsr_jax.models.segsr import SegSR
    from tests.tiny_segsr import tiny_config

    model = perturb(
        SegSR(tiny_config(), dtype=jnp.bfloat16, rngs=nnx.Rngs(jax.random.key(0, impl="rbg"))),
        seed=2,
    )
    plan = plans.make_plan((16, 16), 2, tile=96, guidance=False)
    sched = samplers.make_schedule("ddim", 2)
    lq, ctx, _ = _inputs(model, hw=(16, 16))
    g, st = nnx.split(model)
    args = (st, lq, ctx, None, 1.0, sched, jax.random.key(0))

    def loop_weights(fn):
        """dtypes of the 3x3 conv kernels the scan takes as loop constants."""
        eqn = _scan_eqn(jax.jit(fn).trace(*args).jaxpr.jaxpr)
        consts = eqn.invars[: eqn.params["num_consts"]]
        return [
            str(v.aval.dtype) for v in consts if v.aval.ndim == 4 and v.aval.shape[:2] == (3, 3)
        ]

    def fn(state, *a):
        return sampling.sample(nnx.merge(g, state), plan, *a)

    cast_once = loop_weights(fn)
    assert cast_once and set(cast_once) == {"bfloat16"}, cast_once
    # The parameters themselves stay float32.
    assert model.unet.conv_in.kernel[...].dtype == jnp.float32
    out = jax.jit(fn)(*args)

    monkeypatch.setattr(layers, "with_compute_dtype_weights", lambda m: m)

    def fn_per_step(state, *a):  # a new function: jit caches traces per function
        return sampling.sample(nnx.merge(g, state), plan, *a)

    per_step = loop_weights(fn_per_step)
    assert per_step and set(per_step) == {"float32"}, per_step  # what the test guards against
    ref = jax.jit(fn_per_step)(*args)
    np.testing.assert_array_equal(
        np.asarray(out.latent, np.float32), np.asarray(ref.latent, np.float32)
    )  # the same casts
    np.testing.assert_array_equal(out.labels, ref.labels)


def test_compute_dtype_weights_copy_leaves_the_model_alone():
    """The bf16 weight copy is a copy: eagerly and under nnx.jit the model keeps float32."""
    from segsr_jax.models import layers
    from segsr_jax.models.segsr import SegSR
    from tests.tiny_segsr import tiny_config

    model = SegSR(tiny_config(), dtype=jnp.bfloat16, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
    kernel = lambda m: m.unet.conv_in.kernel[...]
    copy = layers.with_compute_dtype_weights(model)
    assert kernel(copy).dtype == jnp.bfloat16
    assert kernel(model).dtype == jnp.float32
    np.testing.assert_array_equal(
        np.asarray(kernel(copy), np.float32),
        np.asarray(kernel(model).astype(jnp.bfloat16), np.float32),
    )

    @nnx.jit
    def cast_inside(m):
        return kernel(layers.with_compute_dtype_weights(m)).dtype == jnp.bfloat16

    assert cast_inside(model)
    assert kernel(model).dtype == jnp.float32
    assert layers.inference_weights(model) is not model
    f32 = SegSR(tiny_config(), rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
    assert layers.inference_weights(f32) is f32  # nothing to cast: no copy, no compile
