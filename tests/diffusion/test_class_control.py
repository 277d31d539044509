"""Per-class fidelity control (``SampleOptions.class_scale``) and seg-tag prompts at sampling
time (``SampleOptions.prompt_mode = "tags"``)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from segsr_jax.diffusion import geometry, samplers, sampling
from segsr_jax.diffusion.options import SampleOptions, parse_class_scale
from segsr_jax.diffusion.schedules import NoiseConfig
from segsr_jax.diffusion.session import tag_prompt
from segsr_jax.inference import Restorer
from tests.diffusion.test_sampling import perturb
from tests.tiny_segsr import K, save_checkpoint, tiny_model

NAMES = ("sky", "grass", "blue water", "rock")
assert len(NAMES) == K


@pytest.fixture(scope="module")
def restorer(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "tiny"
    model = perturb(tiny_model(0, class_names=NAMES), seed=1)
    return Restorer.from_checkpoint(save_checkpoint(path, model))


def _batch(seed=0, n=1):
    rng = np.random.default_rng(seed)
    lq = rng.integers(0, 256, (n, 16, 24, 3), dtype=np.uint8)
    return jnp.asarray(geometry.model_input(list(lq), (32, 48), 4))


def test_class_scale_parsing_and_options():
    assert parse_class_scale("sky=0.3, blue water=1.5,") == (("sky", 0.3), ("blue water", 1.5))
    assert parse_class_scale("a=b=2") == (("a=b", 2.0),)
    for bad, msg in (
        ("sky", "CLASS=SCALE"),
        ("=1", "CLASS=SCALE"),
        ("sky=x", "not a number"),
        ("sky=-1", ">= 0"),
        ("sky=inf", ">= 0"),
        ("sky=1,sky=2", "twice"),
    ):
        with pytest.raises(ValueError, match=msg):
            parse_class_scale(bad)
    # From a checkpoint's JSON (lists), a dict or the flag's text: one hashable tuple.
    want = (("sky", 0.5),)
    for given in ([["sky", 0.5]], {"sky": 0.5}, "sky=0.5"):
        assert SampleOptions(class_scale=given).class_scale == want
    assert hash(SampleOptions(class_scale="sky=0.5")) == hash(SampleOptions(class_scale=want))
    with pytest.raises(ValueError, match="prompt mode 'seg'"):
        SampleOptions(prompt_mode="seg")
    with pytest.raises(ValueError, match="max_tags"):
        SampleOptions(max_tags=0)


def test_scale_by_class_moves_the_clean_estimate_per_pixel():
    """x0 of the returned output = z_lq + m (x0_hat - z_lq), m the soft map times the scales:
    a one-hot map makes class 1's pixels keep the LQ latent (scale 0), class 2's double their
    offset, and the rest unchanged."""
    rng = np.random.default_rng(0)
    sched = samplers.make_schedule("ddpm", 10, NoiseConfig(prediction_type="epsilon"))
    c = jax.tree.map(lambda a: a[3], sched.sr)
    x_t, out, z_lq = (jnp.asarray(rng.normal(size=(1, 4, 6, 4)), jnp.float32) for _ in range(3))
    labels = rng.integers(0, K, (1, 4, 6))
    logits = jnp.asarray(np.eye(K)[labels] * 60.0, jnp.float32)  # one-hot after softmax
    scale = jnp.asarray([1.0, 0.0, 2.0, 1.0])
    cond = sampling.Conditions(
        z_lq=z_lq, f_lq=None, context=None, uncond_context=None, guidance_scale=1.0,
        class_scale=scale,
    )  # fmt: skip
    new = sampling.scale_by_class(out, x_t, logits, cond, c)
    x0 = lambda o: c.x0_from_x * x_t + c.x0_from_out * o  # noqa: E731
    m = np.asarray(scale)[labels][..., None]
    want = z_lq + m * (x0(out) - z_lq)
    np.testing.assert_allclose(x0(new), want, atol=1e-4)
    keep = labels == 1
    np.testing.assert_allclose(np.asarray(x0(new))[keep], np.asarray(z_lq)[keep], atol=1e-4)
    same = np.isin(labels, (0, 3))
    np.testing.assert_allclose(np.asarray(new)[same], np.asarray(out)[same], atol=1e-4)


def test_sampler_with_class_scale(restorer):
    """Through the session: scales of 1 give the plain sampler's output, scale 0 for every
    class ends DDIM at the LQ latent, and a class that is not the model's is refused."""
    batch = _batch()
    opts = restorer.options(steps=4, sampler="ddim", guidance=1.0, seed=2)
    plain, _ = restorer.session.run(restorer.state, batch, opts)
    ones = dataclasses.replace(opts, class_scale=tuple((n, 1.0) for n in NAMES[:2]))
    assert restorer.session.plan((32, 48), ones).class_scale
    same, _ = restorer.session.run(restorer.state, batch, ones)
    np.testing.assert_allclose(same.latent, plain.latent, atol=1e-4)
    zeros = dataclasses.replace(opts, class_scale=tuple((n, 0.0) for n in NAMES))
    kept, _ = restorer.session.run(restorer.state, batch, zeros)
    model = nnx.merge(restorer.graphdef, restorer.state)
    z_lq = jax.jit(lambda x: model.vae.encode_latent(x))(batch)
    # DDIM's last step lands on a_0 = 0.99915 (SD's set_alpha_to_one False), not on x0_hat
    # itself: the LQ latent up to sqrt(1 - a_0) = 0.03 of the implied noise.
    kept_off = float(jnp.abs(kept.latent - z_lq).mean())
    plain_off = float(jnp.abs(plain.latent - z_lq).mean())
    print(f"mean |latent - z_lq|: scale 0 {kept_off:.4f}, plain {plain_off:.4f}")
    assert kept_off < 0.05 and plain_off > 5 * kept_off
    np.testing.assert_array_equal(restorer.session.class_scale(zeros), np.zeros(K))
    with pytest.raises(ValueError, match=r"no class 'snow' in this model \(classes: sky, grass"):
        restorer.session.class_scale(dataclasses.replace(opts, class_scale="snow=2"))


def test_tag_prompts_come_from_the_lq_segmenter_and_condition_the_sampler(restorer):
    """prompt_mode tags: each image's prompt is its LQ-segmenter classes, largest first,
    then the options' prompt; the sampler then runs exactly as if given those prompts."""
    assert tag_prompt(np.array([[1, 1, 3], [1, 0, 0]]), NAMES, 2, "clean") == "grass, sky, clean"
    assert tag_prompt(np.array([[2]]), NAMES, 3, "") == "blue water"
    batch = _batch(seed=3, n=2)
    opts = restorer.options(steps=2, sampler="ddim", guidance=1.0, prompt="x", max_tags=2)
    tags = dataclasses.replace(opts, prompt_mode="tags")
    session = restorer.session
    plan = session.plan((32, 48), tags)
    prompts = session.tag_prompts(restorer.state, batch, plan, tags, None)
    model = nnx.merge(restorer.graphdef, restorer.state)
    lq_logits = jax.jit(lambda x: sampling.lq_conditions(model, plan, x)[2])(batch)
    labels = np.asarray(jnp.argmax(lq_logits, -1))
    assert prompts == [tag_prompt(y, NAMES, 2, "x") for y in labels]
    assert all(p.endswith(", x") and p.split(", ")[0] in NAMES for p in prompts)
    by_tags, _ = session.run(restorer.state, batch, tags)
    ctx = session.prompt_contexts(restorer.state, prompts)
    given, _ = session.run(restorer.state, batch, opts, contexts=(ctx, None))
    np.testing.assert_array_equal(by_tags.latent, given.latent)
    fixed, _ = session.run(restorer.state, batch, opts)
    assert not np.allclose(by_tags.latent, fixed.latent, atol=1e-4)
