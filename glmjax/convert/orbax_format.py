"""glmjax's own checkpoint: an orbax PyTree checkpoint of the parameters plus the config beside it.

Layout of DIR:
  glmjax.json   {"format": "glmjax-params", "version": 1, "config": {...}}; written last, so a
                directory without it is not a checkpoint
  params/       orbax PyTree checkpoint (zarr arrays, no OCDBT), restorable with orbax directly

Writing streams: orbax lays out the tree's metadata from a skeleton of tiny arrays, then each
parameter's zarr array is created at full size with tensorstore and filled one tensor (one layer of
a stacked parameter) at a time, so host memory holds one tensor, never the model. Reading goes
through orbax with the target mesh's shardings: each device reads only its own shard.
"""
from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from glmjax import config as C
from glmjax import storage
from glmjax.config import GLMConfig
from glmjax.convert.engine import Path, Source
from glmjax.errors import CheckpointError

FORMAT = "glmjax-params"
VERSION = 1
META_FILE = "glmjax.json"
PARAMS_DIR = "params"
CHUNK_BYTES = 128 << 20


def is_checkpoint(path: str) -> bool:
    return storage.isfile(storage.join(path, META_FILE))


def read_meta(path: str) -> dict[str, Any]:
    meta_path = storage.join(path, META_FILE)
    if not storage.isfile(meta_path):
        raise CheckpointError(f"{path} is not a glmjax checkpoint (no {META_FILE})")
    try:
        meta = json.loads(storage.read_bytes(meta_path).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path} is unreadable: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{meta_path}: not a {FORMAT} v{VERSION} checkpoint")
    if meta.get("sat_iteration") is not None:  # joined into SAT output paths: digits only
        from glmjax.convert.sat import check_iteration

        check_iteration(meta["sat_iteration"], f"{meta_path}: sat_iteration")
    return meta


def read_config(path: str) -> GLMConfig:
    return C.from_dict(read_meta(path)["config"], source=storage.join(path, META_FILE))


def _leaves(cfg: GLMConfig) -> dict[Path, tuple[int, ...]]:
    from glmjax.model.api import abstract_params

    flat = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_params(cfg)))[0]
    return {tuple(k.key for k in p): tuple(a.shape) for p, a in flat}


def _param_name(path: Path) -> str:
    return ".".join(path)  # orbax's non-OCDBT directory name of a leaf (orbax 0.12, pinned in setup.cfg)


def _kvstore(params_dir: str, path: Path) -> Any:
    return storage.kvstore(storage.join(params_dir, _param_name(path)))


# How glmjax saves any PyTree with orbax (converted parameters and training state alike): one zarr
# array per leaf, no OCDBT, so a reader can open one leaf -- one layer of it -- without the rest.
def pytree_handler():
    import orbax.checkpoint as ocp

    return ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=False)


def _chunks(shape: tuple[int, ...], itemsize: int, stacked: bool, align: tuple[int, int] | None = None
            ) -> list[int]:
    """One layer per chunk along a stacked axis; `align` = (axis, parts) cuts that axis into the
    source's pieces so each piece fills whole chunks (no read-modify-write); then the largest dim is
    split until a chunk is <= CHUNK_BYTES."""
    chunk = list(shape)
    if stacked:
        chunk[0] = 1
    if align and align[1] > 1 and chunk[align[0]] % align[1] == 0:
        chunk[align[0]] //= align[1]
    while int(np.prod(chunk)) * itemsize > CHUNK_BYTES:
        d = int(np.argmax(chunk[1:] if stacked else chunk)) + (1 if stacked else 0)
        k = next((k for k in range(2, chunk[d] + 1) if chunk[d] % k == 0), chunk[d])
        if k == chunk[d] and chunk[d] == 1:
            break
        chunk[d] //= k
    return chunk


def _orbax_skeleton(params_dir: str, shapes: dict[Path, tuple[int, ...]],
                    dtypes: dict[Path, np.dtype]) -> None:
    """Let orbax write its metadata for a tree of tiny arrays, then give every leaf its real shape."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    tree: dict[str, Any] = {}
    for path, shape in shapes.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = jnp.zeros((1,) * len(shape), dtypes[path])
    with ocp.Checkpointer(pytree_handler()) as ckptr:
        ckptr.save(params_dir, args=ocp.args.PyTreeSave(tree))
    meta_path = os.path.join(params_dir, "_METADATA")
    with open(meta_path) as f:
        meta = json.load(f)
    for entry in meta["tree_metadata"].values():
        path = tuple(k["key"] for k in entry["key_metadata"])
        entry["value_metadata"]["write_shape"] = list(shapes[path])
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    arr_dir = os.path.join(params_dir, "array_metadatas")
    by_name = {_param_name(p): s for p, s in shapes.items()}
    for name in os.listdir(arr_dir):
        with open(os.path.join(arr_dir, name)) as f:
            am = json.load(f)
        for item in am["array_metadatas"]:
            a = item["array_metadata"]
            a["write_shape"] = list(by_name[a["param_name"]])
            a["chunk_shape"] = _chunks(by_name[a["param_name"]], 1, False)  # informational
        with open(os.path.join(arr_dir, name), "w") as f:
            json.dump(am, f)


def write_params(out_dir: str, cfg: GLMConfig, source: Source, dtype: Any = None,
                 extra_meta: dict[str, Any] | None = None) -> None:
    """Write a glmjax checkpoint into the (new, empty) out_dir from a Source, piece by piece.

    Each parameter (each layer of a stacked one) is written from the source's pieces straight into
    its zarr array; glmjax.json is written last.
    """
    import tensorstore as ts

    from glmjax.convert.tables import sat_rules

    shapes = _leaves(cfg)
    dtypes = {p: np.dtype(dtype) if dtype else np.dtype(source.dtype(p)) for p in shapes}
    axes = {r.path: r.jax_axis for r in sat_rules(cfg)}
    params_dir = os.path.join(out_dir, PARAMS_DIR)
    _orbax_skeleton(params_dir, shapes, dtypes)
    for path, shape in shapes.items():
        stacked = path[0] == "layers"
        dt = dtypes[path]
        align = None if axes[path] is None else (axes[path] + int(stacked), source.parts)
        spec = {"driver": "zarr", "kvstore": _kvstore(params_dir, path),
                "metadata": {"shape": list(shape), "dtype": "bfloat16" if dt.name == "bfloat16" else dt.str,
                             "chunks": _chunks(shape, dt.itemsize, stacked, align), "compressor": None,
                             "dimension_separator": "."}}
        store = ts.open(spec, create=True, delete_existing=True).result()
        for layer in (range(shape[0]) if stacked else [None]):
            target = store if layer is None else store[layer]
            want = shape[1:] if stacked else shape
            covered = 0
            for idx, part in source.iter_pieces(path, layer):
                region = np.empty(want, np.uint8)[idx].shape if idx else want
                if tuple(part.shape) != tuple(region):
                    raise CheckpointError(f"parameter {'/'.join(path)}: piece of shape {tuple(part.shape)}, "
                                          f"expected {tuple(region)}")
                (target[idx] if idx else target).write(np.asarray(part).astype(dt, copy=False)).result()
                covered += int(np.prod(region))
            if covered != int(np.prod(want)):
                raise CheckpointError(f"parameter {'/'.join(path)} (layer {layer}) was not completely written")
    meta = {"format": FORMAT, "version": VERSION, "config": cfg.to_dict(), **(extra_meta or {})}
    with open(os.path.join(out_dir, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)


def save_params(out_dir: str, cfg: GLMConfig, params: Any,
                extra_meta: dict[str, Any] | None = None) -> None:
    """Save device-resident (sharded) parameters with orbax: each host writes its own shards."""
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(pytree_handler()) as ckptr:
        ckptr.save(os.path.join(out_dir, PARAMS_DIR), args=ocp.args.PyTreeSave(params))
    meta = {"format": FORMAT, "version": VERSION, "config": cfg.to_dict(), **(extra_meta or {})}
    with open(os.path.join(out_dir, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)


def orbax_source(path: str) -> tuple[GLMConfig, Source]:
    """Random access to a glmjax checkpoint on the host, one tensor (one layer) at a time."""
    cfg = read_config(path)
    return cfg, tree_source(storage.join(path, PARAMS_DIR), cfg, (), path)


def tree_source(tree_dir: str, cfg: GLMConfig, prefix: Path, where: str) -> Source:
    """Host reads of the parameters (under key path `prefix`) of an orbax PyTree saved by glmjax:
    each leaf's zarr array is opened with tensorstore and read one layer, or one slice, at a time.
    A missing chunk is an error, never zeros (glmjax and orbax store every chunk); a missing,
    truncated or unreadable one is one CheckpointError naming the parameter."""
    import tensorstore as ts

    shapes = _leaves(cfg)
    stores: dict[Path, Any] = {}

    def store(p: Path):
        if p not in stores:
            spec = {"driver": "zarr", "kvstore": _kvstore(tree_dir, prefix + p), "fill_missing_data_reads": False}
            try:
                stores[p] = ts.open(spec, open=True).result()
            except Exception as e:
                raise CheckpointError(f"{where}: parameter {'/'.join(p)} is missing or unreadable "
                                      f"({first_line(e)})") from None
            if tuple(stores[p].shape) != shapes[p]:
                raise CheckpointError(f"{where}: parameter {'/'.join(p)} has shape {tuple(stores[p].shape)}, "
                                      f"the config implies {shapes[p]}")
        return stores[p]

    def read(p: Path, view: Any) -> np.ndarray:
        try:
            return np.asarray(view.read().result())
        except Exception as e:
            raise CheckpointError(f"{where}: parameter {'/'.join(p)} is damaged ({first_line(e)})") from None

    def get(p: Path, layer: int | None) -> np.ndarray:
        s = store(p)
        return read(p, s if layer is None else s[layer])

    def read_slice(p: Path, layer: int | None, idx: tuple[slice, ...]) -> np.ndarray:
        s = store(p) if layer is None else store(p)[layer]
        return read(p, s[idx] if idx else s)

    def dtype(p: Path) -> np.dtype:
        return np.dtype(store(p).dtype.numpy_dtype)

    return Source(get=get, dtype=dtype, read_slice=read_slice)


def first_line(e: BaseException) -> str:
    """The first line of the root cause of an exception: orbax wraps tensorstore's precise message
    ("... local file X is missing", "Not enough data") in a generic one."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def quiet_abandoned_reads() -> None:
    """After a failed orbax restore, tensorstore still completes the reads it had in flight and calls
    back into orbax's closed event loop; Python reports each as an unraisable RuntimeError (or an
    abandoned orbax coroutine) on stderr. Those reports say nothing the CheckpointError does not:
    drop them, and only them (installed once, every other unraisable goes to the previous hook)."""
    import sys

    if getattr(sys.unraisablehook, "_glmjax_quiet", False):
        return
    previous = sys.unraisablehook

    def hook(u):
        exc, obj = u.exc_value, u.object
        code = getattr(obj, "cr_code", None)
        if (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed") or \
                (code is not None and "orbax" in code.co_filename):
            return
        previous(u)

    hook._glmjax_quiet = True
    sys.unraisablehook = hook


def check_tree_dir(tree_dir: str, where: str) -> None:
    """An orbax PyTree folder restores only with its _METADATA (orbax's own error for a missing one
    is about pytree structure): one clear line instead."""
    meta = storage.join(tree_dir, "_METADATA")
    if not storage.isfile(meta):
        raise CheckpointError(f"cannot restore {where}: {meta} is missing")


def restore_tree(tree_dir: str, mesh: jax.sharding.Mesh, cfg: GLMConfig, prefix: str | None = None,
                 where: str | None = None) -> Any:
    """Parameters (the subtree `prefix` of a larger tree, e.g. a training state's "params") restored
    onto `mesh` in the config's dtypes: each device reads its own shard (orbax with target shardings)."""
    import orbax.checkpoint as ocp

    from glmjax.model.api import abstract_params, param_shardings

    shardings = param_shardings(cfg, mesh)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.unbox(abstract_params(cfg)), shardings)
    item = {prefix: target} if prefix else target
    args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=bool(prefix))
    check_tree_dir(tree_dir, where or tree_dir)
    try:
        with ocp.Checkpointer(pytree_handler()) as ckptr:
            restored = ckptr.restore(tree_dir, args=args)
    except Exception as e:
        quiet_abandoned_reads()
        raise CheckpointError(f"cannot restore {where or tree_dir}: {first_line(e)}") from None
    return restored[prefix] if prefix else restored


def restore_params(path: str, mesh: jax.sharding.Mesh, cfg: GLMConfig | None = None) -> tuple[GLMConfig, Any]:
    """Restore a glmjax checkpoint onto `mesh` (in `cfg`'s dtypes; default its own config)."""
    cfg = cfg or read_config(path)
    return cfg, restore_tree(storage.join(path, PARAMS_DIR), mesh, cfg, where=path)
