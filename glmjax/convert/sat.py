"""GLM-130B's SwissArmyTransformer (SAT) checkpoints, read and written at any tensor-parallel degree.

Layout: `DIR/latest` holds the iteration; `DIR/<iter>/mp_rank_XX_model_states.pt` holds
`{'module': state_dict}`, one file per tensor-parallel rank, split with GLM-130B's rules
(tools/convert_tp.py). Quantized checkpoints hold int8 (or int4 packed two per byte) for the four
linear weights of each block, with a float16 `<key>_scale` per shard row. Files are memory-mapped
on read and streamed on write: one tensor in memory at a time.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from glmjax.config import GLMConfig
from glmjax.convert import engine
from glmjax.convert.engine import Source, TensorRule
from glmjax.convert.tables import sat_rules
from glmjax.convert.torch_files import StreamingTorchFile, TorchZipReader
from glmjax.errors import CheckpointError, GlmjaxError
from glmjax.model import quant

SHARD_RE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
ITERATION_RE = re.compile(r"[0-9]+")  # an iteration names a folder of its checkpoint: digits, nothing else
# A buffer SAT recomputes and never loads (GLM-130B issue #18); SAT's state_dict() carries it.
INV_FREQ_KEY = "mixins.rotary-embedding.rotary_emb.inv_freq"
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def shard_name(rank: int) -> str:
    return f"mp_rank_{rank:02d}_model_states.pt"


def check_iteration(iteration: str, where: str) -> str:
    """An iteration is digits only: it is joined into read and write paths, so `..`, `/` or an
    absolute path would reach files outside the checkpoint."""
    if not isinstance(iteration, str) or not ITERATION_RE.fullmatch(iteration):
        raise CheckpointError(f"{where}: iteration {iteration!r} must be a string of digits (it names a "
                              f"folder inside the checkpoint)")
    return iteration


def find_shards(ckpt_dir: str) -> tuple[str, list[str]]:
    """Return (iteration, shard paths in rank order); one clear error for each layout problem."""
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"SAT checkpoint directory not found: {ckpt_dir}")
    latest = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(latest):
        raise CheckpointError(f"SAT checkpoint {ckpt_dir} has no 'latest' file naming its iteration")
    with open(latest, encoding="utf-8", errors="replace") as fh:
        iteration = fh.read().strip()
    check_iteration(iteration, f"SAT checkpoint {ckpt_dir}: 'latest'")
    it_dir = os.path.join(ckpt_dir, iteration)
    if not os.path.isdir(it_dir):
        raise CheckpointError(f"SAT checkpoint {ckpt_dir}: 'latest' names iteration {iteration!r} "
                              f"but {it_dir} does not exist")
    ranks = {}
    for name in os.listdir(it_dir):
        m = SHARD_RE.match(name)
        if m:
            ranks[int(m.group(1))] = os.path.join(it_dir, name)
    if not ranks:
        raise CheckpointError(f"SAT checkpoint {it_dir} holds no mp_rank_XX_model_states.pt files")
    missing = [r for r in range(max(ranks) + 1) if r not in ranks]
    if missing:
        raise CheckpointError(f"SAT checkpoint {it_dir}: shard {shard_name(missing[0])} is missing "
                              f"(found ranks {sorted(ranks)})")
    return iteration, [ranks[r] for r in range(len(ranks))]


def check_tp(cfg: GLMConfig, tp: int, where: str) -> None:
    """A tensor-parallel degree must divide the heads, the MLP width and the vocabulary."""
    if tp < 1:
        raise CheckpointError(f"{where}: tensor-parallel degree must be >= 1, got {tp}")
    for name, dim in (("num_attention_heads", cfg.num_attention_heads),
                      ("inner_hidden_size", cfg.inner_hidden_size), ("vocab_size", cfg.vocab_size)):
        if dim % tp:
            raise CheckpointError(f"{where}: {tp} tensor-parallel shards, but {name}={dim} is not "
                                  f"divisible by {tp}")


def _load_module(path: str) -> tuple[TorchZipReader, dict[str, Any]]:
    reader = TorchZipReader(path)
    if not isinstance(reader.obj, dict) or not isinstance(reader.obj.get("module"), dict):
        raise CheckpointError(f"{path} is not a SAT model-states file (no 'module' state dict)")
    return reader, reader.obj["module"]


def _quant_bits(rule: TensorRule, shape: tuple[int, ...], tp: int) -> int:
    want = rule.shard_shape(tp)
    if shape == want:
        return 8
    if shape == (want[0], want[1] // 2):
        return 4
    return 0


def _open_checked(ckpt_dir: str, cfg: GLMConfig, expect_tp: int | None = None
                  ) -> tuple[list[str], list[tuple[TorchZipReader, dict[str, Any]]], int, list[TensorRule]]:
    """(shard paths, (reader, state dict) per rank, tp, rules): every shard's index read and checked
    (keys, shapes, shard count); no tensor bytes read."""
    _, paths = find_shards(ckpt_dir)
    tp = len(paths)
    if expect_tp is not None and tp != expect_tp:
        raise CheckpointError(f"SAT checkpoint {ckpt_dir} has {tp} shards, expected {expect_tp}")
    check_tp(cfg, tp, f"SAT checkpoint {ckpt_dir}")
    shards = [_load_module(p) for p in paths]
    rules = sat_rules(cfg)
    expected = {r.key(i) for r, i in engine.ordered(rules, cfg)}
    scales = {r.key(i) + "_scale" for r, i in engine.ordered(rules, cfg) if r.quantizable}
    for path, (_, sd) in zip(paths, shards):
        keys = {k for k in sd if not k.endswith(IGNORED_SUFFIXES)}
        extra = sorted(keys - expected - scales)
        if extra:
            hint = " (more layers than num_layers?)" if ".layers." in extra[0] else ""
            raise CheckpointError(f"{path}: unexpected tensor {extra[0]!r}{hint}")
        if expected - keys:
            raise CheckpointError(f"{path}: missing tensor {sorted(expected - keys)[0]!r}")
        for rule, i in engine.ordered(rules, cfg):
            key, want, t = rule.key(i), rule.shard_shape(tp), sd[rule.key(i)]
            if rule.quantizable and t.dtype == np.int8:
                if not _quant_bits(rule, t.shape, tp):
                    raise CheckpointError(f"{path}: quantized {key} has shape {t.shape}, the config implies "
                                          f"{want} (int8) or {(want[0], want[1] // 2)} (int4) per shard")
                if key + "_scale" not in sd:
                    raise CheckpointError(f"{path}: quantized {key} has no {key}_scale")
            elif t.shape != want:
                raise CheckpointError(f"{path}: {key} has shape {t.shape}, the config implies {want} per "
                                      f"shard at tp={tp}")
    return paths, shards, tp, rules


def sat_source(ckpt_dir: str, cfg: GLMConfig, expect_tp: int | None = None) -> Source:
    """Random access to a SAT checkpoint's tensors in glmjax layout, shard by shard.

    Every shard's index is read and checked up front (keys, shapes, shard count); tensor bytes are
    read when asked for. Quantized weights are dequantized shard by shard (their scales are per
    shard row) to float16.
    """
    return _source_of(*_open_checked(ckpt_dir, cfg, expect_tp))


def _source_of(paths: list[str], shards: list[tuple[TorchZipReader, dict[str, Any]]], tp: int,
               rules: list[TensorRule]) -> Source:
    by_path = {r.path: r for r in rules}
    full_shapes = {r.path: engine.jax_shape(r) for r in rules}

    def read_shard(rule: TensorRule, i: int | None, rank: int) -> np.ndarray:
        reader, sd = shards[rank]
        key = rule.key(i)
        t = reader.read(sd[key])
        if rule.quantizable and t.dtype == np.int8:
            t = quant.dequantize_rows(t, reader.read(sd[key + "_scale"]), _quant_bits(rule, t.shape, tp))
        return t

    def pieces(param: engine.Path, i: int | None) -> Iterator[engine.Piece]:
        rule = by_path[param]
        if rule.jax_axis is None:  # replicated: rank 0's copy, after checking that the others agree
            first = read_shard(rule, i, 0)
            for rank in range(1, tp):
                if not np.array_equal(first, read_shard(rule, i, rank)):
                    raise CheckpointError(f"{paths[rank]}: replicated tensor {rule.key(i)} differs from "
                                          f"rank 0's copy")
            yield (), rule.to_jax(first)
            return
        size = full_shapes[param][rule.jax_axis]
        for rank in range(tp):
            idx = engine.rank_slice(rule, len(full_shapes[param]), size, tp, rank)
            yield idx, rule.to_jax(read_shard(rule, i, rank))

    def get(param: engine.Path, i: int | None) -> np.ndarray:
        out = None
        for idx, part in pieces(param, i):
            if out is None:
                out = np.empty(full_shapes[param], part.dtype)
            out[idx] = part
        return out

    def dtype(param: engine.Path) -> np.dtype:
        rule = by_path[param]
        t = shards[0][1][rule.key(0 if rule.per_layer else None)]
        return np.dtype(np.float16) if t.dtype == np.int8 else t.dtype

    return Source(get=get, dtype=dtype, pieces=pieces, parts=tp)


def read_sat_checkpoint(ckpt_dir: str, cfg: GLMConfig, dtype: str | None = None,
                        expect_tp: int | None = None) -> dict[str, Any]:
    """Read a SAT checkpoint into a glmjax parameter pytree of numpy arrays (layers stacked)."""
    return engine.host_tree(sat_rules(cfg), cfg, sat_source(ckpt_dir, cfg, expect_tp), dtype)


# --- GLM-130B's quantized checkpoints, kept quantized -------------------------------------------
def _checkpoint_bits(ckpt_dir: str, paths: list[str], shards: list[tuple[TorchZipReader, dict[str, Any]]],
                     tp: int, rules: list[TensorRule], cfg: GLMConfig) -> int:
    """0 when every linear weight of every shard is float, else the one bit width they all have."""
    seen: dict[int, str] = {}
    for path, (_, sd) in zip(paths, shards):
        for rule, i in engine.ordered(rules, cfg):
            if rule.quantizable:
                t = sd[rule.key(i)]
                bits = _quant_bits(rule, tuple(t.shape), tp) if t.dtype == np.int8 else 0
                seen.setdefault(bits, f"{os.path.basename(path)}:{rule.key(i)}")
    if len(seen) > 1:
        name = lambda b: f"int{b}" if b else "float"  # noqa: E731
        (a, where_a), (b, where_b) = sorted(seen.items())[:2]
        raise CheckpointError(f"SAT checkpoint {ckpt_dir} mixes {name(a)} and {name(b)} linear weights "
                              f"({where_a} is {name(a)}, {where_b} is {name(b)})")
    return next(iter(seen), 0)


def _close(shards: list[tuple[TorchZipReader, dict[str, Any]]]) -> None:
    for reader, _ in shards:
        reader.close()


def sat_quantization_bits(ckpt_dir: str, cfg: GLMConfig) -> int:
    """0 for a float SAT checkpoint, else the bit width (8 or 4) of its quantized linear weights
    (from the shard indexes alone; one clear error for a checkpoint that mixes widths)."""
    paths, shards, tp, rules = _open_checked(ckpt_dir, cfg)
    try:
        return _checkpoint_bits(ckpt_dir, paths, shards, tp, rules, cfg)
    finally:
        _close(shards)


def _merged_quantized(rule: TensorRule, scale_rule: TensorRule | None, i: int | None, bits: int,
                      paths: list[str], shards: list[tuple[TorchZipReader, dict[str, Any]]],
                      tp: int) -> tuple[np.ndarray, np.ndarray]:
    """One quantized linear weight of all ranks in glmjax's quantized layout, bytes and scales as
    stored. int4 bytes are unpacked to their values for the layout change and packed again along
    glmjax's last input axis: the pairs are the same (the torch input dim in glmjax's order), so
    every byte comes back unchanged."""
    name, key = rule.path[-1], rule.key(i)
    spec = quant.KERNELS[name]
    if spec.row_parallel != (rule.split == "cols"):
        raise CheckpointError(f"{key}: split {rule.split!r} disagrees with {name}'s quantization layout")
    rows = rule.shard_shape(tp)[0]
    qs, scales = [], []
    for rank, (reader, sd) in enumerate(shards):
        st = sd[key + "_scale"]
        if st.dtype != np.float16 or tuple(st.shape) != (rows,):
            raise CheckpointError(f"{paths[rank]}: {key}_scale is {st.dtype} {list(st.shape)}, expected "
                                  f"float16 [{rows}] (one scale per shard row)")
        q = reader.read(sd[key])
        qs.append(quant.unpack_int4(q, 1) if bits == 4 else q)  # packed along the input columns
        scales.append(reader.read(st))
    q = engine.merge_to_jax(rule, qs)
    if bits == 4:
        q = quant.pack_int4(q, spec.pack_axis)
    if spec.row_parallel:  # each rank's scales cover its part of the input: one group per rank
        scale = np.stack(scales)
    else:  # whole rows in every rank: the scales follow the rows, laid out as the bias is
        scale = engine.merge_to_jax(scale_rule, scales)[None]
    return q, scale


def read_sat_quantized(ckpt_dir: str, cfg: GLMConfig, expect_tp: int | None = None
                       ) -> tuple[GLMConfig, dict[str, Any]]:
    """A GLM-130B quantized SAT checkpoint (tools/convert_tp.py --quantization-bit-width, any
    tensor-parallel degree) as (quantized config, numpy parameter tree in glmjax's quantized layout).

    The int8 (or packed int4) bytes and float16 scales are kept exactly: no dequantize/requantize.
    Column-parallel kernels (qkv, dense_h_to_4h) get scales [1, *out]; row-parallel ones
    (attention dense, dense_4h_to_h) one scale row per shard, [tp, out], and the config
    quantization_groups=tp. Embeddings, norms and biases come as read_sat_checkpoint gives them.
    """
    import jax.numpy as jnp

    paths, shards, tp, rules = _open_checked(ckpt_dir, cfg, expect_tp)
    try:
        bits = _checkpoint_bits(ckpt_dir, paths, shards, tp, rules, cfg)
        if not bits:
            raise CheckpointError(f"SAT checkpoint {ckpt_dir} is not quantized (its linear weights are float); "
                                  f"read it as a float checkpoint or quantize it at load")
        qcfg = cfg.replace(quantization_bits=bits, quantization_groups=tp)
        for rule in rules:
            if rule.quantizable:
                try:
                    quant.quantized_shapes(rule.path[-1], engine.jax_shape(rule), bits, tp)
                except GlmjaxError as e:
                    raise CheckpointError(f"SAT checkpoint {ckpt_dir}: {e}") from None
        by_path = {r.path: r for r in rules}
        src = _source_of(paths, shards, tp, rules)
        pdt = jnp.dtype(cfg.param_dtype)
        params: dict[str, Any] = {}
        for rule, i in engine.ordered(rules, cfg):
            if rule.quantizable:
                name = rule.path[-1]
                scale_rule = by_path.get(rule.path[:-1] + (name.replace("_kernel", "_bias"),))
                q, scale = _merged_quantized(rule, scale_rule, i, bits, paths, shards, tp)
                engine.put_param(params, rule.path[:-1] + (name + "_q",), i, q, cfg.num_layers)
                engine.put_param(params, rule.path[:-1] + (name + "_scale",), i, scale, cfg.num_layers)
            else:
                engine.put_param(params, rule.path, i, np.asarray(src.get(rule.path, i), pdt), cfg.num_layers)
    finally:
        _close(shards)
    return qcfg, params


def sat_inv_freq(cfg: GLMConfig) -> np.ndarray:
    """The rotary buffer SAT's state_dict() carries: float16 for GLM-130B's tables, else float32."""
    d = cfg.head_dim // 2 if cfg.position_encoding_2d else cfg.head_dim
    expo = np.arange(0, d, 2, dtype=np.float32) / np.float32(d)
    inv = np.float32(1.0) / (np.float64(cfg.rotary_base) ** expo.astype(np.float64)).astype(np.float32)
    return inv.astype(np.float16 if cfg.rotary_dtype == "float16" else np.float32)


def _inside(root: str, path: str) -> bool:
    """Whether `path`, links resolved, lies under `root` (links resolved)."""
    root, path = os.path.realpath(root), os.path.realpath(path)
    return os.path.commonpath([root, path]) == root


def write_sat_checkpoint(out_dir: str, source: Source, cfg: GLMConfig, tp: int, *,
                         dtype: str | None = None, quantize_bits: int | None = None,
                         iteration: str = "1") -> list[str]:
    """Write `latest` and `<iteration>/mp_rank_XX_model_states.pt` for `tp` ranks into out_dir.

    Tensors come from `source` one at a time and are split with GLM-130B's rules; with
    quantize_bits the four linear weights of each block are stored int8/int4 with float16 per-row
    scales computed on each shard's rows (as tools/convert_tp.py). Returns the files written.
    """
    check_tp(cfg, tp, "SAT output")
    it_dir = os.path.join(out_dir, check_iteration(iteration, "SAT output"))
    paths = [os.path.join(it_dir, shard_name(rank)) for rank in range(tp)]
    for path in (it_dir, *paths, os.path.join(out_dir, "latest")):
        if not _inside(out_dir, path):
            raise CheckpointError(f"SAT output: {path} resolves outside {out_dir}")
    rules = list(engine.ordered(sat_rules(cfg), cfg))
    inv = sat_inv_freq(cfg)
    inv_parts = np.split(inv, tp) if len(inv) % tp == 0 else [inv] * tp  # convert_tp.py chunks it too
    out_dt = None if dtype is None else np.dtype(dtype)
    quantized = lambda rule: bool(quantize_bits) and rule.quantizable  # noqa: E731

    specs = []
    for rule, i in rules:
        shape = rule.shard_shape(tp)
        if quantized(rule):
            qshape = shape if quantize_bits == 8 else (shape[0], shape[1] // 2)
            specs += [(rule.key(i), qshape, np.int8), (rule.key(i) + "_scale", (shape[0],), np.float16)]
        else:
            specs.append((rule.key(i), shape, out_dt or source.dtype(rule.path)))

    os.makedirs(it_dir, exist_ok=True)
    files = [StreamingTorchFile(path, [(INV_FREQ_KEY, inv_parts[r].shape, inv_parts[r].dtype)] + specs)
             for r, path in enumerate(paths)]
    try:
        for r, f in enumerate(files):
            f.write(0, inv_parts[r])
        index = 1
        for rule, i in rules:  # each rank's part of each tensor is read once
            shape, read = engine.jax_shape(rule), source.reader(rule.path, i)
            for r, f in enumerate(files):
                part = engine.shard_from_jax(rule, read, shape, tp, r)
                if quantized(rule):
                    q, scale = quant.quantize_rows(part, quantize_bits, rule.key(i))
                    f.write(index, q)
                    f.write(index + 1, scale)
                else:
                    f.write(index, part if out_dt is None else part.astype(out_dt))
            index += 2 if quantized(rule) else 1
    except BaseException:
        for f in files:
            f.abort()
        raise
    for f in files:
        f.close()
    with open(os.path.join(out_dir, "latest"), "w") as f:
        f.write(iteration)
    return paths
