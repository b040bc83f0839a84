"""3D (temporal, height, width) positions of the AR prior model, exactly as transformers' ``get_rope_index``.

Text tokens get the same position on all three axes. A source image's h x w tokens (editing) get
``start + (0, row, col)``, after which the running position advances by ``max(h, w)`` rather than ``h * w``.
The grids still to be generated (text-to-image: the small preview grid, then the large target grid; editing:
the target grid) get positions laid out the same way, starting at the prompt's next position; one extra entry
(the "end marker") follows them. These host-side tables are plain numpy: they are tiny and data dependent.
"""

from __future__ import annotations

import numpy as np


def _vision_positions(start: int, t: int, h: int, w: int) -> np.ndarray:
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h) + start, np.arange(w) + start, indexing="ij")
    pos = np.stack([tt, hh, ww]).reshape(3, -1)
    pos[0] += start
    return pos


def split_grids(image_grid_thw, images_per_sample, batch_size: int) -> list:
    if image_grid_thw is None:
        return [None] * batch_size
    grids = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    if images_per_sample is None:
        # as transformers: all grids belong to every sample (batch size 1)
        return [grids] * batch_size
    bounds = np.cumsum([0] + [int(n) for n in np.asarray(images_per_sample).reshape(-1)])
    return [grids[bounds[i] : bounds[i + 1]] for i in range(len(bounds) - 1)]


def get_rope_index(
    input_ids,
    image_grid_thw=None,
    images_per_sample=None,
    attention_mask=None,
    image_start_token_id: int = 16384,
    image_end_token_id: int = 16385,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Prefill positions (3, B, L) and decode positions (B, 3, T) (None without grids), as numpy int64.

    Padded positions (attention_mask 0) get 1, as in transformers. Decode tables of samples of different length
    are right-padded by repeating their last column.
    """
    input_ids = np.asarray(input_ids)
    B, L = input_ids.shape
    position_ids = np.ones((3, B, L), dtype=np.int64)
    mask = None if attention_mask is None else np.asarray(attention_mask)
    grids_per_sample = split_grids(image_grid_thw, images_per_sample, B)
    decode = []
    for b in range(B):
        ids = input_ids[b]
        grids = grids_per_sample[b]
        valid = None
        if mask is not None and mask.shape[1] == L:
            valid = mask[b] == 1
            ids = ids[valid]
        ends = np.nonzero(ids == image_end_token_id)[0]
        starts = np.nonzero(ids == image_start_token_id)[0] + 1
        n_complete = len(ends)

        current, prev_end, parts = 0, 0, []
        for i, (start, end) in enumerate(zip(starts, ends)):
            if grids is None or i >= len(grids):
                break
            n_text = int(start - prev_end)
            parts.append(np.broadcast_to(np.arange(current, current + n_text), (3, n_text)))
            current += n_text
            t, h, w = (int(x) for x in grids[i])
            parts.append(_vision_positions(current, t, h, w))
            current += max(h, w)
            prev_end = int(end)
        n_text = len(ids) - prev_end
        parts.append(np.broadcast_to(np.arange(current, current + n_text), (3, n_text)))
        current += n_text
        pos = np.concatenate(parts, axis=1)
        if valid is not None:
            position_ids[:, b, valid] = pos
        else:
            position_ids[:, b, :] = pos

        if grids is not None and len(grids) > 0:
            n_decode = max(len(grids) - n_complete, 0)
            cols, p = [], current
            for i in range(1, n_decode + 1):
                _, h, w = (int(x) for x in grids[-i])
                hh = np.repeat(np.arange(h), w)
                ww = np.tile(np.arange(w), h)
                cols.append(np.stack([np.full(h * w, p), p + hh, p + ww]))
                p += max(h, w)
            cols.append(np.full((3, 1), p))
            decode.append(np.concatenate(cols, axis=1).astype(np.int64))

    if not decode:
        return position_ids, None
    T = max(d.shape[1] for d in decode)
    decode = np.stack([np.concatenate([d, np.repeat(d[:, -1:], T - d.shape[1], axis=1)], axis=1) for d in decode])
    return position_ids, decode


def decode_positions(decode_table: np.ndarray | None, step: int, n: int, batch_size: int, start: int) -> np.ndarray:
    """Positions (3, B, n) of the tokens fed at decode steps ``step .. step + n - 1``.

    Past the table's end (longer generations than the grids) the last column repeats; without a table, positions
    continue from ``start`` like plain text.
    """
    if decode_table is None:
        p = np.arange(start + step, start + step + n)
        return np.broadcast_to(p, (3, batch_size, n)).copy()
    idx = np.minimum(np.arange(step, step + n), decode_table.shape[2] - 1)
    return decode_table[:, :, idx].transpose(1, 0, 2)
