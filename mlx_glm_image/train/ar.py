"""Training examples and the loss of the AR prior model: the sequence inference feeds it, and cross-entropy over its
vision head on the grid it should write.

An example is an image (its VQ codes) and its prompt at a size H x W. Its sequence is, token for token, what the
prior stage feeds the model when it generates that image's grid (pipeline/prior_grid.py): the prompt after the chat
template with the grid sizes (``{prompt}<sop>{H/32} {W/32}<eop><sop>{h} {w}<eop><bos>``, editing: the source
images' VQ tokens and no preview grid), then the small preview grid, the H/32 x W/32 target grid and the end token;
the positions are the prefill's rope index and the decode steps' positions, by the rule the decode loop uses. The
labels are -100 on the prompt (the image-start token included), then the grids and the end token.

The target grid's codes come from the AR model's own vision encoder + VQ (the path editing takes for a source
image), over the image resized to the target grid times the vision patch (H/2 x W/2 with the released 16-pixel
patch: the size the image processor gives an H x W image, which it halves); the preview grid is the target grid
downsampled (nearest, as torch's ``interpolate``) to inference's preview size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..models.ar.positions import decode_positions
from ..pipeline.image_processor import to_rgb
from ..pipeline.prior_grid import end_tokens, prior_prompt
from ..pipeline.processor import TargetGrids, target_grids

IGNORE_INDEX = -100  # transformers' label for tokens without a loss


@dataclass(frozen=True, kw_only=True)
class ArExample:
    """One training sequence: ``input_ids`` (1, L), ``position_ids`` (3, 1, L), ``labels`` (1, L), numpy int64."""

    input_ids: np.ndarray
    position_ids: np.ndarray
    labels: np.ndarray
    grids: TargetGrids

    @property
    def prompt_length(self) -> int:
        return int((self.labels[0] == IGNORE_INDEX).sum())


def target_codes(model, processor, image, height: int, width: int) -> np.ndarray:
    """The VQ codes (H/32, W/32) of ``image`` for an ``height`` x ``width`` target: the AR model's vision encoder +
    VQ over the image resized (the processor's resampling) to the target grid times the patch, then patched and
    normalized as the processor does."""
    from PIL import Image

    ip = processor.image_processor
    th, tw = target_grids(height, width, text_to_image=False).target
    side = ip.patch_size * ip.merge_size
    img = to_rgb(Image.open(image) if not isinstance(image, Image.Image) else image)
    img = img.resize((tw * side, th * side), resample=Image.Resampling(ip.resample))
    pixels, grid = dataclasses.replace(ip, do_resize=False).preprocess_one(img)
    codes = np.array(model.get_image_tokens(model.get_image_features(mx.array(pixels), np.array([grid]))))
    if codes.size != th * tw:
        raise ValueError(f"the vision encoder gave {codes.size} codes for a {th}x{tw} grid")
    return codes.reshape(th, tw)


def downsample_nearest(codes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``codes`` (h, w) at ``size``, nearest: source index ``floor(i * in / out)`` (torch's ``interpolate``)."""
    (h, w), (oh, ow) = codes.shape, size
    # in float32, as torch computes the scale and the product
    rows = np.minimum(np.floor(np.arange(oh, dtype=np.float32) * np.float32(h / oh)).astype(np.int64), h - 1)
    cols = np.minimum(np.floor(np.arange(ow, dtype=np.float32) * np.float32(w / ow)).astype(np.int64), w - 1)
    return codes[rows][:, cols]


def ar_example(model, processor, prompt: str, codes: np.ndarray, height: int, width: int, images=None) -> ArExample:
    """The sequence of ``prompt`` whose ``height`` x ``width`` image has the target grid ``codes`` (H/32, W/32);
    ``images``: the source images of an editing example."""
    pp = prior_prompt(model, processor, [prompt], height, width, None if images is None else [list(images)])
    grids = pp.grids
    if tuple(codes.shape) != grids.target:
        raise ValueError(f"codes of shape {tuple(codes.shape)} for a {grids.target[0]}x{grids.target[1]} target grid")
    written = [downsample_nearest(codes, grids.preview).reshape(-1)] if grids.preview else []
    written = np.concatenate(written + [codes.reshape(-1), [end_tokens(model)[0]]]).astype(np.int64)
    inputs = pp.inputs
    prompt_ids = model.embed_prompt(inputs["input_ids"], image_token_ids=pp.image_ids)
    prefill, table = model.get_rope_index(prompt_ids, inputs["image_grid_thw"], inputs["images_per_sample"])
    L = prompt_ids.shape[1]
    decode = decode_positions(table, 0, written.size, 1, L)
    return ArExample(
        input_ids=np.concatenate([prompt_ids, written[None]], axis=1),
        position_ids=np.concatenate([prefill, decode], axis=2),
        labels=np.concatenate([np.full((1, L), IGNORE_INDEX), written[None]], axis=1),
        grids=grids)


def causal_lm_loss(logits: mx.array, labels: mx.array, reduction: str = "mean") -> mx.array:
    """Cross-entropy of each token's logits against the next token's label (MLX's fused kernel, accumulated in
    float32: no float32 copy of the vision head's logits), over the labelled ones:
    their mean (transformers' ``ForCausalLMLoss``), or with ``reduction="sum"`` their sum."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logits = logits[:, :-1]
    if mx.default_device() == mx.cpu:  # MLX's CPU fallback reduces in the logits' dtype; the fused kernel in float32
        logits = logits.astype(mx.float32)
    ce = mx.fast.cross_entropy(logits, mx.where(mask, targets, 0))
    total = (ce * mask).sum()
    return total if reduction == "sum" else total / mask.sum()


def ar_loss(model, example: ArExample, reduction: str = "mean") -> mx.array:
    """The example's loss under ``model`` (the AR prior, with its adapters)."""
    logits = model(mx.array(example.input_ids), position_ids=mx.array(example.position_ids))
    return causal_lm_loss(logits, mx.array(example.labels), reduction)


def ar_batch_loss(model, examples: list[ArExample]) -> mx.array:
    """The mean over every labelled token of a batch of examples: what transformers' loss gives for the batch
    padded on the right (padding changes no real token's logits), computed one sequence at a time."""
    labelled = sum(int((e.labels[0, 1:] != IGNORE_INDEX).sum()) for e in examples)
    return sum(ar_loss(model, e, "sum") for e in examples) / labelled
