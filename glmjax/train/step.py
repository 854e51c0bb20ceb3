"""The training step: a variable number of fixed-shape micro-batches accumulated inside one compiled
step (GLM-130B's batch-size ramp-up without recompiling), float32 master weights, compute in the
model's dtype, dynamic loss scaling for float16, skip-on-overflow, global-norm clipping, AdamW."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from glmjax.config import GLMConfig
from glmjax.model.api import param_shardings
from glmjax.model.glm import GLM
from glmjax.parallel import rules
from glmjax.train import optim, precision

BATCH_KEYS = ("tokens", "targets", "loss_mask", "position_ids", "prefix_mask", "segment_ids")


class TrainState(NamedTuple):
    step: jax.Array  # int32
    consumed_samples: jax.Array  # int32: 2^31 samples is 10x GLM-130B's whole run
    params: Any  # float32 master weights
    opt_state: Any
    loss_scale: precision.LossScale
    rng: jax.Array


def init_state(cfg: GLMConfig, params: Any, optim_cfg: optim.OptimConfig, ls_cfg: precision.LossScaleConfig,
               seed: int) -> TrainState:
    opt = optim.make_optimizer(optim_cfg)
    params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    return TrainState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), params, opt.init(params),
                      precision.init_loss_scale(ls_cfg, cfg.dtype == "float16"), jax.random.key(seed))


def _loss(model: GLM, params: Any, micro: dict[str, jax.Array], rng: jax.Array, egs_alpha: jax.Array,
          scale: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    logits, _ = model.apply({"params": params}, micro["tokens"], micro["position_ids"],
                            prefix_mask=micro["prefix_mask"], segment_ids=micro["segment_ids"],
                            deterministic=False, egs_alpha=egs_alpha, rngs={"dropout": rng})
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, micro["targets"][..., None], -1)[..., 0]
    mask = micro["loss_mask"].astype(jnp.float32)
    loss_sum = (nll * mask).sum()
    correct = ((logits.argmax(-1) == micro["targets"]) * mask).sum()
    return loss_sum * scale, (loss_sum, correct, mask.sum())


def make_train_step(cfg: GLMConfig, optim_cfg: optim.OptimConfig, ls_cfg: precision.LossScaleConfig,
                    mesh: jax.sharding.Mesh, state_example: TrainState) -> Callable:
    """jit(step)(state, batch, n_micro, lr, egs_alpha) -> (state, metrics).

    batch arrays are [max_micro, rows, ...]; only the first n_micro micro-batches are used, so every
    batch size of the ramp runs the same compiled program. The loss is the mean over the loss tokens
    of all used micro-batches.
    """
    model = GLM(cfg)
    opt = optim.make_optimizer(optim_cfg)
    use_scaling = cfg.dtype == "float16"
    p_shard = param_shardings(cfg, mesh)
    batch_shard = {k: rules.named(mesh, None, "batch", *((None,) * (2 if k == "position_ids" and
                                                                     cfg.position_encoding_2d else 1)))
                   for k in BATCH_KEYS}
    state_shard = jax.tree.map(lambda _: rules.named(mesh), state_example)
    state_shard = state_shard._replace(params=p_shard, opt_state=_opt_shardings(state_example.opt_state, p_shard,
                                                                                 mesh))

    def step(state: TrainState, batch: dict[str, jax.Array], n_micro: jax.Array, lr: jax.Array,
             egs_alpha: jax.Array):
        grad_fn = jax.grad(lambda p, m, r: _loss(model, p, m, r, egs_alpha, state.loss_scale.scale), has_aux=True)
        zeros = jax.tree.map(jnp.zeros_like, state.params)

        def body(i, carry):
            grads, loss_sum, correct, count = carry
            micro = {k: jax.lax.dynamic_index_in_dim(v, i, 0, keepdims=False) for k, v in batch.items()}
            rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), i)
            with nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
                g, (ls, c, n) = grad_fn(state.params, micro, rng)
            return (jax.tree.map(jnp.add, grads, g), loss_sum + ls, correct + c, count + n)

        grads, loss_sum, correct, count = jax.lax.fori_loop(
            0, n_micro, body, (zeros, jnp.zeros(()), jnp.zeros(()), jnp.zeros(())))
        denom = jnp.maximum(count, 1.0) * state.loss_scale.scale
        grads = jax.tree.map(lambda g: g / denom, grads)
        finite = precision.all_finite(grads) & jnp.isfinite(loss_sum)
        grad_norm = optax.tree.norm(grads)
        emb_norm = jnp.linalg.norm(grads["word_embeddings"])
        opt_state = optim.set_learning_rate(state.opt_state, lr)
        safe = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
        updates, new_opt = opt.update(safe, opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        rows = batch["tokens"].shape[1]
        new_state = TrainState(
            step=state.step + 1,
            consumed_samples=state.consumed_samples + n_micro * rows,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt, opt_state),
            loss_scale=precision.update_loss_scale(state.loss_scale, finite, ls_cfg, use_scaling),
            rng=state.rng,
        )
        metrics = {"loss": loss_sum / jnp.maximum(count, 1.0), "accuracy": correct / jnp.maximum(count, 1.0),
                   "grad_norm": grad_norm, "embedding_grad_norm": emb_norm, "loss_scale": state.loss_scale.scale,
                   "finite": finite, "tokens": count, "learning_rate": lr}
        return new_state, metrics

    jitted = jax.jit(step, in_shardings=(state_shard, batch_shard, None, None, None),
                     out_shardings=(state_shard, None), donate_argnums=(0,))

    def run(state, batch, n_micro, lr, egs_alpha):
        with jax.set_mesh(mesh):
            return jitted(state, batch, jnp.asarray(n_micro, jnp.int32), jnp.asarray(lr, jnp.float32),
                          jnp.asarray(egs_alpha, jnp.float32))

    run.jitted = jitted
    return run


def _opt_shardings(opt_state: Any, p_shard: Any, mesh: jax.sharding.Mesh) -> Any:
    """Adam's moments shard like the parameters; counters and hyper-parameters are replicated."""
    p_struct = jax.tree.structure(p_shard)

    def walk(node):
        if not isinstance(node, jax.Array) and jax.tree.structure(node) == p_struct:
            return p_shard
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*[walk(x) for x in node])
        if isinstance(node, tuple):
            return tuple(walk(x) for x in node)
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        return rules.named(mesh)

    return walk(opt_state)
