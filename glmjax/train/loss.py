"""The training loss from the final hidden states: the output head and the token cross-entropy
applied one sequence chunk at a time, so float32 logits exist for one chunk only and each chunk's
are recomputed in the backward pass instead of kept (at GLM-130B's vocabulary of 150528 the whole
[b, s, vocab] float32 block is 1.2 GB per 2048-token row). The price is an accumulator for the
head's gradient, [vocab shard, hidden]: at GLM-130B's size and one row per device that is more
than the logits it saves (BENCHMARKS.md). With the head sharded over `tensor` by vocabulary, the
log-sum-exp, the target logit and the argmax are vocab-parallel reductions (Megatron's
vocab-parallel cross-entropy); nothing gathers the vocabulary."""
from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

LOSS_CHUNK = 512  # sequence positions per chunk: 512 x 150528 float32 logits are 308 MB per row


class TokenSums(NamedTuple):
    """Sums over the loss tokens of a batch (float32 scalars)."""

    nll: jax.Array  # negative log-likelihood of the targets
    correct: jax.Array  # targets that are the argmax of the logits
    tokens: jax.Array  # loss tokens


def chunk_size(seq_length: int, chunk: int = LOSS_CHUNK) -> int:
    """The largest divisor of seq_length that is at most `chunk`."""
    c = max(1, min(chunk, seq_length))
    while seq_length % c:
        c -= 1
    return c


def token_sums(hidden: jax.Array, head: jax.Array, targets: jax.Array, loss_mask: jax.Array,
               chunk: int = LOSS_CHUNK) -> TokenSums:
    """hidden [b, s, h] (compute dtype), head [vocab, h] (cast to hidden's dtype, as the model's
    head), targets and loss_mask [b, s]: the logits hidden @ head.T in float32, their log-softmax at
    the targets and argmax, summed over the masked tokens, `chunk` positions at a time."""
    b, s, h = hidden.shape
    c = chunk_size(s, chunk)
    n = s // c
    split = lambda x: jnp.moveaxis(x.reshape((b, n, c) + x.shape[2:]), 1, 0)  # noqa: E731  [n, b, c, ...]
    # whole along embed before the chunk loop (FSDP gathers it once, as for the model's own head);
    # inside the loop the gather would repeat for every chunk, forward, recompute and backward
    head = nn.with_logical_constraint(head.astype(hidden.dtype), ("vocab", None))
    ids = jnp.arange(head.shape[0], dtype=jnp.int32)

    @jax.checkpoint
    def one(hc: jax.Array, tc: jax.Array, mc: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = jnp.einsum("bce,ve->bcv", hc, head, preferred_element_type=jnp.float32)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        target = jnp.sum(jnp.where(ids == tc[..., None], logits, 0.0), -1)
        nll = jax.nn.logsumexp(logits, -1) - target
        right = (jnp.argmax(logits, -1) == tc).astype(jnp.float32)
        return (nll * mc).sum(), (right * mc).sum()

    def body(carry, xs):
        nll, right = one(*xs)
        return (carry[0] + nll, carry[1] + right), None

    mask = loss_mask.astype(jnp.float32)
    zero = jnp.zeros((), jnp.float32)
    (nll, right), _ = jax.lax.scan(body, (zero, zero), (split(hidden), split(targets), split(mask)))
    return TokenSums(nll, right, mask.sum())
