"""Layer behaviours pinned one at a time: rotary tables and 2-D rotary, GeGLU gate half, DeepNorm
residual, embedding gradient shrink, dropout switch, remat policies."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from glmjax import config as C
from glmjax.model import layers
from glmjax.model.glm import GLM
from glmjax.model.layouts import GLM130B_IDS, batch_layout


def small(**kw):
    return C.resolve("glm-test", overrides=kw)


def init(cfg, b=2, s=12, seed=0):
    model = GLM(cfg)
    tokens = jax.random.randint(jax.random.key(seed + 1), (b, s), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(s), (b, 2, s) if cfg.position_encoding_2d else (b, s))
    params = jax.jit(lambda r: nn.unbox(model.init(r, tokens, pos)["params"]))(jax.random.key(seed))
    return model, params, tokens, pos


def apply(model, params, tokens, pos, **kw):
    """Jitted model.apply (eager scan is slow); keyword arguments are static unless arrays."""
    rngs = kw.pop("rngs", None)
    fn = jax.jit(lambda p, t, q, r, a: model.apply({"params": p}, t, q, rngs=r, egs_alpha=a, **kw)[0])
    return fn(params, tokens, pos, rngs, kw.pop("egs_alpha", None))


@pytest.mark.parametrize("head_dim", [16, 64, 128])
@pytest.mark.parametrize("table_dtype", ["float16", "float32"])
def test_rotary_tables_equal_torch_sat(head_dim, table_dtype):
    """SAT 0.2.12 (float16 tables: inv_freq, positions, angles, cos/sin in half) and SAT 0.4
    (float32) computed by torch, every entry up to position 4095."""
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    if table_dtype == "float16":
        inv = inv.half()
    freqs = torch.einsum("i,j->ij", torch.arange(4096, dtype=inv.dtype), inv)
    cos, sin = layers.rotary_table(head_dim, 10000.0, table_dtype, 4096)
    if table_dtype == "float16":  # bit for bit
        np.testing.assert_array_equal(cos, freqs.cos().float().numpy())
        np.testing.assert_array_equal(sin, freqs.sin().float().numpy())
    else:  # torch's float32 sin/cos are within an ulp of the correctly rounded value we use
        np.testing.assert_allclose(cos, freqs.cos().numpy(), rtol=0, atol=2e-7)
        np.testing.assert_allclose(sin, freqs.sin().numpy(), rtol=0, atol=2e-7)


def _chatglm_rotary_restated(x, pos, block, base=10000.0):
    """ChatGLM-6B's 2-D rotary restated in numpy (float32 tables): each half of the head dim is
    rotated half-wise by its own position stream, with rotary dim d/2."""
    d = x.shape[-1] // 2
    inv = 1.0 / (base ** (np.arange(0, d, 2, dtype=np.float64) / d))
    out = []
    for part, p in ((x[..., :d], pos), (x[..., d:], block)):
        ang = p[..., None].astype(np.float64) * inv
        emb = np.concatenate([ang, ang], -1)[:, :, None]
        rot = np.concatenate([-part[..., d // 2:], part[..., :d // 2]], -1)
        out.append(part * np.cos(emb) + rot * np.sin(emb))
    return np.concatenate(out, -1)


def test_2d_rotary_matches_chatglm_rules():
    cfg = small(position_encoding_2d=True, rotary_dtype="float32")
    x = np.random.default_rng(0).standard_normal((2, 7, 8, cfg.head_dim)).astype(np.float32)
    pos = np.array([[0, 1, 2, 3, 4, 4, 4], [0, 1, 2, 2, 2, 2, 2]])
    block = np.array([[0, 0, 0, 0, 0, 1, 2], [0, 0, 0, 1, 2, 3, 4]])
    got = layers.apply_rotary(jnp.asarray(x), jnp.stack([pos, block], 1), cfg)
    np.testing.assert_allclose(np.asarray(got), _chatglm_rotary_restated(x, pos, block), atol=2e-6)


def test_1d_rotary_is_half_rotation_over_full_head_dim():
    cfg = small(rotary_dtype="float32")
    d = cfg.head_dim
    x = np.random.default_rng(1).standard_normal((1, 5, 2, d)).astype(np.float32)
    pos = np.arange(5)[None]
    inv = 1.0 / (10000.0 ** (np.arange(0, d, 2) / d))
    ang = pos[..., None] * inv
    emb = np.concatenate([ang, ang], -1)[:, :, None]
    want = x * np.cos(emb) + np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1) * np.sin(emb)
    got = layers.apply_rotary(jnp.asarray(x), jnp.asarray(pos), cfg)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)


def test_geglu_gates_with_the_second_half():
    """value * gelu_erf(gate): zeroing the gate half silences the layer, zeroing the value half too,
    and the value half enters linearly."""
    cfg = small()
    mlp = layers.MLP(cfg)
    x = jax.random.normal(jax.random.key(0), (1, 3, cfg.hidden_size))
    p = nn.unbox(mlp.init(jax.random.key(1), x)["params"])
    p["wo_bias"] = jnp.zeros_like(p["wo_bias"])
    p["wi_bias"] = jnp.zeros_like(p["wi_bias"])
    h = np.einsum("bse,etf->bstf", x, p["wi_kernel"])
    want = np.einsum("bsf,fe->bse", h[..., 0, :] * jax.nn.gelu(h[..., 1, :], approximate=False),
                     p["wo_kernel"])
    np.testing.assert_allclose(mlp.apply({"params": p}, x), want, rtol=1e-5, atol=1e-6)
    erf_vs_tanh = jax.nn.gelu(h[..., 1, :], approximate=False) - jax.nn.gelu(h[..., 1, :], approximate=True)
    assert np.abs(erf_vs_tanh).max() > 1e-6  # the exact-erf choice is observable


def test_plain_mlp_uses_tanh_gelu():
    cfg = small(glu=False)
    mlp = layers.MLP(cfg)
    x = jax.random.normal(jax.random.key(0), (1, 3, cfg.hidden_size))
    p = nn.unbox(mlp.init(jax.random.key(1), x)["params"])
    h = np.einsum("bse,ef->bsf", x, p["wi_kernel"]) + p["wi_bias"]
    want = np.einsum("bsf,fe->bse", jax.nn.gelu(h, approximate=True), p["wo_kernel"]) + p["wo_bias"]
    np.testing.assert_allclose(mlp.apply({"params": p}, x), want, rtol=1e-5, atol=1e-6)


def test_deepnorm_residual_adds_the_normalised_input():
    """With attention and MLP outputs zeroed, a layer is alpha*LN2(alpha*LN1(x))."""
    cfg = small()
    block = layers.DeepNormBlock(cfg, collect_hidden=True)
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (2, 5, cfg.hidden_size))
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    blocked = jnp.zeros((2, 1, 5, 5), bool)
    carry = (x, jnp.zeros((), jnp.int32))
    p = nn.unbox(block.init(jax.random.key(1), carry, pos, blocked)["params"])
    p = jax.tree.map(jnp.zeros_like, p)
    for ln in ("input_layernorm", "post_attention_layernorm"):
        p[ln] = {"scale": jnp.ones(cfg.hidden_size), "bias": jnp.zeros(cfg.hidden_size)}
    (out, layer_id), _ = block.apply({"params": p}, carry, pos, blocked)

    def ln(v):
        return (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + cfg.layernorm_epsilon)

    a = cfg.deepnorm_alpha
    np.testing.assert_allclose(out, a * ln(a * ln(np.asarray(x))), rtol=1e-5, atol=1e-5)
    assert int(layer_id) == 1 and a == pytest.approx(np.sqrt(2 * cfg.num_layers))


def test_embedding_gradient_shrink_scales_only_the_embedding_gradient():
    cfg = small(tie_word_embeddings=False)  # untied: all embedding gradient comes via the lookup
    model, params, tokens, pos = init(cfg)

    def loss(p, alpha):
        logits, _ = model.apply({"params": p}, tokens, pos, egs_alpha=alpha)
        return jnp.mean(jax.nn.logsumexp(logits, -1)), logits

    vg = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (l1, logits1), g1 = vg(params, 1.0)
    (l2, logits2), g2 = vg(params, 0.1)
    np.testing.assert_array_equal(logits1, logits2)  # forward unchanged, bit for bit
    np.testing.assert_allclose(g2["word_embeddings"], 0.1 * g1["word_embeddings"], rtol=1e-5, atol=1e-10)
    np.testing.assert_array_equal(g2["lm_head"], g1["lm_head"])
    assert np.abs(g1["word_embeddings"]).max() > 0


def test_dropout_only_when_not_deterministic():
    cfg = small()
    model, params, tokens, pos = init(cfg)
    ref = apply(model, params, tokens, pos)
    again = apply(model, params, tokens, pos, deterministic=True)
    np.testing.assert_array_equal(ref, again)
    d1 = apply(model, params, tokens, pos, deterministic=False, rngs={"dropout": jax.random.key(1)})
    d2 = apply(model, params, tokens, pos, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert np.abs(d1 - ref).max() > 1e-3 and np.abs(d1 - d2).max() > 1e-3
    off = cfg.replace(hidden_dropout=0.0, attention_dropout=0.0)
    d0 = apply(GLM(off), params, tokens, pos, deterministic=False, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_allclose(d0, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_policies_change_memory_not_numbers(policy):
    cfg = small()
    model, params, tokens, pos = init(cfg)

    def loss(m, p):
        return jnp.mean(m.apply({"params": p}, tokens, pos)[0] ** 2)

    want = jax.jit(jax.grad(lambda p: loss(model, p)))(params)
    got = jax.jit(jax.grad(lambda p: loss(GLM(cfg.replace(remat_policy=policy)), p)))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)


def test_untied_head_and_2d_rotary_model_runs_on_a_chatglm_layout():
    cfg = small(position_encoding_2d=True, glu=False, tie_word_embeddings=False)
    model, params, _, _ = init(cfg)
    assert params["lm_head"].shape == (cfg.vocab_size, cfg.hidden_size)
    assert params["layers"]["mlp"]["wi_kernel"].shape == (cfg.num_layers, cfg.hidden_size,
                                                         cfg.inner_hidden_size)
    ids = GLM130B_IDS.__class__(mask=1000, gmask=1001, smask=1002, sop=1003)
    lay = batch_layout([[5, 6, 1001, 1003, 7], [5, 1000, 6, 1003, 8, 9]], ids, position_encoding_2d=True)
    logits = jax.jit(lambda p, lay: model.apply({"params": p}, lay["tokens"], lay["position_ids"],
                                                prefix_mask=lay["prefix_mask"],
                                                segment_ids=lay["segment_ids"])[0])(params, lay)
    assert logits.shape == (2, 6, cfg.vocab_size) and np.isfinite(np.asarray(logits)).all()


def test_param_count_formula_equals_initialised_model():
    for cfg in (small(), small(glu=False, tie_word_embeddings=False, position_encoding_2d=True),
                C.resolve("glm-tiny"), C.resolve("chatglm-6b"), C.resolve("glm-130b")):
        from glmjax.model.api import abstract_params

        params = nn.unbox(abstract_params(cfg))
        assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()
