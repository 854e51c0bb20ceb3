"""Training throughput and MFU of glmjax's real training step on synthetic GLM batches.

    python tools/bench_train.py --preset glm-1b --dtype bfloat16 --seq-length 2048 --micro-batch 8 \\
        [--config FILE.json] [key=value ...] [--mesh data=2,fsdp=2,tensor=2] [--micro-steps 1] \\
        [--remat none|full|dots|dots_no_batch] [--steps 10] [--warmup 2] [--peak-tflops T] [--json-out F]

The step is glmjax.train.step.TrainStep (micro-batch accumulation, float32 master weights, compute
in --dtype, loss scaling for float16, clipping, AdamW), whose two programs are compiled ahead of time
when it is built, so the compile time is reported apart from the step times. Micro-batches have the
trainer's layout ([micro-batch, seq] tokens, targets, loss_mask, position_ids, prefix_mask,
segment_ids; a [gMASK]-style sequence: bidirectional first half, generated second half) and stay on
the devices between steps, so the figures are the step alone, without data loading.

MFU = model_flops_per_token(cfg, seq) x tokens per step / step time / (peak x devices), with
glmjax.train.loop's PaLM/MaxText accounting (rematerialisation not counted). The peak per device is
--peak-tflops, else the dense bf16 peak of a known accelerator, else (CPU) a measured float32 matmul
rate on the same devices. One JSON line ends the output; bad input ends in one
`bench_train: error: ...` line and exit status 2.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from glmjax import config as C
from glmjax.errors import GlmjaxError, InputError, MeshError
from glmjax.model.api import init_params
from glmjax.parallel.mesh import make_mesh
from glmjax.plan.roofline import model_flops_per_token
from glmjax.train import optim, precision
from glmjax.train import step as S
from glmjax.train.report import peak_tflops_for


def measure_matmul_tflops(devices: Sequence[jax.Device], size: int, reps: int = 3) -> float:
    """Per-device float32 matmul TFLOP/s: one size^3 matmul on every device at once, best of `reps`.

    Running on all the benchmark's devices together matters for simulated CPU devices, which share the
    host's cores: the rate one device reaches alone would be the whole host's."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    n = len(devices)
    shard = NamedSharding(Mesh(np.array(devices), ("d",)), PartitionSpec("d"))
    a = jax.device_put(jax.random.normal(jax.random.key(1), (n, size, size), jnp.float32), shard)
    b = jax.device_put(jax.random.normal(jax.random.key(2), (n, size, size), jnp.float32), shard)
    mm = jax.jit(lambda x, y: jnp.einsum("nij,njk->nik", x, y), out_shardings=shard)
    jax.block_until_ready(mm(a, b))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(mm(a, b))
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size ** 3 / best / 1e12


def synthetic_batch(cfg: C.GLMConfig, micro_steps: int, rows: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """[micro_steps, rows, ...] arrays in GLMLoader's layout: one [gMASK]-style sample per row, the
    first half bidirectional context, the second half generated (and in the loss)."""
    rng = np.random.default_rng(seed)
    shape = (micro_steps, rows, seq)
    prefix = np.broadcast_to(np.arange(seq) < seq // 2, shape)
    pos = np.broadcast_to(np.arange(seq, dtype=np.int32), shape)
    if cfg.position_encoding_2d:  # ChatGLM: positions stop at the mask, block positions count the rest
        ar = np.arange(seq, dtype=np.int32)
        two = np.stack([np.minimum(ar, seq // 2), np.maximum(ar - seq // 2 + 1, 0)])
        pos = np.broadcast_to(two, (micro_steps, rows, 2, seq))
    return {
        "tokens": rng.integers(0, cfg.vocab_size, shape, dtype=np.int32),
        "targets": rng.integers(0, cfg.vocab_size, shape, dtype=np.int32),
        "loss_mask": (~prefix).astype(np.int32),
        "position_ids": np.ascontiguousarray(pos, np.int32),
        "prefix_mask": np.ascontiguousarray(prefix),
        "segment_ids": np.ones(shape, np.int32),
    }


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise InputError(f"--{name} must be {'>= 0' if allow_zero else 'positive'}, got {value}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench_train", description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help=f"model preset ({', '.join(C.PRESETS)})")
    src.add_argument("--config", help="model config file (.json or .yaml)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="model config overrides")
    ap.add_argument("--mesh", default=None, help="e.g. data=2,fsdp=2,tensor=2 (default: one device)")
    ap.add_argument("--seq-length", type=int, default=None, help="default: the model's max_sequence_length")
    ap.add_argument("--micro-batch", type=int, default=8, help="global rows per micro-batch")
    ap.add_argument("--micro-steps", type=int, default=1, help="micro-batches accumulated per step")
    ap.add_argument("--dtype", choices=C.FLOAT_DTYPES, default=None,
                    help="compute dtype (default: the model's); parameters stay float32")
    ap.add_argument("--remat", choices=C.REMAT_POLICIES, default=None, help="default: the model's remat_policy")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak TFLOP/s per device for MFU (default: by device kind; measured on a CPU)")
    ap.add_argument("--cpu-peak-size", type=int, default=2048, help="matmul size of the CPU peak measurement")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", default=None, help="append the JSON result line to this file")
    return ap


def run(a: argparse.Namespace, log=print) -> dict[str, Any]:
    for name in ("micro_batch", "micro_steps", "steps", "cpu_peak_size"):
        _positive(name.replace("_", "-"), getattr(a, name))
    _positive("warmup", a.warmup, allow_zero=True)
    if a.peak_tflops is not None:
        _positive("peak-tflops", a.peak_tflops)
    if a.json_out and not os.path.isdir(os.path.dirname(os.path.abspath(a.json_out))):
        raise InputError(f"--json-out {a.json_out}: its directory does not exist")
    cfg = C.resolve(a.preset, a.config, a.overrides)
    changes: dict[str, Any] = {"param_dtype": "float32"}
    if a.dtype:
        changes["dtype"] = a.dtype
    if a.remat:
        changes["remat_policy"] = a.remat
    cfg = cfg.replace(**changes)
    seq = a.seq_length or cfg.max_sequence_length
    _positive("seq-length", seq)
    if seq > cfg.max_sequence_length:
        raise InputError(f"--seq-length {seq} exceeds the model's max_sequence_length={cfg.max_sequence_length} "
                         f"(add the override max_sequence_length={seq})")
    try:
        mesh = make_mesh(a.mesh)
    except MeshError as e:
        short = re.search(r"needs (\d+) devices, but (\d+)", str(e))
        if jax.devices()[0].platform == "cpu" and short and int(short[1]) > int(short[2]):
            raise MeshError(f"{e} (on a CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)") from None
        raise
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if a.micro_batch % dp:
        raise MeshError(f"--micro-batch {a.micro_batch} is not divisible by the data parallelism "
                        f"data*fsdp={dp} of mesh {dict(mesh.shape)}")
    devices = list(mesh.devices.flat)
    n_dev, kind, plat = len(devices), devices[0].device_kind, devices[0].platform

    peak_source = "flag"
    peak = a.peak_tflops
    if peak is None:
        peak, peak_source = peak_tflops_for(kind), "table (dense bf16)"
    if peak is None and plat == "cpu":
        log(f"measuring the CPU peak: float32 {a.cpu_peak_size}^3 matmuls on {n_dev} device(s) at once ...")
        peak = measure_matmul_tflops(devices, a.cpu_peak_size)
        peak_source = f"measured (float32 {a.cpu_peak_size}^3 matmul, all {n_dev} device(s) at once)"
    if peak is None:
        peak_source = "unknown device kind: pass --peak-tflops for MFU"
        log(f"warning: no peak TFLOP/s known for {kind!r}; pass --peak-tflops for MFU")

    params = init_params(cfg, jax.random.key(a.seed), mesh)
    n_params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
    global_batch = a.micro_batch * a.micro_steps
    oc = optim.OptimConfig(rampup_batch_size=None, global_batch=global_batch, warmup_samples=0)  # peak lr
    lc = precision.LossScaleConfig()
    state = S.init_state(cfg, params, oc, lc, a.seed, mesh)
    del params
    t0 = time.perf_counter()
    step_fn = S.TrainStep(cfg, oc, lc, mesh, a.micro_batch, seq)
    compile_s = time.perf_counter() - t0
    compiled_bytes = step_fn.memory_bytes()
    host = synthetic_batch(cfg, a.micro_steps, a.micro_batch, seq, a.seed)
    micro = [{k: jax.device_put(v[j], step_fn.batch_shardings[k]) for k, v in host.items()}
             for j in range(a.micro_steps)]
    alpha = cfg.egs_alpha_at(0)

    def one_step(state):
        t = time.perf_counter()
        state, metrics = step_fn(state, micro, a.micro_steps, alpha)
        jax.block_until_ready((state, metrics))
        return state, metrics, time.perf_counter() - t

    first_loss = None
    for _ in range(a.warmup):
        state, m, _ = one_step(state)
        first_loss = float(m["loss"]) if first_loss is None else first_loss
    times = []
    for i in range(a.steps):
        state, m, dt = one_step(state)
        times.append(dt)
        if i == 0 and first_loss is None:
            first_loss = float(m["loss"])
    last_loss = float(m["loss"])
    skipped = not bool(m["finite"])

    tokens = global_batch * seq
    mean_s, min_s = float(np.mean(times)), float(np.min(times))
    fpt = model_flops_per_token(cfg, seq)
    achieved = fpt * tokens / mean_s / 1e12 / n_dev  # model TFLOP/s per device
    mfu = achieved / peak if peak else None
    peak_mem = None
    stats = [d.memory_stats() for d in devices]
    if all(s and "peak_bytes_in_use" in s for s in stats):
        peak_mem = int(max(s["peak_bytes_in_use"] for s in stats))

    return {
        "bench": "train", "model": a.preset or a.config, "overrides": list(a.overrides),
        "num_params": n_params, "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
        "dtype": cfg.dtype, "remat": cfg.remat_policy, "seq_length": seq, "micro_batch": a.micro_batch,
        "micro_steps": a.micro_steps, "tokens_per_step": tokens, "mesh": dict(mesh.shape), "devices": n_dev,
        "device_kind": kind, "platform": plat, "steps": a.steps, "warmup": a.warmup,
        "compile_s": round(compile_s, 3), "step_time_mean_s": round(mean_s, 6), "step_time_min_s": round(min_s, 6),
        "tokens_per_s": round(tokens / mean_s, 2), "tokens_per_s_per_device": round(tokens / mean_s / n_dev, 2),
        "model_flops_per_token": fpt, "model_tflops_per_device": round(achieved, 6),
        "peak_tflops_per_device": round(peak, 6) if peak else None, "peak_source": peak_source,
        "mfu": round(mfu, 6) if mfu is not None else None,
        "peak_memory_bytes": peak_mem, "compiled_memory_bytes": compiled_bytes,
        "loss_first": first_loss, "loss_last": last_loss, "last_step_skipped": skipped,
        "jax": jax.__version__, "host": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def table(r: dict[str, Any]) -> str:
    mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
    name = f"{r['model']} {' '.join(r['overrides'])}".strip()
    rows = [
        ("model", f"{name}  ({r['num_params']:,} parameters, {r['num_layers']} layers x {r['hidden_size']})"),
        ("compute", f"{r['dtype']} (parameters float32), remat {r['remat']}"),
        ("batch", f"{r['micro_steps']} x {r['micro_batch']} rows x {r['seq_length']} = {r['tokens_per_step']:,} "
                  f"tokens per step"),
        ("devices", f"{r['devices']} x {r['device_kind']} ({r['platform']}), mesh {mesh}"),
        ("compile", f"{r['compile_s']:.2f} s"),
        ("step time", f"mean {r['step_time_mean_s'] * 1e3:.1f} ms, min {r['step_time_min_s'] * 1e3:.1f} ms "
                      f"over {r['steps']} steps ({r['warmup']} warm-up)"),
        ("tokens/s", f"{r['tokens_per_s']:,.1f} global, {r['tokens_per_s_per_device']:,.1f} per device"),
        ("model TFLOP/s", f"{r['model_tflops_per_device']:.4g} per device "
                          f"({r['model_flops_per_token'] / 1e9:.4g} GFLOP per token)"),
        ("peak TFLOP/s", "n/a" if r["peak_tflops_per_device"] is None
         else f"{r['peak_tflops_per_device']:.4g} per device, {r['peak_source']}"),
        ("MFU", "n/a" if r["mfu"] is None else f"{r['mfu']:.2%}"),
        ("memory", f"peak in use {_gib(r['peak_memory_bytes'])}, compiled step {_gib(r['compiled_memory_bytes'])} "
                   f"per device"),
        ("loss", f"{r['loss_first']:.4f} -> {r['loss_last']:.4f}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        result = run(a, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except GlmjaxError as e:
        print(f"bench_train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench_train: interrupted", file=sys.stderr)
        return 130
    print(table(result))
    line = json.dumps(result)
    print(line, flush=True)
    if a.json_out:
        try:
            with open(a.json_out, "a") as f:
                f.write(line + "\n")
        except OSError as e:
            print(f"bench_train: error: cannot write --json-out {a.json_out}: {e.strerror}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
