"""THE logical-axis rules table, and shardings derived from it.

Layers name their parameter and activation axes logically (embed, heads, kv, mlp, vocab, layers,
batch, length); this table alone decides where each goes on the (data, fsdp, tensor) mesh:
Megatron-style tensor parallelism on `tensor` (heads, MLP width, vocabulary), FSDP on `fsdp`
(the embed dimension of parameters), and the batch over `data` and `fsdp`. When a rule's mesh axis
is already taken in one array (an activation's embed dim once the batch holds fsdp) flax falls
through to the next rule, here: replicated.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from glmjax.errors import MeshError

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)


def logical_specs(boxed_tree: Any) -> Any:
    """PartitionSpecs of logical names from an (eval_shape'd) tree of LogicallyPartitioned leaves."""
    return nn.get_partition_spec(boxed_tree)


def mesh_shardings(logical: Any, mesh: Mesh) -> Any:
    """NamedShardings on `mesh` for a tree of logical PartitionSpecs."""
    return nn.logical_to_mesh_sharding(logical, mesh, LOGICAL_AXIS_RULES)


def named(mesh: Mesh, *logical_axes: str | None) -> NamedSharding:
    """NamedSharding of one array whose axes have these logical names."""
    spec = nn.logical_to_mesh_axes(logical_axes, LOGICAL_AXIS_RULES)
    return NamedSharding(mesh, spec)


def _axis_size(mesh: Mesh, entry: Any) -> int:
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return int(np.prod([mesh.shape[n] for n in names]))


def check_divisible(shapes: Any, shardings: Any, what: str = "parameter") -> None:
    """One clear error naming the array, the dimension and the mesh axis that it does not divide."""
    flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
    flat_shard = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), sharding in zip(flat_shapes, flat_shard):
        spec: PartitionSpec = sharding.spec
        for dim, entry in enumerate(spec):
            n = _axis_size(sharding.mesh, entry)
            if leaf.shape[dim] % n:
                name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
                raise MeshError(f"{what} {name}: dimension {dim} (size {leaf.shape[dim]}) is not "
                                f"divisible by mesh axis {entry!r} (size {n})")
