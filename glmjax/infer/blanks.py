"""Text in, text out: GLM-130B's blank filling over the KV-cache generator.

fill_blanks (GLM-130B generate.py): a prompt without a mask token gets [gMASK] at its end. The
mask kind used is [MASK] if the prompt has one, else [sMASK], else [gMASK]; its first occurrence
is filled by generating after `prompt + [sop]` (positions of [sop] and the generated tokens set
per the layout rules), the generated span up to the first end token replaces the mask, and the
next mask of that kind is filled from the spliced text, until none is left. Prompts of a batch are
filled together, one blank per round. With beam search the next blank continues from the best
hypothesis, and the other hypotheses of the last blank are returned too (both as GLM-130B).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import numpy as np

from glmjax.data.tokenizer import GLMTokenizer
from glmjax.errors import InputError
from glmjax.infer.decode import GenerateConfig, Generator, prepare, trim
from glmjax.model.layouts import SpecialIds


def special_ids(tok: GLMTokenizer) -> SpecialIds:
    return SpecialIds(mask=tok["MASK"], gmask=tok["gMASK"], smask=tok["sMASK"], sop=tok["sop"], pad=tok.pad_id)


def end_tokens(tok: GLMTokenizer) -> tuple[int, ...]:
    """GLM-130B stops at [eop] or the end of text."""
    return tuple(dict.fromkeys((tok["eop"], tok.eos_id)))


def encode_prompt(tok: GLMTokenizer, text: str) -> list[int]:
    """Ids of a prompt: [gMASK] appended when it has no mask token, eos when it does not end in one
    (as GLM-130B's generate.py). One clear error for bad input."""
    if not text.strip():
        raise InputError("empty prompt")
    # "The [MASK] is" -> ids of "The", [MASK], "is": spaces around a blank belong to it, as in the
    # training samples (made from token ids), not stray whitespace pieces
    ids = tok.encode(re.sub(r" *(\[[sg]?MASK\]) *", r"\1", text))
    specials = set(tok.special_ids.values())
    masks = {tok["MASK"], tok["sMASK"], tok["gMASK"]}
    stray = [tok.special_names[i] for i in ids if i in specials and i not in masks]
    if stray:
        raise InputError(f"prompt holds the special token [{stray[0]}]; only [MASK], [sMASK] and [gMASK] may appear")
    unknown = [t for t in _bracketed(text) if t not in tok.special_ids]
    if unknown:
        raise InputError(f"unknown special token [{unknown[0]}] in the prompt (known: [MASK], [sMASK], [gMASK])")
    if not masks & set(ids):
        ids.append(tok["gMASK"])
    if ids[-1] not in masks:  # GLM-130B's generate.py: text after the last blank ends with eos
        ids.append(tok.eos_id)
    return ids


def _bracketed(text: str) -> list[str]:
    return re.findall(r"\[([A-Za-z][A-Za-z0-9_]*MASK[A-Za-z0-9_]*)\]", text)


@dataclasses.dataclass
class Filled:
    prompt: str
    text: str  # the prompt with every blank filled
    blanks: list[str]  # what went into each blank, in order
    beams: list[str] = dataclasses.field(default_factory=list)  # beam search: the text with the last
    # blank filled by each hypothesis, best first (GLM-130B's --print-all-beams)


def fill_blanks(gen: Generator, tok: GLMTokenizer, prompts: Sequence[str], gc: GenerateConfig,
                on_token: Callable[[int, str], None] | None = None) -> list[Filled]:
    """Fill every blank of every prompt (see the module docstring). on_token(row, text) streams the
    text of each blank as it is generated (interactive mode)."""
    ids = special_ids(tok)
    ends = gc.end_tokens or end_tokens(tok)
    # special tokens other than the end tokens never appear inside a blank
    banned = tuple(sorted(set(gc.invalid_ids) | {i for i in tok.special_ids.values() if i not in ends}))
    gc = dataclasses.replace(gc, end_tokens=ends, invalid_ids=banned)
    seqs = [encode_prompt(tok, p) for p in prompts]
    kinds = [_kind(s, ids) for s in seqs]
    blanks: list[list[str]] = [[] for _ in prompts]
    beams: list[list[list[int]]] = [[] for _ in prompts]
    while True:
        todo = [i for i, s in enumerate(seqs) if kinds[i] in s]
        if not todo:
            break
        rows = [seqs[i] + [ids.sop] for i in todo]
        prep = prepare(rows, ids, gen.cfg, gc.max_new_tokens, gen.batch_multiple, gc.no_repeat_ngram)
        stream = None
        if on_token is not None:
            stream = _Streamer(tok, todo, on_token, gc.end_tokens)
        out = gen.generate(prep, gc, stream=stream)
        for row, i in enumerate(todo):
            at = seqs[i].index(kinds[i])
            head, tail = seqs[i][:at], seqs[i][at + 1:]
            if "beams" in out:  # the next blank continues from the best, as GLM-130B does
                beams[i] = [head + b + tail for b in trim(out["beams"][row], gc.end_tokens)]
            span = trim(out["tokens"][row:row + 1], gc.end_tokens)[0]
            seqs[i] = head + span + tail
            blanks[i].append(tok.decode(span))
    text = lambda seq: tok.decode(seq[:-1] if seq and seq[-1] == tok.eos_id else seq)  # noqa: E731
    return [Filled(p, text(s), b, [text(x) for x in bs]) for p, s, b, bs in zip(prompts, seqs, blanks, beams)]


def _kind(seq: Sequence[int], ids: SpecialIds) -> int:
    for k in (ids.mask, ids.smask, ids.gmask):
        if k in seq:
            return k
    return ids.gmask


class _Streamer:
    """Host side of the decode loop's per-token callback: text of each row's blank as it grows."""

    def __init__(self, tok: GLMTokenizer, rows: Sequence[int], emit: Callable[[int, str], None],
                 end: Sequence[int]):
        self.tok, self.rows, self.emit, self.end = tok, list(rows), emit, set(end)
        self.ids: list[list[int]] = [[] for _ in rows]
        self.shown = ["" for _ in rows]
        self.closed = [False] * len(rows)

    def __call__(self, tokens: np.ndarray) -> None:
        for r in range(len(self.rows)):
            x = int(tokens[r])
            if self.closed[r] or x < 0 or x in self.end:
                self.closed[r] = True
                continue
            self.ids[r].append(x)
            text = self.tok.decode(self.ids[r])
            if text.startswith(self.shown[r]) and len(text) > len(self.shown[r]):
                self.emit(self.rows[r], text[len(self.shown[r]):])
                self.shown[r] = text
