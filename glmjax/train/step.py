"""The training step as GLM-130B's Megatron/DeepSpeed runs it: a step is `n` micro-batches, each
forward/backward accumulating its gradient, then one update -- float32 master weights, compute in
the model's dtype, dynamic loss scaling of the mean loss for float16, skip-on-overflow, global-norm
clipping, AdamW with the learning rate of the consumed samples.

Two programs, each compiled once ahead of time for the mesh (no recompilation as the batch ramps
from 192 to 4224 rows: only the number of micro-batch calls changes, and only used micro-batches
are ever sent to the devices):
  accumulate(state, acc, micro, n, egs_alpha) -> acc    gradient of loss_j * scale / n added to acc
  update(state, acc) -> (state, metrics, zeroed acc)    unscale, check, clip, AdamW, loss scaler
The loss of micro-batch j is its mean token NLL and the step's loss the mean over its micro-batches,
as Megatron averages micro-batch losses (the loss scale then multiplies a mean, so GLM-130B's
initial scale 65536 means what it meant there).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from glmjax.config import GLMConfig
from glmjax.model.api import abstract_params, param_shardings
from glmjax.model.glm import GLM
from glmjax.parallel import rules
from glmjax.train import loss, optim, precision

BATCH_KEYS = ("tokens", "targets", "loss_mask", "position_ids", "prefix_mask", "segment_ids")


class TrainState(NamedTuple):
    step: jax.Array  # int32
    consumed_samples: jax.Array  # int32: 2^31 samples is 10x GLM-130B's whole run
    params: Any  # float32 master weights
    opt_state: Any
    loss_scale: precision.LossScale
    rng: jax.Array


class Accumulator(NamedTuple):
    grads: Any  # float32, shaped and sharded like the parameters
    loss: jax.Array  # sum of micro-batch mean losses / n
    correct: jax.Array  # sum of micro-batch accuracies / n
    tokens: jax.Array  # loss tokens
    samples: jax.Array  # rows


def _host_state(cfg: GLMConfig, params: Any, optim_cfg: optim.OptimConfig, ls_cfg: precision.LossScaleConfig,
                seed: int) -> TrainState:
    opt = optim.make_optimizer(optim_cfg)
    params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    return TrainState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), params, opt.init(params),
                      precision.init_loss_scale(ls_cfg, cfg.dtype == "float16"), jax.random.key(seed))


def state_shardings(cfg: GLMConfig, optim_cfg: optim.OptimConfig, ls_cfg: precision.LossScaleConfig,
                    mesh: jax.sharding.Mesh) -> TrainState:
    """Where every leaf of the training state lives: parameters and Adam's moments by the rules
    table, counters, loss scale and RNG replicated. Restored and fresh states both use these, so the
    step's programs always see the shardings they were compiled for."""
    p_shard = param_shardings(cfg, mesh)
    shapes = abstract_state(cfg, optim_cfg, ls_cfg)
    replicated = jax.tree.map(lambda _: rules.named(mesh), shapes)
    return replicated._replace(params=p_shard, opt_state=_opt_shardings(shapes.opt_state, p_shard, mesh))


def abstract_state(cfg: GLMConfig, optim_cfg: optim.OptimConfig, ls_cfg: precision.LossScaleConfig) -> TrainState:
    """ShapeDtypeStructs of the training state (nothing allocated)."""
    params = nn.unbox(abstract_params(cfg))
    return jax.eval_shape(lambda p: _host_state(cfg, p, optim_cfg, ls_cfg, 0), params)


def init_state(cfg: GLMConfig, params: Any, optim_cfg: optim.OptimConfig, ls_cfg: precision.LossScaleConfig,
               seed: int, mesh: jax.sharding.Mesh) -> TrainState:
    """A fresh state around `params` (already on `mesh`), every leaf placed per state_shardings."""
    shardings = state_shardings(cfg, optim_cfg, ls_cfg, mesh)
    fn = jax.jit(lambda p: _host_state(cfg, p, optim_cfg, ls_cfg, seed), out_shardings=shardings)
    with jax.set_mesh(mesh):
        return fn(params)


def _loss(model: GLM, params: Any, micro: dict[str, jax.Array], rng: jax.Array, egs_alpha: jax.Array,
          weight: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """(mean token NLL x weight, (mean NLL, accuracy, loss tokens)) of one micro-batch; the head and
    the cross-entropy run in sequence chunks (glmjax/train/loss.py), never on the whole logits."""
    hidden, _ = model.apply({"params": params}, micro["tokens"], micro["position_ids"],
                            prefix_mask=micro["prefix_mask"], segment_ids=micro["segment_ids"],
                            deterministic=False, egs_alpha=egs_alpha, rngs={"dropout": rng}, logits=False)
    head = params["word_embeddings"] if model.cfg.tie_word_embeddings else params["lm_head"]
    sums = loss.token_sums(hidden, head, micro["targets"], micro["loss_mask"])
    count = jnp.maximum(sums.tokens, 1.0)
    mean = sums.nll / count
    return mean * weight, (mean, sums.correct / count, sums.tokens)


def batch_specs(cfg: GLMConfig, rows: int, seq_length: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one global micro-batch, as glmjax/data/pipeline.py builds them."""
    shape = (rows, seq_length)
    pos = (rows, 2, seq_length) if cfg.position_encoding_2d else shape
    dtypes = {"tokens": np.int32, "targets": np.int32, "loss_mask": np.int32, "position_ids": np.int32,
              "prefix_mask": np.bool_, "segment_ids": np.int32}
    return {k: jax.ShapeDtypeStruct(pos if k == "position_ids" else shape, dtypes[k]) for k in BATCH_KEYS}


class TrainStep:
    """The step's two programs compiled once for `mesh` (XLA `compiler_options` if given); call(state,
    micro_batches, egs_alpha)."""

    def __init__(self, cfg: GLMConfig, optim_cfg: optim.OptimConfig, ls_cfg: precision.LossScaleConfig,
                 mesh: jax.sharding.Mesh, micro_rows: int, seq_length: int,
                 compiler_options: dict[str, Any] | None = None):
        self.cfg, self.mesh = cfg, mesh
        self.state_shardings = state_shardings(cfg, optim_cfg, ls_cfg, mesh)
        self.batch_shardings = {k: rules.named(mesh, "batch", *((None,) * (len(v.shape) - 1)))
                                for k, v in batch_specs(cfg, micro_rows, seq_length).items()}
        self.batch_specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_shardings[k])
                            for k, v in batch_specs(cfg, micro_rows, seq_length).items()}
        rep = rules.named(mesh)
        p_shard = self.state_shardings.params
        self.acc_shardings = Accumulator(p_shard, rep, rep, rep, rep)
        state = _spec(abstract_state(cfg, optim_cfg, ls_cfg), self.state_shardings)
        acc = self.acc_specs = _spec(_zero_acc_like(state.params, abstract=True), self.acc_shardings)
        scalar = lambda dt: jax.ShapeDtypeStruct((), dt, sharding=rep)  # noqa: E731
        accumulate = jax.jit(_accumulate_fn(GLM(cfg)), out_shardings=self.acc_shardings, donate_argnums=(1,))
        update = jax.jit(_update_fn(cfg, optim_cfg, ls_cfg),
                         out_shardings=(self.state_shardings, None, self.acc_shardings), donate_argnums=(0, 1))
        zeros = jax.jit(lambda: _zero_acc_like(state.params), out_shardings=self.acc_shardings)
        # compiled only, nothing allocated: `glmjax plan` builds this for devices that are not attached
        with jax.set_mesh(mesh):
            self._zeros = zeros.lower().compile(compiler_options)
            self.programs = {
                "accumulate": accumulate.lower(state, acc, self.batch_specs, scalar(jnp.int32),
                                               scalar(jnp.float32)).compile(compiler_options),
                "update": update.lower(state, acc).compile(compiler_options),
            }
        self._acc: Accumulator | None = None  # the zeroed accumulator, made on the first call
        self._rep = rep

    def __call__(self, state: TrainState, micro_batches: Iterable[dict[str, jax.Array]], n_micro: int,
                 egs_alpha: float) -> tuple[TrainState, dict[str, jax.Array]]:
        """One step over `n_micro` micro-batches (global jax.Arrays, sent as they are made)."""
        n = jax.device_put(np.int32(n_micro), self._rep)
        alpha = jax.device_put(np.float32(egs_alpha), self._rep)
        with jax.set_mesh(self.mesh):
            if self._acc is None:
                self._acc = self._zeros()
            acc, seen = self._acc, 0
            for micro in micro_batches:
                acc = self.programs["accumulate"](state, acc, micro, n, alpha)
                seen += 1
            if seen != n_micro:
                raise ValueError(f"the step was given {seen} micro-batches, not {n_micro}")
            state, metrics, self._acc = self.programs["update"](state, acc)
        return state, metrics

    def memory_bytes(self) -> int | None:
        """XLA's largest per-device footprint of the two programs (arguments + outputs + temporaries)."""
        sizes = []
        for c in self.programs.values():
            try:
                m = c.memory_analysis()
                sizes.append(int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                                 + m.temp_size_in_bytes))
            except Exception:  # not every backend reports it
                return None
        return max(sizes)


def _spec(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _zero_acc_like(params: Any, abstract: bool = False) -> Accumulator:
    if abstract:
        z = lambda dt: jax.ShapeDtypeStruct((), dt)  # noqa: E731
        return Accumulator(jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32), params),
                           z(jnp.float32), z(jnp.float32), z(jnp.float32), z(jnp.int32))
    return Accumulator(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), jnp.zeros(()),
                       jnp.zeros(()), jnp.zeros(()), jnp.zeros((), jnp.int32))


def _accumulate_fn(model: GLM):
    def accumulate(state: TrainState, acc: Accumulator, micro: dict[str, jax.Array], n: jax.Array,
                   egs_alpha: jax.Array) -> Accumulator:
        rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), acc.samples)
        weight = state.loss_scale.scale / n.astype(jnp.float32)
        grad_fn = jax.grad(lambda p: _loss(model, p, micro, rng, egs_alpha, weight), has_aux=True)
        with nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
            g, (mean, accuracy, tokens) = grad_fn(state.params)
        nf = n.astype(jnp.float32)
        return Accumulator(jax.tree.map(jnp.add, acc.grads, g), acc.loss + mean / nf, acc.correct + accuracy / nf,
                           acc.tokens + tokens, acc.samples + micro["tokens"].shape[0])

    return accumulate


def _update_fn(cfg: GLMConfig, optim_cfg: optim.OptimConfig, ls_cfg: precision.LossScaleConfig):
    opt = optim.make_optimizer(optim_cfg)
    use_scaling = cfg.dtype == "float16"

    def update(state: TrainState, acc: Accumulator):
        grads = jax.tree.map(lambda g: g / state.loss_scale.scale, acc.grads)
        grads_finite = precision.all_finite(grads) & jnp.isfinite(acc.loss)
        lr = optim.learning_rate(optim_cfg, state.consumed_samples)
        opt_state = optim.set_learning_rate(state.opt_state, lr)
        safe = jax.tree.map(lambda g: jnp.where(grads_finite, g, 0.0), grads)
        updates, new_opt = opt.update(safe, opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        # an update that would make a parameter non-finite (a NaN weight decay, an infinite rate) is
        # skipped like an overflowing gradient; only overflows move the loss scale
        ok = grads_finite & precision.all_finite(new_params)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        new_state = TrainState(
            step=state.step + 1,
            consumed_samples=state.consumed_samples + acc.samples,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt, opt_state),
            loss_scale=precision.update_loss_scale(state.loss_scale, grads_finite, ls_cfg, use_scaling),
            rng=state.rng,
        )
        metrics = {"loss": acc.loss, "accuracy": acc.correct, "grad_norm": optax.tree.norm(grads),
                   "embedding_grad_norm": jnp.linalg.norm(grads["word_embeddings"]),
                   "loss_scale": state.loss_scale.scale, "finite": ok, "tokens": acc.tokens, "learning_rate": lr}
        return new_state, metrics, jax.tree.map(jnp.zeros_like, acc)

    return update


def _opt_shardings(opt_state: Any, p_shard: Any, mesh: jax.sharding.Mesh) -> Any:
    """Adam's moments shard like the parameters; counters and hyper-parameters are replicated."""
    p_struct = jax.tree.structure(p_shard)

    def walk(node):
        if not isinstance(node, (jax.Array, jax.ShapeDtypeStruct)) and jax.tree.structure(node) == p_struct:
            return p_shard
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*[walk(x) for x in node])
        if isinstance(node, tuple):
            return tuple(walk(x) for x in node)
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        return rules.named(mesh)

    return walk(opt_state)
