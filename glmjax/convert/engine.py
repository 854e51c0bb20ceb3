"""The one conversion engine: declarative per-family tables of tensor rules, GLM-130B's
tensor-parallel merge/split rules, shared by every format (GLM-130B's weight-only quantization lives in
glmjax/model/quant.py, the one home of that scheme).

A rule maps one external tensor (torch layout, [out, in]) to one glmjax parameter (a path into the
pytree, layers stacked on axis 0). Formats only decide where bytes live; what a tensor *is* lives
here and in glmjax/convert/tables.py.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from glmjax.config import GLMConfig
from glmjax.model import quant

Path = tuple[str, ...]
Piece = tuple[tuple[slice, ...], np.ndarray]  # where in the glmjax-layout tensor, and its values


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a writer pulls glmjax-layout tensors from, one (path, layer) at a time.

    pieces, when a format stores a tensor in parts (SAT's ranks), yields them one by one so a
    writer that can place parts (orbax) never holds the whole tensor.
    """

    get: Callable[[Path, int | None], np.ndarray]
    dtype: Callable[[Path], np.dtype]
    pieces: Callable[[Path, int | None], Iterator[Piece]] | None = None
    parts: int = 1  # how many pieces a split tensor comes in (SAT: the tensor-parallel degree)
    read_slice: Callable[[Path, int | None, tuple[slice, ...]], np.ndarray] | None = None

    def iter_pieces(self, path: Path, layer: int | None) -> Iterator[Piece]:
        if self.pieces is not None:
            yield from self.pieces(path, layer)
        else:
            yield (), self.get(path, layer)

    def reader(self, path: Path, layer: int | None) -> Callable[[tuple[slice, ...]], np.ndarray]:
        """index -> part of one tensor: formats that read parts (orbax) read only the part asked
        for; the others read the tensor once and slice it."""
        if self.read_slice is not None:
            return lambda idx: self.read_slice(path, layer, idx)
        full = self.get(path, layer)
        return lambda idx: full[idx]


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One external tensor <-> one glmjax parameter.

    split: how tensor-parallel ranks hold it -- 'rows' (dim 0), 'cols' (dim 1), 'glu' (each rank
    holds [its value rows; its gate rows]) or 'replicated'. to_jax/from_jax convert between the
    torch layout and glmjax's layout, of the whole tensor or of one rank's shard: in glmjax's layout
    every split, GeGLU's included, is a plain cut along jax_axis, so merging shards is concatenating
    their to_jax along it and splitting is from_jax of equal pieces.
    """

    name: str  # external key, with {i} for the layer index
    path: Path
    shape: tuple[int, ...]  # merged torch-layout shape
    split: str
    jax_axis: int | None  # the glmjax-layout axis that the tensor-parallel split cuts (None: replicated)
    to_jax: Callable[[np.ndarray], np.ndarray]  # shape-agnostic: works on one rank's shard too
    from_jax: Callable[[np.ndarray], np.ndarray]

    @property
    def quantizable(self) -> bool:
        """One of the four linear weights of a block (quant.KERNELS) that GLM-130B stores as int8/int4
        with a per-row scale."""
        return self.path[-1] in quant.KERNELS

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.name

    def key(self, layer: int | None) -> str:
        return self.name.format(i=layer)

    def shard_shape(self, tp: int) -> tuple[int, ...]:
        dim = {"rows": 0, "glu": 0, "cols": 1}.get(self.split)
        if dim is None:
            return self.shape
        return tuple(n // tp if d == dim else n for d, n in enumerate(self.shape))


def ordered(rules: list[TensorRule], cfg: GLMConfig) -> Iterator[tuple[TensorRule, int | None]]:
    """State-dict order: tensors listed before the layer rules, then each layer's tensors in table
    order, then the remaining tensors."""
    k = next((n for n, r in enumerate(rules) if r.per_layer), len(rules))
    for r in rules[:k]:
        yield r, None
    for i in range(cfg.num_layers):
        for r in rules:
            if r.per_layer:
                yield r, i
    for r in rules[k:]:
        if not r.per_layer:
            yield r, None


def merge_to_jax(rule: TensorRule, parts: list[np.ndarray]) -> np.ndarray:
    """Undo GLM-130B's tensor-parallel split (tools/convert_tp.py rules); parts in rank order."""
    if rule.jax_axis is None or len(parts) == 1:
        return rule.to_jax(parts[0])
    return np.concatenate([rule.to_jax(p) for p in parts], axis=rule.jax_axis)


def rank_slice(rule: TensorRule, ndim: int, size: int, tp: int, rank: int) -> tuple[slice, ...]:
    """Where rank `rank`'s shard sits in the whole glmjax-layout tensor."""
    if rule.jax_axis is None or tp == 1:
        return ()
    n = size // tp
    return (slice(None),) * rule.jax_axis + (slice(rank * n, (rank + 1) * n),)


def shard_from_jax(rule: TensorRule, read: Callable[[tuple[slice, ...]], np.ndarray], shape: tuple[int, ...],
                   tp: int, rank: int) -> np.ndarray:
    """Rank `rank`'s tensor (torch layout) from `read(index)` of the glmjax-layout tensor of `shape`,
    asking only for that rank's part."""
    idx = rank_slice(rule, len(shape), shape[rule.jax_axis] if rule.jax_axis is not None else 0, tp, rank)
    return np.ascontiguousarray(rule.from_jax(read(idx)))


def jax_shape(rule: TensorRule) -> tuple[int, ...]:
    """Shape of the whole tensor in glmjax's layout."""
    return rule.to_jax(np.empty(rule.shape, np.uint8)).shape


def put_param(tree: dict[str, Any], path: Path, layer: int | None, arr: np.ndarray, num_layers: int) -> None:
    """The one tree builder: a host array into a glmjax parameter pytree (in its own dtype), a
    per-layer one into its slot of the [num_layers, ...] stack (allocated on first use)."""
    node = tree
    for k in path[:-1]:
        node = node.setdefault(k, {})
    if layer is None:
        node[path[-1]] = arr
        return
    if path[-1] not in node:
        node[path[-1]] = np.empty((num_layers,) + arr.shape, arr.dtype)
    node[path[-1]][layer] = arr


def host_tree(rules: list[TensorRule], cfg: GLMConfig, source: Source, dtype: Any = None) -> dict[str, Any]:
    """The parameter pytree of a Source on the host, one tensor at a time, in `dtype` (default the
    config's parameter dtype)."""
    import jax.numpy as jnp  # its dtype() knows bfloat16

    dt = jnp.dtype(dtype or cfg.param_dtype)
    tree: dict[str, Any] = {}
    for rule, i in ordered(rules, cfg):
        put_param(tree, rule.path, i, np.asarray(source.get(rule.path, i), dt), cfg.num_layers)
    return tree
