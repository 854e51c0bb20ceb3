"""Functional entry points over the GLM module: abstract shapes, sharded init, placing parameters on
a mesh, and a jitted forward with explicit in/out shardings. Parameters are a plain pytree
(the module's `params` collection, without the outer {'params': ...}).

Any batch runs on any mesh: `pad_rows` fills a batch up to a multiple of the data parallelism
(data * fsdp) and every batch entry point drops the padding rows from what it returns."""
from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from glmjax.config import GLMConfig
from glmjax.errors import CheckpointError, InputError
from glmjax.model.glm import GLM
from glmjax.parallel import rules

Batch = Mapping[str, Any]
INPUT_NAMES = ("tokens", "position_ids", "attention_mask", "prefix_mask", "segment_ids")


def _init_fn(cfg: GLMConfig):
    model = GLM(cfg)
    pos_shape = (1, 2, 1) if cfg.position_encoding_2d else (1, 1)

    def init(rng):
        return model.init(rng, jnp.zeros((1, 1), jnp.int32), jnp.zeros(pos_shape, jnp.int32))["params"]

    return init


def abstract_params(cfg: GLMConfig) -> Any:
    """ShapeDtypeStructs of the parameters, boxed with their logical axis names."""
    return jax.eval_shape(_init_fn(cfg), jax.random.key(0))


def param_shardings(cfg: GLMConfig, mesh: Mesh) -> Any:
    """NamedShardings of every parameter on `mesh`; one clear error if a dimension does not divide."""
    boxed = abstract_params(cfg)
    shardings = rules.mesh_shardings(rules.logical_specs(boxed), mesh)
    rules.check_divisible(nn.unbox(boxed), shardings)
    return shardings


def init_params(cfg: GLMConfig, rng: jax.Array, mesh: Mesh) -> Any:
    """Random parameters created directly in their shards (no host ever holds the whole model)."""
    shardings = param_shardings(cfg, mesh)
    init = jax.jit(lambda r: nn.unbox(_init_fn(cfg)(r)), out_shardings=shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
        return init(rng)


def shard_params(params: Any, cfg: GLMConfig, mesh: Mesh) -> Any:
    """Place a host pytree (e.g. read from a checkpoint) on `mesh`, checking it against the config."""
    shardings = param_shardings(cfg, mesh)
    want = nn.unbox(abstract_params(cfg))
    want_flat, want_def = jax.tree_util.tree_flatten_with_path(want)
    got_flat, got_def = jax.tree_util.tree_flatten_with_path(params)
    if want_def != got_def:
        raise CheckpointError(f"parameter tree does not match the config: expected "
                              f"{[jax.tree_util.keystr(p) for p, _ in want_flat][:4]}..., got "
                              f"{[jax.tree_util.keystr(p) for p, _ in got_flat][:4]}...")
    for (path, w), (_, g) in zip(want_flat, got_flat):
        if tuple(w.shape) != tuple(np.shape(g)):
            raise CheckpointError(f"parameter {jax.tree_util.keystr(path)} has shape {tuple(np.shape(g))}, "
                                  f"the config implies {tuple(w.shape)}")
    return jax.device_put(params, shardings)


def batch_shardings(batch: Batch, mesh: Mesh) -> dict[str, NamedSharding]:
    """Shardings of the model inputs: batch over data+fsdp, everything else replicated."""
    names = {"tokens": ("batch", "length"), "prefix_mask": ("batch", "length"),
             "segment_ids": ("batch", "length"), "attention_mask": ("batch", None, None, None)}
    out = {}
    for k, v in batch.items():
        if k == "position_ids":
            axes = ("batch", "length") if np.ndim(v) == 2 else ("batch", None, "length")
        else:
            axes = names[k]
        out[k] = rules.named(mesh, *axes)
    return out


def data_parallelism(mesh: Mesh) -> int:
    """How many ways the batch dimension is split on `mesh`: data * fsdp."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def pad_rows(batch: Mapping[str, Any], multiple: int, zero: Collection[str] = ()) -> tuple[dict[str, Any], int]:
    """(batch with its rows padded up to a multiple of `multiple`, the number of real rows).

    Padding rows are copies of row 0: a real row keeps every layout (dense mask, prefix/segments,
    positions) finite and harmless. Arrays named in `zero` are padded with zeros instead, e.g. a
    loss mask, so padding rows count for nothing. Every array's leading dimension is the batch.
    """
    out = dict(batch)
    rows = {int(np.shape(v)[0]) for v in out.values()}
    if len(rows) != 1:
        raise InputError(f"batch arrays disagree on the number of rows: {sorted(rows)}")
    b = rows.pop()
    extra = -b % multiple
    if extra:
        for k, v in out.items():
            xp = jnp if isinstance(v, jax.Array) else np
            fill = xp.zeros_like(v[:1]) if k in zero else v[:1]
            out[k] = xp.concatenate([v, xp.repeat(fill, extra, axis=0)], axis=0)
    return out, b


def validate_batch(cfg: GLMConfig, batch: Batch) -> None:
    """Shapes, dtypes, lengths and token ids of a forward batch; one clear error each."""
    if "tokens" not in batch or "position_ids" not in batch:
        raise InputError("inputs need 'tokens' [b, s] and 'position_ids'")
    unknown = set(batch) - set(INPUT_NAMES)
    if unknown:
        raise InputError(f"unknown input array {sorted(unknown)[0]!r}")
    tok = np.asarray(batch["tokens"])
    if tok.ndim != 2 or not np.issubdtype(tok.dtype, np.integer):
        raise InputError(f"tokens must be an integer array [batch, seq], got {tok.dtype} {tok.shape}")
    b, s = tok.shape
    if b == 0 or s == 0:
        raise InputError(f"tokens [batch, seq] must hold at least one row and one position, got {list(tok.shape)} "
                         f"({'batch' if b == 0 else 'sequence'} 0)")
    if "attention_mask" in batch and ("prefix_mask" in batch or "segment_ids" in batch):
        raise InputError("give attention_mask or prefix_mask/segment_ids, not both (the dense attention_mask "
                         "would silently win)")
    if s > cfg.max_sequence_length:
        raise InputError(f"sequence length {s} exceeds max_sequence_length={cfg.max_sequence_length}")
    bad = (tok < 0) | (tok >= cfg.vocab_size)
    if bad.any():
        i = tuple(int(x) for x in np.argwhere(bad)[0])
        raise InputError(f"unknown token id {int(tok[i])} at {i}: the vocabulary has {cfg.vocab_size} ids")
    pos = np.asarray(batch["position_ids"])
    want = (b, 2, s) if cfg.position_encoding_2d else (b, s)
    if pos.shape != want or not np.issubdtype(pos.dtype, np.integer):
        kind = "2-D" if cfg.position_encoding_2d else "1-D"
        raise InputError(f"position_ids must be integer {list(want)} for {kind} rotary, "
                         f"got {pos.dtype} {list(pos.shape)}")
    if pos.min() < 0 or pos.max() >= cfg.max_sequence_length:
        raise InputError(f"position_ids must lie in [0, {cfg.max_sequence_length}) (max_sequence_length), "
                         f"got [{pos.min()}, {pos.max()}]")
    if "attention_mask" in batch:
        m = np.asarray(batch["attention_mask"])
        if (m.dtype != bool or m.ndim != 4 or m.shape[1] != 1 or m.shape[2:] != (s, s)
                or m.shape[0] not in (1, b)):
            raise InputError(f"attention_mask must be bool [{b}, 1, {s}, {s}] with True = blocked, "
                             f"got {m.dtype} {list(m.shape)}")
    for k in ("prefix_mask", "segment_ids"):
        if k not in batch:
            continue
        v = np.asarray(batch[k])
        if v.shape != (b, s) or not (v.dtype == bool or np.issubdtype(v.dtype, np.integer)):
            raise InputError(f"{k} must be a bool or integer array [{b}, {s}], got {v.dtype} {list(v.shape)}")


def make_forward(cfg: GLMConfig, mesh: Mesh, *, collect_hidden: bool = False,
                 collect_kv: bool = False) -> Callable[[Any, Batch], tuple[jax.Array, dict]]:
    """A jitted inference forward over `mesh`: (params, batch) -> (float32 logits, per-layer outputs).

    Shardings are explicit: parameters per the rules table, batch arrays over data+fsdp, logits
    over (batch, vocab). A dense attention_mask with batch 1 is broadcast to the batch first; any
    batch size runs: rows are padded to data*fsdp (`pad_rows`) and only the real ones come back.
    """
    model = GLM(cfg)
    p_shard = param_shardings(cfg, mesh)
    logits_shard = rules.named(mesh, "batch", "length", "vocab")
    compiled: dict[tuple, Callable] = {}

    def apply(params, batch):
        with nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
            return model.apply({"params": params}, batch["tokens"], batch["position_ids"],
                               attention_mask=batch.get("attention_mask"),
                               prefix_mask=batch.get("prefix_mask"), segment_ids=batch.get("segment_ids"),
                               collect_hidden=collect_hidden, collect_kv=collect_kv)

    def forward(params, batch):
        batch = dict(batch)
        b = np.shape(batch["tokens"])[0]
        if "attention_mask" in batch and np.shape(batch["attention_mask"])[0] != b:
            mask = batch["attention_mask"]
            xp = jnp if isinstance(mask, jax.Array) else np
            batch["attention_mask"] = xp.broadcast_to(mask, (b,) + tuple(np.shape(mask)[1:]))
        batch, _ = pad_rows(batch, data_parallelism(mesh))
        b_shard = batch_shardings(batch, mesh)
        key = tuple(sorted((k, np.ndim(v)) for k, v in batch.items()))
        if key not in compiled:
            compiled[key] = jax.jit(apply, in_shardings=(p_shard, b_shard),
                                    out_shardings=(logits_shard, None))
        batch = {k: v if isinstance(v, jax.Array) else jax.device_put(v, b_shard[k]) for k, v in batch.items()}
        with jax.set_mesh(mesh):
            logits, per_layer = compiled[key](params, batch)
        if np.shape(batch["tokens"])[0] == b:
            return logits, per_layer
        return logits[:b], jax.tree.map(lambda x: x[:, :b], per_layer)  # per-layer outputs: [layers, b, ...]

    return forward
