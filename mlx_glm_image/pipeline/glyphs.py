"""Glyph texts and their embeddings: the quoted strings of the prompt -> ByT5 bytes -> the T5 encoder.

Mirrors diffusers' GlmImagePipeline.get_glyph_texts / _get_glyph_embeds and transformers' ByT5Tokenizer.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ..loading import to_dtype
from ..models.t5 import T5EncoderModel

# ---------------------------------------------------------------------------------------------------------
# Glyph strings


def get_glyph_texts(prompt: str | list[str]) -> list[list[str]]:
    """The quoted substrings of each prompt, in the pipeline's order: '...', then \u201c...\u201d, "...", 「...」."""
    if isinstance(prompt, str):
        prompt = [prompt]
    out = []
    for p in prompt:
        out.append(
            re.findall(r"'([^']*)'", p)
            + re.findall(r"\u201c([^\u201c\u201d]*)\u201d", p)
            + re.findall(r'"([^"]*)"', p)
            + re.findall(r"「([^「」]*)」", p)
        )
    return out


# ---------------------------------------------------------------------------------------------------------
# ByT5 tokenizer (bytes + 3; no vocabulary file needed)


@dataclass(frozen=True)
class _Special:
    content: str
    id: int
    lstrip: bool = False
    rstrip: bool = False


class ByT5Tokenizer:
    """transformers' ByT5Tokenizer for encoding: utf-8 bytes + 3, ``</s>`` (1) appended, ``<pad>`` 0.

    Literal special-token strings in the text (``</s>``, ``<pad>``, ``<unk>``, ``<extra_id_N>``) map to their
    ids as transformers does, with the whitespace stripping of pad/eos/unk.
    """

    pad_token_id = 0
    eos_token_id = 1
    unk_token_id = 2
    offset = 3

    def __init__(self, extra_ids: int = 125, specials: list[_Special] | None = None):
        if specials is None:
            specials = [
                _Special("<pad>", 0, True, True),
                _Special("</s>", 1, True, True),
                _Special("<unk>", 2, True, True),
            ] + [_Special(f"<extra_id_{i}>", 259 + i) for i in range(extra_ids)]
        self.specials = {s.content: s for s in specials}
        # Longest first so that no token shadows a longer one starting at the same place.
        names = sorted(self.specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(n) for n in names) + ")") if names else None

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "ByT5Tokenizer":
        """Read the added tokens of a ``tokenizer/`` folder's tokenizer_config.json (defaults when absent)."""
        path = Path(folder) / "tokenizer_config.json"
        if not path.is_file():
            return cls()
        cfg = json.loads(path.read_text())
        decoder = cfg.get("added_tokens_decoder")
        if not decoder:
            return cls(extra_ids=int(cfg.get("extra_ids", 125)))
        specials = [
            _Special(t["content"], int(i), bool(t.get("lstrip", False)), bool(t.get("rstrip", False)))
            for i, t in decoder.items()
        ]
        return cls(specials=specials)

    def tokenize_ids(self, text: str) -> list[int]:
        if self._split is None:
            return [b + self.offset for b in text.encode("utf-8")]
        pieces = self._split.split(text)  # odd indices are special tokens
        for i in range(1, len(pieces), 2):
            tok = self.specials[pieces[i]]
            if tok.lstrip and i > 0:
                pieces[i - 1] = pieces[i - 1].rstrip()
            if tok.rstrip and i + 1 < len(pieces):
                pieces[i + 1] = pieces[i + 1].lstrip()
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i % 2:
                ids.append(self.specials[piece].id)
            elif piece:
                ids.extend(b + self.offset for b in piece.encode("utf-8"))
        return ids

    def encode(self, text: str, max_length: int | None = None, truncation: bool = False) -> list[int]:
        ids = self.tokenize_ids(text)
        if truncation and max_length is not None:
            if max_length < 1:
                raise ValueError(f"max_length must be >= 1, got {max_length}")
            # room for the eos, as prepare_for_model does (num_special_tokens_to_add = 1)
            ids = ids[: max(max_length - 1, 0)]
        # ByT5 does not add a second eos when the text already ends with one
        if not ids or ids[-1] != self.eos_token_id:
            ids = ids + [self.eos_token_id]
        return ids

    def __call__(self, texts: str | list[str], max_length: int | None = None, truncation: bool = False):
        if isinstance(texts, str):
            return self.encode(texts, max_length, truncation)
        return [self.encode(t, max_length, truncation) for t in texts]


# ---------------------------------------------------------------------------------------------------------
# Glyph embeddings (diffusers' GlmImagePipeline._get_glyph_embeds)


def glyph_token_ids(tokenizer: ByT5Tokenizer, glyph_texts: list[str], max_sequence_length: int) -> list[list[int]]:
    """The token ids of one prompt's glyph strings, each truncated to ``max_sequence_length``, as diffusers makes
    them (the empty string when there is none)."""
    ids = tokenizer(glyph_texts or [""], max_length=max_sequence_length, truncation=True)
    # diffusers' quirk: one pad token in front of every string when the NUMBER of strings is even
    return [[tokenizer.pad_token_id] * ((len(ids) + 1) % 2) + x for x in ids]


def glyph_tokens(prompt: str, max_sequence_length: int = 2048) -> int:
    """How many glyph tokens one prompt gives the DiT (the encoder states of all its strings, concatenated)."""
    return sum(map(len, glyph_token_ids(ByT5Tokenizer(), get_glyph_texts(prompt)[0], max_sequence_length)))


def get_glyph_embeds(
    text_encoder: T5EncoderModel,
    prompts: str | list[str],
    max_sequence_length: int = 2048,
    dtype=None,
    tokenizer: ByT5Tokenizer | None = None,
) -> mx.array:
    """(B, L, d_model): per prompt, the encoder states of all its glyph strings' tokens, concatenated,
    left-padded with zeros to the batch's longest."""
    tokenizer = tokenizer or ByT5Tokenizer()
    dtype = to_dtype(dtype) or text_encoder.dtype
    embeds = []
    for glyph_texts in get_glyph_texts(prompts):
        ids = glyph_token_ids(tokenizer, glyph_texts, max_sequence_length)
        longest = max(len(x) for x in ids)
        mask = mx.array([[1] * len(x) + [0] * (longest - len(x)) for x in ids], dtype=mx.int32)
        tokens = mx.array([x + [tokenizer.pad_token_id] * (longest - len(x)) for x in ids], dtype=mx.int32)
        hidden = text_encoder(tokens, attention_mask=mask)  # (n_strings, longest, d)
        # keep the unmasked positions, row by row, in order (= last_hidden_state[mask.bool()])
        kept = [hidden[i, : len(x)] for i, x in enumerate(ids)]
        emb = mx.concatenate(kept, axis=0)[None]
        mx.eval(emb)
        embeds.append(emb)
    return left_padded(embeds).astype(dtype)


def left_padded(embeds: list[mx.array]) -> mx.array:
    """(1, L_i, d) glyph embeddings as one batch (B, max L_i, d), each left-padded with zeros (the pipeline's rule
    for a batch of prompts, and the trainer's for a batch of examples)."""
    longest = max(e.shape[1] for e in embeds)
    padded = [
        mx.concatenate([mx.zeros((1, longest - e.shape[1], e.shape[2]), e.dtype), e], axis=1)
        if e.shape[1] < longest
        else e
        for e in embeds
    ]
    return mx.concatenate(padded, axis=0)


def encode_prompt(text_encoder: T5EncoderModel, tokenizer: ByT5Tokenizer | None, prompt: list[str],
                  do_classifier_free_guidance: bool = True, num_images_per_prompt: int = 1,
                  max_sequence_length: int = 2048) -> tuple[mx.array, mx.array | None]:
    """Glyph embeddings of the prompts and of the empty negative prompt, each repeated per image (diffusers'
    encode_prompt)."""
    embeds = get_glyph_embeds(text_encoder, prompt, max_sequence_length, tokenizer=tokenizer)
    negative = (get_glyph_embeds(text_encoder, [""] * len(prompt), max_sequence_length, tokenizer=tokenizer)
                if do_classifier_free_guidance else None)
    mx.eval([e for e in (embeds, negative) if e is not None])
    return repeat(embeds, num_images_per_prompt), repeat(negative, num_images_per_prompt)


def repeat(x: mx.array | None, n: int) -> mx.array | None:
    """Each row ``n`` times in a row (images per prompt)."""
    return mx.repeat(x, n, axis=0) if x is not None and n > 1 else x
