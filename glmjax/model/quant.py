"""GLM-130B's weight-only INT8/INT4 quantization, kept quantized in device memory.

Scheme (GLM-130B quantization/functional.py): per output unit ("row" of the torch weight) a float16
scale = max|w| / (2^(b-1) - 1), q = round(w / scale) (half to even) as int8; INT4 values in [-7, 7]
packed two per byte along the input dimension, the even input in the high nibble. Only the four
linear kernels of each layer are quantized; embeddings, norms and biases stay as they are.

In glmjax's layouts the input (contraction) axes come first in every kernel. A row-parallel layer
(attention dense, dense_4h_to_h) in a GLM-130B checkpoint of tensor-parallel degree G has one scale
per output unit *per shard*: `groups` splits the first input axis into G blocks, each with its own
scales, so such checkpoints load exactly. Parameters of a quantized model hold `<kernel>_q` (int8)
and `<kernel>_scale` (float16, shape [groups, *output dims]) in place of `<kernel>`; the layer
dequantizes inside the compiled step, one layer at a time under the scan over layers.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from glmjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """n_in: leading input axes; row_parallel: its scales are grouped by tensor-parallel shard."""

    n_in: int
    row_parallel: bool


KERNELS = {
    "qkv_kernel": KernelSpec(1, False),  # [embed, heads, 3, kv]
    "dense_kernel": KernelSpec(2, True),  # [heads, kv, embed]
    "wi_kernel": KernelSpec(1, False),  # [embed, 2, mlp] or [embed, mlp]
    "wo_kernel": KernelSpec(1, True),  # [mlp, embed]
}


def check_bits(bits: int) -> int:
    if bits not in (0, 4, 8):
        raise ConfigError(f"quantization bits must be 0 (none), 4 or 8, got {bits}")
    return bits


def quantized_shapes(name: str, shape: tuple[int, ...], bits: int, groups: int
                     ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(q shape, scale shape) of kernel `name` of float shape `shape`."""
    if bits not in (4, 8):
        raise ConfigError(f"{name}: quantization bits must be 4 or 8, got {bits}")
    spec = KERNELS[name]
    g = groups if spec.row_parallel else 1
    if shape[0] % g:
        raise ConfigError(f"{name}: {g} quantization groups do not divide its input axis of {shape[0]}")
    q = list(shape)
    if bits == 4:
        a = spec.n_in - 1
        # packed pairs must not straddle a group (a tensor-parallel shard packs its own columns)
        per = q[a] // g if a == 0 else q[a]
        if per % 2:
            where = f" in each of its {g} groups" if a == 0 and g > 1 else ""
            raise ConfigError(f"{name}: int4 packing needs an even input axis{where}, got {per}")
        q[a] //= 2
    return tuple(q), (g,) + tuple(shape[spec.n_in:])


def _grouped(x: Any, g: int) -> Any:
    return x.reshape((g, x.shape[0] // g) + x.shape[1:])


def quantize_kernel(w: np.ndarray, name: str, bits: int, groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Host-side quantization of a float kernel in float16 arithmetic, as GLM-130B does it."""
    spec = KERNELS[name]
    g = groups if spec.row_parallel else 1
    quantized_shapes(name, w.shape, bits, groups)  # validates
    w16 = _grouped(np.asarray(w).astype(np.float16), g)
    axes = tuple(range(1, spec.n_in + 1))
    scale = (np.abs(w16).max(axis=axes) / np.float16(2 ** (bits - 1) - 1)).astype(np.float16)
    safe = np.where(scale == 0, np.float16(1), scale)
    q = np.round(w16 / safe.reshape(safe.shape[:1] + (1,) * spec.n_in + safe.shape[1:])).astype(np.int8)
    q = q.reshape(w.shape)
    if bits == 4:
        q = pack_int4(q, spec.n_in - 1)
    return q, scale


def pack_int4(q: np.ndarray, axis: int) -> np.ndarray:
    """Host-side: int8 values in [-8, 7] -> bytes holding two along `axis` (halved), the even one in
    the high nibble (GLM-130B's int4WeightCompression along its input dimension)."""
    q = np.asarray(q, np.int8)
    if q.shape[axis] % 2:
        raise ConfigError(f"int4 packing needs an even axis {axis}, got shape {q.shape}")
    hi = np.take(q, np.arange(0, q.shape[axis], 2), axis=axis).astype(np.uint8)
    lo = np.take(q, np.arange(1, q.shape[axis], 2), axis=axis).astype(np.uint8)
    return ((hi << 4) | (lo & 0xF)).astype(np.uint8).view(np.int8)


def unpack_int4_host(q: np.ndarray, axis: int) -> np.ndarray:
    """Host-side inverse of pack_int4: sign-extended int8 values, `axis` doubled."""
    q = np.asarray(q, np.int8)
    hi = q >> 4  # arithmetic shift keeps the sign
    lo = (q << 4).astype(np.int8) >> 4
    both = np.stack([hi, lo], axis=axis + 1)
    shape = list(q.shape)
    shape[axis] *= 2
    return both.reshape(shape)


def unpack_int4(q: Any, axis: int) -> Any:
    """Sign-extended nibbles of packed int4 bytes, the high nibble first along `axis` (doubled)."""
    hi = jnp.right_shift(q, 4)  # arithmetic on int8
    lo = jnp.right_shift(jnp.left_shift(q, 4), 4)
    both = jnp.stack([hi, lo], axis=axis + 1)
    shape = list(q.shape)
    shape[axis] *= 2
    return both.reshape(shape)


def dequantize_kernel(q: Any, scale: Any, name: str, bits: int, dtype: Any) -> Any:
    """q * scale in float16 (GLM-130B's dequantization), cast to the compute dtype."""
    spec = KERNELS[name]
    if bits == 4:
        q = unpack_int4(q, spec.n_in - 1)
    g = scale.shape[0]
    s = scale.astype(jnp.float16).reshape(scale.shape[:1] + (1,) * spec.n_in + scale.shape[1:])
    w = _grouped(q, g).astype(jnp.float16) * s
    return w.reshape(q.shape).astype(dtype)


def dequantize_int4_halves(q: Any, scale: Any, name: str, dtype: Any) -> tuple[Any, Any]:
    """Packed int4 -> (weights of the even inputs, weights of the odd inputs), each dequantized as
    GLM-130B does. A layer contracts each half with the matching half of its input, so the nibbles
    are never interleaved back into one tensor (that copy made the scanned layers 4x slower on CPU)."""
    hi = jnp.right_shift(q, 4)  # arithmetic on int8: the even input, sign-extended
    lo = jnp.right_shift(jnp.left_shift(q, 4), 4)
    return dequantize_kernel(hi, scale, name, 8, dtype), dequantize_kernel(lo, scale, name, 8, dtype)


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


def set_param(tree: dict[str, Any], path: tuple[str, ...], layer: int | None, arr: np.ndarray,
              num_layers: int) -> None:
    """Put a host array into a parameter tree in its own dtype; a per-layer one into its slot of
    the [num_layers, ...] stack (allocated on first use)."""
    node = tree
    for k in path[:-1]:
        node = node.setdefault(k, {})
    if layer is None:
        node[path[-1]] = arr
        return
    if path[-1] not in node:
        node[path[-1]] = np.empty((num_layers,) + arr.shape, arr.dtype)
    node[path[-1]][layer] = arr


def param_bytes(params: Any) -> int:
    """Bytes the parameter arrays occupy (all shards together)."""
    import jax

    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(params)))
