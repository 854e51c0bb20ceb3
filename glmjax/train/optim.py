"""GLM-130B's optimisation recipe (paper section 2.3, Table 11) with optax.

AdamW (beta1 0.9, beta2 0.95, eps 1e-8, weight decay 0.1, none on biases and LayerNorm), learning
rate warmed up from 1e-7 to the peak over `warmup_samples` then cosine-decayed to `min_lr` (10% of
the peak) over `decay_samples` -- both counted in samples, as GLM-130B's Megatron-DeepSpeed code
does -- global-norm clipping at 1.0, and the batch-size ramp-up 192 -> 4224 in steps of 24 over
5,493,164 samples.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from glmjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 8e-5
    min_lr: float = 8e-6
    warmup_init_lr: float = 1e-7
    warmup_samples: int = 1_098_632
    decay_samples: int = 197_753_905
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_grad_norm: float = 1.0
    # batch-size ramp-up: (start, increment, ramp samples); None = always global_batch
    rampup_batch_size: tuple[int, int, int] | None = (192, 24, 5_493_164)
    global_batch: int = 4224

    def __post_init__(self) -> None:
        if not 0 < self.min_lr <= self.lr:
            raise ConfigError(f"optim: need 0 < min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.global_batch <= 0 or self.warmup_init_lr < 0 or self.warmup_samples < 0 or self.decay_samples < 0:
            raise ConfigError("optim: need global_batch > 0 and warmup_init_lr, warmup_samples, decay_samples >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.eps > 0 and self.weight_decay >= 0
                and self.clip_grad_norm > 0):
            raise ConfigError("optim: need beta1, beta2 in [0, 1), eps > 0, weight_decay >= 0, clip_grad_norm > 0")
        if self.rampup_batch_size is not None:
            start, inc, samples = self.rampup_batch_size
            if (start <= 0 or inc <= 0 or samples <= 0 or start >= self.global_batch
                    or (self.global_batch - start) % inc):
                raise ConfigError(f"optim: rampup_batch_size {self.rampup_batch_size} must step from a positive "
                                  f"start by a positive increment to global_batch={self.global_batch}")


def learning_rate(cfg: OptimConfig, consumed_samples: jax.Array | int) -> jax.Array:
    """Linear warm-up from warmup_init_lr to lr, then cosine decay to min_lr, by consumed samples."""
    s = jnp.asarray(consumed_samples, jnp.float32)
    warm = cfg.warmup_init_lr + (cfg.lr - cfg.warmup_init_lr) * s / max(cfg.warmup_samples, 1)
    t = jnp.clip((s - cfg.warmup_samples) / max(cfg.decay_samples - cfg.warmup_samples, 1), 0.0, 1.0)
    cos = cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + jnp.cos(math.pi * t))
    return jnp.where(s < cfg.warmup_samples, warm, cos)


def batch_size(cfg: OptimConfig, consumed_samples: int) -> int:
    """Global batch size after `consumed_samples`: Megatron's ramp-up (start + k * increment)."""
    if cfg.rampup_batch_size is None:
        return cfg.global_batch
    start, inc, ramp = cfg.rampup_batch_size
    steps = (cfg.global_batch - start) // inc
    per_step = ramp / steps
    return min(cfg.global_batch, start + int(consumed_samples / per_step) * inc)


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: not on biases, not on LayerNorm scales and shifts."""

    def keep(path, _):
        names = [getattr(k, "key", str(k)) for k in path]
        return not (names[-1].endswith("bias") or any("layernorm" in n for n in names))

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """Clip by global norm, Adam, decoupled weight decay (masked), times -learning rate; the learning
    rate lives in the state so each step can set it from consumed samples (set_learning_rate)."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_grad_norm),
        optax.scale_by_adam(b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
        optax.inject_hyperparams(optax.scale)(step_size=-cfg.lr),
    )


def set_learning_rate(opt_state: Any, lr: jax.Array) -> Any:
    """make_optimizer's state with the learning rate replaced."""
    *rest, lr_state = opt_state
    hp = dict(lr_state.hyperparams)
    hp["step_size"] = -jnp.asarray(lr, jnp.asarray(hp["step_size"]).dtype)
    return (*rest, lr_state._replace(hyperparams=hp))
