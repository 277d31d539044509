"""Chaos tests on the tiny model: training and sampling killed (SIGKILL) at random moments and
restarted, Ctrl-C then resume, and the in-step NaN/Inf guard.

* Training (``python -m segsr_jax.train``, a checkpoint every step, async writes) is killed
  ``SEGSR_CHAOS_KILLS`` times (default 3 here; the issue's 10 was run by hand with
  ``SEGSR_CHAOS_KILLS=10``) at moments drawn from a seeded RNG: while a checkpoint is being
  written (its temporary folder just appeared), right after one was committed, or at a random
  delay after the last logged step. After every kill each checkpoint Orbax lists as finished
  must restore; the run restarted until done ends bitwise equal (params, EMA, optimizer
  state, step and RNG, data position) to an uninterrupted run of the same steps.
* Sampling (``python -m segsr_jax.sample`` over 8 small images) is killed
  ``SEGSR_CHAOS_SAMPLE_KILLS`` times (default 3): while an output's temporary file is being
  written, as soon as an output appears, or at a random delay. No output is ever partial or
  undecodable, and the last rerun finishes the rest with the bytes of an uninterrupted run.

Every process shares one persistent compilation cache, so only the first ones compile.
"""

import dataclasses
import os
import random
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from segsr_jax import images, sample
from segsr_jax.training import losses
from segsr_jax.training import state as state_lib
from segsr_jax.training import step as step_lib
from tests import chaos_helpers as ch
from tests.training.tiny_train_config import random_params, write_init_checkpoint

KILLS = int(os.environ.get("SEGSR_CHAOS_KILLS", "3"))
SAMPLE_KILLS = int(os.environ.get("SEGSR_CHAOS_SAMPLE_KILLS", "3"))
SEED = int(os.environ.get("SEGSR_CHAOS_SEED", "17"))
IMAGES = max(8, 3 * SAMPLE_KILLS)  # a killed sampling run gets through 3 images at most
# Each life of the killed run trains at least one new step and at most a few: enough steps
# that every planned kill lands before the end.
STEPS = 3 * KILLS + 3
TRAIN_FLAGS = ["--config.log.every=1", f"--config.num_steps={STEPS}"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    return write_init_checkpoint(tmp_path_factory.mktemp("init") / "init")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir, init):
    """An uninterrupted run of STEPS steps: (its workdir, its last checkpoint's items)."""
    work = tmp_path_factory.mktemp("straight")
    rc, err = ch.finish(
        ch.start_train(
            work,
            cache_dir,
            *TRAIN_FLAGS,
            f"--config.init_from={init}",
            "--config.checkpoint.every=1",
        )
    )
    assert rc == 0, err[-3000:]
    return work, ch.restore_step(work / "checkpoints", STEPS)


def _assert_data_order(work, reference_work):
    """Every logged step (a step redone after a kill is logged again) saw the examples the
    uninterrupted run saw at that step."""
    want = {r["step"]: r["data_index"] for r in ch.records(reference_work)}
    got = ch.records(work)
    assert {r["step"] for r in got} == set(range(1, STEPS + 1))
    for r in got:
        assert r["data_index"] == want[r["step"]], r["step"]


def _plan(rng, modes, n):
    """``n`` kill modes, each of ``modes`` as often as can be (n >= len(modes): all of
    them), in a seeded random order."""
    plan = [modes[i % len(modes)] for i in range(n)]
    rng.shuffle(plan)
    return plan


def _entries(folder):
    return set(os.listdir(folder)) if folder.exists() else set()


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(
    tmp_path, cache_dir, init, reference
):
    rng = random.Random(SEED)
    work = tmp_path / "killed"
    ckpts = work / "checkpoints"
    flags = [*TRAIN_FLAGS, f"--config.init_from={init}", "--config.checkpoint.every=1"]
    kills, restored = [], 0
    for mode in _plan(rng, ["writing", "committed", "delay"], KILLS):
        logged = len(ch.records(work))
        proc = ch.start_train(work, cache_dir, *flags)
        # Kill only once this life has trained a step, so that every life makes progress.
        assert ch.wait_until(lambda n=logged: len(ch.records(work)) > n, proc), ch.finish(proc)[1][
            -3000:
        ]
        before = _entries(ckpts)
        if mode == "writing":  # Orbax's temporary folder of a save in flight
            ch.wait_until(
                lambda b=before: any(not n.isdigit() and n not in b for n in _entries(ckpts)),
                proc,
                poll=0.001,
            )
        elif mode == "committed":  # a new step folder, just renamed into place
            ch.wait_until(
                lambda b=before: any(n.isdigit() and n not in b for n in _entries(ckpts)),
                proc,
                poll=0.001,
            )
        else:
            time.sleep(rng.uniform(0.0, 1.5))
        assert proc.poll() is None, "the run ended before it was killed: raise STEPS"
        ch.kill(proc)
        kills.append(
            (
                mode,
                max((r["step"] for r in ch.records(work)), default=0),
                sorted(_entries(ckpts) - {"tokenizer"}),
            )
        )
        # Every checkpoint listed as finished restores, whole.
        for step in ch.finished_steps(ckpts):
            items = ch.restore_step(ckpts, step)
            assert int(items["train"]["step"]) == step
            restored += 1
    assert len(kills) == KILLS
    print(
        f"{KILLS} kills (mode, last logged step, checkpoint folder): {kills}; "
        f"{restored} checkpoint restores checked"
    )

    rc, err = ch.finish(ch.start_train(work, cache_dir, *flags))
    assert rc == 0, err[-3000:]
    assert ch.records(work, "resume"), "the final run did not resume"
    ch.assert_same_state(ch.restore_step(ckpts, STEPS), reference[1])
    _assert_data_order(work, reference[0])


def test_ctrl_c_then_resume_equals_an_uninterrupted_run(tmp_path, cache_dir, init, reference):
    """SIGINT saves at the next step boundary (exit 130); the same command resumes from that
    checkpoint (the only one: no periodic saves) and ends where the uninterrupted run does."""
    work = tmp_path / "interrupted"
    flags = [*TRAIN_FLAGS, f"--config.init_from={init}", "--config.checkpoint.every=1000"]
    proc = ch.start_train(work, cache_dir, *flags)
    assert ch.wait_until(lambda: any(r["step"] >= 2 for r in ch.records(work)), proc)
    proc.send_signal(signal.SIGINT)
    rc, err = ch.finish(proc)
    assert rc == 130, err[-3000:]
    (k,) = [r["step"] for r in ch.records(work, "checkpoint")]
    assert 2 <= k < STEPS
    rc, err = ch.finish(ch.start_train(work, cache_dir, *flags))
    assert rc == 0, err[-3000:]
    assert [r["step"] for r in ch.records(work, "resume")] == [k]
    ch.assert_same_state(ch.restore_step(work / "checkpoints", STEPS), reference[1])
    _assert_data_order(work, reference[0])


def test_in_step_guard_keeps_the_state_when_the_loss_is_not_finite():
    """The jitted step itself: a step whose loss is not finite (a finite but huge SegDM output
    kernel overflows the logits) returns params, EMA and optimizer state bitwise unchanged and
    ``finite == 0``; a normal step from the same state does change them."""
    graphdef, full = random_params()
    graphdef, params, frozen = state_lib.split_model(nnx.merge(graphdef, full), "seg")
    cfg = step_lib.StepConfig(
        loss=losses.LossConfig(stage="seg"),
        optimizer=state_lib.OptimizerConfig(learning_rate=1e-3, warmup_steps=0),
    )
    opt = state_lib.make_optimizer(cfg.optimizer)
    fn = step_lib.make_train_step(graphdef, cfg)  # donates the state: copies below
    rng = np.random.default_rng(0)
    batch = {
        "hr": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
        "lq": rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8),
        "label": rng.integers(0, 4, (8, 32, 32), dtype=np.uint8),
        "input_ids": rng.integers(0, 60, (8, 16)).astype(np.int32),
    }

    def step(host_state):
        """One step from a host copy (fresh device arrays: the step donates its input)."""
        new, metrics = fn(jax.tree.map(jnp.asarray, host_state), frozen, batch)
        return jax.device_get(new), jax.device_get(metrics)

    def same(a, b):
        return all(
            np.asarray(x).tobytes() == np.asarray(y).tobytes()
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        )

    # One good step first, so that the optimizer state and EMA are not at their initial
    # values (zeros / the params).
    state, metrics = step(jax.device_get(state_lib.init_train_state(params, opt, seed=1)))
    assert metrics["finite"] == 1.0
    after, metrics = step(state)  # a normal step changes everything
    assert metrics["finite"] == 1.0
    for item in ("params", "ema_params", "opt_state"):
        changed = not same(getattr(state, item), getattr(after, item))
        assert changed, item

    bad_params = jax.tree.map(np.array, state.params)
    bad_params["segdm"]["conv_out"]["kernel"] *= np.float32(1e36)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(bad_params))
    bad = dataclasses.replace(state, params=bad_params)
    after, metrics = step(bad)
    assert metrics["finite"] == 0.0 and not np.isfinite(metrics["loss"]), metrics
    assert int(after.step) == int(bad.step) + 1
    for item in ("params", "ema_params", "opt_state"):
        kept = same(getattr(bad, item), getattr(after, item))
        assert kept, f"{item} changed in a step whose loss was not finite"


def _sample_inputs(folder):
    folder.mkdir()
    rng = np.random.default_rng(SEED)
    for i in range(IMAGES):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            folder / f"img{i}.png"
        )
    return folder


def _check_outputs(out):
    """Every visible file is a complete output of the right size; temporary files (hidden,
    ``.tmp``) are the only others. Returns (visible names, leftover temporary names)."""
    names = _entries(out)
    visible = {n for n in names if not n.startswith(".")}
    temps = names - visible
    assert all(n.endswith(".tmp") and ".png" not in n[-4:] for n in temps), temps
    expect = {"_sr.png": (64, 64, 3), "_seg.png": (64, 64, 3), "_seg_labels.png": (64, 64)}
    for n in visible:
        suffix = next(s for s in images.OUTPUT_SUFFIXES if n.endswith(s))
        assert n[: -len(suffix)] in {f"img{i}" for i in range(IMAGES)}, n
        with Image.open(out / n) as im:
            im.load()  # decodes the whole file
            shape = np.asarray(im).shape
        if suffix == "_sheet.png":
            assert shape[0] == 64 and shape[1] > 3 * 64, (n, shape)
        else:
            assert shape == expect[suffix], (n, shape)
    return visible, temps


def test_sample_killed_at_random_moments_never_leaves_a_broken_output(tmp_path, cache_dir):
    rng = random.Random(SEED + 1)
    inputs = _sample_inputs(tmp_path / "in")
    tiny, _ = sample.tiny_paths()  # the synthetic-scene model: small and first-stage free
    flags = ["--checkpoint", str(tiny), "--input", str(inputs), "--upscale", "2"]
    flags += ["--steps", "16", "--seed", "3"]
    ref = tmp_path / "ref"
    assert sample.main([*flags, "--output", str(ref), "--cache-dir", str(cache_dir)]) == 0

    out = tmp_path / "out"
    kills = []
    for mode in _plan(rng, ["temp", "output", "delay"], SAMPLE_KILLS):
        seen = _entries(out)
        proc = ch.start_sample(cache_dir, *flags, "--output", str(out))
        # "temp": a temporary file just appeared (a write in flight); "output": an output
        # just appeared (a non-atomic write would be caught halfway); "delay": at random.
        new = lambda s=seen, m=mode: {
            n for n in _entries(out) - s if m == "delay" or n.startswith(".") == (m == "temp")
        }
        assert ch.wait_until(new, proc, poll=0.0005), ch.finish(proc)[1][-3000:]
        if mode == "delay":
            time.sleep(rng.uniform(0.0, 0.5))
        assert proc.poll() is None, "the run ended before it was killed: add images"
        ch.kill(proc)
        visible, temps = _check_outputs(out)
        kills.append((mode, len(visible), len(temps)))
    assert len(kills) == SAMPLE_KILLS
    print(f"sample kills (mode, outputs present, temporary files left): {kills}")

    rc, err = ch.finish(ch.start_sample(cache_dir, *flags, "--output", str(out)))
    assert rc == 0, err[-3000:]
    visible, temps = _check_outputs(out)
    assert visible == _entries(ref) and not temps  # the killed writes' leftovers are gone
    for n in visible:
        assert (out / n).read_bytes() == (ref / n).read_bytes(), n
