"""`glmjax convert`: any format to any format through the one engine, written atomically, with an
optional logit check of the result against the source. Formats and their reading live in
glmjax/checkpoint.py."""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from glmjax.checkpoint import load_params, open_source, parse_location, source_iteration
from glmjax.config import GLMConfig
from glmjax.convert import hf_chatglm, orbax_format, sat
from glmjax.convert.engine import Source
from glmjax.errors import GlmjaxError
from glmjax.outputs import atomic_dir
from glmjax.parallel import distributed


def write(fmt: str, out_dir: str, cfg: GLMConfig, source: Source, *, tp: int | None,
          quantize: str | None, dtype: str | None, safetensors: bool, iteration: str | None = None) -> GLMConfig:
    """Write `source` in format `fmt` into the (empty) out_dir; returns the config written."""
    check_tp_option(tp)
    if quantize and fmt != "sat":
        raise GlmjaxError("--quantize writes GLM-130B's quantized SAT layout: use it with --to sat:...")
    if tp is not None and fmt != "sat":
        raise GlmjaxError("--tp applies to SAT output only (orbax and Hugging Face files are not split)")
    if fmt == "sat":
        bits = {None: None, "int8": 8, "int4": 4}[quantize]
        sat.write_sat_checkpoint(out_dir, source, cfg, 1 if tp is None else tp, dtype=dtype, quantize_bits=bits,
                                 iteration=iteration or "1")
        return cfg
    if fmt == "hf-chatglm":
        hf_chatglm.write_hf(out_dir, source, cfg, dtype=dtype, safetensors=safetensors)
        return cfg
    out_cfg = cfg.replace(param_dtype=dtype) if dtype else cfg
    orbax_format.write_params(out_dir, out_cfg, source, dtype,
                              extra_meta={"sat_iteration": iteration} if iteration else None)
    return out_cfg


def check_tp_option(tp: int | None) -> None:
    """--tp is a tensor-parallel degree: 0 or a negative number is refused, not taken as 1."""
    if tp is not None and (isinstance(tp, bool) or not isinstance(tp, int) or tp < 1):
        raise GlmjaxError(f"--tp must be a tensor-parallel degree >= 1, got {tp}")


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
           prompt_len: int = 512, step: int | None = None) -> dict[str, float]:
    import jax

    from glmjax.model import api

    jax.config.update("jax_default_matmul_precision", "highest")
    results = []
    for fmt, path in (src, dst):  # one model on the devices at a time
        c, params = load_params(fmt, path, cfg if fmt == "sat" else None, mesh, step=step if path == src[1] else None)
        c = c.replace(dtype="float32")
        batch = verify_prompt(c, prompt_len)
        logits, _ = api.make_forward(c, mesh)(params, batch)
        results.append(distributed.to_host(logits))
        del params, logits
        cfg = cfg or c
    return compare_logits(results[0], results[1])


def convert(src: str, dst: str, *, cfg: GLMConfig | None = None, tp: int | None = None,
            quantize: str | None = None, dtype: str | None = None, overwrite: bool = False,
            safetensors: bool = False, step: int | None = None) -> dict[str, Any]:
    """Convert checkpoint `src` (FORMAT:PATH) to `dst` (FORMAT:PATH); returns figures for the log."""
    sfmt, spath = parse_location(src)
    dfmt, dpath = parse_location(dst)
    if os.path.abspath(spath) == os.path.abspath(dpath):
        raise GlmjaxError("source and destination are the same directory")
    check_tp_option(tp)
    t0 = time.perf_counter()
    if dfmt == "run":
        raise GlmjaxError("run directories are written by `glmjax train`; convert into sat, orbax or hf-chatglm")
    if step is not None and sfmt != "run":
        raise GlmjaxError("--step selects a checkpoint of a training run directory (--from run:DIR)")
    cfg, source = open_source(sfmt, spath, cfg, step)
    iteration = source_iteration(sfmt, spath, step)  # GLM-130B's 49300 travels with the weights
    with atomic_dir(dpath, overwrite) as tmp:
        out_cfg = write(dfmt, tmp, cfg, source, tp=tp, quantize=quantize, dtype=dtype,
                        safetensors=safetensors, iteration=iteration)
    seconds = time.perf_counter() - t0
    nbytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dpath) for f in fs)
    return {"config": out_cfg, "seconds": seconds, "bytes": nbytes}
