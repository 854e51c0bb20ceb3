"""GLM input layouts: tokens, position ids and the attention layout of [gMASK], [MASK]/[sMASK] and
ChatGLM's 2-D positions, for batches whose rows have different prompt lengths.

The attention layout stays compact: `prefix_mask` [b, s] (True where a token is in the bidirectional
context, i.e. before [sop]) and `segment_ids` [b, s] (0 = padding; packed samples get 1, 2, ...).
The model builds "key visible if same segment and (key <= query or key in context)" inside the
jitted step, so no [b, s, s] mask is ever an input. `dense_mask` expands it when one is wanted.

Rules (GLM-130B generate.py get_masks_and_position_ids; ChatGLM-6B get_position_ids):
  * context = every token before [sop]: visible to all tokens; [sop] and later tokens are causal.
  * [gMASK] (1-D): positions 0, 1, 2, ... throughout.
  * [MASK]/[sMASK] (1-D): [sop] and every later token take the mask token's position.
  * ChatGLM 2-D: positions as [MASK] for both mask kinds (from [sop] on = mask position); block
    positions 0 over the context, then 1, 2, 3, ... from [sop] on.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from glmjax.errors import InputError


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Ids of the tokens the layouts look for (GLM-130B's icetk layout by default)."""

    mask: int = 150000
    gmask: int = 150001
    smask: int = 150002
    sop: int = 150004
    pad: int = 0


GLM130B_IDS = SpecialIds()
CHATGLM6B_IDS = SpecialIds(mask=130000, gmask=130001, smask=130002, sop=130004, pad=3)


def sample_layout(row: Sequence[int], ids: SpecialIds, position_encoding_2d: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(position_ids, prefix_mask) of one unpadded sample: prompt with one mask token, [sop], rest.

    position_ids is [n] for 1-D rotary, [2, n] for ChatGLM's 2-D rotary.
    """
    row = list(row)
    n = len(row)
    if ids.sop not in row:
        raise InputError("a GLM sample needs a [sop] token after its prompt")
    sop = row.index(ids.sop)
    masks = [i for i in range(sop) if row[i] in (ids.mask, ids.smask, ids.gmask)]
    if not masks:
        raise InputError("a GLM sample needs a [MASK], [sMASK] or [gMASK] token before [sop]")
    # GLM-130B's generate.py picks [MASK] if present, else [sMASK], else [gMASK]: first of that kind
    for kind in (ids.mask, ids.smask, ids.gmask):
        if kind in row[:sop]:
            mask_pos, is_gmask = row.index(kind), kind == ids.gmask
            break
    pos = np.arange(n)
    prefix = np.arange(n) < sop
    if position_encoding_2d:
        pos[sop:] = mask_pos
        block = np.concatenate([np.zeros(sop, np.int64), np.arange(1, n - sop + 1)])
        return np.stack([pos, block]), prefix
    if not is_gmask:
        pos[sop:] = mask_pos
    return pos, prefix


def batch_layout(rows: Sequence[Sequence[int]], ids: SpecialIds = GLM130B_IDS, *,
                 seq_len: int | None = None, position_encoding_2d: bool = False,
                 padding: str = "right") -> dict[str, np.ndarray]:
    """Pad samples of different lengths into one batch with its compact attention layout.

    Returns tokens [b, s], position_ids [b, s] (or [b, 2, s]), prefix_mask [b, s] and
    segment_ids [b, s] (1 on real tokens, 0 on padding). Padding is 'right' (GLM-130B) or 'left'
    (ChatGLM's batch generation); positions count from each sample's first token either way.
    """
    if padding not in ("left", "right"):
        raise InputError(f"padding must be 'left' or 'right', got {padding!r}")
    if not rows:
        raise InputError("a batch needs at least one sample")
    longest = max(len(r) for r in rows)
    s = longest if seq_len is None else seq_len
    if longest > s:
        raise InputError(f"a sample of {longest} tokens does not fit seq_len={s}")
    b = len(rows)
    tokens = np.full((b, s), ids.pad, np.int32)
    pos = np.zeros((b, 2, s) if position_encoding_2d else (b, s), np.int32)
    prefix = np.zeros((b, s), bool)
    seg = np.zeros((b, s), np.int32)
    for i, row in enumerate(rows):
        p, pre = sample_layout(row, ids, position_encoding_2d)
        n = len(row)
        sl = slice(0, n) if padding == "right" else slice(s - n, s)
        tokens[i, sl] = row
        pos[i, ..., sl] = p
        prefix[i, sl] = pre
        seg[i, sl] = 1
    return {"tokens": tokens, "position_ids": pos, "prefix_mask": prefix, "segment_ids": seg}


def lengths_layout(prefix_lengths: Sequence[int], lengths: Sequence[int], seq_len: int
                   ) -> dict[str, np.ndarray]:
    """Compact layout straight from per-row context lengths and total lengths (right padding)."""
    ar = np.arange(seq_len)[None]
    pl, ln = np.asarray(prefix_lengths)[:, None], np.asarray(lengths)[:, None]
    if (pl > ln).any() or (ln > seq_len).any():
        raise InputError("need prefix_length <= length <= seq_len for every row")
    return {"prefix_mask": ar < pl, "segment_ids": (ar < ln).astype(np.int32)}


def dense_mask(prefix_mask: np.ndarray, segment_ids: np.ndarray | None = None) -> np.ndarray:
    """The [b, 1, s, s] bool mask (True = blocked) that the compact layout stands for."""
    prefix_mask = np.asarray(prefix_mask, bool)
    s = prefix_mask.shape[1]
    visible = np.tril(np.ones((s, s), bool))[None] | prefix_mask[:, None, :]
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        visible &= (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
    return ~visible[:, None]
