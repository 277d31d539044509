"""The mapping of an ncnn Real-ESRGAN graph (``realesrgan-x4plus``, read with
:mod:`segsr_jax.weights.ncnn`) onto :class:`segsr_jax.models.rrdbnet.RRDBNet` parameter names;
every convolution is checked against the architecture before its weights are taken.
"""

from __future__ import annotations

import numpy as np

from segsr_jax.weights.ncnn import Layer, NcnnError, conv_shape


def _check_conv(layer: Layer, shape: tuple, leaky: float | None, key: str):
    got = conv_shape(layer)
    strides = (layer.get(3, 1), layer.get(13, layer.get(3, 1)))
    dil = (layer.get(2, 1), layer.get(12, layer.get(2, 1)))
    pl = layer.get(4, 0)
    pads = (pl, layer.get(14, pl), layer.get(15, pl), layer.get(16, layer.get(14, pl)))
    problems = []
    if got != shape:
        problems.append(f"weight shape {got}, expected {shape}")
    if strides != (1, 1) or dil != (1, 1) or pads != (1, 1, 1, 1) or layer.get(18, 0.0):
        problems.append(f"stride {strides}, dilation {dil}, pads {pads} (expected 1, 1, 1)")
    if not layer.get(5, 0):
        problems.append("no bias")
    act = int(layer.get(9, 0))
    if leaky is None and act != 0:
        problems.append(f"activation type {act}, expected none")
    if leaky is not None and (act != 2 or tuple(layer.get(10, ())) != (leaky,)):
        problems.append(f"activation type {act} {layer.get(10, ())}, expected LeakyReLU({leaky})")
    if problems:
        raise NcnnError(f"Convolution {layer.name!r} (mapped to {key}): " + "; ".join(problems))


def rrdbnet_from_layers(
    layers: list[Layer], *, negative_slope: float = 0.2, residual_scale: float = 0.2
) -> tuple[dict, dict[str, np.ndarray]]:
    """Map a Real-ESRGAN x4 ncnn graph (``realesrgan-x4plus``) onto RRDBNet parameter names.

    Returns:
      ``(config, tensors)``: the :class:`~segsr_jax.models.rrdbnet.RRDBNetConfig` fields
      (``num_in_ch``, ``num_out_ch``, ``scale``, ``num_feat``, ``num_block``, ``num_grow_ch``)
      and PyTorch-layout arrays under BasicSR's state-dict names (``conv_first.weight``,
      ``body.0.rdb1.conv1.weight`` ... ``conv_last.bias``), ready for
      :func:`segsr_jax.weights.torch_mapping.load_state_dict`.

    The convolutions are taken in file order (an ncnn export writes layers in a topological
    order, which for RRDBNet is the module order). The rest of the graph is checked as far as
    it is cheap to: every conv's shape, padding and fused activation, the residual scalings of
    the ``Eltwise`` sums and the two nearest x2 ``Interp`` layers; the tests run the graph
    itself (:func:`run_graph`) against the mapped model.

    Raises:
      NcnnError: a graph that is not an x4 RRDBNet, naming the first layer that differs.
    """
    convs = [ly for ly in layers if ly.type == "Convolution"]
    if len(convs) < 6 or (len(convs) - 6) % 15:
        raise NcnnError(
            f"{len(convs)} convolutions do not form an x4 RRDBNet (6 + 15 per RRDB block expected)"
        )
    num_block = (len(convs) - 6) // 15
    out_first, in_ch, _, _ = conv_shape(convs[0])
    feat = out_first
    grow = conv_shape(convs[1])[0]
    out_ch = conv_shape(convs[-1])[0]
    names: list[tuple[str, tuple, float | None]] = [("conv_first", (feat, in_ch, 3, 3), None)]
    for b in range(num_block):
        for r in range(1, 4):
            for c in range(1, 6):
                shape = (grow if c < 5 else feat, feat + (c - 1) * grow, 3, 3)
                names.append((f"body.{b}.rdb{r}.conv{c}", shape, negative_slope if c < 5 else None))
    names += [
        ("conv_body", (feat, feat, 3, 3), None),
        ("conv_up1", (feat, feat, 3, 3), negative_slope),
        ("conv_up2", (feat, feat, 3, 3), negative_slope),
        ("conv_hr", (feat, feat, 3, 3), negative_slope),
        ("conv_last", (out_ch, feat, 3, 3), None),
    ]
    tensors = {}
    for layer, (key, shape, leaky) in zip(convs, names, strict=True):
        _check_conv(layer, shape, leaky, key)
        tensors[f"{key}.weight"] = layer.weights["weight"]
        tensors[f"{key}.bias"] = layer.weights["bias"]

    sums = [ly for ly in layers if ly.type == "Eltwise"]
    if len(sums) != 4 * num_block:
        raise NcnnError(
            f"expected {4 * num_block} Eltwise sums (3 per RDB + 1 per RRDB), found {len(sums)}"
        )
    for ly in sums:
        coeffs = tuple(float(c) for c in ly.get(1, ()))
        if int(ly.get(0, 1)) != 1 or len(ly.inputs) != 2 or coeffs != (residual_scale, 1.0):
            raise NcnnError(
                f"Eltwise {ly.name!r}: expected {residual_scale} * branch + input, "
                f"got op {ly.get(0, 1)} with coefficients {coeffs}"
            )
    interps = [ly for ly in layers if ly.type == "Interp"]
    if len(interps) != 2 or any(
        int(ly.get(0, 0)) != 1 or (float(ly.get(1, 0)), float(ly.get(2, 0))) != (2.0, 2.0)
        for ly in interps
    ):
        raise NcnnError(
            "expected exactly two nearest-neighbour x2 Interp layers (x4 RRDBNet), "
            f"found {[(ly.name, ly.params) for ly in interps]}"
        )
    config = dict(
        num_in_ch=in_ch,
        num_out_ch=out_ch,
        scale=4,
        num_feat=feat,
        num_block=num_block,
        num_grow_ch=grow,
    )
    return config, tensors
