"""Dynamic loss scaling as GLM-130B trained in float16 (Megatron/DeepSpeed's DynamicLossScaler):
initial scale 65536, doubled after `window` (2000) overflow-free steps, halved on an overflow once
`hysteresis` (2) overflows have been absorbed, never below `min_scale` (1). A step whose gradients
are not finite is skipped: the parameters and optimizer state stay as they were."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LossScaleConfig:
    initial: float = 65536.0
    window: int = 2000
    hysteresis: int = 2
    min_scale: float = 1.0

    def __post_init__(self) -> None:
        from glmjax.errors import ConfigError

        if not (0 < self.min_scale <= self.initial and self.window >= 1 and self.hysteresis >= 1):
            raise ConfigError(f"loss_scale: need 0 < min_scale <= initial, window >= 1, hysteresis >= 1, got {self}")


class LossScale(NamedTuple):
    scale: jax.Array  # float32
    good_steps: jax.Array  # int32: overflow-free steps since the last change
    hysteresis: jax.Array  # int32: overflows still absorbed before the scale drops


def init_loss_scale(cfg: LossScaleConfig, enabled: bool) -> LossScale:
    """A scaler; disabled (scale 1, never changing) for float32/bfloat16 compute."""
    return LossScale(jnp.asarray(cfg.initial if enabled else 1.0, jnp.float32), jnp.zeros((), jnp.int32),
                     jnp.asarray(cfg.hysteresis, jnp.int32))


def all_finite(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.asarray(True)


def update_loss_scale(ls: LossScale, finite: jax.Array, cfg: LossScaleConfig, enabled: bool) -> LossScale:
    """The scaler after a step whose gradients were (not) finite."""
    if not enabled:
        return ls
    # an overflow first uses up the hysteresis; once it is down to 1 every overflow halves the scale
    drop = (~finite) & (ls.hysteresis <= 1)
    hyst = jnp.where((~finite) & ~drop, ls.hysteresis - 1, ls.hysteresis)
    scale = jnp.where(drop, jnp.maximum(ls.scale / 2.0, cfg.min_scale), ls.scale)
    good = jnp.where(finite, ls.good_steps + 1, 0)
    grow = finite & (good >= cfg.window)  # `window` clean steps since the last overflow or growth
    scale = jnp.where(grow, scale * 2.0, scale)
    good = jnp.where(grow, 0, good)
    hyst = jnp.where(grow, cfg.hysteresis, hyst)
    return LossScale(scale, good.astype(jnp.int32), hyst.astype(jnp.int32))
