"""GLM-130B's pre-training objective: autoregressive blank infilling with [MASK], [sMASK] and
[gMASK], multi-task instruction samples, and GLM-130B's packing (paper section 2.2, Table 11).

Every sequence gets one corruption type:
  [gMASK] (gpt_prob = 70%): one sample fills the sequence; a prefix stays as context (Part A), the
    rest -- a Uniform[min_gmask_ratio, 1] fraction -- is generated after [sop] (Part B).
  [MASK] (the rest): windows of `window` tokens (GLM-130B: 512, four to a 2048 sequence), each with
    spans of Poisson(3) lengths totalling mask_prob = 15% of its tokens; each span becomes one [MASK]
    in Part A and `[sop] span` in Part B, spans shuffled; with smask_prob a window masks whole
    sentences with [sMASK] instead.
  instruction (multitask_ratio = 5%): windows of `input [gMASK] [sop] target`, packed like [MASK].
Part B tokens predict the next token and each span's last token predicts [eop]. Part A is
bidirectional, Part B causal; packed samples see only themselves (segment ids). Positions: 1-D as
GLM-130B (Part B tokens of a [MASK]/[sMASK] span take the mask token's position; [gMASK]
continues 0, 1, 2, ...), or ChatGLM's 2-D (positions as [MASK] for every kind, block positions
1, 2, ... inside each span).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from glmjax.errors import InputError


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Proportions of the objective; defaults are GLM-130B's (Table 11)."""

    seq_length: int = 2048
    gpt_prob: float = 0.7  # share of [gMASK] sequences among the blank-infilling ones
    mask_prob: float = 0.15  # share of a [MASK] window's tokens that are masked
    average_block_length: float = 3.0  # Poisson lambda of [MASK] span lengths
    min_gmask_ratio: float = 0.2  # smallest masked fraction of a [gMASK] sample
    smask_prob: float = 0.0  # share of [MASK] windows that mask whole sentences with [sMASK]
    multitask_ratio: float = 0.05  # share of sequences made of instruction samples
    window: int = 512  # [MASK] and instruction samples: window length (4 per 2048 sequence)
    position_encoding_2d: bool = False

    def __post_init__(self) -> None:
        for name in ("gpt_prob", "mask_prob", "min_gmask_ratio", "smask_prob", "multitask_ratio"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise InputError(f"objective: {name} must be in [0, 1], got {v}")
        if self.window < 8 or self.window > self.seq_length:
            raise InputError(f"objective: window must be in [8, seq_length={self.seq_length}], got {self.window}")
        if self.average_block_length <= 0:
            raise InputError(f"objective: average_block_length must be > 0, got {self.average_block_length}")

    @property
    def windows_per_sequence(self) -> int:
        return self.seq_length // self.window


@dataclasses.dataclass(frozen=True)
class Ids:
    mask: int
    gmask: int
    smask: int
    sop: int
    eop: int
    pad: int
    sentence_ends: tuple[int, ...] = ()


@dataclasses.dataclass
class Sample:
    """One GLM sample before packing (all arrays 1-D, same length)."""

    tokens: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    positions: np.ndarray
    block_positions: np.ndarray
    prefix: np.ndarray  # True on Part A
    kind: str
    masked: int = 0  # text tokens moved to Part B
    text: int = 0  # text tokens the sample consumed
    spans: tuple[int, ...] = ()


def _assemble(part_a: list[int], spans: list[tuple[int, list[int]]], mask_pos_gmask: bool, kind: str,
              ids: Ids, text: int) -> Sample:
    """Part A tokens + Part B spans (mask position, span tokens) -> one sample."""
    toks, tgts, loss, pos, block, pre = list(part_a), [ids.pad] * len(part_a), [0] * len(part_a), \
        list(range(len(part_a))), [0] * len(part_a), [True] * len(part_a)
    for mask_pos, span in spans:
        n = len(span)
        toks += [ids.sop] + span
        tgts += span + [ids.eop]
        loss += [1] * (n + 1)
        if mask_pos_gmask:  # [gMASK], 1-D: positions continue after Part A
            start = len(pos)
            pos += list(range(start, start + n + 1))
        else:
            pos += [mask_pos] * (n + 1)
        block += list(range(1, n + 2))
        pre += [False] * (n + 1)
    masked = sum(len(s) for _, s in spans)
    return Sample(np.array(toks, np.int32), np.array(tgts, np.int32), np.array(loss, np.int32),
                  np.array(pos, np.int32), np.array(block, np.int32), np.array(pre, bool), kind,
                  masked=masked, text=text, spans=tuple(len(s) for _, s in spans))


def gmask_sample(text: Sequence[int], cfg: ObjectiveConfig, ids: Ids, rng: np.random.Generator) -> Sample:
    """Keep a prefix, generate the rest: masked fraction ~ Uniform[min_gmask_ratio, 1]."""
    n = len(text)
    if n < 2:
        raise InputError("a [gMASK] sample needs at least 2 text tokens")
    k = int(round(rng.uniform(cfg.min_gmask_ratio, 1.0) * n))
    k = min(max(k, 1), n - 1)
    prefix = list(text[: n - k]) + [ids.gmask]
    sample = _assemble(prefix, [(len(prefix) - 1, list(text[n - k:]))], not cfg.position_encoding_2d,
                       "gmask", ids, n)
    return sample


def _span_lengths(n_mask: int, lam: float, rng: np.random.Generator) -> list[int]:
    """Poisson(lam) lengths (at least 1) until they cover n_mask tokens, the last one trimmed."""
    lengths: list[int] = []
    while sum(lengths) < n_mask:
        lengths.append(max(1, int(rng.poisson(lam))))
    lengths[-1] -= sum(lengths) - n_mask
    return [x for x in lengths if x > 0]


def mask_sample(text: Sequence[int], cfg: ObjectiveConfig, ids: Ids, rng: np.random.Generator) -> Sample:
    """[MASK] spans with Poisson lengths totalling mask_prob of the tokens, shuffled into Part B."""
    n = len(text)
    n_mask = min(max(1, int(round(cfg.mask_prob * n))), n - 1)
    lengths = _span_lengths(n_mask, cfg.average_block_length, rng)
    m, free = len(lengths), n - n_mask
    if free < m - 1:  # spans need a kept token between them
        lengths, m = [n_mask], 1
    # kept tokens before each span and after the last: a random composition, inner gaps >= 1
    slack = free - (m - 1)
    bars = np.sort(rng.choice(slack + m, size=m, replace=False))
    parts = np.diff(np.concatenate([[-1], bars, [slack + m]])) - 1
    gaps = parts[:m] + np.array([0] + [1] * (m - 1))
    spans, cursor = [], 0
    for g, length in zip(gaps, lengths):
        cursor += int(g)
        spans.append((cursor, length))
        cursor += length
    return _infill(text, spans, ids.mask, "mask", cfg, ids, rng)


def smask_sample(text: Sequence[int], cfg: ObjectiveConfig, ids: Ids, rng: np.random.Generator) -> Sample:
    """Whole sentences (ending in a sentence-end id) replaced by [sMASK] until mask_prob is reached."""
    ends = set(ids.sentence_ends)
    bounds, start = [], 0
    for i, t in enumerate(text):
        if t in ends:
            bounds.append((start, i + 1 - start))
            start = i + 1
    if start < len(text):
        bounds.append((start, len(text) - start))
    if len(bounds) < 2:
        return mask_sample(text, cfg, ids, rng)
    order = rng.permutation(len(bounds))
    chosen, total = [], 0
    for j in order:
        if total >= cfg.mask_prob * len(text) or len(chosen) == len(bounds) - 1:
            break
        chosen.append(bounds[j])
        total += bounds[j][1]
    return _infill(text, sorted(chosen), ids.smask, "smask", cfg, ids, rng)


def _infill(text: Sequence[int], spans: list[tuple[int, int]], mask_id: int, kind: str, cfg: ObjectiveConfig,
            ids: Ids, rng: np.random.Generator) -> Sample:
    part_a, where = [], []
    cursor = 0
    for start, length in spans:
        part_a += list(text[cursor:start])
        where.append((len(part_a), list(text[start:start + length])))
        part_a.append(mask_id)
        cursor = start + length
    part_a += list(text[cursor:])
    order = rng.permutation(len(where))
    return _assemble(part_a, [where[k] for k in order], False, kind, ids, len(text))


def instruction_sample(inp: Sequence[int], target: Sequence[int], window: int, ids: Ids,
                       cfg: ObjectiveConfig) -> Sample:
    """`input [gMASK] [sop] target [eop]`, the input cut from the left to fit the window."""
    target = list(target)[: window // 2]
    room = window - len(target) - 2
    prefix = list(inp)[-room:] if room > 0 else []
    return _assemble(prefix + [ids.gmask], [(len(prefix), target)], not cfg.position_encoding_2d,
                     "instruction", ids, len(prefix) + len(target))


# --- packing ----------------------------------------------------------------------------------
def pack(samples: Sequence[Sample], cfg: ObjectiveConfig, ids: Ids) -> dict[str, np.ndarray]:
    """Samples side by side in one sequence (segment ids 1, 2, ...), padded to seq_length.

    Positions restart in each sample; the compact layout is prefix_mask (Part A) + segment_ids.
    """
    L = cfg.seq_length
    out = {"tokens": np.full(L, ids.pad, np.int32), "targets": np.full(L, ids.pad, np.int32),
           "loss_mask": np.zeros(L, np.int32), "prefix_mask": np.zeros(L, bool),
           "segment_ids": np.zeros(L, np.int32),
           "position_ids": np.zeros((2, L) if cfg.position_encoding_2d else L, np.int32)}
    cursor = 0
    for seg, s in enumerate(samples, 1):
        n = len(s.tokens)
        if cursor + n > L:
            raise InputError(f"packed samples need {cursor + n} tokens, the sequence has {L}")
        sl = slice(cursor, cursor + n)
        out["tokens"][sl], out["targets"][sl], out["loss_mask"][sl] = s.tokens, s.targets, s.loss_mask
        out["prefix_mask"][sl], out["segment_ids"][sl] = s.prefix, seg
        if cfg.position_encoding_2d:
            out["position_ids"][0, sl], out["position_ids"][1, sl] = s.positions, s.block_positions
        else:
            out["position_ids"][sl] = s.positions
        cursor += n
    return out


class TokenStream:
    """Documents as one stream of token ids (each ended by `sep`), taken n tokens at a time.

    The position is (document index, offset): small, and enough to resume exactly.
    """

    def __init__(self, documents: Sequence[Sequence[int]], sep: int, doc: int = 0, offset: int = 0):
        if not documents:
            raise InputError("the token stream has no documents")
        self.documents, self.sep, self.doc, self.offset = documents, sep, doc, offset

    def take(self, n: int) -> list[int]:
        """The next n ids; only the part of a document taken is converted (documents can be long)."""
        out: list[int] = []
        while len(out) < n:
            d = self.documents[self.doc % len(self.documents)]
            size = len(d) + 1  # + sep
            if self.offset >= size:
                self.doc, self.offset = self.doc + 1, 0
                continue
            stop = min(self.offset + n - len(out), size)
            piece = d[self.offset:min(stop, len(d))]
            out += piece.tolist() if isinstance(piece, np.ndarray) else list(piece)
            if stop == size:
                out.append(self.sep)
            self.offset = stop
            if self.offset >= size:
                self.doc, self.offset = self.doc + 1, 0
        return out

    def state(self) -> tuple[int, int]:
        return self.doc, self.offset


def mask_text_length(cfg: ObjectiveConfig) -> int:
    """Text tokens per [MASK] window: each span adds a [MASK] and a [sop], so leave room for four
    standard deviations more spans than expected (a retry shortens the rare sample that overflows;
    retrying often would bias span lengths upward)."""
    spans_per_token = cfg.mask_prob / max(cfg.average_block_length, 1.0)
    n = cfg.window
    while n > 1:
        mu = spans_per_token * n
        if n + 2 * (mu + 4 * mu ** 0.5 + 1) <= cfg.window:
            return n
        n -= 1
    return 1


def _windowed(make, text_len: int, window: int, stream: TokenStream, rng: np.random.Generator) -> Sample:
    """A sample of at most `window` tokens: fewer text tokens when the spans added too many."""
    n = text_len
    while True:
        state = stream.state()
        sample = make(stream.take(n), rng)
        if len(sample.tokens) <= window:
            return sample
        stream.doc, stream.offset = state
        n -= len(sample.tokens) - window


def make_sequence(stream: TokenStream, cfg: ObjectiveConfig, ids: Ids, rng: np.random.Generator,
                  instructions: Sequence[tuple[Sequence[int], Sequence[int]]] = (),
                  instruction_cursor: list[int] | None = None) -> tuple[dict[str, np.ndarray], list[Sample]]:
    """One training sequence: [gMASK], packed [MASK]/[sMASK] windows, or packed instruction samples."""
    w, k = cfg.window, cfg.windows_per_sequence
    if instructions and rng.random() < cfg.multitask_ratio:
        cursor = instruction_cursor if instruction_cursor is not None else [0]
        samples = []
        for _ in range(k):
            inp, tgt = instructions[cursor[0] % len(instructions)]
            cursor[0] += 1
            samples.append(instruction_sample(inp, tgt, w, ids, cfg))
    elif rng.random() < cfg.gpt_prob:
        samples = [gmask_sample(stream.take(cfg.seq_length - 2), cfg, ids, rng)]
    else:
        text_len = mask_text_length(cfg)
        samples = []
        for _ in range(k):
            use_s = ids.sentence_ends and rng.random() < cfg.smask_prob
            make = (lambda t, r: smask_sample(t, cfg, ids, r)) if use_s else (lambda t, r: mask_sample(t, cfg, ids, r))
            samples.append(_windowed(make, text_len, w, stream, rng))
    return pack(samples, cfg, ids), samples
