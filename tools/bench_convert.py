"""Conversion memory and throughput at GLM-130B's real tensor shapes.

Builds a synthetic SAT checkpoint with GLM-130B's layer shapes (hidden 12288, 96 heads, GeGLU
2 x 32768, vocabulary 150528, float16) and a few layers at tensor-parallel degree 8, then times
`glmjax convert` sat -> orbax and orbax -> sat in fresh processes and reports each one's peak RSS
against the largest single tensor. Usage:

    python tools/bench_convert.py [--layers 2] [--tp 8] [--workdir DIR] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from glmjax import config as C
from glmjax.convert import engine
from glmjax.convert.sat import write_sat_checkpoint
from glmjax.convert.tables import sat_rules


def synthetic_source(cfg: C.GLMConfig, seed: int = 0) -> engine.Source:
    """Random float16 tensors of the config's shapes, made without float32 temporaries."""
    shapes = {r.path: r.to_jax(np.empty(r.shape, np.uint8)).shape for r in sat_rules(cfg)}

    def get(path, layer):
        rng = np.random.default_rng([seed, len(path), sum(map(ord, "/".join(path))), 0 if layer is None else layer + 1])
        bits = rng.integers(0x1C00, 0x2C00, size=shapes[path], dtype=np.uint16)  # |x| in ~[2^-8, 2^-4]
        bits |= (rng.integers(0, 2, size=shapes[path], dtype=np.uint16) << 15)
        return bits.view(np.float16)

    return engine.Source(get=get, dtype=lambda path: np.dtype(np.float16))


# Runs glmjax in a child and records the child's own peak RSS (VmHWM) at exit. ru_maxrss from
# wait4 would not do: a forked child starts from the parent's high-water mark.
_CHILD = """
import atexit, runpy, sys
out = sys.argv.pop(1)
def report():
    with open('/proc/self/status') as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith('VmHWM'))
    with open(out, 'w') as f:
        f.write(str(hwm * 1024))
atexit.register(report)
sys.argv[0] = 'glmjax'
runpy.run_module('glmjax', run_name='__main__')
"""


def run_child(argv: list[str], work: str) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one glmjax command in a fresh process."""
    peak_file = os.path.join(work, "peak_rss")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, peak_file, *argv])
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"glmjax {' '.join(argv)} failed with exit code {proc.returncode}")
    with open(peak_file) as f:
        return seconds, int(f.read())


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=150528)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    cfg = C.resolve("glm-130b", overrides={"num_layers": a.layers, "vocab_size": a.vocab,
                                           "param_dtype": "float16"})
    work = a.workdir or tempfile.mkdtemp(prefix="glmjax-bench-convert-")
    os.makedirs(work, exist_ok=True)
    sat_in, ox, sat_out = (os.path.join(work, n) for n in ("sat_in", "orbax", "sat_out"))
    cfg_file = os.path.join(work, "config.json")
    with open(cfg_file, "w") as f:
        json.dump(cfg.to_dict(), f)
    try:
        t0 = time.perf_counter()
        shutil.rmtree(sat_in, ignore_errors=True)
        write_sat_checkpoint(sat_in, synthetic_source(cfg), cfg, a.tp)
        build_s = time.perf_counter() - t0
        largest = max(int(np.prod(r.shape)) * 2 for r in sat_rules(cfg))
        ckpt_bytes = dir_bytes(sat_in)
        rows = []
        for name, argv in (
            ("sat->orbax", ["convert", "--from", f"sat:{sat_in}", "--to", f"orbax:{ox}", "--config", cfg_file]),
            ("orbax->sat", ["convert", "--from", f"orbax:{ox}", "--to", f"sat:{sat_out}", "--tp", str(a.tp)]),
        ):
            shutil.rmtree(ox if name == "sat->orbax" else sat_out, ignore_errors=True)
            seconds, peak = run_child(argv, work)
            rows.append({"conversion": name, "seconds": round(seconds, 2),
                         "gb_per_s": round(ckpt_bytes / seconds / 1e9, 3), "peak_rss_gb": round(peak / 1e9, 3),
                         "peak_over_largest_tensor": round(peak / largest, 2)})
        result = {"layers": a.layers, "tp": a.tp, "checkpoint_gb": round(ckpt_bytes / 1e9, 3),
                  "largest_tensor_gb": round(largest / 1e9, 3), "build_seconds": round(build_s, 1),
                  "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                             f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
                  "results": rows}
        print(json.dumps(result, indent=2))
        for r in rows:
            print(f"| {r['conversion']} | {result['checkpoint_gb']} GB | {r['seconds']} s | {r['gb_per_s']} GB/s | "
                  f"{r['peak_rss_gb']} GB | {r['peak_over_largest_tensor']}x |")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(result, f, indent=2)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
