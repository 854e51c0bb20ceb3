"""The GLM stack: word embedding (with embedding gradient shrink), scanned DeepNorm layers, final
LayerNorm and the (tied or separate) output head."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from glmjax.config import GLMConfig
from glmjax.model.layers import DeepNormBlock, LayerNorm, _param, blocked_from_layout, dtype_of

Array = jax.Array


@jax.custom_vjp
def shrink_gradient(x: Array, alpha: Array) -> Array:
    """Embedding gradient shrink: the forward is x unchanged, the gradient into x is scaled by alpha.

    Equals GLM-130B's x*alpha + stop_gradient(x)*(1-alpha) without its forward rounding.
    """
    return x


def _shrink_fwd(x, alpha):
    return x, alpha


def _shrink_bwd(alpha, g):
    return (g * alpha.astype(g.dtype), jnp.zeros_like(alpha))


shrink_gradient.defvjp(_shrink_fwd, _shrink_bwd)


# A lookup of this few tokens (a decode step) is a one-hot product with the table instead of a
# gather: XLA turns a one-index gather into a dynamic-slice, and partitions that over a vocab-sharded
# table by all-gathering the whole table every step (3.4 GiB at GLM-130B's size, seen in `glmjax plan`)
ONE_HOT_LOOKUP_TOKENS = 8


def embedding_lookup(table: Array, tokens: Array) -> Array:
    """Rows of `table` [vocab, h] for `tokens`, exactly: a gather, or for a handful of tokens the
    one-hot product (a single non-zero term per row, float32 accumulation at full precision), which
    stays vocab-parallel as Megatron's embedding is (a partial sum per shard, then one all-reduce)."""
    if tokens.size > ONE_HOT_LOOKUP_TOKENS:
        return jnp.take(table, tokens, axis=0)
    one_hot = jax.nn.one_hot(tokens, table.shape[0], dtype=table.dtype)
    rows = jnp.einsum("...v,vh->...h", one_hot, table, preferred_element_type=jnp.float32,
                      precision=jax.lax.Precision.HIGHEST)
    return rows.astype(table.dtype)


def remat_policy(name: str):
    """Map a config remat_policy name to a jax.checkpoint policy (None = no rematerialisation)."""
    return {
        "none": None,
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }[name]


class GLM(nn.Module):
    """GLM-130B / ChatGLM transformer. Returns float32 logits [b, s, vocab] and per-layer outputs."""

    cfg: GLMConfig

    @nn.compact
    def __call__(self, tokens: Array, position_ids: Array, *, attention_mask: Array | None = None,
                 prefix_mask: Array | None = None, segment_ids: Array | None = None,
                 deterministic: bool = True, egs_alpha: Array | float | None = None,
                 collect_hidden: bool = False, collect_kv: bool = False,
                 cache: tuple[Array, Array] | None = None, cache_index: Array | None = None,
                 logits: bool = True) -> tuple[Array, dict[str, Any]]:
        """tokens [b, s]; position_ids [b, s] (or [b, 2, s] with 2-D rotary). With logits=False the
        final LayerNorm's output [b, s, hidden] comes back instead of the float32 logits.

        Attention layout, either compact -- prefix_mask [b, s] bool (True: token belongs to the
        bidirectional context) and optional segment_ids [b, s] (packing; 0 = padding) -- or a dense
        attention_mask [b|1, 1, s, s] bool with True = blocked (GLM-130B's convention).
        """
        cfg = self.cfg
        cdt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        b, s = tokens.shape
        emb = _param(self, "word_embeddings", nn.initializers.normal(cfg.embedding_init_std),
                     (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pdt)
        # gather rows from a table whose embed dim is whole (FSDP all-gathers it, as for any weight
        # about to be used); leaving it fsdp-sharded makes the partitioner replicate the lookup
        table = nn.with_logical_constraint(emb, ("vocab", None))
        x = embedding_lookup(table, tokens).astype(cdt)
        alpha = cfg.embedding_grad_shrink if egs_alpha is None else egs_alpha
        x = shrink_gradient(x, jnp.asarray(alpha, jnp.float32))
        x = nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

        if attention_mask is not None:
            blocked = attention_mask.astype(bool)
        else:
            if prefix_mask is None:
                prefix_mask = jnp.zeros((b, s), bool)
            blocked = blocked_from_layout(prefix_mask, segment_ids, s)

        block = DeepNormBlock
        policy = remat_policy(cfg.remat_policy)
        if policy is not None:
            block = nn.remat(block, policy=policy, prevent_cse=False)
        stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0), length=cfg.num_layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        (x, _), per_layer = stack(cfg, deterministic, collect_hidden, collect_kv, name="layers")(
            (x, jnp.zeros((), jnp.int32)), position_ids, blocked, cache_index, cache)

        x = LayerNorm(cfg, name="final_layernorm")(x)
        if cfg.tie_word_embeddings:
            head = emb
        else:
            head = _param(self, "lm_head", nn.initializers.normal(cfg.embedding_init_std),
                          (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pdt)
        if not logits:  # the final hidden states, for a loss that applies the head itself (train/loss.py)
            return x, per_layer
        out = jnp.einsum("bse,ve->bsv", x, head.astype(cdt), preferred_element_type=jnp.float32)
        out = nn.with_logical_constraint(out, ("batch", "length", "vocab"))
        return out, per_layer
