"""A reader for ncnn models (``.param`` text + ``.bin`` weights), and a reference interpreter
of the graph (:mod:`segsr_jax.weights.ncnn_rrdbnet` maps a Real-ESRGAN graph onto RRDBNet).

Only the layer types an RRDBNet export uses are understood (``Input``, ``Convolution``,
``Split``, ``Concat``, ``Eltwise``, ``BinaryOp``, ``Interp``); anything else, any parameter key
we do not know, and any weight encoding other than float32 / float16 is an :class:`NcnnError`
naming the layer, so a file we would misread is refused instead of silently mis-loaded.

Format (ncnn's "param and model file structure" documentation):

``.param``: line 1 is the magic ``7767517``; line 2 ``layer_count blob_count``; then one line per
layer: ``type name n_in n_out in_blob... out_blob... key=value...``. A key ``k >= 0`` holds one
int or float (a float has ``.``, ``e`` or ``E`` in it); a key ``k <= -23300`` is the array
parameter ``-k - 23300`` written ``count,v1,v2,...``.

``.bin``: the layers' weights back to back in layer order, little-endian, nothing else. Each
layer reads its arrays in a fixed order (``Convolution``: ``weight_data`` of
``weight_data_size`` elements, then ``num_output`` biases if ``bias_term``). An array read
with type 0 (the weights) starts with a 4-byte tag: ``0x01306B47`` float16 (data padded to 4
bytes), all four bytes zero float32, ``0x000D4B38`` int8, anything else quantized. An array
read with type 1 (the biases) is raw float32 with no tag. Convolution weights are
``[num_output, in_channels, kernel_h, kernel_w]``, row-major: PyTorch's layout.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

MAGIC = 7767517
_TAG_FP16 = 0x01306B47
_TAG_INT8 = 0x000D4B38
_TAG_SCALED = 0x0002C056
_ARRAY_BASE = -23300

# The parameter keys honoured per layer type (anything else is refused).
_KNOWN_KEYS = {
    "Input": {0, 1, 2, 11},
    # 0 num_output, 1/11 kernel w/h, 2/12 dilation, 3/13 stride, 4/14/15/16 pads (l, t, r, b),
    # 18 pad value, 5 bias_term, 6 weight_data_size, 8 int8_scale_term, 9 activation type,
    # 10 activation params, 19 dynamic weight.
    "Convolution": {0, 1, 11, 2, 12, 3, 13, 4, 14, 15, 16, 18, 5, 6, 8, 9, 10, 19},
    "Split": set(),
    "Concat": {0},
    "Eltwise": {0, 1},
    "BinaryOp": {0, 1, 2},
    "Interp": {0, 1, 2, 3, 4, 5, 6},
}


class NcnnError(ValueError):
    """A malformed or unsupported ncnn file; the message names the file and layer."""


@dataclasses.dataclass
class Layer:
    """One layer line of a ``.param`` file, plus its weights once :func:`read_bin` ran.

    Attributes:
      type: layer type (``"Convolution"`` ...).
      name: layer name.
      inputs, outputs: blob names.
      params: key -> int, float, or tuple (array parameters, keyed by their id ``-k - 23300``).
      weights: array name (``"weight"``, ``"bias"``) -> float32 numpy array.
    """

    type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: dict[int, int | float | tuple]
    weights: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def get(self, key: int, default=None):
        return self.params.get(key, default)


def _number(text: str, where: str) -> int | float:
    try:
        return float(text) if re.search(r"[.eE]", text) else int(text)
    except ValueError:
        raise NcnnError(f"{where}: cannot parse number {text!r}") from None


def parse_param(text: str, source: str = "param") -> list[Layer]:
    """Parse the text of a ``.param`` file into its layers (in file order).

    Raises:
      NcnnError: bad magic, counts that do not match, a malformed line, an unknown layer type
        or parameter key, or a blob produced twice / consumed before it exists.
    """
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines or lines[0] != str(MAGIC):
        raise NcnnError(f"{source}: not an ncnn param file (first line is not {MAGIC})")
    try:
        layer_count, blob_count = (int(v) for v in lines[1].split())
    except (IndexError, ValueError):
        raise NcnnError(f"{source}: line 2 must be 'layer_count blob_count'") from None
    if len(lines) - 2 != layer_count:
        raise NcnnError(f"{source}: header says {layer_count} layers, found {len(lines) - 2}")
    layers, produced = [], set()
    for lineno, line in enumerate(lines[2:], start=3):
        where = f"{source}:{lineno}"
        tok = line.split()
        if len(tok) < 4:
            raise NcnnError(f"{where}: expected 'type name n_in n_out ...', got {line!r}")
        ltype, name = tok[0], tok[1]
        if ltype not in _KNOWN_KEYS:
            raise NcnnError(
                f"{where}: layer {name!r} has unsupported type {ltype!r} "
                f"(supported: {sorted(_KNOWN_KEYS)})"
            )
        n_in, n_out = int(_number(tok[2], where)), int(_number(tok[3], where))
        if len(tok) < 4 + n_in + n_out:
            raise NcnnError(f"{where}: layer {name!r} lists fewer blobs than {n_in}+{n_out}")
        inputs = tuple(tok[4 : 4 + n_in])
        outputs = tuple(tok[4 + n_in : 4 + n_in + n_out])
        for blob in inputs:
            if blob not in produced:
                raise NcnnError(
                    f"{where}: layer {name!r} reads blob {blob!r} before any layer produces it"
                )
        for blob in outputs:
            if blob in produced:
                raise NcnnError(f"{where}: blob {blob!r} is produced twice")
            produced.add(blob)
        params: dict[int, int | float | tuple] = {}
        for item in tok[4 + n_in + n_out :]:
            key_text, sep, value = item.partition("=")
            if not sep:
                raise NcnnError(f"{where}: layer {name!r}: parameter {item!r} is not key=value")
            key = int(_number(key_text, where))
            if key <= _ARRAY_BASE:
                key = _ARRAY_BASE - key
                count, *values = value.split(",")
                if int(_number(count, where)) != len(values):
                    raise NcnnError(
                        f"{where}: layer {name!r}: array parameter {key} says "
                        f"{count} values, has {len(values)}"
                    )
                parsed = tuple(_number(v, where) for v in values)
            else:
                parsed = _number(value, where)
            if key not in _KNOWN_KEYS[ltype]:
                raise NcnnError(
                    f"{where}: layer {name!r} ({ltype}) has parameter {key}, which "
                    "this reader does not implement"
                )
            params[key] = parsed
        layers.append(Layer(ltype, name, inputs, outputs, params))
    if len(produced) != blob_count:
        raise NcnnError(
            f"{source}: header says {blob_count} blobs, the layers produce {len(produced)}"
        )
    return layers


def conv_shape(layer: Layer) -> tuple[int, int, int, int]:
    """``(out, in, kh, kw)`` of a Convolution layer's weight (checked against its size)."""
    out = int(layer.get(0, 0))
    kw = int(layer.get(1, 0))
    kh = int(layer.get(11, kw))
    size = int(layer.get(6, 0))
    if out <= 0 or kw <= 0 or kh <= 0 or size <= 0 or size % (out * kh * kw):
        raise NcnnError(
            f"Convolution {layer.name!r}: weight_data_size={size} is not "
            f"num_output={out} x in_channels x {kh}x{kw}"
        )
    return out, size // (out * kh * kw), kh, kw


class _Reader:
    """Sequential little-endian reads from a ``.bin`` buffer."""

    def __init__(self, data: bytes, source: str):
        self.data, self.pos, self.source = data, 0, source

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise NcnnError(
                f"{self.source}: file ends at byte {len(self.data)} while reading "
                f"{what} ({n} bytes at offset {self.pos})"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def tagged(self, count: int, what: str) -> np.ndarray:
        """An array stored with a 4-byte type tag (ncnn's ``load(w, 0)``)."""
        tag_bytes = self.take(4, f"the type tag of {what}")
        tag = int.from_bytes(tag_bytes, "little")
        if tag == _TAG_FP16:
            raw = self.take(-(-count * 2 // 4) * 4, what)  # padded to 4 bytes
            return np.frombuffer(raw[: count * 2], "<f2").astype(np.float32)
        if tag == 0:
            return np.frombuffer(self.take(count * 4, what), "<f4").astype(np.float32)
        kind = {_TAG_INT8: "int8", _TAG_SCALED: "scaled float32"}.get(tag, "table-quantized")
        raise NcnnError(
            f"{self.source}: {what} is stored as {kind} data (tag 0x{tag:08X}); "
            "only float32 and float16 weights are supported"
        )

    def raw_f32(self, count: int, what: str) -> np.ndarray:
        """An untagged float32 array (ncnn's ``load(w, 1)``)."""
        return np.frombuffer(self.take(count * 4, what), "<f4").astype(np.float32)


def read_bin(layers: list[Layer], data: bytes, source: str = "bin") -> list[Layer]:
    """Fill ``layer.weights`` of every layer from the ``.bin`` bytes ``data`` (in place).

    Raises:
      NcnnError: a weight encoding we do not support, a truncated file, or bytes left over
        (a sign the param and bin files do not belong together).
    """
    reader = _Reader(data, source)
    for layer in layers:
        if layer.type != "Convolution":
            continue
        if layer.get(8, 0):
            raise NcnnError(
                f"{source}: Convolution {layer.name!r} is int8-quantized "
                "(int8_scale_term set); not supported"
            )
        if layer.get(19, 0):
            raise NcnnError(
                f"{source}: Convolution {layer.name!r} takes its weights as an "
                "input blob (dynamic_weight); not supported"
            )
        shape = conv_shape(layer)
        w = reader.tagged(int(np.prod(shape)), f"the weights of {layer.name!r}")
        layer.weights["weight"] = w.reshape(shape)
        if layer.get(5, 0):
            layer.weights["bias"] = reader.raw_f32(shape[0], f"the bias of {layer.name!r}")
    if reader.pos != len(data):
        raise NcnnError(
            f"{source}: {len(data) - reader.pos} bytes left after the last layer's "
            "weights; the .bin does not match the .param"
        )
    return layers


def load(param_path: str | os.PathLike, bin_path: str | os.PathLike) -> list[Layer]:
    """Read a ``.param`` / ``.bin`` pair from disk into layers with weights."""
    with open(param_path, encoding="utf-8") as f:
        layers = parse_param(f.read(), source=str(param_path))
    with open(bin_path, "rb") as f:
        return read_bin(layers, f.read(), source=str(bin_path))


# --- a reference interpreter (to check a mapping against the graph itself) ------------------


def _activation(layer: Layer, x):
    import jax.numpy as jnp

    kind = int(layer.get(9, 0))
    args = layer.get(10, ())
    if kind == 0:
        return x
    if kind == 1:
        return jnp.maximum(x, 0)
    if kind == 2:
        slope = float(args[0]) if args else 0.0
        return jnp.where(x > 0, x, x * slope)
    raise NcnnError(f"Convolution {layer.name!r}: activation type {kind} is not implemented")


def run_graph(
    layers: list[Layer], x, input_blob: str | None = None, output_blob: str | None = None
):
    """Evaluate the graph on ``x [B, H, W, C]`` (NHWC) and return the output blob, NHWC.

    A plain, slow interpreter of the supported layer types, written from ncnn's layer
    definitions; it exists to check that a weight mapping onto one of our models reproduces
    the graph the file describes. ``input_blob`` defaults to the ``Input`` layer's blob and
    ``output_blob`` to the last layer's first output.
    """
    import jax
    import jax.numpy as jnp

    if input_blob is None:
        inputs = [ly for ly in layers if ly.type == "Input"]
        if len(inputs) != 1:
            raise NcnnError(f"expected one Input layer, found {len(inputs)}")
        input_blob = inputs[0].outputs[0]
    output_blob = output_blob or layers[-1].outputs[0]
    blobs = {input_blob: jnp.asarray(x, jnp.float32)}
    for layer in layers:
        t = layer.type
        if t == "Input":
            continue
        args = [blobs[b] for b in layer.inputs]
        if t == "Convolution":
            out, _, kh, kw = conv_shape(layer)
            dw = int(layer.get(2, 1))
            dh = int(layer.get(12, dw))
            sw = int(layer.get(3, 1))
            sh = int(layer.get(13, sw))
            pl = int(layer.get(4, 0))
            pt, pr = int(layer.get(14, pl)), int(layer.get(15, pl))
            pb = int(layer.get(16, int(layer.get(14, pl))))
            if min(pl, pt, pr, pb) < 0 or layer.get(18, 0.0) != 0.0:
                raise NcnnError(
                    f"Convolution {layer.name!r}: 'same' padding modes and non-zero "
                    "pad values are not implemented"
                )
            kernel = jnp.asarray(layer.weights["weight"]).transpose(2, 3, 1, 0)  # HWIO
            y = jax.lax.conv_general_dilated(
                args[0],
                kernel,
                (sh, sw),
                ((pt, pb), (pl, pr)),
                rhs_dilation=(dh, dw),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                precision=jax.lax.Precision.HIGHEST,
            )
            if "bias" in layer.weights:
                y = y + layer.weights["bias"]
            results = [_activation(layer, y)]
        elif t == "Split":
            results = [args[0]] * len(layer.outputs)
        elif t == "Concat":
            axis = int(layer.get(0, 0))
            if axis != 0:
                raise NcnnError(f"Concat {layer.name!r}: only the channel axis (0) is implemented")
            results = [jnp.concatenate(args, axis=-1)]
        elif t in ("Eltwise", "BinaryOp"):
            op = int(layer.get(0, 0 if t == "BinaryOp" else 1))
            if t == "BinaryOp" and (op != 0 or layer.get(1, 0)):
                raise NcnnError(f"BinaryOp {layer.name!r}: only tensor + tensor is implemented")
            if t == "Eltwise" and op != 1:
                raise NcnnError(f"Eltwise {layer.name!r}: only op 1 (sum) is implemented")
            coeffs = layer.get(1, ()) if t == "Eltwise" else ()
            coeffs = coeffs or (1.0,) * len(args)
            results = [sum(c * a for c, a in zip(coeffs, args, strict=True))]
        elif t == "Interp":
            if int(layer.get(0, 0)) != 1 or layer.get(3, 0) or layer.get(4, 0):
                raise NcnnError(
                    f"Interp {layer.name!r}: only nearest with scale factors is implemented"
                )
            fy, fx = float(layer.get(1, 1.0)), float(layer.get(2, 1.0))
            if fy != int(fy) or fx != int(fx):
                raise NcnnError(f"Interp {layer.name!r}: only integer scales are implemented")
            y = jnp.repeat(jnp.repeat(args[0], int(fy), axis=1), int(fx), axis=2)
            results = [y]
        else:  # parse_param refuses other types; kept for completeness
            raise NcnnError(f"layer type {t!r} is not implemented")
        blobs.update(zip(layer.outputs, results, strict=True))
    return blobs[output_blob]
