"""Generation throughput: prefill tokens/s and decode tokens/s (per-token latency) of the compiled KV-cache
loop, for float, INT8 and INT4 weights, batch 1 and a large batch, with the parameters' memory and the
memory-bandwidth floor of a decode step (parameter bytes / measured bandwidth).

    python tools/bench_generate.py --preset glm-small --prompt 128 --new 64 --batch 1 16
    python tools/bench_generate.py --preset glm-1b --dtype bfloat16 --prompt 512 --new 128 --batch 1 32  # GPU

Random weights (throughput does not depend on their values); greedy decoding with no end token, so
every row runs all --new steps. Prints a table and one JSON line per (mode, batch).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from glmjax import config as C
from glmjax.errors import GlmjaxError
from glmjax.infer.decode import GenerateConfig, Generator, prepare
from glmjax.model import api, quant
from glmjax.model.layouts import SpecialIds
from glmjax.parallel.mesh import make_mesh


def measure_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Bytes/s of reading a large float32 array on device 0 (a reduction is bound by reads)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a.sum())
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def bench(cfg: C.GLMConfig, mesh, mode: str, batch: int, prompt: int, new: int, reps: int) -> dict:
    bits = {"float": 0, "int8": 8, "int4": 4}[mode]
    params = api.init_params(cfg, jax.random.key(0), mesh)
    if bits:
        host = jax.tree.map(np.asarray, jax.device_get(params))
        del params
        cfg = cfg.replace(quantization_bits=bits, quantization_groups=1)
        params = api.shard_params(quant.quantize_params(host, bits), cfg, mesh)
    ids = SpecialIds(mask=cfg.vocab_size - 8, gmask=cfg.vocab_size - 7, smask=cfg.vocab_size - 6,
                     sop=cfg.vocab_size - 4, pad=0)
    rng = np.random.default_rng(0)
    rows = [list(rng.integers(1, cfg.vocab_size - 16, prompt - 2)) + [ids.gmask, ids.sop] for _ in range(batch)]
    gen = Generator(cfg, params, mesh)
    prep = prepare(rows, ids, cfg, new, gen.batch_multiple)
    gc_full, gc_one = GenerateConfig(max_new_tokens=new), GenerateConfig(max_new_tokens=1)

    def timed(gc):
        gen.generate(prep, gc)  # compile
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            gen.generate(prep, gc)
            best = min(best, time.perf_counter() - t)
        return best

    t_prefill = timed(gc_one)  # prefill + one decode step
    t_full = timed(gc_full)
    per_step = (t_full - t_prefill) / max(new - 1, 1)
    b = prep.arrays["tokens"].shape[0]
    return {"mode": mode, "batch": batch, "prompt": prompt, "new": new,
            "param_bytes": quant.param_bytes(params), "prefill_s": t_prefill,
            "prefill_tokens_per_s": b * prep.arrays["tokens"].shape[1] / t_prefill,
            "decode_ms_per_step": per_step * 1e3, "decode_tokens_per_s": batch / per_step}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="glm-small")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--dtype", choices=C.FLOAT_DTYPES, default=None, help="compute dtype (and float weights')")
    p.add_argument("--mesh", default=None)
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--new", type=int, default=32, help="generated tokens")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--modes", nargs="+", default=["float", "int8", "int4"], choices=["float", "int8", "int4"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json-out", help="append the JSON lines to this file")
    a = p.parse_args(argv)
    try:
        over = list(a.overrides) + ["hidden_dropout=0", "attention_dropout=0"]
        if a.dtype:
            over += [f"dtype={a.dtype}", f"param_dtype={a.dtype}"]
        cfg = C.resolve(a.preset, overrides=over)
        cfg = cfg.replace(max_sequence_length=max(cfg.max_sequence_length, a.prompt + a.new))
        mesh = make_mesh(a.mesh)
        bw = measure_bandwidth()
        dev = jax.devices()[0]
        print(f"{a.preset}: {cfg.num_params() / 1e6:.1f}M parameters, compute {cfg.dtype}, {mesh.size} x "
              f"{dev.device_kind}; measured read bandwidth {bw / 1e9:.1f} GB/s")
        print(f"{'mode':6} {'batch':>5} {'params':>10} {'prefill tok/s':>14} {'ms/step':>9} {'decode tok/s':>13} "
              f"{'floor ms':>9} {'x floor':>8}")
        out = []
        for mode in a.modes:
            for batch in a.batch:
                r = bench(cfg, mesh, mode, batch, a.prompt, a.new, a.reps)
                r.update(device=dev.device_kind, devices=mesh.size, preset=a.preset, dtype=cfg.dtype,
                         bandwidth_gb_s=bw / 1e9, floor_ms=r["param_bytes"] / bw * 1e3)
                r["x_floor"] = r["decode_ms_per_step"] / r["floor_ms"]
                out.append(r)
                print(f"{mode:6} {batch:5d} {r['param_bytes'] / 2**20:8.1f}Mi {r['prefill_tokens_per_s']:14.0f} "
                      f"{r['decode_ms_per_step']:9.2f} {r['decode_tokens_per_s']:13.1f} {r['floor_ms']:9.3f} "
                      f"{r['x_floor']:8.2f}", flush=True)
        for r in out:
            line = json.dumps(r)
            print(line)
            if a.json_out:
                with open(a.json_out, "a") as f:
                    f.write(line + "\n")
    except GlmjaxError as e:
        print(f"bench_generate: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
