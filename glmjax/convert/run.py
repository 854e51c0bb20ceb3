"""`glmjax convert`: any format to any format through the one engine, written atomically, with an
optional logit check of the result against the source."""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from glmjax.config import GLMConfig
from glmjax.convert import engine, hf_chatglm, orbax_format, sat
from glmjax.convert.engine import Source
from glmjax.convert.tables import sat_rules
from glmjax.errors import CheckpointError, GlmjaxError

FORMATS = ("sat", "orbax", "hf-chatglm")


def parse_location(text: str) -> tuple[str, str]:
    fmt, sep, path = text.partition(":")
    if not sep or fmt not in FORMATS or not path:
        raise GlmjaxError(f"location {text!r} must be FORMAT:PATH with FORMAT one of {', '.join(FORMATS)}")
    return fmt, path


def detect_format(path: str) -> str:
    """The format of an existing checkpoint directory."""
    if orbax_format.is_checkpoint(path):
        return "orbax"
    if os.path.isfile(os.path.join(path, "latest")):
        return "sat"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf-chatglm"
    raise CheckpointError(f"{path}: not a checkpoint (no glmjax.json, SAT 'latest' or config.json)")


def open_source(fmt: str, path: str, cfg: GLMConfig | None) -> tuple[GLMConfig, Source]:
    """(config, Source) of a checkpoint. SAT files carry no config, so SAT needs `cfg`."""
    if fmt == "sat":
        if cfg is None:
            raise GlmjaxError("reading a SAT checkpoint needs --config (SAT files carry no model config)")
        return cfg, sat.sat_source(path, cfg)
    found, source = orbax_format.orbax_source(path) if fmt == "orbax" else hf_chatglm.hf_source(path)
    if cfg is not None and cfg != found:
        diff = sorted(k for k, v in cfg.to_dict().items() if found.to_dict()[k] != v)
        raise GlmjaxError(f"--config differs from the checkpoint's own config in {diff[0]!r}")
    return found, source


@contextlib.contextmanager
def atomic_dir(dst: str, overwrite: bool) -> Iterator[str]:
    """A temporary sibling of dst to write into; renamed to dst only when the block completes.

    An existing dst is refused unless overwrite, and then replaced only after the new one is
    complete. On any failure or interrupt the temporary is removed, so no half-written directory
    ever carries the checkpoint's name.
    """
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not overwrite:
        raise GlmjaxError(f"output {dst} exists; pass --overwrite to replace it")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(dst)}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(dst):
        old = os.path.join(parent, f".{os.path.basename(dst)}.old-{os.getpid()}")
        os.rename(dst, old)
    os.rename(tmp, dst)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def write(fmt: str, out_dir: str, cfg: GLMConfig, source: Source, *, tp: int | None,
          quantize: str | None, dtype: str | None, safetensors: bool, iteration: str | None = None) -> GLMConfig:
    """Write `source` in format `fmt` into the (empty) out_dir; returns the config written."""
    if quantize and fmt != "sat":
        raise GlmjaxError("--quantize writes GLM-130B's quantized SAT layout: use it with --to sat:...")
    if tp is not None and fmt != "sat":
        raise GlmjaxError("--tp applies to SAT output only (orbax and Hugging Face files are not split)")
    if fmt == "sat":
        bits = {None: None, "int8": 8, "int4": 4}[quantize]
        sat.write_sat_checkpoint(out_dir, source, cfg, tp or 1, dtype=dtype, quantize_bits=bits,
                                 iteration=iteration or "1")
        return cfg
    if fmt == "hf-chatglm":
        hf_chatglm.write_hf(out_dir, source, cfg, dtype=dtype, safetensors=safetensors)
        return cfg
    out_cfg = cfg.replace(param_dtype=dtype) if dtype else cfg
    orbax_format.write_params(out_dir, out_cfg, source, dtype,
                              extra_meta={"sat_iteration": iteration} if iteration else None)
    return out_cfg


QUANTIZE_BITS = {None: 0, "int8": 8, "int4": 4}


def load_params(fmt: str, path: str, cfg: GLMConfig | None, mesh: Any, quantize: str | None = None
                ) -> tuple[GLMConfig, Any]:
    """Parameters of any format placed on `mesh` (orbax restores shard by shard).

    quantize ("int8"/"int4"; None: as stored) gives GLM-130B's weight-only quantized parameters: a
    quantized SAT checkpoint of that width loads its bytes and scales as they are (scale groups =
    its tensor-parallel degree); a float checkpoint of any format is quantized on the host, one
    layer's kernel at a time, before it is placed. Returns (config, params), the config carrying
    quantization_bits/groups. A config with quantization_bits set asks for that width.
    """
    from glmjax.model import api

    if quantize not in QUANTIZE_BITS:
        raise GlmjaxError(f"quantize must be int8 or int4 (or none), got {quantize!r}")
    bits = QUANTIZE_BITS[quantize]
    if cfg is not None and cfg.quantization_bits:
        if bits and bits != cfg.quantization_bits:
            raise GlmjaxError(f"the config asks for int{cfg.quantization_bits} weights but {quantize} was requested")
        bits = cfg.quantization_bits
        cfg = cfg.replace(quantization_bits=0, quantization_groups=1)  # the stored (float) model
    if fmt == "orbax":
        found = orbax_format.read_config(path)
        stored = found.quantization_bits
        if cfg is not None and cfg != found.replace(quantization_bits=0, quantization_groups=1):
            open_source(fmt, path, cfg)  # raises the precise difference
        if stored:  # saved from a quantized model: restore as it is
            if bits and bits != stored:
                raise CheckpointError(f"{path} holds int{stored} weights; it cannot be loaded as int{bits}")
            return orbax_format.restore_params(path, mesh, found)
        if not bits:
            return orbax_format.restore_params(path, mesh, cfg)
    if fmt == "sat" and bits and cfg is not None:
        stored = sat.sat_quantization_bits(path, cfg)
        if stored and stored != bits:
            raise CheckpointError(f"SAT checkpoint {path} is quantized to int{stored}; it cannot be loaded as "
                                  f"int{bits} (load it as int{stored}, or quantize a float checkpoint)")
        if stored:
            qcfg, tree = sat.read_sat_quantized(path, cfg)
            return qcfg, api.shard_params(tree, qcfg, mesh)
    cfg, source = open_source(fmt, path, cfg)
    if bits:
        qcfg, tree = quantize_source(cfg, source, bits)
        return qcfg, api.shard_params(tree, qcfg, mesh)
    tree = engine.TreeBuilder(cfg, cfg.param_dtype)
    for rule, i in engine.ordered(sat_rules(cfg), cfg):
        tree.put(rule.path, i, source.get(rule.path, i))
    return cfg, api.shard_params(tree.params, cfg, mesh)


def quantize_source(cfg: GLMConfig, source: Source, bits: int) -> tuple[GLMConfig, dict[str, Any]]:
    """(quantized config, host tree): the four linear kernels of each layer quantized as GLM-130B does
    (per output unit, one scale group), read and quantized one layer at a time so the host never
    holds more than one float kernel beside the quantized model."""
    import jax.numpy as jnp

    from glmjax.model import quant

    qcfg = cfg.replace(quantization_bits=bits, quantization_groups=1)
    pdt = jnp.dtype(cfg.param_dtype)
    tree: dict[str, Any] = {}
    for rule, i in engine.ordered(sat_rules(cfg), cfg):
        name = rule.path[-1]
        if name in quant.KERNELS:
            q, scale = quant.quantize_kernel(source.get(rule.path, i), name, bits, 1)
            quant.set_param(tree, rule.path[:-1] + (name + "_q",), i, q, cfg.num_layers)
            quant.set_param(tree, rule.path[:-1] + (name + "_scale",), i, scale, cfg.num_layers)
        else:
            quant.set_param(tree, rule.path, i, np.asarray(source.get(rule.path, i), pdt), cfg.num_layers)
    return qcfg, tree


def verify_prompt(cfg: GLMConfig, length: int = 512, seed: int = 0) -> dict[str, np.ndarray]:
    """A long [gMASK]-style prompt (bidirectional first half, causal rest): short prompts hide rotary
    bugs."""
    n = min(length, cfg.max_sequence_length)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (1, n)).astype(np.int32)
    pos = np.arange(n, dtype=np.int32)[None]
    if cfg.position_encoding_2d:
        block = np.maximum(np.arange(n) - n // 2 + 1, 0).astype(np.int32)[None]
        pos = np.stack([np.minimum(pos, n // 2 - 1), block], 1)
    return {"tokens": tokens, "position_ids": pos, "prefix_mask": np.arange(n)[None] < n // 2}


def compare_logits(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """max |a - b|, relative to max |a|, and the mean KL(softmax a || softmax b) per position."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    la = a - a.max(-1, keepdims=True)
    la -= np.log(np.exp(la).sum(-1, keepdims=True))
    lb = b - b.max(-1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(-1, keepdims=True))
    kl = (np.exp(la) * (la - lb)).sum(-1).mean()
    diff = float(np.abs(a - b).max())
    return {"max_abs_diff": diff, "rel_diff": diff / float(np.abs(a).max()), "kl": float(kl)}


def verify(src: tuple[str, str], dst: tuple[str, str], cfg: GLMConfig | None, mesh: Any,
           prompt_len: int = 512) -> dict[str, float]:
    import jax

    from glmjax.model import api

    jax.config.update("jax_default_matmul_precision", "highest")
    results = []
    for fmt, path in (src, dst):  # one model on the devices at a time
        c, params = load_params(fmt, path, cfg if fmt == "sat" else None, mesh)
        c = c.replace(dtype="float32")
        batch = verify_prompt(c, prompt_len)
        logits, _ = api.make_forward(c, mesh)(params, batch)
        results.append(np.asarray(jax.device_get(logits)))
        del params, logits
        cfg = cfg or c
    return compare_logits(results[0], results[1])


def convert(src: str, dst: str, *, cfg: GLMConfig | None = None, tp: int | None = None,
            quantize: str | None = None, dtype: str | None = None, overwrite: bool = False,
            safetensors: bool = False) -> dict[str, Any]:
    """Convert checkpoint `src` (FORMAT:PATH) to `dst` (FORMAT:PATH); returns figures for the log."""
    sfmt, spath = parse_location(src)
    dfmt, dpath = parse_location(dst)
    if os.path.abspath(spath) == os.path.abspath(dpath):
        raise GlmjaxError("source and destination are the same directory")
    t0 = time.perf_counter()
    cfg, source = open_source(sfmt, spath, cfg)
    # GLM-130B's iteration (49300 for the release) travels with the weights
    iteration = (sat.find_shards(spath)[0] if sfmt == "sat" else
                 orbax_format.read_meta(spath).get("sat_iteration") if sfmt == "orbax" else None)
    with atomic_dir(dpath, overwrite) as tmp:
        out_cfg = write(dfmt, tmp, cfg, source, tp=tp, quantize=quantize, dtype=dtype,
                        safetensors=safetensors, iteration=iteration)
    seconds = time.perf_counter() - t0
    nbytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dpath) for f in fs)
    return {"config": out_cfg, "seconds": seconds, "bytes": nbytes}
