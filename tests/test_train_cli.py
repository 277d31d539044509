"""``python -m segsr_jax.train`` as real processes: exact resume after SIGTERM, a two-process
run with ``jax.distributed`` over gloo, Ctrl-C, ``--help``, errors for bad configs and for a
missing init checkpoint, and the from-scratch configs' sampling defaults.

The runs use the tiny test model in stage ``seg`` (tests/training/tiny_train_config.py) and
share one persistent compilation cache, so only the first process compiles from scratch.
"""

import dataclasses
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from segsr_jax import train
from segsr_jax.data import pipeline
from segsr_jax.training import prompts
from tests.conftest import FAST_COMPILE
from tests.training.tiny_train_config import get_config, write_init_checkpoint

ROOT = Path(__file__).parents[1]
CONFIG = "tests/training/tiny_train_config.py:seg"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("xla_cache")


def _env(devices=8):
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(ROOT),
        XLA_FLAGS=f"{FAST_COMPILE} --xla_force_host_platform_device_count={devices}",
    )
    return env


def _start(workdir, cache_dir, *flags, devices=8):
    cmd = [
        sys.executable,
        "-m",
        "segsr_jax.train",
        "--config",
        CONFIG,
        "--workdir",
        str(workdir),
        "--cache_dir",
        str(cache_dir),
        *flags,
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _records(workdir, event="train"):
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.endswith("}")]
    return [r for r in map(json.loads, lines) if r["event"] == event]


def _checkpoint(workdir, step, like=None):
    """The four pytrees of a training checkpoint; ``like``: restore onto one device in the
    structure of these items (a checkpoint of other devices, e.g. two processes')."""
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = lambda k: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), like[k]
    )
    mgr = ocp.CheckpointManager(
        workdir / "checkpoints", options=ocp.CheckpointManagerOptions(read_only=True)
    )
    items = mgr.restore(
        step,
        args=ocp.args.Composite(
            **{
                k: ocp.args.StandardRestore(None if like is None else target(k))
                for k in ("params", "ema_params", "opt_state", "train")
            }
        ),
    )
    mgr.close()
    return items


def _wait_for_step(proc, workdir, step: int, timeout: float = 240) -> None:
    """Until the run in ``workdir`` has logged ``step`` (it must keep running)."""
    deadline = time.time() + timeout
    while not any(r["step"] >= step for r in _records(workdir)):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no training step logged in time"
        time.sleep(0.05)


def test_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path, cache_dir):
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    init = write_init_checkpoint(tmp_path / "init")
    common = [
        "--config.log.every=1",
        "--config.checkpoint.every=1000",
        f"--config.init_from={init}",
    ]
    proc = _start(interrupted, cache_dir, "--config.num_steps=100000", *common)
    _wait_for_step(proc, interrupted, 4)
    proc.send_signal(signal.SIGTERM)
    rc, out, err = _finish(proc)
    assert rc == 143, err[-3000:]
    assert "[preempted]" in out
    (k,) = [r["step"] for r in _records(interrupted, "checkpoint")]
    assert k >= 4
    final = k + 3

    # Resume the interrupted run and train an uninterrupted one, side by side.
    resumed = _start(interrupted, cache_dir, f"--config.num_steps={final}", *common)
    whole = _start(straight, cache_dir, f"--config.num_steps={final}", *common)
    for p in (resumed, whole):
        rc, out, err = _finish(p)
        assert rc == 0, err[-3000:]
    assert [r["step"] for r in _records(interrupted, "resume")] == [k]

    a, b = _checkpoint(straight, final), _checkpoint(interrupted, final)
    for item in ("params", "ema_params", "opt_state", "train"):
        la, lb = jax.tree.leaves(a[item]), jax.tree.leaves(b[item])
        assert len(la) == len(lb) > 0
        for x, y in zip(la, lb, strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=item)
    # The data order continued: every step saw the same examples in both runs.
    order = lambda w: {r["step"]: r["data_index"] for r in _records(w)}
    assert sorted(order(interrupted)) == list(range(1, final + 1))
    assert order(interrupted) == order(straight)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TWO_PROCESS_FLAGS = [
    "--config.num_steps=3",
    "--config.checkpoint.every=3",
    "--config.log.every=1",
    # FSDP across the two processes' devices, and a validation grid.
    "--config.mesh.fsdp=2",
    "--config.sample.every=3",
]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, cache_dir):
    """Two processes of 4 CPU devices each (jax.distributed over gloo) train 3 steps:
    ``(workdir, init checkpoint, [(returncode, stdout, stderr)] per process)``."""
    work = tmp_path_factory.mktemp("two_processes")
    port = _free_port()
    init = write_init_checkpoint(work / "init")
    procs = [
        _start(
            work,
            cache_dir,
            f"--coordinator_address=127.0.0.1:{port}",
            f"--config.init_from={init}",
            "--num_processes=2",
            f"--process_id={i}",
            *TWO_PROCESS_FLAGS,
            devices=4,
        )
        for i in range(2)
    ]
    return work, init, [_finish(p) for p in procs]


def test_two_processes_train_and_checkpoint(two_process_run):
    work, _, results = two_process_run
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    (out0, _), (out1, _) = [(r[1], r[2]) for r in results]
    assert "devices: 8 (2 processes), mesh {'data': 4, 'fsdp': 2}" in out0
    assert len(list((work / "samples").glob("samples_step0000003.png"))) == 1
    assert "step 3:" in out0 and "step" not in out1  # only process 0 logs
    assert [r["step"] for r in _records(work)] == [1, 2, 3]
    data = work / "checkpoints" / "3" / "data"
    assert sorted(p.name for p in data.glob("process_*")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    assert (work / "checkpoints" / "tokenizer" / "vocab.json").is_file()


class _TwoProcessData:
    """What the data iterators of processes 0 and 1 give together: each reads its share of
    the stream (``make_dataset``'s ``shard_index``), and the global batch is their batches
    concatenated in process order (``to_global_arrays``)."""

    def __init__(self, source, config):
        self.iters = [
            iter(pipeline.make_dataset(source, config, shard_index=i, shard_count=2))
            for i in range(2)
        ]

    def __iter__(self):
        return self

    def __next__(self):
        parts = [next(it) for it in self.iters]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self) -> bytes:  # what grain's checkpoint handler saves
        return json.dumps([it.get_state() for it in self.iters]).encode()

    def close(self):
        for it in self.iters:
            getattr(it, "close", lambda: None)()


_PromptMaker = prompts.PromptMaker  # the real one: the test below patches the module's


class _TwoProcessPrompts(_PromptMaker):
    """Prompts as processes 0 and 1 draw them, each for its half of the global batch."""

    def __call__(self, labels, step):
        half = len(labels) // 2
        return np.concatenate(
            [
                _PromptMaker(self.tokenizer, self.class_names, self.config, process_index=i)(
                    labels[i * half : (i + 1) * half], step
                )
                for i in range(2)
            ]
        )


def test_two_processes_equal_one_process_on_the_same_global_batch(
    two_process_run, tmp_path, monkeypatch, capsys
):
    """The same config in one process on the same 8 devices (mesh data 4 x fsdp 2), fed the
    global batches the two processes fed together, ends where the two-process run did, up
    to float32 reduction order (gloo's cross-process sums are not XLA's in-process ones).

    Measured over three runs: losses equal to 2e-7; params, EMA and Adam moments within
    1.1e-6 of each leaf's largest value (gloo's order varies from run to run); step, RNG and
    integer leaves bitwise. The bound is 1e-5 of each leaf's largest value, where one step
    from a different batch moves params by ~1e-3.
    Attention key biases are the exception: their gradient is zero in exact arithmetic
    (softmax ignores a shift shared by all keys), and Adam scales its rounding noise up to
    whole steps: in both runs their moments must be noise (below 1e-8; measured 2e-10) and
    the biases within the 3 steps' reach (lr 1e-3).
    The one-process run skips the validation grid (sampling reads the state, never writes).
    """
    work, init, results = two_process_run
    assert all(rc == 0 for rc, _, _ in results), results[0][2][-3000:]
    c = get_config("seg")
    for flag in TWO_PROCESS_FLAGS:
        key, value = flag.removeprefix("--config.").split("=")
        section, name = key.split(".") if "." in key else (None, key)
        (c[section] if section else c)[name] = int(value)
    c.sample.every = 0
    c.init_from = str(init)
    monkeypatch.setattr(train, "make_dataset", _TwoProcessData)
    monkeypatch.setattr(prompts, "PromptMaker", _TwoProcessPrompts)
    assert train.train_and_evaluate(c, str(tmp_path)) == 0
    assert "(1 processes), mesh {'data': 4, 'fsdp': 2}" in capsys.readouterr().out
    # Process 0 logs its own examples: the first half of every global batch here.
    order = lambda w, n=8: [r["data_index"][:n] for r in _records(w)]
    assert order(tmp_path, 4) == order(work) and len(order(tmp_path)[0]) == 8
    for a, b in zip(_records(tmp_path), _records(work), strict=True):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)

    one = _checkpoint(tmp_path, 3)
    two = _checkpoint(work, 3, like=one)
    for item in ("params", "ema_params", "opt_state", "train"):
        leaves = jax.tree_util.tree_flatten_with_path(one[item])[0]
        assert len(leaves) == len(jax.tree.leaves(two[item])) > 0
        for (path, x), y in zip(leaves, jax.tree.leaves(two[item]), strict=True):
            x, y, name = np.asarray(x), np.asarray(y), f"{item}{jax.tree_util.keystr(path)}"
            if x.dtype.kind != "f":
                np.testing.assert_array_equal(x, y, err_msg=name)
            elif "'to_k']['bias']" in name:  # noise: Adam's moments of it tiny, steps not
                reach = 1e-8 if item == "opt_state" else 3 * c.optim.learning_rate
                assert max(np.abs(x).max(), np.abs(y).max()) <= reach, name
            else:
                np.testing.assert_allclose(
                    x, y, rtol=0, atol=1e-5 * np.abs(x).max() + 1e-12, err_msg=name
                )


def test_bad_config_is_refused_before_training(tmp_path, cache_dir):
    rc, _, err = _finish(_start(tmp_path, cache_dir, "--config.train.stage=srr"))
    assert rc != 0 and "stage 'srr' is not one of" in err
    rc, _, err = _finish(_start(tmp_path, cache_dir, "--config.optim.lr=1"))
    assert rc != 0 and "lr" in err


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path, cache_dir):
    """A first Ctrl-C (SIGINT) stops as SIGTERM does, with the Ctrl-C status 130."""
    init = write_init_checkpoint(tmp_path / "init")
    work = tmp_path / "work"
    proc = _start(
        work,
        cache_dir,
        "--config.num_steps=100000",
        "--config.log.every=1",
        "--config.checkpoint.every=1000",
        f"--config.init_from={init}",
    )
    _wait_for_step(proc, work, 2)
    proc.send_signal(signal.SIGINT)
    rc, out, err = _finish(proc)
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err
    (k,) = [r["step"] for r in _records(work, "checkpoint")]
    (line,) = [x for x in out.splitlines() if x.startswith("[interrupted]")]
    assert f"checkpoint saved in {work / 'checkpoints' / str(k)}" in line
    assert "run the same command again to resume" in line
    assert (work / "checkpoints" / str(k)).is_dir()


def test_second_ctrl_c_stops_at_once():
    code = (
        "import os, signal, time\n"
        "from segsr_jax.train import stop_signals\n"
        "with stop_signals(True) as received:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(0.1)\n"
        "    assert received == [signal.SIGINT], received\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(5)\n"
        "print('not stopped')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_env(1),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "second Ctrl-C: stopped at once" in proc.stderr and "not stopped" not in proc.stdout


def test_stop_signals_restores_the_previous_handlers():
    from segsr_jax.train import stop_signals

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with stop_signals(True) as received:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
    assert received == [signal.SIGTERM]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_missing_init_checkpoint_is_a_one_line_error(tmp_path, cache_dir):
    """A run started before the run it starts from exists: exit 2, no traceback, naming the
    folder, the command that writes it and the init_from override."""
    missing = tmp_path / "runs" / "tiny" / "seg" / "checkpoints"
    rc, _, err = _finish(_start(tmp_path / "joint", cache_dir, f"--config.init_from={missing}"))
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert f"starts from the checkpoint in {missing}, which is missing" in line
    assert f"--config tests/training/tiny_train_config.py:seg --workdir {missing.parent}" in line
    assert "--config.init_from=DIR" in line


def test_decoder_stage_without_lpips_weights_is_a_one_line_error(tmp_path, cache_dir, monkeypatch):
    """Stage decoder's perceptual loss needs the fetched LPIPS weights: without them, exit 2
    with the fetch command, before the workdir exists."""
    monkeypatch.setenv("SEGSR_JAX_CACHE_DIR", str(tmp_path / "empty_cache"))
    workdir = tmp_path / "decoder"
    rc, _, err = _finish(_start(workdir, cache_dir, "--config.train.stage=decoder"))
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "python -m segsr_jax.weights.fetch lpips" in line
    assert not workdir.exists()


def test_help_lists_the_runs_and_exits_0():
    proc = subprocess.run(
        [sys.executable, "-m", "segsr_jax.train", "--help"],
        cwd=ROOT,
        env=_env(1),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for run in ("vae", "sr", "seg", "joint", "sronly", "prior", "segmenter"):
        assert f"``{run}``" in proc.stdout
    assert "--workdir" in proc.stdout and "DESIGN" not in proc.stdout


def _load_config(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("name", "run", "min_side"),
    [("tiny", "joint", 32), ("tiny", "prior", 32), ("small", "joint", 64)],
)
def test_from_scratch_configs_give_checkpoints_small_image_sampling_defaults(name, run, min_side):
    """The sampler's defaults (min_side 128, 96-latent tiles) suit SD-2-sized models; the
    from-scratch configs' checkpoints carry their own (train.py saves sample.options as the
    checkpoint's sampling defaults: tests/training/test_train_loop.py)."""
    from segsr_jax.diffusion.options import SampleOptions

    options = _load_config(name).get_config(run).sample.options.to_dict()
    assert options["min_side"] == min_side
    known = {f.name for f in dataclasses.fields(SampleOptions)}  # validation's too
    assert set(options) <= known
    assert "tiles_per_call" not in options
