"""Training prompts: seg-tag prompts, text dropout, and the tokenizer a from-scratch model uses.

Prompts are made on the host, next to the batch, because the tokenizer is Python. Which
prompts are dropped to the empty string (text dropout, p = 0.5 in SeeSR) is drawn from
``numpy.random.default_rng((seed, step, process))``: a pure function of the step, so a
resumed run drops exactly the prompts an uninterrupted one would.

A model trained from scratch has no CLIP vocabulary to inherit; :func:`write_char_tokenizer`
writes a character-level one in CLIP's file format (``vocab.json`` + an empty
``merges.txt``), which :func:`segsr_jax.weights.load_tokenizer` and the sampler read like any
other.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np
from etils import epath

from segsr_jax.models.segdm import IGNORE_INDEX

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# 256 byte symbols, the same 256 ending a word ("</w>"), BOS and EOS.
CHAR_VOCAB_SIZE = 2 * 256 + 2
PROMPT_MODES = ("tags", "fixed")


def _byte_symbols() -> list[str]:
    """CLIP's (GPT-2's) byte -> printable character table, in byte order: printable Latin-1
    bytes stand for themselves, the others for the characters from U+0100 on."""
    printable = (
        set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    )
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def write_char_tokenizer(folder: str | os.PathLike, max_length: int) -> epath.Path:
    """Write a character-level CLIP tokenizer (``CHAR_VOCAB_SIZE`` ids) into ``folder`` (a
    local path or a ``gs://`` URI).

    Every word becomes its characters (the last one marked end-of-word), between BOS and EOS,
    padded with EOS to ``max_length`` (the text encoder's ``max_position_embeddings``).
    """
    folder = epath.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + [BOS, EOS])}
    # Bytes, not text: fsspec's text mode would encode in the locale's encoding.
    (folder / "vocab.json").write_bytes(json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": max_length,
                "bos_token": BOS,
                "eos_token": EOS,
                "pad_token": EOS,
                "unk_token": EOS,
                "do_lower_case": True,
            }
        )
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS})
    )
    return folder


def seg_tags(labels: np.ndarray, class_names: Sequence[str], max_tags: int) -> str:
    """ "grass, brick, sky": the classes present in ``labels [H, W]``, largest area first."""
    ids, counts = np.unique(labels[labels != IGNORE_INDEX], return_counts=True)
    order = np.argsort(-counts, kind="stable")[:max_tags]
    return ", ".join(class_names[int(i)] for i in ids[order] if int(i) < len(class_names))


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """How training prompts are made.

    Attributes:
      mode: ``tags`` (the class names present in the label map) or ``fixed`` (``text``).
      text: the fixed prompt.
      dropout: probability of replacing a prompt by the empty one.
      max_tags: at most this many tags per prompt.
      seed: seeds the dropout draws (with the step and the process index).
    """

    mode: str = "tags"
    text: str = ""
    dropout: float = 0.5
    max_tags: int = 8
    seed: int = 0

    def __post_init__(self):
        if self.mode not in PROMPT_MODES:
            raise ValueError(f"prompt mode {self.mode!r} is not one of {PROMPT_MODES}")
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"text dropout must be in [0, 1], got {self.dropout}")


class PromptMaker:
    """``(labels, step) -> input_ids [B, L] int32`` for this process's examples."""

    def __init__(
        self, tokenizer, class_names: Sequence[str], config: PromptConfig, process_index: int = 0
    ):
        if config.mode == "tags" and not class_names:
            raise ValueError("seg-tag prompts need the model config's class_names")
        self.tokenizer = tokenizer
        self.class_names = tuple(class_names)
        self.config = config
        self.process_index = process_index

    def prompts(self, labels: np.ndarray, step: int) -> list[str]:
        """The prompt strings of a batch of label maps ``[B, H, W]`` at training step ``step``."""
        cfg = self.config
        rng = np.random.default_rng((cfg.seed, step, self.process_index))
        drop = rng.random(len(labels)) < cfg.dropout
        if cfg.mode == "fixed":
            texts = [cfg.text] * len(labels)
        else:
            texts = [seg_tags(y, self.class_names, cfg.max_tags) for y in labels]
        return ["" if d else t for d, t in zip(drop, texts, strict=True)]

    def __call__(self, labels: np.ndarray, step: int) -> np.ndarray:
        """Token ids of :meth:`prompts`."""
        return self.tokenizer(self.prompts(labels, step))
