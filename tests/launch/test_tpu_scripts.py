"""launch/tpu: every script under --dry-run, against a fake gcloud, and on a simulated worker."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.launch.conftest import REPO, git, shellcheck

SCRIPTS = ("create", "setup", "train", "sample", "logs", "stop", "delete")
ARGS = {
    "train": ["--config", "configs/tiny.py:sr", "--config.num_steps=5"],
    "sample": ["--checkpoint", "gs://b/ck", "--input", "gs://b/lq", "--output", "gs://b/sr"],
}
WHERE = ["--zone=europe-west4-a", "--project=proj-1"]


def run(checkout, name, *args, check=True, **env):
    proc = subprocess.run(
        ["bash", str(checkout / "launch" / "tpu" / f"{name}.sh"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )
    if check:
        assert proc.returncode == 0, f"{name}.sh failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def remote_scripts(stdout: str) -> list[str]:
    """The ssh scripts a --dry-run printed (the indented `  | ` blocks)."""
    blocks, current = [], None
    for line in stdout.splitlines():
        if line == "  with SCRIPT =":
            current = []
            blocks.append(current)
        elif current is not None and line.startswith("  | "):
            current.append(line[4:])
        else:
            current = None
    return ["\n".join(b) + "\n" for b in blocks]


def test_shellcheck_clean():
    tpu = REPO / "launch" / "tpu"
    shellcheck(*sorted(p.relative_to(REPO) for p in tpu.glob("*.sh")))


@pytest.mark.parametrize("name", SCRIPTS)
def test_dry_run_prints_and_runs_nothing(name, checkout, fake, tmp_path):
    out = run(checkout, name, "--dry-run", *ARGS.get(name, [])).stdout
    assert fake.calls() == [], "a dry run must not call gcloud"
    printed = [line for line in out.splitlines() if line.startswith("+ gcloud ")]
    assert printed, out
    for line in printed:
        if " compute tpus " in line:
            assert all(w in line for w in WHERE), line
    scripts = remote_scripts(out)
    if name in ("setup", "train", "sample", "stop"):
        ssh = [line for line in printed if " tpu-vm ssh pod " in line]
        assert len(ssh) == 1 and "--worker=all" in ssh[0], out
    if name == "train":
        assert (
            "python -m segsr_jax.train --distributed --config configs/tiny.py:sr "
            "--workdir gs://proj-1-segsr/runs/tiny-sr --config.num_steps=5 &" in scripts[0]
        )
    # What runs on the workers is shellcheck-clean too.
    for i, script in enumerate(scripts):
        (tmp_path / f"remote{i}.sh").write_text(script)
        shellcheck(tmp_path / f"remote{i}.sh", cwd=tmp_path)


def test_usage_and_bad_input(checkout, fake):
    assert "Usage: launch/tpu/train.sh" in run(checkout, "train", "--help").stdout
    assert run(checkout, "create", "--bogus", check=False).returncode == 2
    proc = run(checkout, "train", "--config", "configs/missing.py", check=False)
    assert proc.returncode == 2 and "no config file configs/missing.py" in proc.stderr
    proc = run(checkout, "create", check=False, PROJECT_ID="")
    assert proc.returncode == 2 and "PROJECT_ID" in proc.stderr
    assert fake.calls() == []


def test_create_makes_what_is_missing_only(checkout, fake):
    run(checkout, "create")
    calls = fake.calls()
    assert calls[:2] == [
        ["storage", "buckets", "describe", "gs://proj-1-segsr", "--project=proj-1"],
        [
            "storage",
            "buckets",
            "create",
            "gs://proj-1-segsr",
            "--project=proj-1",
            "--location=europe-west4",
            "--uniform-bucket-level-access",
        ],
    ]
    assert calls[2:] == [
        ["compute", "tpus", "tpu-vm", "describe", "pod", *WHERE],
        [
            "compute",
            "tpus",
            "tpu-vm",
            "create",
            "pod",
            *WHERE,
            "--accelerator-type=v4-32",
            "--version=tpu-ubuntu2204-base",
        ],
    ]
    # Everything exists: only the describes run.
    fake.gcloud_log.write_text("")
    out = run(checkout, "create", FAKE_EXISTS="tpu-vm buckets").stdout
    assert [c[3] if c[0] == "compute" else c[2] for c in fake.calls()] == ["describe"] * 2
    assert "TPU pod exists" in out


def test_create_queued_spot_waits_until_active(checkout, fake):
    env = dict(
        QUEUED="1",
        SPOT="1",
        FAKE_EXISTS="buckets",
        ACCELERATOR_TYPE="v5litepod-16",
        RUNTIME_VERSION="v2-alpha-tpuv5-lite",
    )
    out = run(checkout, "create", **env).stdout
    calls = [c for c in fake.calls() if c[0] == "compute"]
    assert calls[0] == ["compute", "tpus", "queued-resources", "describe", "pod-qr", *WHERE]
    assert calls[1] == [
        "compute",
        "tpus",
        "queued-resources",
        "create",
        "pod-qr",
        *WHERE,
        "--node-id=pod",
        "--accelerator-type=v5litepod-16",
        "--runtime-version=v2-alpha-tpuv5-lite",
        "--spot",
    ]
    assert "--format=value(state.state)" in calls[2] and "ACTIVE" in out
    # Already queued: no second request; a failed request is an error with advice.
    fake.gcloud_log.write_text("")
    proc = run(
        checkout,
        "create",
        check=False,
        **{**env, "FAKE_EXISTS": "buckets queued-resources", "FAKE_QR_STATE": "FAILED"},
    )
    assert not any("create" in c for c in fake.calls())
    assert proc.returncode != 0 and "FAILED" in proc.stderr and "delete.sh" in proc.stderr


def test_delete_only_what_exists(checkout, fake):
    out = run(checkout, "delete").stdout
    assert "nothing to delete" in out and len(fake.calls()) == 1
    run(checkout, "delete", FAKE_EXISTS="tpu-vm")
    assert fake.calls()[-1] == ["compute", "tpus", "tpu-vm", "delete", "pod", *WHERE, "--quiet"]
    run(checkout, "delete", QUEUED="1", FAKE_EXISTS="queued-resources")
    assert fake.calls()[-1] == [
        "compute",
        "tpus",
        "queued-resources",
        "delete",
        "pod-qr",
        *WHERE,
        "--force",
        "--quiet",
    ]


def wait_for(predicate, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_setup_train_logs_stop_on_a_worker(checkout, fake, worker, tmp_path):
    # setup.sh: the commit travels as a bundle; pip runs in the worker's venv.
    run(checkout, "setup", SSH_FLAGS="--internal-ip")
    head = git(checkout, "rev-parse", "HEAD")
    assert git(worker.path / "segsr_jax", "rev-parse", "HEAD") == head
    scp, ssh = fake.calls()
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert ssh[:5] == ["compute", "tpus", "tpu-vm", "ssh", "pod"]
    assert [*WHERE, "--worker=all", "--internal-ip"] == ssh[5:9]
    pip = [c["argv"] for c in worker.python_calls() if c["argv"][:2] == ["-m", "pip"]]
    assert pip[-1] == [
        "-m",
        "pip",
        "install",
        "-q",
        "-e",
        str(worker.path / "segsr_jax"),
        "jax[tpu]",
        "gcsfs",
    ]

    # train.sh: detached, with the settings' compiler flags, data mirrored first.
    env = dict(DATA_GCS="gs://b/data", DATA_LOCAL=str(tmp_path / "data"), STOP_GRACE_S="10")
    fake.gcloud_log.write_text("")
    out = run(
        checkout, "train", "--config", "configs/tiny.py", "--config.num_steps=5", **env
    ).stdout
    assert "started tiny" in out
    wait_for(
        lambda: any("segsr_jax.train" in c["argv"] for c in worker.python_calls()),
        "the trainer to start",
    )
    call = next(c for c in worker.python_calls() if "segsr_jax.train" in c["argv"])
    assert call["argv"] == [
        "-m",
        "segsr_jax.train",
        "--distributed",
        "--config",
        "configs/tiny.py",
        "--workdir",
        "gs://proj-1-segsr/runs/tiny",
        "--config.num_steps=5",
        f"--config.data.path={tmp_path}/data",
    ]
    assert call["cwd"] == str(worker.path / "segsr_jax")
    assert "--xla_tpu_enable_async_collective_fusion=true" in call["env"]["LIBTPU_INIT_ARGS"]
    assert call["env"]["JAX_COMPILATION_CACHE_DIR"] == "gs://proj-1-segsr/xla_cache"
    assert [
        "storage",
        "rsync",
        "--recursive",
        "--quiet",
        "gs://b/data",
        str(tmp_path / "data"),
    ] in fake.calls()
    logs = worker.path / "segsr_logs"
    shellcheck(logs / "tiny.job", cwd=logs)

    # Rerunning while it runs starts nothing new.
    out = run(checkout, "train", "--config", "configs/tiny.py", **env).stdout
    assert "already running" in out
    assert sum("segsr_jax.train" in c["argv"] for c in worker.python_calls()) == 1

    wait_for(lambda: "trainer: step 1" in (logs / "tiny.worker0.log").read_text(), "a log line")
    out = run(checkout, "logs", "--no-follow", "--lines", "5").stdout
    assert "[worker 0] trainer: step 1" in out

    # stop.sh: SIGTERM reaches the trainer (it checkpoints), the log is uploaded.
    out = run(checkout, "stop", **env).stdout
    assert "stopping tiny" in out and "stopped 1 run(s)" in out
    log = (logs / "tiny.worker0.log").read_text()
    assert "trainer: SIGTERM, checkpoint saved" in log and "exited with status 0" in log
    assert not (logs / "tiny.pid").exists()
    assert [
        "storage",
        "cp",
        "--quiet",
        str(logs / "tiny.worker0.log"),
        "gs://proj-1-segsr/runs/tiny/logs/worker0.log",
    ] in fake.calls()
    assert "stopped 0 run(s)" in run(checkout, "stop").stdout

    # A new commit here that the workers lack: train.sh refuses until setup.sh has run.
    (checkout / "configs" / "tiny.py").write_text("# changed\n")
    git(checkout, "commit", "-qam", "change")
    proc = run(checkout, "train", "--config", "configs/tiny.py", check=False, **env)
    assert proc.returncode != 0 and "run setup.sh" in proc.stderr


def test_sample_shards_images_over_workers(checkout, fake, worker, tmp_path):
    run(checkout, "setup")
    inputs = tmp_path / "lq"
    inputs.mkdir()
    for name in "abcde":
        (inputs / f"{name}.png").write_bytes(b"png")
    stage = tmp_path / "stage"
    fake.gcloud_log.write_text("")
    run(
        checkout,
        "sample",
        "--checkpoint",
        "gs://b/ck",
        "--input",
        str(inputs),
        "--output",
        "gs://b/sr",
        "--",
        "--steps",
        "20",
        FAKE_WORKER="1",
        FAKE_ENDPOINTS="w0,w1",
        SAMPLE_STAGE_DIR=str(stage),
    )
    logs = worker.path / "segsr_logs"
    wait_for(lambda: not (logs / "sample.pid").exists(), "sampling to finish")
    call = next(c for c in worker.python_calls() if "segsr_jax.sample" in c["argv"])
    assert call["argv"] == [
        "-m",
        "segsr_jax.sample",
        "--checkpoint",
        str(stage / "sample" / "checkpoint"),
        "--input",
        str(stage / "sample" / "shard"),
        "--output",
        str(stage / "sample" / "out"),
        "--steps",
        "20",
    ]
    assert call["env"]["TPU_PROCESS_BOUNDS"] == "1,1,1"
    # Worker 1 of 2 takes every second file in name order: b and d.
    assert sorted(p.name for p in (stage / "sample" / "out").iterdir()) == ["b_sr.png", "d_sr.png"]
    calls = fake.calls()
    assert [
        "storage",
        "rsync",
        "--recursive",
        "--quiet",
        "gs://b/ck",
        str(stage / "sample" / "checkpoint"),
    ] in calls
    assert [
        "storage",
        "rsync",
        "--recursive",
        "--quiet",
        str(stage / "sample" / "out"),
        "gs://b/sr",
    ] in calls
    assert "2 of the 5 files" in (logs / "sample.worker1.log").read_text()
    shellcheck(logs / "sample.job", cwd=logs)
