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


def _setup(mesh_spec, dtype="float32", rows=4, s=32, **overrides):
    cfg = C.resolve("glm-test", overrides={"hidden_dropout": 0.0, "attention_dropout": 0.0, "dtype": dtype,
                                           **overrides})
    oc = optim.OptimConfig(lr=1e-3, min_lr=1e-4, warmup_samples=8, decay_samples=1000, rampup_batch_size=None,
                           global_batch=8)
    lc = precision.LossScaleConfig()
    mesh = make_mesh(mesh_spec)
    state = S.init_state(cfg, init_params(cfg, jax.random.key(0), mesh), oc, lc, 0, mesh)
    return cfg, S.TrainStep(cfg, oc, lc, mesh, rows, s), state


def _micro(fn, batch, n):
    """The first n micro-batches of a host batch [micro, rows, ...] as global arrays."""
    for j in range(n):
        yield {k: jax.device_put(np.asarray(v[j], fn.batch_specs[k].dtype), fn.batch_shardings[k])
               for k, v in batch.items()}


def _train(fn, state, batch, steps):
    losses = []
    for i in range(steps):
        n = 2 if i % 2 else 1
        state, m = fn(state, _micro(fn, batch, n), n, 1.0)
        losses.append(float(m["loss"]))
    return state, losses


def test_loss_drops_and_sharded_training_matches_single_device():
    batch = _batch(np.random.default_rng(0), 2, 4)
    _, fn1, s1 = _setup(None)
    s1, l1 = _train(fn1, s1, batch, 12)
    assert l1[-1] < l1[0] - 0.5
    _, fn8, s8 = _setup("data=2,fsdp=2,tensor=2")
    s8, l8 = _train(fn8, s8, batch, 12)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
                 s8.params, s1.params)


def test_the_steps_programs_compile_once_ahead_of_time_for_every_batch_size_of_the_ramp():
    """Both programs are compiled when the step is built; 1 and 2 micro-batches (the ramp) and a
    fresh state all run them without another XLA compilation."""
    compiles = []
    event = "/jax/core/compile/backend_compile_duration"
    jax.monitoring.register_event_duration_secs_listener(
        lambda e, d, **kw: compiles.append(e) if e == event else None)
    batch = _batch(np.random.default_rng(0), 2, 4)
    _, fn, state = _setup("data=2,fsdp=2,tensor=2")
    assert sorted(fn.programs) == ["accumulate", "update"]
    before = len(compiles)
    state, _ = _train(fn, state, batch, 4)
    assert len(compiles) == before, "the step compiled again"


def test_micro_batch_losses_are_averaged_as_megatron_does():
    """The step's loss is the mean of the micro-batches' mean token losses."""
    batch = _batch(np.random.default_rng(3), 2, 4)
    batch["loss_mask"][1, :, 16:] = 0  # the second micro-batch has half the loss tokens
    _, fn, state = _setup(None)
    copy = lambda: jax.tree.map(lambda x: x.copy(), state)  # noqa: E731  (the update donates its state)
    losses = []
    for j in range(2):
        one = {k: v[j:j + 1] for k, v in batch.items()}
        _, m = fn(copy(), _micro(fn, one, 1), 1, 1.0)
        losses.append(float(m["loss"]))
    _, m = fn(copy(), _micro(fn, batch, 2), 2, 1.0)
    assert float(m["loss"]) == pytest.approx((losses[0] + losses[1]) / 2, rel=1e-6)
    assert float(m["tokens"]) == 4 * 32 + 4 * 16


def test_float16_overflow_skips_the_step_and_keeps_parameters_finite():
    cfg, fn, state = _setup(None, dtype="float16")
    assert float(state.loss_scale.scale) == 65536
    batch = _batch(np.random.default_rng(1), 1, 4)
    params = jax.tree.map(np.asarray, state.params)
    bad = dict(params)
    bad["word_embeddings"] = params["word_embeddings"] * 1e4  # float16 activations overflow
    state = state._replace(params=jax.device_put(bad, fn.state_shardings.params))
    before = jax.tree.map(np.asarray, state.params)
    for _ in range(2):
        state, m = fn(state, _micro(fn, batch, 1), 1, 1.0)
        assert not bool(m["finite"])
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), before)
    assert float(state.loss_scale.scale) == 32768  # hysteresis 2: the second overflow halves it
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.tree.map(np.asarray, state.params)))


def test_float16_with_glm130bs_initial_scale_65536_trains_from_the_first_step():
    """The scale multiplies the MEAN loss (as Megatron/DeepSpeed): the first steps at 65536 are finite."""
    cfg, fn, state = _setup(None, dtype="float16")
    batch = _batch(np.random.default_rng(2), 2, 4)
    state, losses = _train(fn, state, batch, 6)
    assert float(state.loss_scale.scale) == 65536 and int(state.step) == 6
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_an_update_that_would_make_parameters_non_finite_is_skipped():
    """An infinite learning rate (which the experiment schema refuses; a library user can still pass
    one) reaches no parameter: the update is skipped like an overflowing gradient."""
    cfg = C.resolve("glm-test", overrides={"hidden_dropout": 0.0, "attention_dropout": 0.0})
    oc = optim.OptimConfig(lr=float("inf"), min_lr=1e-4, warmup_samples=0, rampup_batch_size=None, global_batch=4)
    lc = precision.LossScaleConfig()
    mesh = make_mesh(None)
    state = S.init_state(cfg, init_params(cfg, jax.random.key(0), mesh), oc, lc, 0, mesh)
    fn = S.TrainStep(cfg, oc, lc, mesh, 4, 32)
    before = jax.tree.map(np.asarray, state.params)
    state, m = fn(state, _micro(fn, _batch(np.random.default_rng(1), 1, 4), 1), 1, 1.0)
    assert not bool(m["finite"]) and int(state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), before)


def test_chatglm_style_2d_positions_train_on_a_sharded_mesh():
    """ChatGLM's [b, 2, s] position ids go through the micro-batched step on data=2,fsdp=2,tensor=2."""
    cfg, fn, state = _setup("data=2,fsdp=2,tensor=2", position_encoding_2d=True, glu=False)
    batch = _batch(np.random.default_rng(0), 1, 4)
    s = batch["tokens"].shape[-1]
    batch["position_ids"] = np.stack([np.broadcast_to(np.arange(s), batch["tokens"].shape),
                                      np.zeros(batch["tokens"].shape, int)], 2).astype(np.int32)
    state, losses = _train(fn, state, {k: np.repeat(v, 2, 0) for k, v in batch.items()}, 4)
    assert losses[-1] < losses[0]


def test_a_step_takes_exactly_the_micro_batches_it_uses():
    """The ramp's smaller steps send fewer micro-batches (no zero-filled ones); a miscount is refused."""
    batch = _batch(np.random.default_rng(0), 2, 4)
    _, fn, state = _setup(None)
    state, m = fn(state, _micro(fn, batch, 1), 1, 1.0)
    assert float(m["tokens"]) == 4 * 32 and int(state.consumed_samples) == 4
    with pytest.raises(ValueError, match="given 2 micro-batches, not 1"):
        fn(state, _micro(fn, batch, 2), 1, 1.0)
