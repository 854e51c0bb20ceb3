"""GLM-130B's optimisation recipe, float16 loss scaling, and the micro-batched training step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax import config as C
from glmjax.model.api import init_params
from glmjax.parallel.mesh import make_mesh
from glmjax.train import optim, precision
from glmjax.train import step as S


def test_learning_rate_and_batch_ramp_are_glm130bs():
    cfg = optim.OptimConfig()
    lr = lambda s: float(optim.learning_rate(cfg, s))  # noqa: E731
    assert lr(0) == pytest.approx(1e-7)
    assert lr(1_098_632 // 2) == pytest.approx((1e-7 + 8e-5) / 2, rel=1e-5)
    assert lr(1_098_632) == pytest.approx(8e-5, rel=1e-6)
    mid = (1_098_632 + 197_753_905) // 2
    assert lr(mid) == pytest.approx((8e-5 + 8e-6) / 2, rel=1e-4)
    assert lr(197_753_905) == pytest.approx(8e-6, rel=1e-6) and lr(10**9) == pytest.approx(8e-6, rel=1e-6)
    # 192 -> 4224 in steps of 24 over 5,493,164 samples: 168 increments, one every ~32,697 samples
    assert optim.batch_size(cfg, 0) == 192
    assert optim.batch_size(cfg, 32_697) == 192 and optim.batch_size(cfg, 32_698) == 216
    assert optim.batch_size(cfg, 5_493_164 // 2) == 192 + 84 * 24
    assert optim.batch_size(cfg, 5_493_164) == 4224 and optim.batch_size(cfg, 10**9) == 4224
    sizes = {optim.batch_size(cfg, s) for s in range(0, 5_600_000, 997)}
    assert sizes == set(range(192, 4225, 24))


def test_no_weight_decay_on_biases_and_layernorms():
    params = jax.tree.map(np.asarray, init_params(C.resolve("glm-test"), jax.random.key(0), make_mesh(None)))
    mask = optim.decay_mask(params)
    assert mask["word_embeddings"] and mask["layers"]["attention"]["qkv_kernel"]
    assert not mask["layers"]["attention"]["qkv_bias"] and not mask["layers"]["mlp"]["wo_bias"]
    assert not mask["layers"]["input_layernorm"]["scale"] and not mask["final_layernorm"]["bias"]


def test_loss_scale_follows_glm130bs_dynamic_scaler():
    cfg = precision.LossScaleConfig(window=3)
    ls = precision.init_loss_scale(cfg, True)
    step = lambda ls, ok: precision.update_loss_scale(ls, jnp.asarray(ok), cfg, True)  # noqa: E731
    ls = step(ls, False)
    assert float(ls.scale) == 65536  # the first overflow is absorbed by the hysteresis of 2
    ls = step(ls, False)
    assert float(ls.scale) == 32768
    ls = step(ls, False)
    assert float(ls.scale) == 16384  # hysteresis stays used up until the scale grows again
    for _ in range(3):
        ls = step(ls, True)
    assert float(ls.scale) == 32768 and int(ls.hysteresis) == 2  # `window` clean steps double it
    low = precision.LossScale(jnp.asarray(1.0), jnp.asarray(0), jnp.asarray(1))
    assert float(step(low, False).scale) == 1.0  # never below min_scale
    off = precision.init_loss_scale(cfg, False)
    assert float(precision.update_loss_scale(off, jnp.asarray(False), cfg, False).scale) == 1.0


def _batch(rng, micro, rows, s=32, vocab=1000):
    tokens = rng.integers(0, vocab, (micro, rows, s)).astype(np.int32)
    return {"tokens": tokens, "targets": np.roll(tokens, -1, -1), "loss_mask": np.ones_like(tokens),
            "position_ids": np.broadcast_to(np.arange(s), tokens.shape).astype(np.int32),
            "prefix_mask": np.zeros(tokens.shape, bool), "segment_ids": np.ones_like(tokens)}


def _setup(mesh_spec, dtype="float32"):
    cfg = C.resolve("glm-test", overrides={"hidden_dropout": 0.0, "attention_dropout": 0.0, "dtype": dtype})
    oc = optim.OptimConfig(lr=1e-3, min_lr=1e-4, warmup_samples=8, decay_samples=1000, rampup_batch_size=None,
                           global_batch=8)
    lc = precision.LossScaleConfig()
    mesh = make_mesh(mesh_spec)
    state = S.init_state(cfg, init_params(cfg, jax.random.key(0), mesh), oc, lc, 0)
    return cfg, oc, S.make_train_step(cfg, oc, lc, mesh, state), state


def _train(fn, state, oc, batch, steps):
    losses = []
    for i in range(steps):
        state, m = fn(state, batch, 2 if i % 2 else 1, optim.learning_rate(oc, int(state.consumed_samples)), 1.0)
        losses.append(float(m["loss"]))
    return state, losses


def test_loss_drops_and_sharded_training_matches_single_device():
    batch = _batch(np.random.default_rng(0), 2, 4)
    _, oc, fn1, s1 = _setup(None)
    s1, l1 = _train(fn1, s1, oc, batch, 12)
    assert l1[-1] < l1[0] - 0.5
    _, oc, fn8, s8 = _setup("data=2,fsdp=2,tensor=2")
    s8, l8 = _train(fn8, s8, oc, batch, 12)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
                 s8.params, s1.params)
    # every batch size of the ramp (1 or 2 micro-batches here) ran one compiled program
    before = fn8.jitted._cache_size()
    _train(fn8, s8, oc, batch, 2)
    assert fn8.jitted._cache_size() == before


def test_float16_overflow_skips_the_step_and_keeps_parameters_finite():
    cfg, oc, fn, state = _setup(None, dtype="float16")
    assert float(state.loss_scale.scale) == 65536
    batch = _batch(np.random.default_rng(1), 1, 4)
    params = jax.tree.map(np.asarray, state.params)
    bad = dict(params)
    bad["word_embeddings"] = params["word_embeddings"] * 1e4  # float16 activations overflow
    state = state._replace(params=jax.tree.map(jnp.asarray, bad))
    before = jax.tree.map(np.asarray, state.params)
    for _ in range(2):
        state, m = fn(state, batch, 1, 1e-3, 1.0)
        assert not bool(m["finite"])
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), before)
    assert float(state.loss_scale.scale) == 32768  # hysteresis 2: the second overflow halves it
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.tree.map(np.asarray, state.params)))


def test_chatglm_style_2d_positions_train_on_a_sharded_mesh():
    """ChatGLM's [b, 2, s] position ids go through the micro-batched step on data=2,fsdp=2,tensor=2."""
    cfg = C.resolve("glm-test", overrides={"hidden_dropout": 0.0, "attention_dropout": 0.0,
                                           "position_encoding_2d": True, "glu": False})
    oc = optim.OptimConfig(lr=1e-3, min_lr=1e-4, warmup_samples=8, decay_samples=1000, rampup_batch_size=None,
                           global_batch=8)
    lc = precision.LossScaleConfig()
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    state = S.init_state(cfg, init_params(cfg, jax.random.key(0), mesh), oc, lc, 0)
    fn = S.make_train_step(cfg, oc, lc, mesh, state)
    batch = _batch(np.random.default_rng(0), 1, 4)
    s = batch["tokens"].shape[-1]
    batch["position_ids"] = np.stack([np.broadcast_to(np.arange(s), batch["tokens"].shape),
                                      np.zeros(batch["tokens"].shape, int)], 2).astype(np.int32)
    state, losses = _train(fn, state, oc, batch, 4)
    assert losses[-1] < losses[0]
