"""SegSR: the two diffusion models, the bridge and their encoders in one NNX module.

``SegSR.denoise`` is the one place where the coupling order of a reverse step is written
(the paper's figure: the bridge reads the states the previous step produced)::

    I_t, C_t   = DMB(Z_t, S_t, t)
    eps_hat    = SRDM(Z_t, t, text, cond=(Z_lq, C_t))       # ControlNet + UNet
    seg_logits = SegDM(S_t, t_seg, F_lq, I_t)               # x0-prediction

The sampler updates that turn these into ``(Z_{t-1}, S_{t-1})`` live in
:mod:`segsr_jax.diffusion.sampling`, which drives ``denoise`` from one ``lax.scan``.
"""

from __future__ import annotations

import dataclasses
import types
import typing

import jax
import jax.numpy as jnp
from flax import nnx

from segsr_jax.models import guidance
from segsr_jax.models.bridge import Bridge, BridgeConfig
from segsr_jax.models.controlnet import (
    ControlNet,
    ControlNetConfig,
    controlnet_config_from_unet,
    residual_channels,
)
from segsr_jax.models.seg_encoder import SegFormer, SegFormerConfig, normalize_images
from segsr_jax.models.segdm import SegDM, SegDMConfig
from segsr_jax.models.text_encoder import CLIPTextConfig, CLIPTextEncoder
from segsr_jax.models.unet import UNet2DCondition, UNetConfig
from segsr_jax.models.vae import AutoencoderKL, VAEConfig

CONFIG_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SegSRConfig:
    """Every part of the model; serialised into checkpoints with :meth:`to_dict`.

    Attributes:
      prediction_type: the SR UNet's parameterisation, ``epsilon`` or ``v_prediction``.
      class_names: names of the K segmentation classes (for seg-tag prompts and legends).
    """

    vae: VAEConfig
    text: CLIPTextConfig
    unet: UNetConfig
    controlnet: ControlNetConfig
    segformer: SegFormerConfig
    segdm: SegDMConfig
    bridge: BridgeConfig
    prediction_type: str = "epsilon"
    class_names: tuple[str, ...] = ()

    def __post_init__(self):
        lat = self.vae.latent_channels
        problems = []
        if self.unet.in_channels != lat or self.controlnet.in_channels != lat:
            problems.append(f"unet/controlnet in_channels must equal latent_channels {lat}")
        if self.controlnet.conditioning != "latent":
            problems.append("SegSR's ControlNet uses conditioning='latent'")
        if self.controlnet.conditioning_channels != lat + self.bridge.c_channels:
            problems.append(
                f"controlnet.conditioning_channels must be latent_channels + "
                f"bridge.c_channels = {lat + self.bridge.c_channels}"
            )
        levels = tuple(self.bridge.level_channels)
        if levels and levels != residual_channels(self.controlnet):
            problems.append(
                f"bridge.level_channels {levels} must be empty or the ControlNet's residual "
                f"widths {residual_channels(self.controlnet)}"
            )
        if self.bridge.seg_source not in ("state", "estimate"):
            problems.append(f"bridge.seg_source {self.bridge.seg_source!r}: 'state' or 'estimate'")
        if self.bridge.latent_channels != lat:
            problems.append(f"bridge.latent_channels must be {lat}")
        if self.bridge.seg_channels != self.segdm.embed_dim:
            problems.append("bridge.seg_channels must equal segdm.embed_dim")
        if self.bridge.i_channels != self.segdm.cond_channels:
            problems.append("bridge.i_channels must equal segdm.cond_channels")
        if self.segdm.feat_channels != self.segformer.decoder_hidden_size:
            problems.append("segdm.feat_channels must equal segformer.decoder_hidden_size")
        if self.segdm.num_classes != self.segformer.num_labels:
            problems.append("segdm.num_classes must equal segformer.num_labels")
        if self.unet.cross_attention_dim != self.text.hidden_size:
            problems.append("unet.cross_attention_dim must equal text.hidden_size")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            problems.append(f"prediction_type {self.prediction_type!r}")
        if self.class_names and len(self.class_names) != self.segdm.num_classes:
            problems.append(
                f"{len(self.class_names)} class_names for {self.segdm.num_classes} classes"
            )
        if problems:
            raise ValueError("inconsistent SegSRConfig: " + "; ".join(problems))

    @classmethod
    def compose(
        cls,
        *,
        vae: VAEConfig,
        text: CLIPTextConfig,
        unet: UNetConfig,
        segformer: SegFormerConfig,
        segdm: SegDMConfig | None = None,
        bridge: BridgeConfig | None = None,
        conditioning_embedding_out_channels: tuple[int, ...] = (64, 128, 256),
        **kwargs,
    ) -> SegSRConfig:
        """A consistent config from the pretrained parts: the ControlNet is the UNet's encoder
        with latent conditioning ``concat(Z_lq, C_t)``; SegDM and the bridge are sized to fit
        (their other fields from the given configs or the defaults)."""
        lat = vae.latent_channels
        segdm = dataclasses.replace(
            segdm or SegDMConfig(),
            num_classes=segformer.num_labels,
            feat_channels=segformer.decoder_hidden_size,
        )
        bridge = dataclasses.replace(
            bridge or BridgeConfig(),
            latent_channels=lat,
            seg_channels=segdm.embed_dim,
            i_channels=segdm.cond_channels,
        )
        controlnet = controlnet_config_from_unet(
            unet,
            dict(
                conditioning="latent",
                conditioning_channels=lat + bridge.c_channels,
                conditioning_embedding_out_channels=conditioning_embedding_out_channels,
            ),
        )
        if not kwargs.get("class_names") and segformer.id2label:
            kwargs["class_names"] = tuple(segformer.id2label)
        return cls(
            vae=vae,
            text=text,
            unet=unet,
            controlnet=controlnet,
            segformer=segformer,
            segdm=segdm,
            bridge=bridge,
            **kwargs,
        )

    @property
    def latent_factor(self) -> int:
        """Image pixels per latent pixel (8 for SD)."""
        return self.vae.downscale_factor

    def to_dict(self) -> dict:
        """A JSON-able dict (tuples become lists)."""
        return {"version": CONFIG_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, raw: dict) -> SegSRConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        raw = dict(raw)
        version = raw.pop("version", None)
        if version != CONFIG_VERSION:
            raise ValueError(
                f"model config version {version!r}; this code reads version {CONFIG_VERSION}"
            )
        return _from_dict(cls, raw, "model")


def _coerce(tp, value):
    """Rebuild tuples and nested dataclasses from JSON values per a type annotation."""
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return _from_dict(tp, value, tp.__name__)
    if isinstance(value, list):
        return tuple(_coerce(typing.Any, v) for v in value)
    return value


def _from_dict(cls, raw: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"{where} config has field(s) this code does not know: {unknown}")
    kwargs = {}
    for k, v in raw.items():
        tp = hints[k]
        if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
            tp = typing.Any
        kwargs[k] = _coerce(tp, v)
    return cls(**kwargs)


class SegSR(nnx.Module):
    """VAE, text encoder, UNet + ControlNet (SRDM), SegFormer, SegDM and the bridge."""

    PARTS = {
        "vae": (AutoencoderKL, "vae"),
        "text_encoder": (CLIPTextEncoder, "text"),
        "unet": (UNet2DCondition, "unet"),
        "controlnet": (ControlNet, "controlnet"),
        "segformer": (SegFormer, "segformer"),
        "segdm": (SegDM, "segdm"),
        "bridge": (Bridge, "bridge"),
    }

    def __init__(
        self,
        config: SegSRConfig,
        *,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
        parts: dict[str, nnx.Module] | None = None,
    ):
        """Build every part from ``config``, except those given in ``parts`` (e.g. loaded
        pretrained modules, ``{"unet": weights.load_unet(path), ...}``), which are used as
        they are."""
        self.config = config
        parts = dict(parts or {})
        unknown = sorted(set(parts) - set(self.PARTS))
        if unknown:
            raise ValueError(f"unknown SegSR part(s) {unknown}; parts are {sorted(self.PARTS)}")
        for name, (cls, field) in self.PARTS.items():
            module = parts.get(name)
            if module is None:
                module = cls(getattr(config, field), dtype=dtype, rngs=rngs)
            setattr(self, name, module)

    def encode_prompts(self, input_ids: jax.Array) -> jax.Array:
        """Token ids ``[B, L]`` -> text context ``[B, L, D]`` float32."""
        return self.text_encoder(input_ids).astype(jnp.float32)

    def lq_features(self, lq: jax.Array, latent_hw: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
        """SegFormer on the (upsampled) LQ image ``lq [B, H, W, 3]`` in ``[-1, 1]``.

        Returns:
          ``f_lq [B, h, w, F]`` (the fused decode-head features resized to the latent size
          ``latent_hw``) and ``lq_logits [B, h, w, K]`` (the fixed segmenter's prediction),
          float32.
        """
        logits, feats = self.segformer(normalize_images(lq))
        b = lq.shape[0]
        h, w = latent_hw
        f_lq = jax.image.resize(feats.astype(jnp.float32), (b, h, w, feats.shape[-1]), "linear")
        lq_logits = jax.image.resize(
            logits.astype(jnp.float32), (b, h, w, logits.shape[-1]), "linear"
        )
        return f_lq, lq_logits

    def bridge_messages(
        self,
        z_t: jax.Array,
        s_t: jax.Array,
        t: jax.Array,
        t_seg: jax.Array,
        f_lq: jax.Array,
        *,
        use_bridge: tuple[bool, bool] = (True, True),
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
        """The bridge's messages for one step, as :meth:`denoise` uses them.

        Returns:
          ``(i_t, c_t, seg_feats, seg_logits)``: ``I_t`` for SegDM and ``C_t`` for SRDM
          (zeros where ``use_bridge`` switches them off), the segmentation stream's features
          (:meth:`Bridge.levels` reads them), and SegDM's logits when they were needed here
          (``BridgeConfig.seg_source = "estimate"`` with SegDM coupled: the stream then reads
          SegDM's re-embedded soft estimate, at unit scale, instead of the noisy ``S_t``),
          else None.
        """
        i_t, c_t, seg_feats = self.bridge.encode(z_t, s_t, t)
        i_t = i_t if use_bridge[1] else jnp.zeros_like(i_t)
        seg_logits = None
        if self.config.bridge.seg_source == "estimate" and all(use_bridge):
            # SegDM learns from its own loss only: no gradient through its estimate here. The
            # estimate is divided by the embedding's scale (bit_scale): the stream's input conv
            # is shared with the noisy S_t, whose noise is O(1); at 0.01 the class would be
            # lost beside the image stream's features (measured: issue 15's README section).
            seg_logits = self.segdm(s_t, t_seg, f_lq, i_t)
            probs = jax.nn.softmax(jax.lax.stop_gradient(seg_logits), axis=-1)
            s_hat = self.segdm.embed_probs(probs) / self.config.segdm.bit_scale
            _, c_t, seg_feats = self.bridge.encode(z_t, s_hat, t)
        c_t = c_t if use_bridge[0] else jnp.zeros_like(c_t)
        return i_t, c_t, seg_feats, seg_logits

    def denoise(
        self,
        z_t: jax.Array,
        s_t: jax.Array,
        t: jax.Array,
        t_seg: jax.Array,
        z_lq: jax.Array,
        f_lq: jax.Array,
        context: jax.Array,
        uncond_context: jax.Array | None = None,
        guidance_scale: jax.Array | float = 1.0,
        *,
        use_bridge: tuple[bool, bool] = (True, True),
    ) -> tuple[jax.Array, jax.Array]:
        """One coupled evaluation of both models (no sampler update).

        Args:
          z_t: ``[B, h, w, 4]`` image latent; s_t: ``[B, h, w, E]`` segmentation state.
          t: SR timestep (scalar or ``[B]``); t_seg: SegDM continuous time (scalar or ``[B]``).
          z_lq, f_lq: the LQ latent and :meth:`lq_features`.
          context: ``[B, L, D]`` prompt context; uncond_context: the negative prompt's, or
            None for no classifier-free guidance (then ``guidance_scale`` is unused).
          guidance_scale: text CFG scale (text only: the LQ, bridge and SegDM are shared).
          use_bridge: static ``(use C_t, use I_t)``. The training stages ``sr`` and ``seg``
            switch one off (that condition becomes zeros, so each model learns alone before
            the joint stage couples them); with both off XLA drops the bridge from the
            program. Sampling takes it from :class:`segsr_jax.diffusion.options.SegPrior`.

        Returns:
          ``(model_out [B, h, w, 4], seg_logits [B, h, w, K])`` float32; ``model_out`` is
          epsilon or v as ``config.prediction_type`` says.
        """
        i_t, c_t, seg_feats, seg_logits = self.bridge_messages(
            z_t, s_t, t, t_seg, f_lq, use_bridge=use_bridge
        )
        cond = jnp.concatenate([z_lq, c_t], axis=-1)
        b = z_t.shape[0]
        t_b = jnp.broadcast_to(jnp.asarray(t), (b,))
        cfg = uncond_context is not None
        if cfg:
            # Batch-doubled CFG: [uncond; cond] through ControlNet and UNet together.
            z_in, t_in, cond_in = guidance.double_batch((z_t, t_b, cond))
            ctx_in = jnp.concatenate([uncond_context, context], axis=0)
        else:
            z_in, t_in, cond_in, ctx_in = z_t, t_b, cond, context
        down, mid = self.controlnet(z_in, t_in, ctx_in, cond_in)
        if use_bridge[0] and self.config.bridge.level_channels:
            # The segmentation stream at every level (BridgeConfig.level_channels); shared by
            # both halves of CFG like C_t.
            shapes = [(b, *r.shape[1:]) for r in (*down, mid)]
            levels = self.bridge.levels(seg_feats, shapes)
            if cfg:
                levels = guidance.double_batch(levels)
            down = tuple(r + lv.astype(r.dtype) for r, lv in zip(down, levels[:-1], strict=True))
            mid = mid + levels[-1].astype(mid.dtype)
        out = self.unet(z_in, t_in, ctx_in, down_residuals=down, mid_residual=mid)
        if cfg:
            out_u, out_c = guidance.split_batch(out)
            out = guidance.cfg_combine(out_u, out_c, guidance_scale)
        if seg_logits is None:
            seg_logits = self.segdm(s_t, t_seg, f_lq, i_t)
        return out.astype(jnp.float32), seg_logits


class ShapeOnlyRngs:
    """Stands in for ``nnx.Rngs`` when a model is only built for its shapes (under
    ``nnx.eval_shape``): every stream returns the same key and nothing is counted.

    Why: a real ``Rngs`` bumps a traced counter on every draw, and with this jax/flax each bump
    reads ``.sharding`` of a tracer, whose error message walks the whole trace -- quadratic in
    the model size (minutes for SD-2; seconds for the tiny test model). The built graph and
    the shapes are the same (SegSR keeps no RNG state).
    """

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda: jax.random.key(0)
