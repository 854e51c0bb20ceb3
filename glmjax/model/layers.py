"""GLM layers: LayerNorm, rotary (1-D and ChatGLM 2-D), self-attention, GeGLU/MLP, the DeepNorm block.

Parameter layouts (logical axis names in brackets; see glmjax/parallel/rules.py):
  query_key_value.kernel [embed, heads, 3, kv]  -- GLM's head-interleaved rows: q, k, v per head
  dense.kernel           [heads, kv, embed]     -- row-parallel output projection
  dense_h_to_4h.kernel   [embed, 2, mlp]        -- GeGLU: index 0 = value, 1 = gate (gelu'd)
                         [embed, mlp]           -- plain MLP
  dense_4h_to_h.kernel   [mlp, embed]
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glmjax.config import GLMConfig
from glmjax.model import quant

Array = jax.Array
MASK_FILL = -10000.0  # GLM-130B fills blocked scores with -10000 (before the layer-scaling rescale)


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def _xavier_normal(scale: float = 1.0, in_axes=(0,), out_axes=(-1,)):
    """Xavier-normal init times `scale` (DeepNorm's beta on v, dense and the MLP)."""

    def init(key, shape, dtype=jnp.float32):
        fan_in = math.prod(shape[a] for a in in_axes)
        fan_out = math.prod(shape[a] for a in out_axes)
        std = scale * math.sqrt(2.0 / (fan_in + fan_out))
        return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return init


def _param(module: nn.Module, name: str, init, shape, axes, dtype):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _linear(module: nn.Module, name: str, init, shape, axes) -> quant.QuantEinsum:
    """Linear kernel `name` of `module` (which has a cfg): float, or int8/int4 with the config's
    quantization_bits, as a quant.QuantEinsum called with (equation, x)."""
    cfg: GLMConfig = module.cfg
    return quant.QuantEinsum.declare(module, name, init, shape, axes, bits=cfg.quantization_bits,
                                     groups=cfg.quantization_groups, param_dtype=dtype_of(cfg.param_dtype),
                                     dtype=dtype_of(cfg.dtype))


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 (biased variance, as torch.nn.LayerNorm and apex)."""

    cfg: GLMConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        pdt = dtype_of(self.cfg.param_dtype)
        h = x.shape[-1]
        scale = _param(self, "scale", nn.initializers.ones, (h,), ("embed",), pdt)
        bias = _param(self, "bias", nn.initializers.zeros, (h,), ("embed",), pdt)
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.cfg.layernorm_epsilon)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype_of(self.cfg.dtype))


# --- rotary -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def rotary_table(dim: int, base: float, table_dtype: str, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [length, dim/2] float32 for positions 0..length-1 (half-rotation frequencies).

    With table_dtype float16 these are SAT 0.2.12's numbers in GLM-130B's fp16 model: inv_freq,
    the position, the angle position*inv_freq and cos/sin are each rounded to float16. Built on the
    host: float64 -> float32 -> float16 as torch's float16 kernels do (XLA's own float32 sin/cos
    differ by an ulp often enough to flip float16 roundings). torch's float16 sin sends values that
    sit exactly on a float16 tie toward zero (cos: to even); so do we, so the tables match torch bit
    for bit (tests/test_layers.py checks every entry).
    """
    expo = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = np.float32(1.0) / (np.float64(base) ** expo.astype(np.float64)).astype(np.float32)
    pos = np.arange(length, dtype=np.float32)
    if table_dtype == "float16":
        inv_freq = inv_freq.astype(np.float16).astype(np.float32)
        pos = pos.astype(np.float16).astype(np.float32)
    # the product of two float16 numbers is exact in float32: one rounding, as torch's f16 multiply
    angle = pos[:, None] * inv_freq[None, :]
    if table_dtype == "float16":
        angle = angle.astype(np.float16)
    angle = angle.astype(np.float64)
    cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
    if table_dtype == "float16":
        cos, sin = cos.astype(np.float16), _f16_ties_toward_zero(sin)
    return cos.astype(np.float32), sin.astype(np.float32)


def _f16_ties_toward_zero(x: np.ndarray) -> np.ndarray:
    """float32 -> float16, round to nearest with exact ties resolved toward zero."""
    r = x.astype(np.float16)
    toward0 = np.nextafter(r, np.float16(0))
    away = np.abs(r.astype(np.float32)) > np.abs(x)
    tie = away & ((r.astype(np.float32) - x) == (x - toward0.astype(np.float32)))
    return np.where(tie, toward0, r)


def rotary_cos_sin(position_ids: Array, dim: int, cfg: GLMConfig) -> tuple[Array, Array]:
    """cos/sin [..., dim] for integer positions: a lookup in the table, as SAT's F.embedding does."""
    cos_t, sin_t = rotary_table(dim, cfg.rotary_base, cfg.rotary_dtype, cfg.max_sequence_length)
    pos = jnp.clip(position_ids, 0, cfg.max_sequence_length - 1)
    cos, sin = jnp.take(jnp.asarray(cos_t), pos, axis=0), jnp.take(jnp.asarray(sin_t), pos, axis=0)
    return jnp.concatenate([cos, cos], -1), jnp.concatenate([sin, sin], -1)


def _rotate_half(x: Array) -> Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], -1)


def apply_rotary(x: Array, position_ids: Array, cfg: GLMConfig) -> Array:
    """Rotate q or k [b, s, heads, d] by 1-D positions [b, s] or ChatGLM 2-D positions [b, 2, s].

    2-D: the first half of the head dim turns with the positions, the second with the block
    positions, each half with its own half-rotation over d/2 channels.
    """
    xf = x.astype(jnp.float32)
    if cfg.position_encoding_2d:
        d = x.shape[-1] // 2
        halves = []
        for i in range(2):
            cos, sin = rotary_cos_sin(position_ids[:, i], d, cfg)
            part = xf[..., i * d:(i + 1) * d]
            halves.append(part * cos[:, :, None] + _rotate_half(part) * sin[:, :, None])
        out = jnp.concatenate(halves, -1)
    else:
        cos, sin = rotary_cos_sin(position_ids, x.shape[-1], cfg)
        out = xf * cos[:, :, None] + _rotate_half(xf) * sin[:, :, None]
    return out.astype(x.dtype)


# --- attention --------------------------------------------------------------------------------
def blocked_from_layout(prefix_mask: Array, segment_ids: Array | None, q_len: int,
                        q_offset: int = 0) -> Array:
    """Bool [b, 1, q, k], True = blocked, from the compact GLM layout (built inside the jitted step).

    Key j is visible to query i when both are in the same segment and j <= i or j lies in the
    bidirectional context (prefix_mask[j]). Segment 0 is padding and sees / is seen by nothing.
    """
    k_len = prefix_mask.shape[1]
    qi = jnp.arange(q_len)[:, None] + q_offset
    kj = jnp.arange(k_len)[None, :]
    visible = (kj <= qi)[None] | prefix_mask[:, None, :]
    if segment_ids is not None:
        q_seg = jax.lax.dynamic_slice_in_dim(segment_ids, q_offset, q_len, 1)
        same = q_seg[:, :, None] == segment_ids[:, None, :]
        visible = visible & same & (segment_ids[:, None, :] != 0)
    return ~visible[:, None]


class SelfAttention(nn.Module):
    """GLM self-attention: fused head-interleaved QKV, rotary, float32 softmax with layer scaling."""

    cfg: GLMConfig

    @nn.compact
    def __call__(self, x: Array, position_ids: Array, blocked: Array, layer_id: Array,
                 deterministic: bool, cache: tuple[Array, Array] | None = None,
                 cache_index: Array | None = None) -> tuple[Array, tuple[Array, Array]]:
        """With `cache` (k, v [b, L, heads, d]) the new keys/values are written at `cache_index` and
        the queries attend over all L slots (`blocked` is then [b, 1, q, L]); returns the cache."""
        cfg = self.cfg
        nh, d, h = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
        cdt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        beta = (2.0 * cfg.num_layers) ** -0.5

        def qkv_init(key, shape, dtype):  # Xavier over (h -> 3h); DeepNorm's beta on v only
            w = _xavier_normal(1.0, (0,), (1, 2, 3))(key, shape, jnp.float32)
            return w.at[:, :, 2].multiply(beta).astype(dtype)

        wqkv = _linear(self, "qkv_kernel", qkv_init, (h, nh, 3, d), ("embed", "heads", None, "kv"))
        bqkv = _param(self, "qkv_bias", nn.initializers.zeros, (nh, 3, d), ("heads", None, "kv"), pdt)
        wo = _linear(self, "dense_kernel", _xavier_normal(beta, (0, 1), (2,)), (nh, d, h),
                     ("heads", "kv", "embed"))
        bo = _param(self, "dense_bias", nn.initializers.zeros, (h,), ("embed",), pdt)

        qkv = wqkv("bse,ehtd->bshtd", x) + bqkv.astype(cdt)
        qkv = nn.with_logical_constraint(qkv, ("batch", "length", "heads", None, "kv"))
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        q = apply_rotary(q, position_ids, cfg)
        k = apply_rotary(k, position_ids, cfg)
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), cache_index, 1)
            v = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), cache_index, 1)
            k = nn.with_logical_constraint(k, ("batch", "length", "heads", "kv"))
            v = nn.with_logical_constraint(v, ("batch", "length", "heads", "kv"))

        # Megatron's query-key layer scaling (coefficient c = layer_id + 1): q / (sqrt(d) c), blocked
        # scores filled with -10000, then x c before the float32 softmax. Neutral in exact arithmetic;
        # it keeps fp16 scores in range and reproduces GLM-130B's rounding.
        c = (layer_id + 1).astype(jnp.float32)
        qs = (q.astype(jnp.float32) / (math.sqrt(d) * c)).astype(cdt)
        scores = jnp.einsum("bqhd,bkhd->bhqk", qs, k, preferred_element_type=jnp.float32)
        scores = jnp.where(blocked, MASK_FILL, scores) * c
        probs = jax.nn.softmax(scores, axis=-1)
        probs = nn.Dropout(cfg.attention_dropout)(probs, deterministic=deterministic)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(cdt), v)
        ctx = nn.with_logical_constraint(ctx, ("batch", "length", "heads", "kv"))
        out = wo("bqhd,hde->bqe", ctx) + bo.astype(cdt)
        return out, (k, v)


class MLP(nn.Module):
    """GeGLU (value * gelu_erf(gate), gate = second half) or ChatGLM's plain tanh-gelu MLP."""

    cfg: GLMConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        h, f = cfg.hidden_size, cfg.inner_hidden_size
        cdt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        beta = (2.0 * cfg.num_layers) ** -0.5
        if cfg.glu:
            wi = _linear(self, "wi_kernel", _xavier_normal(beta, (0,), (1, 2)), (h, 2, f),
                         ("embed", None, "mlp"))
            bi = _param(self, "wi_bias", nn.initializers.zeros, (2, f), (None, "mlp"), pdt)
            hh = wi("bse,etf->bstf", x) + bi.astype(cdt)
            hh = nn.with_logical_constraint(hh, ("batch", "length", None, "mlp"))
            act = hh[..., 0, :] * jax.nn.gelu(hh[..., 1, :], approximate=False)
        else:
            wi = _linear(self, "wi_kernel", _xavier_normal(beta), (h, f), ("embed", "mlp"))
            bi = _param(self, "wi_bias", nn.initializers.zeros, (f,), ("mlp",), pdt)
            hh = wi("bse,ef->bsf", x) + bi.astype(cdt)
            act = jax.nn.gelu(hh, approximate=True)
        act = nn.with_logical_constraint(act, ("batch", "length", "mlp"))
        wo = _linear(self, "wo_kernel", _xavier_normal(beta), (f, h), ("mlp", "embed"))
        bo = _param(self, "wo_bias", nn.initializers.zeros, (h,), ("embed",), pdt)
        return wo("bsf,fe->bse", act) + bo.astype(cdt)


class DeepNormBlock(nn.Module):
    """Post-LN DeepNorm layer: h = alpha*LN(x) + Attn(LN(x)); out = alpha*LN2(h) + MLP(LN2(h))."""

    cfg: GLMConfig
    deterministic: bool = True
    collect_hidden: bool = False
    collect_kv: bool = False

    @nn.compact
    def __call__(self, carry: tuple[Array, Array], position_ids: Array, blocked: Array,
                 cache_index: Array | None = None, cache: tuple[Array, Array] | None = None):
        x, layer_id = carry
        cfg = self.cfg
        drop = functools.partial(nn.Dropout(cfg.hidden_dropout), deterministic=self.deterministic)
        alpha = cfg.deepnorm_alpha
        a = LayerNorm(cfg, name="input_layernorm")(x)
        attn, kv = SelfAttention(cfg, name="attention")(a, position_ids, blocked, layer_id,
                                                       self.deterministic, cache, cache_index)
        h1 = a * alpha + drop(attn)
        m = LayerNorm(cfg, name="post_attention_layernorm")(h1)
        out = m * alpha + drop(MLP(cfg, name="mlp")(m))
        out = nn.with_logical_constraint(out, ("batch", "length", "embed"))
        per_layer: dict[str, Any] = {}
        if self.collect_hidden:
            per_layer["hidden_states"] = out
        if self.collect_kv or cache is not None:
            per_layer["kv"] = kv
        return (out, layer_id + 1), per_layer
