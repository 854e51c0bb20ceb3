"""GLM-130B's weight-only INT8/INT4 quantization: the one home of the scheme, of its packing, of the
table of quantizable kernels, and of the einsum that contracts activations with a quantized kernel.

Scheme (GLM-130B quantization/functional.py): per output unit ("row" of the torch weight) a float16
scale = max|w| / (2^(b-1) - 1), q = round(w / scale) (half to even) as int8; INT4 values in [-7, 7]
packed two per byte along the input dimension, the even input in the high nibble (GLM-130B's
int4WeightCompression / its CUDA kernels' nibble order). Only the four linear kernels of each layer
are quantized (KERNELS); embeddings, norms and biases stay as they are.

In glmjax's layouts the input (contraction) axes come first in every kernel. A row-parallel layer
(attention dense, dense_4h_to_h) in a GLM-130B checkpoint of tensor-parallel degree G has one scale
per output unit *per shard*: `groups` splits the first input axis into G blocks, each with its own
scales, so such checkpoints load exactly. Parameters of a quantized model hold `<kernel>_q` (int8)
and `<kernel>_scale` (float16, shape [groups, *output dims]) in place of `<kernel>`; QuantEinsum
dequantizes inside the compiled step, one layer at a time under the scan over layers. A torch-layout
weight [out, in] (SAT's shards) is the same scheme on its transpose (quantize_rows, dequantize_rows).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glmjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """n_in: leading input axes; row_parallel: its scales are grouped by tensor-parallel shard."""

    n_in: int
    row_parallel: bool

    @property
    def pack_axis(self) -> int:
        """int4 pairs run along the last input axis (the torch input dim in glmjax's order)."""
        return self.n_in - 1


# The table of quantizable kernels, stated once: the four linear weights of a GLM block.
KERNELS = {
    "qkv_kernel": KernelSpec(1, False),  # [embed, heads, 3, kv]
    "dense_kernel": KernelSpec(2, True),  # [heads, kv, embed]
    "wi_kernel": KernelSpec(1, False),  # [embed, 2, mlp] or [embed, mlp]
    "wo_kernel": KernelSpec(1, True),  # [mlp, embed]
}
_ROWS = KernelSpec(1, False)  # a torch-layout weight [out, in], transposed to [in, out]


def check_bits(bits: int) -> int:
    """bits, if it is 0 (no quantization), 4 or 8."""
    if bits not in (0, 4, 8):
        raise ConfigError(f"quantization bits must be 0 (none), 4 or 8, got {bits}")
    return bits


def _shapes(what: str, spec: KernelSpec, shape: tuple[int, ...], bits: int, groups: int
            ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if bits not in (4, 8):
        raise ConfigError(f"{what}: quantization bits must be 4 or 8, got {bits}")
    g = groups if spec.row_parallel else 1
    if shape[0] % g:
        raise ConfigError(f"{what}: {g} quantization groups do not divide its input axis of {shape[0]}")
    q = list(shape)
    if bits == 4:
        a = spec.pack_axis
        # packed pairs must not straddle a group (a tensor-parallel shard packs its own columns)
        per = q[a] // g if a == 0 else q[a]
        if per % 2:
            where = f" in each of its {g} groups" if a == 0 and g > 1 else ""
            raise ConfigError(f"{what}: int4 packing needs an even input axis{where}, got {per}")
        q[a] //= 2
    return tuple(q), (g,) + tuple(shape[spec.n_in:])


def quantized_shapes(name: str, shape: tuple[int, ...], bits: int, groups: int
                     ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(q shape, scale shape) of kernel `name` of float shape `shape`; one clear error if it cannot be."""
    return _shapes(name, KERNELS[name], tuple(shape), bits, groups)


# --- int4 packing: numpy on the host, jax.numpy inside jit ----------------------------------------
def _xp(x: Any) -> Any:
    """The array namespace of x: jax.numpy for jax arrays and tracers, numpy for everything else."""
    return jnp if isinstance(x, jax.Array) else np


def _every_other(x: Any, axis: int, start: int) -> Any:
    return x[(slice(None),) * axis + (slice(start, None, 2),)]


def pack_int4(q: Any, axis: int) -> Any:
    """int8 values in [-8, 7] -> bytes holding two along `axis` (halved), the even one in the high
    nibble (GLM-130B's int4WeightCompression along its input dimension). numpy or jax in and out."""
    xp = _xp(q)
    q = xp.asarray(q, xp.int8)
    axis %= q.ndim
    if q.shape[axis] % 2:
        raise ConfigError(f"int4 packing needs an even axis {axis}, got shape {tuple(q.shape)}")
    hi, lo = _every_other(q, axis, 0), _every_other(q, axis, 1)
    return xp.bitwise_or(xp.left_shift(hi, 4), xp.bitwise_and(lo, 0xF)).astype(xp.int8)


def unpack_int4(q: Any, axis: int, halves: bool = False) -> Any:
    """Inverse of pack_int4: the sign-extended nibbles, `axis` doubled (high nibble first); with
    `halves`, the (even, odd) value planes instead, never interleaved. numpy or jax in and out."""
    xp = _xp(q)
    q = xp.asarray(q).astype(xp.int8)  # a uint8 view of the bytes reads as the same int8 bytes
    axis %= q.ndim
    hi = xp.right_shift(q, 4)  # arithmetic shift on int8 keeps the sign
    lo = xp.right_shift(xp.left_shift(q, 4), 4)
    if halves:
        return hi, lo
    shape = list(q.shape)
    shape[axis] *= 2
    return xp.stack([hi, lo], axis=axis + 1).reshape(shape)


# --- quantize (host) and dequantize (host or jit) ---------------------------------------------------
def _grouped(x: Any, g: int) -> Any:
    return x.reshape((g, x.shape[0] // g) + x.shape[1:])


def _per_input(scale: Any, n_in: int) -> Any:
    """[groups, *out] -> [groups, 1 (inputs of a group), 1 (other input axes)..., *out]."""
    return scale.reshape(scale.shape[:1] + (1,) * n_in + scale.shape[1:])


def _quantize(w: Any, spec: KernelSpec, bits: int, groups: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """GLM-130B's absmax quantization in float16 arithmetic, as it does on its fp16 weights."""
    w = np.asarray(w)
    _shapes(what, spec, w.shape, bits, groups)  # validates
    g = groups if spec.row_parallel else 1
    w16 = _grouped(w.astype(np.float16), g)
    scale = (np.abs(w16).max(axis=tuple(range(1, spec.n_in + 1))) / np.float16(2 ** (bits - 1) - 1)
             ).astype(np.float16)
    safe = np.where(scale == 0, np.float16(1), scale)  # an all-zero row: q = 0, scale = 0
    q = np.round(w16 / _per_input(safe, spec.n_in)).astype(np.int8).reshape(w.shape)
    return (pack_int4(q, spec.pack_axis) if bits == 4 else q), scale


def _dequantize(q: Any, scale: Any, spec: KernelSpec, bits: int, dtype: Any, halves: bool = False) -> Any:
    """q * scale in float16 (GLM-130B's dequantization), cast to `dtype`; numpy or jax in and out.
    int4 with `halves`: (weights of the even inputs, weights of the odd inputs)."""
    xp = _xp(q)
    vals = unpack_int4(q, spec.pack_axis, halves) if bits == 4 else q
    s = _per_input(xp.asarray(scale).astype(xp.float16), spec.n_in)

    def scaled(v: Any) -> Any:
        return (_grouped(v, s.shape[0]).astype(xp.float16) * s).reshape(v.shape).astype(dtype)

    return tuple(scaled(v) for v in vals) if bits == 4 and halves else scaled(vals)


def quantize_kernel(w: np.ndarray, name: str, bits: int, groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Host-side quantization of a float kernel in glmjax's layout: (int8 q, float16 scale)."""
    return _quantize(w, KERNELS[name], bits, groups, name)


def dequantize_kernel(q: Any, scale: Any, name: str, bits: int, dtype: Any) -> Any:
    """The float kernel that quantize_kernel's (q, scale) stand for, in `dtype`."""
    return _dequantize(q, scale, KERNELS[name], bits, dtype)


def quantize_rows(w: np.ndarray, bits: int, what: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """A torch-layout weight [out, in] (one SAT shard) quantized per row: (int8 [out, in or in/2],
    float16 scale [out]), the bytes GLM-130B stores. The same scheme on the transpose."""
    q, scale = _quantize(np.asarray(w).T, _ROWS, bits, 1, what)
    return np.ascontiguousarray(q.T), scale[0]


def dequantize_rows(q: np.ndarray, scale: np.ndarray, bits: int, out_dtype: Any = np.float16) -> np.ndarray:
    """Inverse of quantize_rows: the float16 products q * scale of a torch-layout weight, in out_dtype."""
    w = _dequantize(np.asarray(q, np.int8).T, np.asarray(scale)[None], _ROWS, bits, np.dtype(out_dtype))
    return np.ascontiguousarray(w.T)


# --- the quantized einsum layer -----------------------------------------------------------------
def _param(module: nn.Module, name: str, init: Callable, shape: tuple[int, ...], axes: tuple, dtype: Any) -> Any:
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


@dataclasses.dataclass(frozen=True)
class QuantEinsum:
    """A linear kernel, float or GLM-130B-quantized, contracted with an activation by einsum.

    `declare` creates the parameters on the calling module itself (no submodule, so parameter paths
    stay `.../<name>` or `.../<name>_q` + `.../<name>_scale`, also under nn.scan and nn.remat); calling
    the result with (equation, x) dequantizes inside the compiled step and contracts. An int4 kernel
    is dequantized as its two nibble planes, each contracted with the matching (even or odd) inputs
    of x: interleaving the nibbles back into one tensor made the scanned decode 4x slower on CPU.
    """

    name: str  # a key of KERNELS when quantized
    bits: int  # 0 (float), 8 or 4
    dtype: Any  # the compute dtype
    kernel: Any  # the float kernel, or the int8 bytes `<name>_q`
    scale: Any = None  # float16 `<name>_scale` [groups, *output dims] when quantized

    @classmethod
    def declare(cls, module: nn.Module, name: str, init: Callable, shape: tuple[int, ...], axes: tuple, *,
                bits: int, groups: int, param_dtype: Any, dtype: Any) -> QuantEinsum:
        """The parameters of kernel `name` of float `shape` with logical `axes`, created on `module`:
        `<name>` (init, param_dtype), or with bits `<name>_q` (int8, same axes) and `<name>_scale`
        (float16, axes None + the output axes)."""
        if not bits:
            return cls(name, 0, dtype, _param(module, name, init, shape, axes, param_dtype))
        q_shape, s_shape = quantized_shapes(name, shape, bits, groups)
        q = _param(module, name + "_q", nn.initializers.zeros, q_shape, axes, jnp.int8)
        scale = _param(module, name + "_scale", nn.initializers.ones, s_shape,
                       (None,) + tuple(axes[KERNELS[name].n_in:]), jnp.float16)
        return cls(name, bits, dtype, q, scale)

    def __call__(self, equation: str, x: jax.Array) -> jax.Array:
        """jnp.einsum(equation, x, kernel) with the kernel in the compute dtype."""
        if not self.bits:
            return jnp.einsum(equation, x, self.kernel.astype(self.dtype))
        spec = KERNELS[self.name]
        if self.bits == 8:
            return jnp.einsum(equation, x, _dequantize(self.kernel, self.scale, spec, 8, self.dtype))
        x_axes, k_axes = equation.split("->")[0].split(",")
        if x_axes[-1] != k_axes[spec.pack_axis]:
            raise ConfigError(f"{self.name}: int4 einsum {equation!r} must contract x's last axis with the "
                              f"kernel's packed axis {spec.pack_axis}")
        even, odd = _dequantize(self.kernel, self.scale, spec, 4, self.dtype, halves=True)
        return jnp.einsum(equation, x[..., 0::2], even) + jnp.einsum(equation, x[..., 1::2], odd)


# --- parameter trees --------------------------------------------------------------------------------
def quantize_params(params: dict[str, Any], bits: int, groups: int = 1) -> dict[str, Any]:
    """A float parameter tree (numpy or jax; layers stacked on axis 0) -> the quantized tree."""
    out = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out[key] = quantize_params(value, bits, groups)
        elif key in KERNELS:
            w = np.asarray(value)
            qs, ss = zip(*(quantize_kernel(w[i], key, bits, groups) for i in range(w.shape[0])))
            out[key + "_q"], out[key + "_scale"] = np.stack(qs), np.stack(ss)
        else:
            out[key] = value
    return out


def dequantize_params(params: dict[str, Any], bits: int, dtype: Any = jnp.float32) -> dict[str, Any]:
    """The float tree a quantized tree stands for: each `<kernel>_q`/`<kernel>_scale` pair (layers
    stacked on axis 0) -> `<kernel>` = dequantize_kernel of every layer; other leaves unchanged."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out[key] = dequantize_params(value, bits, dtype)
        elif key.endswith("_q") and key[:-2] in KERNELS:
            name, scale = key[:-2], params[key[:-2] + "_scale"]
            out[name] = jnp.stack([dequantize_kernel(value[i], scale[i], name, bits, dtype)
                                   for i in range(value.shape[0])])
        elif not (key.endswith("_scale") and key[:-6] in KERNELS):
            out[key] = value
    return out


def param_bytes(params: Any) -> int:
    """Bytes the parameter arrays occupy (all shards together)."""
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(params)))
