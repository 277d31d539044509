"""Training data for the real-photo model: HR photos at two scales and pseudo-class label maps.

    python scripts/fetch_photos.py                     # the training photos (Debian packages)
    python scripts/prepare_photos.py --out data/photo  # images/, labels/, classes.json, sheets

There is no multi-class segmenter offline, so the classes are made from the photos
themselves: every photo is run through ImageNet VGG16 (the convolutions that ship with the
LPIPS weights, ``python -m segsr_jax.weights.fetch lpips``); the relu3_3 and relu4_3
activations, pooled to 1/8 resolution and L2-normalised, plus a little of the local colour,
are clustered with k-means (``--classes``, default 10). Each pixel gets the class of the nearest
centroid, decided on bilinearly upsampled distances so that borders follow the image rather
than an 8-pixel grid. A contact sheet per class (``<out>/sheets/class_<k>.jpg``: the 64 px
patches that sit most confidently in the class, from as many photos as possible) is what a
person looks at to name the class; ``--names`` writes those names into ``classes.json``
(``configs/photo.py`` reads them).

The photos are resized (never enlarged) to shorter sides ``--sides`` (default 384 and 640):
the wallpapers are 4-15 MP, and a 64 px training crop of a 2560 px wallpaper holds almost no
structure (a patch of one leaf or of sky); at these sides a crop spans an object's part, as
it does in an ordinary phone-sized photo. (The sides were chosen from the training photos
alone; the held-out evaluation photos play no part in it.) Images are stored as PNG
(lossless: the degradation pipeline adds its own JPEG).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PATCH = 64  # contact-sheet patch size (HR pixels)


def photo_list(photos: Path) -> list[Path]:
    """The photos listed in ``fetch_photos.py``'s manifest (its order: stable)."""
    manifest = photos / "manifest.json"
    if not manifest.is_file():
        raise SystemExit(f"{manifest} missing: run `python scripts/fetch_photos.py` first")
    return [photos / p["file"] for p in json.loads(manifest.read_text())["photos"]]


def resized(img: Image.Image, side: int) -> Image.Image | None:
    """``img`` with shorter side ``side`` (Lanczos); None when that would enlarge it."""
    w, h = img.size
    if min(w, h) < side:
        return None
    s = side / min(w, h)
    return img.resize((round(w * s), round(h * s)), Image.LANCZOS)


def make_feature_fn():
    """``[H, W, 3] uint8 -> [H/8, W/8, D] float32``: VGG16 relu3_3 (pooled x2) and relu4_3,
    each L2-normalised over channels, and the 8x8 mean colour in [-1, 1] scaled by 0.5."""
    import jax
    import jax.numpy as jnp

    from segsr_jax.lpips import load_lpips

    vgg = load_lpips()

    @jax.jit
    def fn(x):
        h, w = x.shape[1] // 8 * 8, x.shape[2] // 8 * 8
        x = x[:, :h, :w]
        taps = vgg.features(x)
        f3, f4 = taps[2], taps[3]  # 1/4 and 1/8 resolution
        b, h3, w3, c3 = f3.shape
        f3 = f3.reshape(b, h3 // 2, 2, w3 // 2, 2, c3).mean(axis=(2, 4))
        colour = x.reshape(b, h // 8, 8, w // 8, 8, 3).mean(axis=(2, 4))

        def unit(f):
            return f / (jnp.linalg.norm(f, axis=-1, keepdims=True) + 1e-6)

        return jnp.concatenate([unit(f3), unit(f4), 0.5 * colour], axis=-1)

    def features(img_u8: np.ndarray) -> np.ndarray:
        x = jnp.asarray(img_u8, jnp.float32)[None] / 127.5 - 1.0
        return np.asarray(fn(x))[0]

    return features


def kmeans(x: np.ndarray, k: int, seed: int, iters: int = 30) -> np.ndarray:
    """Centroids ``[k, D]`` of rows ``x`` (k-means++ start, Lloyd iterations)."""
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d = np.min(((x[:, None] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
        centres.append(x[rng.choice(len(x), p=d / d.sum())])
    c = np.asarray(centres)
    for _ in range(iters):
        assign = np.argmin(((x[:, None] - c[None]) ** 2).sum(-1), axis=1)
        for j in range(k):
            members = x[assign == j]
            if len(members):
                c[j] = members.mean(axis=0)
    return c


def assign_pixels(feat: np.ndarray, centres: np.ndarray, shape_hw) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel class ``[H, W] uint8`` and margin (second-nearest minus nearest squared
    distance, ``[H, W]``) from the feature map, via bilinear upsampling of the distances."""
    import jax
    import jax.numpy as jnp

    feat = feat.astype(np.float32)
    d = ((feat[:, :, None, :] - centres[None, None]) ** 2).sum(-1)  # [h, w, k]
    h, w = shape_hw
    up = np.asarray(jax.image.resize(jnp.asarray(d), (h, w, d.shape[-1]), "bilinear"))
    order = np.sort(up, axis=-1)
    return np.argmin(up, axis=-1).astype(np.uint8), order[..., 1] - order[..., 0]


def contact_sheet(patches: list[np.ndarray], cols: int = 8) -> np.ndarray:
    """Patches ``[P, P, 3]`` in a grid with 2 px gaps."""
    rows = max(1, -(-len(patches) // cols))
    sheet = np.full((rows * (PATCH + 2), cols * (PATCH + 2), 3), 255, np.uint8)
    for i, p in enumerate(patches):
        r, c = divmod(i, cols)
        sheet[
            r * (PATCH + 2) : r * (PATCH + 2) + PATCH, c * (PATCH + 2) : c * (PATCH + 2) + PATCH
        ] = p
    return sheet


def best_patches(images, labels, margins, k: int, per_image: int = 2, total: int = 32):
    """Up to ``total`` patches whose centre pixel is most confidently class ``k`` and whose
    window is mostly class ``k``, at most ``per_image`` per image."""
    found = []
    for img, lab, mar in zip(images, labels, margins, strict=True):
        h, w = lab.shape
        score = np.where(lab == k, mar, -np.inf)
        score[: PATCH // 2] = score[h - PATCH // 2 :] = -np.inf
        score[:, : PATCH // 2] = score[:, w - PATCH // 2 :] = -np.inf
        taken = 0
        for flat in np.argsort(score, axis=None)[::-1][:200]:
            y, x = divmod(int(flat), w)
            if not np.isfinite(score[y, x]) or taken == per_image:
                break
            win = np.s_[y - PATCH // 2 : y + PATCH // 2, x - PATCH // 2 : x + PATCH // 2]
            if (lab[win] == k).mean() < 0.6:
                continue
            found.append((float(score[y, x]), img[win]))
            score[max(0, y - PATCH) : y + PATCH, max(0, x - PATCH) : x + PATCH] = -np.inf
            taken += 1
    found.sort(key=lambda t: -t[0])
    return [p for _, p in found[:total]]


def main(argv=None) -> None:
    cache = Path(os.environ.get("SEGSR_JAX_CACHE_DIR", Path.home() / ".cache" / "segsr_jax"))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--photos", type=Path, default=cache / "photos")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sides", type=int, nargs="+", default=[384, 640])
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--names", default="", help="comma-separated class names, in class order")
    args = p.parse_args(argv)

    from segsr_jax.images import write_png

    out = args.out
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    (out / "sheets").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    features = make_feature_fn()
    stems, images, feats = [], [], []
    for path in photo_list(args.photos):
        with Image.open(path) as img:
            img = img.convert("RGB")
            for side in args.sides:
                small = resized(img, side)
                if small is None:
                    continue
                arr = np.asarray(small)
                arr = arr[: arr.shape[0] // 8 * 8, : arr.shape[1] // 8 * 8]
                stem = f"{path.parent.name}/{path.stem}_s{side}"
                stems.append(stem)
                images.append(arr)
                feats.append(features(arr).astype(np.float16))  # 1.5 GB less over ~100 photos
    print(f"{len(images)} images from {args.photos}, features in {time.time() - t0:.0f} s")

    rng = np.random.default_rng(args.seed)
    pool = np.concatenate([f.reshape(-1, f.shape[-1]) for f in feats]).astype(np.float32)
    sample = pool[rng.choice(len(pool), size=min(len(pool), 20000), replace=False)]
    centres = kmeans(sample, args.classes, args.seed)
    labels, margins, counts = [], [], np.zeros(args.classes, np.int64)
    for arr, feat, stem in zip(images, feats, stems, strict=True):
        lab, mar = assign_pixels(feat, centres, arr.shape[:2])
        labels.append(lab)
        margins.append(mar)
        counts += np.bincount(lab.ravel(), minlength=args.classes)
        write_png(out / "images" / f"{stem}.png", arr)
        write_png(out / "labels" / f"{stem}.png", lab)
    for k in range(args.classes):
        sheet = contact_sheet(best_patches(images, labels, margins, k))
        Image.fromarray(sheet).save(out / "sheets" / f"class_{k}.jpg", quality=90)
    names = [n.strip() for n in args.names.split(",")] if args.names else []
    if names and len(names) != args.classes:
        raise SystemExit(f"--names has {len(names)} names for {args.classes} classes")
    info = {
        "classes": args.classes,
        "names": names or [f"class{k}" for k in range(args.classes)],
        "pixel_share": [round(float(c) / counts.sum(), 4) for c in counts],
        "images": len(images),
        "sides": args.sides,
        "seed": args.seed,
    }
    (out / "classes.json").write_text(json.dumps(info, indent=1) + "\n")
    np.save(out / "centres.npy", centres)
    print(json.dumps(info))
    print(f"done in {time.time() - t0:.0f} s: {out}")


if __name__ == "__main__":
    main()
