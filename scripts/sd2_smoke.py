"""The full-size pipeline end to end, once, on a CPU: SD-2-base + SegFormer-B5 shapes with
random weights, converted, trained (``sr`` then ``joint``, FSDP and validation on, killed and
resumed), then sampled.

::

    python scripts/sd2_smoke.py --workdir /tmp/sd2_smoke --devices 1 --fsdp 1  # 24 GiB, 2 cores
    python scripts/sd2_smoke.py --workdir /tmp/sd2_smoke --devices 8 --fsdp 8  # ~64 GiB host

Phases (each a real command, as a user types it; wall time and peak RSS of its process tree
are printed and written to ``WORKDIR/smoke.json``):

1. ``folders``: diffusers ``unet/``, ``vae/``, ``text_encoder/`` (SD-2-base configs), a CLIP
   tokenizer, and a transformers SegFormer-B5 (150 classes), random weights,
   ``save_pretrained``;
2. ``convert``: ``python -m segsr_jax.convert``;
3. ``train_sr``: ``python -m segsr_jax.train --config configs/segsr_sd2.py:sr`` on a folder of
   random 128 px images and label maps, ``--config.data.crop_size`` small (default 64),
   validation after every step (the SeeSR sampler, CFG, a few steps), a checkpoint after every
   step; SIGKILLed as soon as step 1's checkpoint is written;
4. ``resume_sr``: the same command again: resumes at step 1 and finishes step 2;
5. ``train_joint``: ``configs/segsr_sd2.py:joint`` from the ``sr`` run, 2 steps;
6. ``sample``: ``python -m segsr_jax.sample --checkpoint .../joint/checkpoints --fsdp N`` on one
   image.

Memory: the simulated devices share this machine's RAM, so every leaf that FSDP leaves
replicated (the VAE, SegFormer, SegDM, norms, biases) is held once per device, every FSDP
shard once per ``data`` group, and every device's temporaries too. On a 24 GiB machine
(2026-12-02, benchmarks/results/sd2_smoke_cpu_2026-12-02.log, RESULTS.md) every phase runs
with ``--devices 1 --fsdp 1`` (frozen weights in bf16, the SD-2 configs' default, and glibc
told to return freed memory, set below): peak RSS 19.3 GiB in ``train_sr``, 21.9 GiB in
``train_joint``, about 20 minutes in all. Two devices need about 2 x 11.4 GiB for arguments
and temporaries alone, eight about 64 GiB: use ``--devices N --fsdp N`` on a larger host.
Not part of the CI suite (too slow).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_tokenizer(folder: Path, max_length: int = 77) -> None:
    """A CLIP tokenizer folder (vocab.json + merges.txt): single printable characters, with
    and without ``</w>``, then BOS / EOS; no merges."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(33, 127)]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": max_length,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "!",
                "do_lower_case": True,
            }
        )
    )


def make_folders(root: Path) -> None:
    """Random-weight diffusers / transformers folders with SD-2-base and SegFormer-B5 shapes."""
    import dataclasses
    import inspect

    import diffusers
    import torch
    import transformers

    from segsr_jax.models.seg_encoder import SegFormerConfig
    from segsr_jax.models.text_encoder import CLIPTextConfig
    from segsr_jax.models.unet import UNetConfig
    from segsr_jax.models.vae import VAEConfig

    torch.manual_seed(0)

    def kwargs_for(cls, cfg) -> dict:
        names = set(inspect.signature(cls.__init__).parameters)
        return {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(cfg).items()
            if k in names
        }

    pipe = root / "sd2"
    if not (pipe / "unet" / "config.json").exists():
        unet = diffusers.UNet2DConditionModel(
            **kwargs_for(diffusers.UNet2DConditionModel, UNetConfig.sd2_base())
        )
        unet.save_pretrained(pipe / "unet")
        del unet
    if not (pipe / "vae" / "config.json").exists():
        vae = diffusers.AutoencoderKL(**kwargs_for(diffusers.AutoencoderKL, VAEConfig.sd2()))
        vae.save_pretrained(pipe / "vae")
        del vae
    if not (pipe / "text_encoder" / "config.json").exists():
        text_cfg = dataclasses.asdict(CLIPTextConfig.sd2())
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_cfg))
        text.save_pretrained(pipe / "text_encoder")
        del text
    write_tokenizer(pipe / "tokenizer")
    (pipe / "scheduler").mkdir(exist_ok=True)
    (pipe / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"prediction_type": "epsilon"})
    )
    seg_dir = root / "segformer_b5"
    if not (seg_dir / "config.json").exists():
        cfg = SegFormerConfig.b5(150)
        hf = transformers.SegformerConfig(
            **{
                k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(cfg).items()
                if k != "id2label"
            }
        )
        seg = transformers.SegformerForSemanticSegmentation(hf)
        seg.save_pretrained(seg_dir)


def make_data(folder: Path, n: int = 16, size: int = 128, classes: int = 150) -> None:
    """``n`` smooth random RGB images and label maps (``images/``, ``labels/``)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
        img.save(folder / "images" / f"{i:03d}.png")
        lab = rng.integers(0, classes, (4, 4), dtype=np.uint8)
        Image.fromarray(lab).resize((size, size), Image.NEAREST).save(
            folder / "labels" / f"{i:03d}.png"
        )


class Phase:
    """Runs one command, sampling the RSS of its process tree; records wall time and peak."""

    def __init__(self, name: str, cmd: list[str], env: dict, log: Path):
        self.name, self.cmd, self.env, self.log = name, cmd, env, log
        self.peak = 0

    def _watch(self, proc, stop: threading.Event):
        import psutil

        try:
            root = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not stop.is_set():
            try:
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                self.peak = max(self.peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.5)

    def run(self, kill_when=None) -> dict:
        print(f"[{self.name}] {' '.join(self.cmd)}", flush=True)
        t0 = time.time()
        with self.log.open("w") as out:
            proc = subprocess.Popen(
                self.cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
            stop = threading.Event()
            watcher = threading.Thread(target=self._watch, args=(proc, stop), daemon=True)
            watcher.start()
            killed = False
            while proc.poll() is None:
                if kill_when is not None and kill_when():
                    proc.send_signal(signal.SIGKILL)
                    killed = True
                    proc.wait()
                    break
                time.sleep(0.5)
            stop.set()
            watcher.join()
        row = {
            "phase": self.name,
            "seconds": round(time.time() - t0, 1),
            "peak_rss_gib": round(self.peak / 2**30, 2),
            "returncode": proc.returncode,
            "killed": killed,
            "log": str(self.log),
        }
        print(f"[{self.name}] {row}", flush=True)
        if proc.returncode and not killed:
            print(self.log.read_text()[-5000:], file=sys.stderr)
            raise SystemExit(f"phase {self.name} failed (exit {proc.returncode})")
        return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--devices", type=int, default=1, help="simulated CPU devices")
    p.add_argument("--fsdp", type=int, default=1)
    p.add_argument("--crop", type=int, default=64, help="training crop (HR pixels)")
    p.add_argument("--sample-steps", type=int, default=2, help="validation / sampling steps")
    args = p.parse_args(argv)
    w = args.workdir.resolve()
    w.mkdir(parents=True, exist_ok=True)
    # glibc keeps the several GB that compiling the SD-2 step takes in its arenas unless told
    # to return freed memory; with these the 1-device run peaks at 18.4 GiB instead of being
    # killed at 21.5 GiB (2026-12-02). A user's own settings win.
    malloc = {"MALLOC_ARENA_MAX": "2", "MALLOC_TRIM_THRESHOLD_": "0"}
    env = {
        **malloc,
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(ROOT),
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices}",
    }
    py = sys.executable
    rows = []
    t0 = time.time()
    make_folders(w)
    rows.append({"phase": "folders", "seconds": round(time.time() - t0, 1)})
    make_data(w / "data")
    ckpt = w / "converted"
    if not (ckpt / "0").exists():
        rows.append(
            Phase(
                "convert",
                [
                    py,
                    "-m",
                    "segsr_jax.convert",
                    "--pipeline",
                    str(w / "sd2"),
                    "--segformer",
                    str(w / "segformer_b5"),
                    "--output",
                    str(ckpt),
                    "--overwrite",
                ],
                env,
                w / "convert.log",
            ).run()
        )
    common = [
        "--config.data.source=folder",
        f"--config.data.path={w / 'data' / 'images'}",
        f"--config.data.labels={w / 'data' / 'labels'}",
        f"--config.data.crop_size={args.crop}",
        f"--config.data.global_batch_size={args.devices}",
        "--config.data.num_workers=0",
        f"--config.mesh.fsdp={args.fsdp}",
        "--config.num_steps=2",
        "--config.checkpoint.every=1",
        "--config.checkpoint.keep_last=1",
        "--config.checkpoint.async_save=False",
        "--config.log.every=1",
        "--config.sample.every=1",
        f"--config.sample.num_images={args.devices}",
        f"--config.sample.options.steps={args.sample_steps}",
        "--cache_dir",
        str(w / "xla_cache"),
    ]

    def train(stage: str, init: Path, name: str, kill_when=None):
        return Phase(
            name,
            [
                py,
                "-m",
                "segsr_jax.train",
                "--config",
                f"configs/segsr_sd2.py:{stage}",
                "--workdir",
                str(w / stage),
                f"--config.init_from={init}",
                *common,
            ],
            env,
            w / f"{name}.log",
        ).run(kill_when)

    step1 = w / "sr" / "checkpoints" / "1"
    rows.append(
        train(
            "sr",
            ckpt,
            "train_sr",
            kill_when=lambda: (
                (step1 / "_CHECKPOINT_METADATA").exists() or (step1 / "commit_success.txt").exists()
            ),
        )
    )
    rows.append(train("sr", ckpt, "resume_sr"))
    rows.append(train("joint", w / "sr" / "checkpoints", "train_joint"))
    img_dir = w / "sample_in"
    img_dir.mkdir(exist_ok=True)
    from PIL import Image

    Image.open(w / "data" / "images" / "000.png").resize((32, 32)).save(img_dir / "lq.png")
    rows.append(
        Phase(
            "sample",
            [
                py,
                "-m",
                "segsr_jax.sample",
                "--checkpoint",
                str(w / "joint" / "checkpoints"),
                "--input",
                str(img_dir),
                "--output",
                str(w / "sample_out"),
                "--fsdp",
                str(args.fsdp),
                "--steps",
                str(args.sample_steps),
                "--min-side",
                "32",
                "--cache-dir",
                str(w / "xla_cache"),
            ],
            env,
            w / "sample.log",
        ).run()
    )
    (w / "smoke.json").write_text(
        json.dumps(
            {"devices": args.devices, "fsdp": args.fsdp, "crop": args.crop, "phases": rows},
            indent=1,
        )
    )
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
