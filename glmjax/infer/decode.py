"""Cached generation: prefill the prompt into a preallocated KV cache, then decode in one compiled loop.

Prompts are left-padded into a bucketed length P (so a handful of shapes compile, not one per
prompt) and end in [sop]; the cache holds P + max_new_tokens slots per row and is sharded like the
attention heads. Prefill attends bidirectionally over each prompt's context and causally from [sop]
(GLM-130B's layout); every later step feeds one token per row at slot P + t. Greedy, sampling and
beam search all run inside one `lax.while_loop` per call and stop early once every row is done.

For evaluation and research the same cache is public: `Generator.prefill` runs a prompt into it,
`Generator.step` feeds one forced token per row, and `Generator.score` gives the log-likelihood of
given continuations, teacher-forced through the cache in one compiled program per bucket.

Strategy semantics follow GLM-130B's generation/strategies.py:
  * logits in float32; invalid ids and, before min_gen_length, the end tokens set to -65504;
  * sampling: temperature, then top-k, then top-p keeping the first token above the threshold,
    per row (GLM-130B's top-p only works for batch 1);
  * beam search: log-softmax plus the beam score, candidates (max(1, #end) + 1) x beams picked by
    top-k (deterministic) or sampled without replacement; candidates sorted by score and walked in
    order: an end token closes a hypothesis scored score / ((5 + len) / 6)^lp (len counting the
    context), another token joins the live beams, and the walk stops at the first non-end token
    that finds all beams filled (end tokens between the beams-th and that one still close); a row
    is done when beams hypotheses are closed and the worst beats the best live beam's bound; at the
    end the live beams join the hypotheses (GLM-130B's `finalize(consider_end=True)` meant to add
    every live beam; its loop bound adds only the first batch_size of them);
  * no-repeat-ngram: a token that would repeat an n-gram this sequence generated before is banned
    (GLM-130B keeps the same bans in per-beam dictionaries).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from glmjax.config import GLMConfig
from glmjax.errors import InputError
from glmjax.model.api import abstract_params, data_parallelism, pad_rows, param_shardings
from glmjax.model.glm import GLM
from glmjax.model.layouts import SpecialIds, batch_layout
from glmjax.parallel import distributed, rules

NEG = -65504.0  # GLM-130B's fill for banned logits (the float16 minimum)
STRATEGIES = ("greedy", "sample", "beam")
CONTINUATION_BUCKET = 8  # score(): continuations are padded to a power of two from 8 tokens
_PREFILL_INPUTS = ("tokens", "position_ids", "prefix_mask", "segment_ids", "gen_pos_base", "gen_pos_step")


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """How to pick tokens. end_tokens: [eop, eos] for GLM-130B; invalid_ids are never generated."""

    strategy: str = "greedy"
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    num_beams: int = 4
    length_penalty: float = 1.0
    no_repeat_ngram: int = 0
    min_gen_length: int = 0
    deterministic: bool = True  # beam: top-k candidates; False: sampled, as GLM-130B's generate.py
    end_tokens: tuple[int, ...] = ()
    invalid_ids: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise InputError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        for name in ("temperature", "top_p", "length_penalty"):  # nan or inf would slip past the range checks
            value = getattr(self, name)
            try:
                finite = math.isfinite(value)
            except TypeError:
                finite = False
            if not finite:
                raise InputError(f"{name} must be a finite number, got {value!r}")
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise InputError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0 or not 0.0 <= self.top_p <= 1.0:
            raise InputError(f"need top_k >= 0 and 0 <= top_p <= 1, got top_k={self.top_k} top_p={self.top_p}")
        if self.num_beams < 1 or self.no_repeat_ngram < 0 or self.min_gen_length < 0:
            raise InputError("num_beams must be >= 1; no_repeat_ngram and min_gen_length >= 0")


def bucket(n: int, smallest: int = 16) -> int:
    """The compiled length for n: the next power of two from `smallest`."""
    return max(smallest, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


@dataclasses.dataclass
class Prepared:
    """A padded batch ready for `Generator`: arrays for the device plus what the host needs back."""

    arrays: dict[str, np.ndarray]
    rows: int  # real rows (the rest are padding rows)
    context_lengths: np.ndarray  # [b] prompt tokens incl. [sop]


def prepare(prompts: Sequence[Sequence[int]], ids: SpecialIds, cfg: GLMConfig, max_new_tokens: int,
            batch_multiple: int = 1, no_repeat_ngram: int = 0) -> Prepared:
    """Left-pad prompts (each already holding a mask token and ending in [sop]) into buckets."""
    if not prompts:
        raise InputError("no prompts to generate from")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_sequence_length:
        raise InputError(f"a prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds the model's "
                         f"context of {cfg.max_sequence_length}")
    p_len = min(bucket(longest), cfg.max_sequence_length - max_new_tokens)
    b = len(prompts)
    b_pad = bucket(b, 1)
    b_pad = -(-b_pad // batch_multiple) * batch_multiple
    rows = [list(p) for p in prompts] + [list(prompts[0])] * (b_pad - b)
    lay = batch_layout(rows, ids, seq_len=p_len, position_encoding_2d=cfg.position_encoding_2d, padding="left")
    for r in rows:
        if r[-1] != ids.sop:
            raise InputError("every prompt must end in [sop]")
    # positions of generated token t (fed at slot P + t): base + step * (t + 1)
    pos = lay["position_ids"]
    base = pos[..., -1]
    if cfg.position_encoding_2d:
        step = np.broadcast_to(np.array([0, 1], np.int32), base.shape)
    else:
        step = np.array([1 if _is_gmask(r, ids) else 0 for r in rows], np.int32)
    n = max(no_repeat_ngram - 1, 1)
    tail = np.array([([ids.pad] * n + r)[-n:] for r in rows], np.int32)  # context tail for n-gram bans
    ctx = np.array([len(r) for r in rows], np.int32)
    arrays = dict(lay, gen_pos_base=base.astype(np.int32), gen_pos_step=step.astype(np.int32),
                  context_tail=tail, context_lengths=ctx)
    return Prepared(arrays, b, ctx[:b])


def _is_gmask(row: Sequence[int], ids: SpecialIds) -> bool:
    """GLM-130B's choice: [MASK] if present, else [sMASK], else [gMASK] sets the generated positions."""
    return ids.mask not in row and ids.smask not in row


# --- token choice ------------------------------------------------------------------------------------
def _mask_logits(logits: jax.Array, gc: GenerateConfig, t: jax.Array, vocab_limit: int,
                 history: jax.Array, tail: jax.Array, ctx_len: jax.Array) -> jax.Array:
    """Invalid ids, end tokens before min_gen_length and n-gram repeats -> -65504. [n, V] float32."""
    n, v = logits.shape
    ids = jnp.arange(v)
    bad = ids >= vocab_limit
    for i in gc.invalid_ids:
        bad = bad | (ids == i)
    logits = jnp.where(bad[None], NEG, logits)
    if gc.min_gen_length and gc.end_tokens:
        is_end = jnp.isin(ids, jnp.asarray(gc.end_tokens))
        logits = jnp.where(is_end[None] & (t < gc.min_gen_length), NEG, logits)
    if gc.no_repeat_ngram:
        logits = jnp.where(_ngram_bans(history, tail, t, gc.no_repeat_ngram, v, ctx_len), NEG, logits)
    return logits


def _ngram_bans(history: jax.Array, tail: jax.Array, t: jax.Array, n: int, v: int, ctx_len: jax.Array) -> jax.Array:
    """[rows, V] bool: tokens that would complete an n-gram generated earlier in the row.

    history [rows, T] generated tokens (valid before t); tail [rows, n-1] the context's last tokens,
    so n-grams that start in the context count, as in GLM-130B.
    """
    rows, steps = history.shape
    if n == 1:  # every generated token is banned once
        seen = jnp.arange(steps)[None] < t
        return jnp.zeros((rows, v), bool).at[jnp.arange(rows)[:, None], history].max(seen)
    ext = jnp.concatenate([tail[:, -(n - 1):], history], 1)  # [rows, n-1+T]
    windows = jnp.stack([ext[:, i:i + steps] for i in range(n - 1)], -1)  # [rows, T, n-1]: before token j
    nxt = ext[:, n - 1:n - 1 + steps]
    cur = jax.lax.dynamic_slice_in_dim(ext, t, n - 1, 1)  # the last n-1 tokens now
    match = (windows == cur[:, None, :]).all(-1) & (jnp.arange(steps)[None] < t)
    match = match & (ctx_len[:, None] + t > n)  # GLM-130B bans only once the sequence is longer than n
    return jnp.zeros((rows, v), bool).at[jnp.arange(rows)[:, None], nxt].max(match)


def filter_top_k_top_p(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """SAT's top_k_logits, batched: keep the k best, then the smallest set whose probability reaches
    top_p (the first token above the threshold kept); the rest -> -inf."""
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p > 0.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, -1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, -1), -1)
        remove = jnp.concatenate([jnp.zeros_like(cum[:, :1], bool), cum[:, :-1] > top_p], -1)
        remove_orig = jnp.zeros_like(remove).at[jnp.arange(logits.shape[0])[:, None], order].set(remove)
        logits = jnp.where(remove_orig, -jnp.inf, logits)
    return logits


# --- public decoding state ---------------------------------------------------------------------------
@functools.partial(jax.tree_util.register_dataclass, data_fields=["logits", "cache", "valid", "positions"],
                   meta_fields=["prompt_len", "fed", "rows"])
@dataclasses.dataclass(frozen=True)
class Decoding:
    """A cached decode in progress (`Generator.prefill`, `Generator.step`); device arrays over all
    n rows of the compiled batch, the real ones first (`logits[:rows]`)."""

    logits: jax.Array  # [n, V] float32: next-token logits after the last token fed
    cache: tuple[jax.Array, jax.Array]  # keys, values [layers, n, slots, heads, head_dim]
    valid: jax.Array  # [n, slots] bool: the slots that hold a token of the row
    positions: tuple[jax.Array, jax.Array]  # (base, step): fed token t has position base + step * (t + 1)
    prompt_len: int  # P, the prompt bucket: fed token t sits in slot P + t
    fed: int  # tokens fed after the prompt so far
    rows: int  # real rows

    @property
    def room(self) -> int:
        """How many more tokens `step` can feed before the cache is full."""
        return self.valid.shape[1] - self.prompt_len - self.fed


@dataclasses.dataclass(frozen=True)
class Scores:
    """`Generator.score`: float32 log-likelihoods of continuations, real rows only (numpy)."""

    token_logprobs: np.ndarray  # [rows, T]: log p(c_j | prompt, c_<j); 0 past each continuation's end
    logprobs: np.ndarray  # [rows]: their sums, the continuation's log-likelihood
    lengths: np.ndarray  # [rows]: tokens per continuation


# --- the generator ----------------------------------------------------------------------------------
class Generator:
    """Compiled generation, forced decoding and scoring for one model on one mesh; programs cached
    per (batch, prompt) bucket. Any prepared batch runs: rows are padded to data * fsdp here."""

    def __init__(self, cfg: GLMConfig, params: Any, mesh: Mesh, vocab_limit: int | None = None):
        self.cfg, self.params, self.mesh = cfg, params, mesh
        self.model = GLM(cfg)
        self.vocab_limit = vocab_limit or cfg.vocab_size
        self.p_shard = param_shardings(cfg, mesh)
        self._compiled: dict[tuple, Any] = {}
        self._sink = None  # host callback of the streaming loop: tokens [b] of each step

    @property
    def batch_multiple(self) -> int:
        """Rows of a compiled batch are a multiple of this (the mesh's data * fsdp)."""
        return data_parallelism(self.mesh)

    @property
    def programs(self) -> dict[str, int]:
        """Compiled XLA programs so far per entry point ('generate', 'prefill', 'step', 'score')."""
        out: dict[str, int] = {}
        for key, fn in self._compiled.items():
            out[key[0]] = out.get(key[0], 0) + fn._cache_size()
        return out

    # one forward over new tokens written at `index` of the cache: logits at every new token
    def _forward(self, params, tokens, positions, blocked, cache, index):
        with nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
            logits, per_layer = self.model.apply({"params": params}, tokens, positions, attention_mask=blocked,
                                                 cache=cache, cache_index=index)
        return logits, per_layer["kv"]

    def _cache_sharding(self):
        return rules.named(self.mesh, "layers", "batch", "length", "heads", "kv")

    def _batch_sharding(self, arrays: dict) -> dict:
        return {k: rules.named(self.mesh, "batch", *((None,) * (np.ndim(v) - 1))) for k, v in arrays.items()}

    def _on_mesh(self, arrays: dict) -> dict:
        """Host arrays (the same on every process) placed as global arrays over the batch axes."""
        return jax.device_put(arrays, self._batch_sharding(arrays))

    def _padded(self, prepared: Prepared) -> dict[str, np.ndarray]:
        """The prepared arrays with rows padded (copies of row 0) to the mesh's data parallelism."""
        return pad_rows(prepared.arrays, self.batch_multiple)[0]

    def _prefill(self, params, a, cache_len: int, copies: int):
        cfg = self.cfg
        b, p = a["tokens"].shape
        dt = jnp.dtype(cfg.dtype)
        shape = (cfg.num_layers, b, cache_len, cfg.num_attention_heads, cfg.head_dim)
        cache_shard = self._cache_sharding()
        zeros = jax.lax.with_sharding_constraint(jnp.zeros(shape, dt), cache_shard)
        pad = cache_len - p
        valid = jnp.pad(a["segment_ids"] != 0, ((0, 0), (0, pad)))
        prefix = jnp.pad(a["prefix_mask"], ((0, 0), (0, pad)))
        kj, qi = jnp.arange(cache_len), jnp.arange(p)
        visible = valid[:, None, :] & ((kj[None, None, :] <= qi[None, :, None]) | prefix[:, None, :])
        logits, cache = self._forward(params, a["tokens"], a["position_ids"], ~visible[:, None], (zeros, zeros), 0)
        logits = logits[:, -1]
        if copies > 1:  # beams: every beam starts from its row's prompt
            cache = jax.tree.map(lambda c: jnp.repeat(c, copies, axis=1), cache)
            valid, logits = jnp.repeat(valid, copies, 0), jnp.repeat(logits, copies, 0)
        cache = jax.tree.map(lambda c: jax.lax.with_sharding_constraint(c, cache_shard), cache)
        return logits, cache, valid

    def _extend(self, params, tokens, t, p, base, step, cache, valid):
        """Feed tokens [n, q] as generated tokens t .. t+q-1 at slots p+t ..., each seeing the valid
        slots up to its own; logits after each token [n, q, V]."""
        n, q = tokens.shape
        idx = p + t
        valid = jax.lax.dynamic_update_slice_in_dim(valid, jnp.ones((n, q), bool), idx, 1)
        upto = jnp.arange(valid.shape[1])[None, :] <= idx + jnp.arange(q)[:, None]  # [q, slots]
        visible = valid[:, None, :] & upto[None]
        pos = base[..., None] + step[..., None] * (t + 1 + jnp.arange(q))  # [n, q] or [n, 2, q]
        logits, cache = self._forward(params, tokens, pos, ~visible[:, None], cache, idx)
        return logits, cache, valid

    def _step(self, params, tok, t, p, base, step, cache, valid):
        """Feed tok [n] as generated token t at slot p + t; next logits [n, V]."""
        logits, cache, valid = self._extend(params, tok[:, None], t, p, base, step, cache, valid)
        return logits[:, 0], cache, valid

    def _emit(self, tokens) -> None:
        if self._sink is not None:
            self._sink(np.asarray(tokens))

    def _sample_loop(self, params, a, gc: GenerateConfig, stream: bool = False, key_data=None):
        b, p = a["tokens"].shape
        logits, cache, valid = self._prefill(params, a, p + gc.max_new_tokens, 1)
        ends = jnp.asarray(gc.end_tokens or (-1,))
        key = jax.random.key(gc.seed) if key_data is None else jax.random.wrap_key_data(key_data)
        row_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(b))

        def body(state):
            t, logits, cache, valid, out, done = state
            lg = _mask_logits(logits.astype(jnp.float32), gc, t, self.vocab_limit, out, a["context_tail"],
                              a["context_lengths"])
            if gc.strategy == "greedy":
                tok = jnp.argmax(lg, -1)
            else:
                lg = filter_top_k_top_p(lg / gc.temperature, gc.top_k, gc.top_p)
                keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(row_keys)
                tok = jax.vmap(jax.random.categorical)(keys, lg)
            tok = jnp.where(done, -1, tok).astype(jnp.int32)  # finished rows emit -1, as GLM-130B
            if stream:
                jax.debug.callback(self._emit, tok)  # unordered: fine on any mesh; steps are sequential
            out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], t, 1)
            done = done | jnp.isin(tok, ends)
            logits, cache, valid = self._step(params, jnp.maximum(tok, 0), t, p, a["gen_pos_base"],
                                              a["gen_pos_step"], cache, valid)
            return t + 1, logits, cache, valid, out, done

        def cond(state):
            return (state[0] < gc.max_new_tokens) & ~state[-1].all()

        out = jnp.full((b, gc.max_new_tokens), -1, jnp.int32)
        state = (jnp.int32(0), logits, cache, valid, out, jnp.zeros((b,), bool))
        t, _, _, _, out, _ = jax.lax.while_loop(cond, body, state)
        return {"tokens": out, "steps": t}

    def _beam_loop(self, params, a, gc: GenerateConfig, stream: bool = False,  # beams change: no stream
                   key_data=None):
        b, p = a["tokens"].shape
        k, steps = gc.num_beams, gc.max_new_tokens
        n = b * k
        logits, cache, valid = self._prefill(params, a, p + steps, k)
        ends = jnp.asarray(gc.end_tokens or (-1,))
        n_cand = (max(1, len(gc.end_tokens)) + 1) * k
        lp = gc.length_penalty
        ctx = a["context_lengths"]  # [b]
        tail = jnp.repeat(a["context_tail"], k, 0)
        base, step_ = jnp.repeat(a["gen_pos_base"], k, 0), jnp.repeat(a["gen_pos_step"], k, 0)
        key = jax.random.key(gc.seed) if key_data is None else jax.random.wrap_key_data(key_data)

        def penalty(length):
            return ((5.0 + length) / 6.0) ** lp

        def insert(fin_tok, fin_score, fin_len, new_tok, new_score, new_len, new_ok):
            """Merge closed hypotheses into the best-k list; equal scores: newer first (GLM-130B)."""
            c = new_score.shape[1]
            scores = jnp.concatenate([jnp.where(new_ok, new_score, -jnp.inf), fin_score], 1)
            prio = jnp.concatenate([jnp.broadcast_to(c - 1 - jnp.arange(c), new_score.shape),
                                    jnp.broadcast_to(c + jnp.arange(k), fin_score.shape)], 1)
            order = jnp.lexsort((prio, -scores), axis=-1)[:, :k]
            take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), 1)  # noqa: E731
            return (take(jnp.concatenate([new_tok, fin_tok], 1)), take(scores),
                    take(jnp.concatenate([new_len, fin_len], 1)))

        def body(state):
            (t, logits, cache, valid, gen, scores, fin_tok, fin_score, fin_len, done) = state
            lg = _mask_logits(logits.astype(jnp.float32), gc, t, self.vocab_limit, gen.reshape(n, steps), tail,
                              jnp.repeat(ctx, k))
            v = lg.shape[-1]
            cand = (jax.nn.log_softmax(lg, -1).reshape(b, k, v) + scores[:, :, None])
            cand = jnp.where((t == 0) & (jnp.arange(k)[None, :, None] > 0), -jnp.inf, cand).reshape(b, k * v)
            if gc.deterministic:
                _, idx = jax.lax.top_k(cand, n_cand)
            else:
                g = jax.random.gumbel(jax.random.fold_in(key, t), cand.shape)
                _, idx = jax.lax.top_k(cand + g, n_cand)  # sampling without replacement, p ~ softmax
            cs = jnp.take_along_axis(cand, idx, 1)
            order = jnp.argsort(-cs, axis=1, stable=True)
            idx, cs = jnp.take_along_axis(idx, order, 1), jnp.take_along_axis(cs, order, 1)
            parent, tok = idx // v, (idx % v).astype(jnp.int32)
            is_end = jnp.isin(tok, ends) & ~done[:, None]
            live_rank = jnp.cumsum(~is_end, 1) - 1
            live = ~is_end & (live_rank < k)
            # GLM-130B walks the sorted candidates and stops at the first live one that finds all k
            # beams filled: end candidates before that one close hypotheses, those after it do not
            stop = ~is_end & (live_rank == k)
            cutoff = jnp.where(stop.any(1), jnp.argmax(stop, 1), n_cand)
            end_ok = is_end & (jnp.arange(n_cand)[None] < cutoff[:, None])
            parent_gen = jnp.take_along_axis(gen, parent[..., None], 1)  # [b, C, steps]
            cand_gen = jnp.where(jnp.arange(steps) == t, tok[..., None], parent_gen)
            new_len = jnp.broadcast_to((ctx + t + 1)[:, None], tok.shape)
            fin_tok, fin_score, fin_len = insert(fin_tok, fin_score, fin_len, cand_gen, cs / penalty(new_len),
                                                 new_len, end_ok)
            sel = jnp.argsort(jnp.where(live, live_rank, n_cand), axis=1)[:, :k]  # the k live ones, in order
            gen = jnp.take_along_axis(cand_gen, sel[..., None], 1)
            scores = jnp.take_along_axis(cs, sel, 1)
            rows = (jnp.arange(b)[:, None] * k + jnp.take_along_axis(parent, sel, 1)).reshape(n)
            cache = jax.tree.map(lambda c: jnp.take(c, rows, axis=1), cache)
            valid = jnp.take(valid, rows, axis=0)
            full = jnp.isfinite(fin_score).all(1)
            bound = scores.max(1) / penalty(ctx + t + 1)
            done = done | (full & (fin_score[:, -1] >= bound))
            tok_now = jnp.take_along_axis(tok, sel, 1).reshape(n)
            logits, cache, valid = self._step(params, tok_now, t, p, base, step_, cache, valid)
            return (t + 1, logits, cache, valid, gen, scores, fin_tok, fin_score, fin_len, done)

        def cond(state):
            return (state[0] < steps) & ~state[-1].all()

        state = (jnp.int32(0), logits, cache, valid, jnp.full((b, k, steps), -1, jnp.int32),
                 jnp.zeros((b, k), jnp.float32), jnp.full((b, k, steps), -1, jnp.int32),
                 jnp.full((b, k), -jnp.inf, jnp.float32), jnp.zeros((b, k), jnp.int32), jnp.zeros((b,), bool))
        t, _, _, _, gen, scores, fin_tok, fin_score, fin_len, done = jax.lax.while_loop(cond, body, state)
        # finalize: rows still open add their live beams (length = context + t generated)
        live_len = jnp.broadcast_to((ctx + t)[:, None], scores.shape)
        gen_masked = jnp.where(jnp.arange(steps) < t, gen, -1)
        fin_tok, fin_score, fin_len = insert(fin_tok, fin_score, fin_len, gen_masked, scores / penalty(live_len),
                                             live_len, jnp.broadcast_to(~done[:, None], scores.shape))
        return {"tokens": fin_tok[:, 0], "beams": fin_tok, "beam_scores": fin_score,
                "beam_lengths": fin_len - ctx[:, None], "steps": t}

    def generate(self, prepared: Prepared, gc: GenerateConfig, stream=None) -> dict[str, np.ndarray]:
        """Run the compiled loop; returns numpy 'tokens' [rows, max_new] (-1 after the end) and, for
        beam search, every hypothesis with its penalised score. stream(tokens [b]) is called from
        inside the loop with each step's tokens (greedy and sampling)."""
        a = self._padded(prepared)
        if a["context_tail"].shape[1] < gc.no_repeat_ngram - 1:
            raise InputError(f"no_repeat_ngram={gc.no_repeat_ngram} needs the batch prepared with "
                             f"prepare(..., no_repeat_ngram={gc.no_repeat_ngram})")
        program = self._generate_program(a, gc, stream is not None)
        self._sink = stream
        try:
            with jax.set_mesh(self.mesh):
                out = program(self.params, self._on_mesh(a), np.asarray(jax.random.key_data(jax.random.key(gc.seed))))
                jax.block_until_ready(out)
        finally:
            self._sink = None
        out = {k: distributed.to_host(v) for k, v in out.items()}
        rows = prepared.rows
        return {k: (v[:rows] if np.ndim(v) else v) for k, v in out.items()}

    def _generate_program(self, a: dict[str, np.ndarray], gc: GenerateConfig, stream: bool):
        """The jitted prefill + decode loop for padded arrays `a`, one per (batch, prompt, strategy);
        the seed is an argument of the program, not a constant in it: a new seed reuses the program."""
        b, p = a["tokens"].shape
        key = ("generate", b, p, dataclasses.replace(gc, seed=0), stream)
        if key not in self._compiled:
            loop = functools.partial(self._beam_loop if gc.strategy == "beam" else self._sample_loop, stream=stream)
            self._compiled[key] = jax.jit(lambda params, arrays, kd: loop(params, arrays, gc, key_data=kd),
                                          in_shardings=(self.p_shard, self._batch_sharding(a), None))
        return self._compiled[key]

    def lower_generate(self, prepared: Prepared, gc: GenerateConfig) -> jax.stages.Lowered:
        """The generation program for `prepared` lowered from shapes alone (parameters, batch and key
        abstract, with their shardings): what `glmjax plan --generate` compiles for a target."""
        a = self._padded(prepared)
        params = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                              nn.unbox(abstract_params(self.cfg)), self.p_shard)
        shard = self._batch_sharding(a)
        arrays = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shard[k]) for k, v in a.items()}
        key = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
        with jax.set_mesh(self.mesh):
            return self._generate_program(a, gc, False).lower(params, arrays, key)

    # --- scoring and forced decoding --------------------------------------------------------------
    def prefill(self, prepared: Prepared, steps: int) -> Decoding:
        """Run the prompts (ending in [sop]) into a KV cache with room for `steps` forced tokens;
        the Decoding holds the logits at [sop]. One program per (batch, prompt bucket, steps)."""
        if steps < 0:
            raise InputError(f"steps must be >= 0, got {steps}")
        a = {k: v for k, v in self._padded(prepared).items() if k in _PREFILL_INPUTS}
        b, p = a["tokens"].shape
        key = ("prefill", b, p, steps)
        if key not in self._compiled:
            def run(params, arrays):
                logits, cache, valid = self._prefill(params, arrays, p + steps, 1)
                return logits, cache, valid, (arrays["gen_pos_base"], arrays["gen_pos_step"])

            self._compiled[key] = jax.jit(run, in_shardings=(self.p_shard, self._batch_sharding(a)))
        with jax.set_mesh(self.mesh):
            logits, cache, valid, positions = self._compiled[key](self.params, self._on_mesh(a))
        return Decoding(logits, cache, valid, positions, prompt_len=p, fed=0, rows=prepared.rows)

    def step(self, decoding: Decoding, tokens: Sequence[int] | np.ndarray) -> Decoding:
        """Feed one forced token per row (real rows first; missing padding rows get 0) into a copy
        of the cache; the new Decoding holds the logits after it. One program per (batch, slots)."""
        n, slots = decoding.valid.shape
        tok = np.asarray(tokens, np.int32).reshape(-1)
        if not decoding.rows <= len(tok) <= n:
            raise InputError(f"step needs one token per row ({decoding.rows} to {n}), got {len(tok)}")
        _check_ids(tok, self.cfg.vocab_size)
        if decoding.room < 1:
            raise InputError(f"the cache is full: prefill made room for {decoding.fed} tokens")
        tok = np.concatenate([tok, np.zeros(n - len(tok), np.int32)])
        key = ("step", n, slots)
        if key not in self._compiled:
            batch, cache = rules.named(self.mesh, "batch"), self._cache_sharding()
            pos_shard = jax.tree.map(lambda x: rules.named(self.mesh, "batch", *((None,) * (x.ndim - 1))),
                                     decoding.positions)
            self._compiled[key] = jax.jit(
                lambda params, tok, t, p, pos, kv, valid: self._step(params, tok, t, p, *pos, kv, valid),
                in_shardings=(self.p_shard, batch, None, None, pos_shard, (cache, cache),
                              rules.named(self.mesh, "batch", None)))
        with jax.set_mesh(self.mesh):
            logits, cache, valid = self._compiled[key](self.params, tok, np.int32(decoding.fed),
                                                       np.int32(decoding.prompt_len), decoding.positions,
                                                       decoding.cache, decoding.valid)
        return dataclasses.replace(decoding, logits=logits, cache=cache, valid=valid, fed=decoding.fed + 1)

    def score(self, prepared: Prepared, continuations: Sequence[Sequence[int]]) -> Scores:
        """Log-likelihood of continuation i after prompt i (which ends in [sop]): log-softmax in
        float32 over the whole vocabulary of each token given the prompt and the tokens before it,
        teacher-forced through the KV cache (prepare the prompts with max_new_tokens = the longest
        continuation). Continuations are padded to a power of two (from CONTINUATION_BUCKET) and
        masked; one program per (batch, prompt, continuation) bucket. No ids are banned here."""
        if len(continuations) != prepared.rows:
            raise InputError(f"{len(continuations)} continuations for {prepared.rows} prompts")
        lengths = np.array([len(c) for c in continuations], np.int32)
        too_long = prepared.context_lengths + lengths > self.cfg.max_sequence_length
        if too_long.any():
            i = int(np.argmax(too_long))
            raise InputError(f"prompt {i} ({prepared.context_lengths[i]} tokens) plus its continuation "
                             f"({lengths[i]}) exceeds the model's context of {self.cfg.max_sequence_length}")
        a = {k: v for k, v in self._padded(prepared).items() if k in _PREFILL_INPUTS}
        b, p = a["tokens"].shape
        tb = bucket(int(lengths.max()), CONTINUATION_BUCKET)
        cont = np.zeros((b, tb), np.int32)
        for i, c in enumerate(continuations):
            cont[i, :len(c)] = c
        _check_ids(cont, self.cfg.vocab_size)
        a.update(continuations=cont, continuation_lengths=np.pad(lengths, (0, b - len(lengths))))
        key = ("score", b, p, tb)
        if key not in self._compiled:
            self._compiled[key] = jax.jit(self._score, in_shardings=(self.p_shard, self._batch_sharding(a)))
        with jax.set_mesh(self.mesh):
            token_lp, sums = map(distributed.to_host, self._compiled[key](self.params, self._on_mesh(a)))
        t, rows = int(lengths.max()), prepared.rows
        return Scores(np.asarray(token_lp)[:rows, :t], np.asarray(sums)[:rows], lengths)

    def _score(self, params, a):
        """Per-token log-probs [n, Tb] (0 past each length) and their sums [n]."""
        cont, lengths = a["continuations"], a["continuation_lengths"]
        p, tb = a["tokens"].shape[1], cont.shape[1]
        first, cache, valid = self._prefill(params, a, p + tb, 1)
        after, _, _ = self._extend(params, cont, 0, p, a["gen_pos_base"], a["gen_pos_step"], cache, valid)
        predict = jnp.concatenate([first[:, None], after[:, :-1]], 1)  # the logits before each token
        logp = jax.nn.log_softmax(predict.astype(jnp.float32), -1)
        token_lp = jnp.take_along_axis(logp, cont[..., None], -1)[..., 0]
        token_lp = jnp.where(jnp.arange(tb)[None] < lengths[:, None], token_lp, 0.0)
        return token_lp, token_lp.sum(-1)


def _check_ids(tokens: np.ndarray, vocab_size: int) -> None:
    bad = (tokens < 0) | (tokens >= vocab_size)
    if bad.any():
        raise InputError(f"unknown token id {int(tokens[bad][0])}: the vocabulary has {vocab_size} ids")


def trim(tokens: np.ndarray, end_tokens: Sequence[int]) -> list[list[int]]:
    """Generated ids per row up to (not including) the first end token or -1."""
    out = []
    for row in np.asarray(tokens):
        ids = []
        for x in row.tolist():
            if x < 0 or x in end_tokens:
                break
            ids.append(int(x))
        out.append(ids)
    return out
