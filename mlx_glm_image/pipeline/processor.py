"""Prompt building and image preprocessing of the AR prior model, equal to transformers' ``GlmImageProcessor``.

Reads the checkpoint's ``processor/`` folder: ``tokenizer.json`` (with the ``tokenizers`` package, no
transformers), ``tokenizer_config.json`` (special tokens), the chat template (``chat_template.jinja``, or a
``chat_template`` entry of a json config), and the image processor settings (``processor_config.json`` or
``preprocessor_config.json``). The chat template is rendered with jinja2 the way transformers renders it.

Text-to-image prompts end with ``<grid_bos>{H/32} {W/32}<grid_eos><grid_bos>{h} {w}<grid_eos><bos>``
(target grid, then the small preview grid); editing prompts with ``<grid_bos>{H/32} {W/32}<grid_eos><bos>``.
Batches are left-padded.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import loading
from .image_processor import to_rgb

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# ---- the grids the AR model writes ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TargetGrids:
    """The token grids the AR model writes for one image, in the order the prompt names them: the target grid
    (height/32 x width/32), then for text-to-image the small preview grid. It writes the preview first and the
    target after it, then one end token (diffusers' ``_compute_generation_params``)."""

    target: tuple[int, int]
    preview: tuple[int, int] | None = None

    @property
    def grids(self) -> list[tuple[int, int]]:
        return [self.target] + ([self.preview] if self.preview else [])

    @property
    def offset(self) -> int:
        """Where the target grid starts among the generated tokens: after the preview grid."""
        return self.preview[0] * self.preview[1] if self.preview else 0

    @property
    def new_tokens(self) -> int:
        """The tokens generated: every grid's, and the end token."""
        return sum(h * w for h, w in self.grids) + 1


def target_grids(height: int, width: int, text_to_image: bool) -> TargetGrids:
    """The grids for a ``height`` x ``width`` image: the target at 1/32 of it; for text-to-image, a preview grid of
    about 16x16 tokens with the target's aspect ratio (transformers' ``_get_target_shape``)."""
    factor = 32
    token_h, token_w = height // factor, width // factor
    if not text_to_image:
        return TargetGrids((token_h, token_w))
    ratio = token_h / token_w
    preview = (int(math.sqrt(ratio) * (factor // 2)), int(math.sqrt(1 / ratio) * (factor // 2)))
    return TargetGrids((token_h, token_w), preview)


# ---- image preprocessing (GlmImageImageProcessorPil) --------------------------------------------------------
def smart_resize(height: int, width: int, factor: int = 16, min_pixels: int = 512 * 512,
                 max_pixels: int = 2048 * 2048) -> tuple[int, int]:
    if height < factor or width < factor:
        raise ValueError(f"height:{height} or width:{width} must be larger than factor:{factor}")
    if max(height, width) / min(height, width) > 4:
        raise ValueError(f"absolute aspect ratio must be smaller than 4, got {max(height, width) / min(height, width)}")
    shortest_edge = int(round(math.sqrt(min_pixels)))
    longest_edge = int(round(math.sqrt(max_pixels)))
    min_side, max_side = min(height, width), max(height, width)
    scale = 1.0
    if min_side < shortest_edge:
        scale = shortest_edge / min_side
    if max_side * scale > longest_edge:
        scale = longest_edge / max_side
    # the reference halves the image before rounding to the factor (its grid is at 1/32 of the input)
    height, width = height // 2, width // 2
    h_bar = max(factor, int(round(height * scale / factor)) * factor)
    w_bar = max(factor, int(round(width * scale / factor)) * factor)
    if max(h_bar, w_bar) > longest_edge:
        beta = max(h_bar, w_bar) / longest_edge
        h_bar = max(factor, int(math.floor((h_bar / beta) / factor)) * factor)
        w_bar = max(factor, int(math.floor((w_bar / beta) / factor)) * factor)
    return h_bar, w_bar


@dataclass
class ImageProcessor:
    patch_size: int = 16
    temporal_patch_size: int = 1
    merge_size: int = 1
    shortest_edge: int = 56 * 56
    longest_edge: int = 28 * 28 * 1280
    image_mean: list = field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list = field(default_factory=lambda: list(CLIP_STD))
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL bicubic
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "ImageProcessor":
        d = dict(d)
        size = d.pop("size", None) or {}
        out = cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
        out.shortest_edge = size.get("shortest_edge", d.get("min_pixels", out.shortest_edge))
        out.longest_edge = size.get("longest_edge", d.get("max_pixels", out.longest_edge))
        return out

    def preprocess_one(self, image) -> tuple[np.ndarray, tuple[int, int, int]]:
        """One image -> (h*w patches of C*T*p*p values, (1, h, w))."""
        from PIL import Image

        img = to_rgb(Image.open(image) if isinstance(image, (str, os.PathLike)) else image)
        p, m, T = self.patch_size, self.merge_size, self.temporal_patch_size
        if self.do_resize:
            rh, rw = smart_resize(img.height, img.width, p * m, self.shortest_edge, self.longest_edge)
            img = img.resize((rw, rh), resample=Image.Resampling(self.resample))
        x = np.asarray(img).transpose(2, 0, 1)  # (C, H, W) uint8
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            x = x.astype(np.float32) if not np.issubdtype(x.dtype, np.floating) else x
            mean = np.array(self.image_mean, dtype=x.dtype)
            std = np.array(self.image_std, dtype=x.dtype)
            x = ((x.T - mean) / std).T
        x = np.asarray(x, dtype=np.float32)
        C, H, Wd = x.shape
        gh, gw = H // p, Wd // p
        x = x.reshape(C, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], T, p, p))
        return x.reshape(gh * gw, C * T * p * p), (1, gh, gw)

    def __call__(self, images) -> dict:
        patches, grids = [], []
        for im in images:
            x, g = self.preprocess_one(im)
            patches.append(x)
            grids.append(g)
        return {"pixel_values": np.concatenate(patches, axis=0), "image_grid_thw": np.array(grids, dtype=np.int64)}


# ---- chat template ------------------------------------------------------------------------------------------
def render_chat_template(template: str, conversations: list, add_generation_prompt: bool = False, **kwargs) -> list[str]:
    """Render like transformers' ``render_jinja_template`` (sandboxed, trim/lstrip blocks, loopcontrols)."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 ships with most environments
        raise ImportError("rendering the GLM-Image chat template needs jinja2: pip install jinja2") from e

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    compiled = env.from_string(template)
    return [compiled.render(messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                            **kwargs) for chat in conversations]


def _token_text(v):
    if isinstance(v, dict):
        return v.get("content")
    return v


class GlmImageProcessor:
    """Tokenizer + chat template + image processor of the prior model (no transformers needed)."""

    def __init__(self, tokenizer, chat_template: str | None, special_tokens: dict, image_processor: ImageProcessor):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.special_tokens = special_tokens
        self.image_processor = image_processor
        self.image_token = special_tokens.get("image_token", "<|image|>")
        self.grid_bos_token = special_tokens.get("grid_bos_token", "<sop>")
        self.grid_eos_token = special_tokens.get("grid_eos_token", "<eop>")
        self.bos_token = special_tokens.get("bos_token") or ""
        self.image_token_id = self.token_to_id(self.image_token)
        pad = special_tokens.get("pad_token")
        self.pad_token_id = self.token_to_id(pad) if pad is not None else 0

    def token_to_id(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(f"token {token!r} is not in the tokenizer's vocabulary")
        return i

    @classmethod
    def from_pretrained(cls, path_or_repo, subfolder: str | None = None) -> "GlmImageProcessor":
        """A ``processor/`` folder (or a pipeline root containing one)."""
        from tokenizers import Tokenizer

        folder = loading.component_folder(path_or_repo, "processor", subfolder)
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise loading.WeightsError(f"{tok_file} is missing")
        tokenizer = Tokenizer.from_file(str(tok_file))

        def read(name):
            p = Path(folder) / name
            return json.loads(p.read_text()) if p.is_file() else {}

        tok_cfg = read("tokenizer_config.json")
        proc_cfg = read("processor_config.json")
        pre_cfg = read("preprocessor_config.json")
        special = {}
        extra = tok_cfg.get("extra_special_tokens")
        if isinstance(extra, dict):
            special.update({k: _token_text(v) for k, v in extra.items()})
        for k in ("bos_token", "eos_token", "pad_token", "unk_token", "image_token", "grid_bos_token", "grid_eos_token"):
            if tok_cfg.get(k) is not None:
                special[k] = _token_text(tok_cfg[k])

        template = None
        for name in ("chat_template.jinja",):
            if (Path(folder) / name).is_file():
                template = (Path(folder) / name).read_text()
        if template is None:
            ct = read("chat_template.json").get("chat_template") or proc_cfg.get("chat_template") or tok_cfg.get("chat_template")
            if isinstance(ct, list):  # named templates: take the default one
                ct = next((t["template"] for t in ct if t.get("name") == "default"), ct[0]["template"])
            template = ct

        ip = proc_cfg.get("image_processor") or pre_cfg or {}
        return cls(tokenizer, template, special, ImageProcessor.from_dict(ip))

    # ---- prompt pieces ----
    def _suffix(self, grids: TargetGrids) -> str:
        return "".join(f"{self.grid_bos_token}{h} {w}{self.grid_eos_token}" for h, w in grids.grids) + self.bos_token

    def render(self, conversations, add_generation_prompt: bool = False) -> list[str]:
        if self.chat_template is None:
            raise ValueError("this processor has no chat template")
        kwargs = {k: v for k, v in self.special_tokens.items() if v is not None}
        return render_chat_template(self.chat_template, conversations, add_generation_prompt, **kwargs)

    def __call__(self, text, images=None, target_h: int = 1152, target_w: int = 768,
                 add_special_tokens: bool = True, padding: bool = True) -> dict:
        """Tokenize rendered prompts (and preprocess their source images) like ``GlmImageProcessor.__call__``.

        ``images``: a flat list over the batch (sample 0's images first). Returns numpy arrays.
        """
        texts = [text] if isinstance(text, str) else list(text)
        t2i = images is None or len(images) == 0
        counts = [t.count(self.image_token) for t in texts]
        if not t2i and len(set(counts)) != 1:
            raise ValueError(f"In image-to-image mode, all samples must have the same number of source images. "
                             f"Got different counts: {counts}")
        out: dict = {}
        replacements = []
        if not t2i:
            if sum(counts) != len(images):
                raise ValueError(f"{sum(counts)} image tokens in the text but {len(images)} images")
            out.update(self.image_processor(images))
            merge = self.image_processor.merge_size ** 2
            replacements = [self.image_token * int(np.prod(g) // merge) for g in out["image_grid_thw"]]
        it = iter(replacements)
        full = []
        grids = target_grids(target_h, target_w, t2i)
        for t in texts:
            t = t + self._suffix(grids)
            if not t2i:
                pieces = t.split(self.image_token)
                t = pieces[0] + "".join(next(it) + p for p in pieces[1:])
            full.append(t)
        encs = self.tokenizer.encode_batch(full, add_special_tokens=add_special_tokens)
        ids = [e.ids for e in encs]
        L = max(len(x) for x in ids) if padding else None
        if not padding and len(set(len(x) for x in ids)) != 1:
            raise ValueError("prompts of different lengths need padding=True")
        L = L or len(ids[0])
        input_ids = np.full((len(ids), L), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(ids), L), dtype=np.int64)
        for i, x in enumerate(ids):  # left padding: generation continues every row at the same index
            input_ids[i, L - len(x):] = x
            attention_mask[i, L - len(x):] = 1
        out["input_ids"], out["attention_mask"] = input_ids, attention_mask

        target = [[1, h, w] for h, w in grids.grids]
        thw = []
        n_src = 0 if t2i else counts[0]
        for i in range(len(texts)):
            if n_src:
                thw.extend(out["image_grid_thw"][i * n_src:(i + 1) * n_src].tolist())
            thw.extend(target)
        out["image_grid_thw"] = np.array(thw, dtype=np.int64)
        out["images_per_sample"] = np.array([n_src + len(target)] * len(texts), dtype=np.int64)
        return out

    def sequence_length(self, prompt: str, target_h: int, target_w: int, image_sizes=()) -> int:
        """The AR model's whole sequence for one prompt: its tokens after the chat template, each condition
        image's placeholder tokens (``image_sizes``: (width, height) each) and the grid tokens it generates; as
        ``__call__`` builds it, without preprocessing any image."""
        grids = target_grids(target_h, target_w, not image_sizes)
        content = [{"type": "image"} for _ in image_sizes] + [{"type": "text", "text": prompt}]
        text = self.render([[{"role": "user", "content": content}]])[0] + self._suffix(grids)
        n = len(self.tokenizer.encode(text, add_special_tokens=not (self.bos_token and text.startswith(self.bos_token))).ids)
        ip = self.image_processor
        for w, h in image_sizes:  # each placeholder becomes its grid's tokens
            gh, gw = smart_resize(h, w, ip.patch_size * ip.merge_size, ip.shortest_edge, ip.longest_edge)
            n += (gh // ip.patch_size) * (gw // ip.patch_size) // ip.merge_size**2 - 1
        return n + grids.new_tokens

    def apply_chat_template(self, conversations, target_h: int = 1152, target_w: int = 768,
                            add_generation_prompt: bool = False, tokenize: bool = True, padding: bool = True):
        """Render one conversation or a batch of them and tokenize, as transformers' ``apply_chat_template``.

        Image entries of the messages (``{"type": "image", "image": PIL.Image | path}``) are collected in order
        and preprocessed.
        """
        batched = len(conversations) > 0 and isinstance(conversations[0], (list, tuple))
        convs = [list(c) for c in conversations] if batched else [list(conversations)]
        prompts = self.render(convs, add_generation_prompt)
        if not tokenize:
            return prompts if batched else prompts[0]
        images = []
        for chat in convs:
            for msg in chat:
                content = msg.get("content")
                if isinstance(content, list):
                    for item in content:
                        if isinstance(item, dict) and item.get("type") == "image":
                            img = item.get("image", item.get("path", item.get("url")))
                            if img is not None:
                                images.append(img)
        add_special = not (self.bos_token and prompts[0].startswith(self.bos_token))
        return self(prompts, images or None, target_h, target_w, add_special_tokens=add_special, padding=padding)
