"""What a run tells while it works: one ``Event`` per stage boundary, condition image encoded, prefill chunk, AR
token, denoising step and finished image, in order (``GlmImagePipeline.stream``). ``__call__``, ``generate_batch``,
the CLI's bars and the server's worker all consume the same stream; nothing in a stage prints or draws."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

STAGES = ("prior", "glyphs", "denoise", "decode")
KINDS = ("stage", "condition", "prefill", "token", "step", "preview", "image")


@dataclass(frozen=True, kw_only=True)
class Event:
    """One thing that happened, for request ``request`` (its index in the batch; 0 for a single call).

    - ``stage``: stage ``stage`` starts (one of ``STAGES``); with ``done``, it ended: ``seconds`` of compute,
      ``load_seconds`` loading its models, MLX's ``peak_memory`` (bytes) during it.
    - ``condition``: condition image ``index`` of ``total`` of the request is encoded, in stage ``stage``: by the
      AR model's vision encoder ("prior") or the VAE ("denoise").
    - ``prefill``: the AR model read chunk ``index`` of ``total`` of its prompt into its cache (prior_tokens.py;
      the last chunk is read with the first token, without an event of its own).
    - ``token``: the AR model wrote token ``index`` of ``total`` for each of the request's ``count`` prompts.
    - ``step``: denoising step ``index`` of ``total`` of the request's ``count`` images is done; ``blocks`` is
      (DiT blocks computed, blocks in its passes) for it (the step cache skips some), ``passes`` (DiT passes run,
      passes of a guided step: a step past ``guidance_end`` runs one).
    - ``preview``: preview ``index`` of ``total`` of image ``image_index`` of the request, after step ``step``: a
      small PIL ``image`` of the clean image the latents point at (preview.py).
    - ``image``: image ``index`` of the request is finished: ``image`` (as ``output_type`` asks: a PIL image, an
      (H, W, 3) array, a (3, H, W) MLX array, or (C, h, w) latents), its ``seed`` and its ``metadata`` record.
    """

    kind: str
    request: int = 0
    stage: str | None = None
    index: int = 0
    total: int = 0
    count: int = 1
    step: int | None = None
    image_index: int = 0
    blocks: tuple[int, int] | None = None
    passes: tuple[int, int] | None = None
    image: Any = None
    seed: int | None = None
    metadata: dict | None = None
    done: bool = False
    seconds: float = 0.0
    load_seconds: float = 0.0
    peak_memory: int = 0
