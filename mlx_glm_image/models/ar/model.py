"""``GlmImageForConditionalGeneration``: the AR prior model (text decoder + vision encoder + VQ) in MLX.

Parameter names equal transformers' (``model.language_model.*``, ``model.visual.*``, ``model.vqmodel.*``,
``lm_head.weight``) so a ``vision_language_encoder/`` folder loads after a small ``sanitize`` (conv layouts).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..base import PretrainedModel
from .config import GlmImageConfig
from .positions import get_rope_index, split_grids
from .text_model import GlmImageTextModel, KVCache
from .vision import GlmImageVisionModel, GlmImageVQVAE


class GlmImageModel(nn.Module):
    def __init__(self, config: GlmImageConfig):
        super().__init__()
        self.visual = GlmImageVisionModel(config.vision_config)
        self.language_model = GlmImageTextModel(config.text_config)
        self.vqmodel = GlmImageVQVAE(config.vq_config)


class GlmImageForConditionalGeneration(PretrainedModel):
    component = "vision_language_encoder"
    config_class = GlmImageConfig
    quantize_by_default = True
    full_precision_note = "the VQ codebook and the vision patch/position embeddings"
    FULL_PRECISION = ("model.vqmodel", "model.visual.patch_embed", "model.visual.embeddings")

    def __init__(self, config: GlmImageConfig | dict | None = None):
        super().__init__()
        self.config = config = self.as_config(config)
        self.model = GlmImageModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vision_vocab_size, bias=False)
        self.generation_config: dict = {}

    # ---- loading -------------------------------------------------------------------------------------------
    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """transformers -> MLX layout: conv weights (O, I, kh, kw) -> (O, kh, kw, I); drop non-parameters."""
        out = {}
        for k, v in weights.items():
            if "rotary_emb" in k or k.endswith("inv_freq"):
                continue
            if k.endswith(("patch_embed.proj.weight", "quant_conv.weight")) and v.ndim == 4:
                # torch layout has kh == kw in the last two axes; an MLX-layout tensor has them in axes 1, 2
                if not (v.shape[1] == v.shape[2] and v.shape[3] != v.shape[2]):
                    v = v.transpose(0, 2, 3, 1)
            out[k] = v
        return out

    def quant_predicate(self, path: str, module: nn.Module) -> bool:
        """Linear layers, and the token table (1.4 GB in bf16, read one row per token), but not the vision
        side's embeddings and VQ codebook."""
        if path.startswith(self.FULL_PRECISION):
            return False
        return isinstance(module, nn.Linear) or path.endswith("embed_tokens")

    @staticmethod
    def tensor_plan(config: GlmImageConfig, n: int, rank: int) -> list:
        """mlx-lm's plan for a GQA decoder, in every text layer: q/k/v and gate_up by output (gate and up split
        alike), o and down by input (one all-reduce each). With more ranks than KV heads (the released model has
        2), each rank computes the one KV head its query heads read, so those projections are replicated across
        the ranks that share it. The token table, the LM head and the vision side stay whole."""
        from ...sharding import Share, ShardingError, part, require

        t = config.text_config
        kv = t.num_key_value_heads
        require({"attention heads": t.num_attention_heads, "MLP width": t.intermediate_size}, n, "the AR model")
        if kv % n and n % kv:
            raise ShardingError(f"--parallel tensor splits the AR model over {n} ranks, but its {kv} KV heads neither "
                                f"divide among them nor does {kv} divide {n}")
        hd, inter = t.head_dim, t.intermediate_size
        q = part(t.num_attention_heads * hd, n, rank)
        k = part(kv * hd, n, rank) if kv % n == 0 else part(kv * hd, kv, rank * kv // n)
        mlp = part(inter, n, rank)
        plan = []
        for i in range(t.num_hidden_layers):
            a, m = f"model.language_model.layers.{i}.self_attn", f"model.language_model.layers.{i}.mlp"
            plan += [Share(f"{a}.q_proj", "out", (q,)), Share(f"{a}.k_proj", "out", (k,)), Share(f"{a}.v_proj", "out", (k,)),
                     Share(f"{a}.o_proj", "in", (q,)),
                     Share(f"{m}.gate_up_proj", "out", (mlp, part(inter, n, rank, offset=inter))),
                     Share(f"{m}.down_proj", "in", (mlp,))]
        return plan

    def shard_heads(self, n: int):
        for layer in self.model.language_model.layers:
            a = layer.self_attn
            a.n_heads //= n
            a.n_kv_heads = max(a.n_kv_heads // n, 1)

    # ---- pieces mirroring transformers ---------------------------------------------------------------------
    def make_cache(self, max_size: int, window: int | None = None) -> list[KVCache]:
        """One cache per layer for a generation of ``max_size`` tokens, the prompt included; attention reads the
        first ``window`` positions (all by default)."""
        return [KVCache(max_size, window=window) for _ in self.model.language_model.layers]

    def get_rope_index(self, input_ids, image_grid_thw=None, images_per_sample=None, attention_mask=None):
        """(position_ids (3, B, L), decode_position_ids (B, 3, T) or None), numpy, as transformers computes them."""
        return get_rope_index(
            np.asarray(input_ids),
            image_grid_thw,
            images_per_sample,
            None if attention_mask is None else np.asarray(attention_mask),
            self.config.image_start_token_id,
            self.config.image_end_token_id,
        )

    def get_image_features(self, pixel_values: mx.array, image_grid_thw) -> list[mx.array]:
        """ViT features per source image, each (t*h*w, hidden) in row-major grid order."""
        grid = np.asarray(image_grid_thw).reshape(-1, 3)
        h = self.model.visual(mx.array(pixel_values), grid)
        sizes = [int(t * hh * ww) for t, hh, ww in grid]
        bounds = np.cumsum([0] + sizes)
        return [h[int(bounds[i]) : int(bounds[i + 1])] for i in range(len(sizes))]

    def get_image_tokens(self, features: list[mx.array]) -> mx.array:
        """VQ code ids of each image's features, concatenated: (sum of t*h*w,)."""
        return mx.concatenate([self.model.vqmodel.encode(f) for f in features])

    @staticmethod
    def source_grids(image_grid_thw, images_per_sample) -> np.ndarray:
        """The grids of the source images: every sample's grids but its last (the target), as transformers."""
        grids = np.asarray(image_grid_thw).reshape(-1, 3)
        if images_per_sample is None:
            return grids[:-1]
        per = split_grids(grids, images_per_sample, len(np.asarray(images_per_sample).reshape(-1)))
        return np.concatenate([g[:-1] for g in per], axis=0)

    def embed_prompt(self, input_ids, pixel_values=None, image_grid_thw=None, images_per_sample=None,
                     image_token_ids=None) -> np.ndarray:
        """Input ids with image placeholders replaced by the source images' VQ tokens (host numpy, (B, L))."""
        ids = np.array(input_ids, dtype=np.int64)
        if image_token_ids is None and pixel_values is not None:
            grids = self.source_grids(image_grid_thw, images_per_sample)
            image_token_ids = self.get_image_tokens(self.get_image_features(pixel_values, grids))
        if image_token_ids is not None:
            tok = np.array(image_token_ids).reshape(-1)
            slots = ids == self.config.image_token_id
            if int(slots.sum()) != tok.size:
                raise ValueError(
                    f"Number of image placeholder tokens ({int(slots.sum())}) does not match "
                    f"number of image tokens from VQVAE ({tok.size})"
                )
            ids[slots] = tok  # row-major, as torch's masked_scatter
        return ids

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        cache: list[KVCache] | None = None,
        pixel_values=None,
        image_grid_thw=None,
        images_per_sample=None,
        logits_to_keep: int = 0,
    ) -> mx.array:
        """Logits (B, L, vision_vocab_size); the first call of a generation (prefill) as transformers' forward.

        ``position_ids`` (3, B, L) default to ``get_rope_index`` when grids are given, else to plain positions.
        ``attention_mask`` (B, cached + L) marks left padding with 0.
        """
        if pixel_values is not None:
            input_ids = self.embed_prompt(input_ids, pixel_values, image_grid_thw, images_per_sample)
        if position_ids is None and image_grid_thw is not None:
            position_ids, _ = self.get_rope_index(input_ids, image_grid_thw, images_per_sample, attention_mask)
        input_ids = mx.array(np.asarray(input_ids)) if not isinstance(input_ids, mx.array) else input_ids
        if position_ids is not None and not isinstance(position_ids, mx.array):
            position_ids = mx.array(np.asarray(position_ids))
        if attention_mask is not None and not isinstance(attention_mask, mx.array):
            attention_mask = mx.array(np.asarray(attention_mask))
        h = self.model.language_model(input_ids, position_ids, attention_mask, cache)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.lm_head(h)
