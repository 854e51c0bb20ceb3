"""The data path's figures: `data prepare` tokens/s by worker count, the corpus index's memory, the
GLM loader's throughput and how much of it the background producer hides behind a training step.

    python tools/bench_data.py [--only prepare,index,loader,overlap] [--prepare-mchars 24] [--workers 1 2]
        [--index-docs 2000000] [--seq-length 2048] [--batch 8] [--steps 6] [--json-out FILE]

prepare: a bilingual corpus (Python's own documentation text and synthetic Chinese) of
  --prepare-mchars million characters (24: 35.7 MB of UTF-8) in .txt and .jsonl files, an
  8000-piece tokenizer trained on a 2M-character sample of it, then `pipeline.prepare` timed once
  per --workers value (wall time, worker start-up included, and CPU seconds of the parent and of
  the workers); the outputs are checked to be byte-identical.
index: a synthetic corpus of --index-docs documents (random lengths, mean 2000 tokens, in shards of
  SHARD_TOKENS tokens as `prepare` cuts them: real docs-NNNNN.npy offsets, sparse token files, so no
  token is written) opened by TokenShards and an epoch order built by GLMLoader, in a fresh process:
  its RSS growth (private and file-backed, /proc/self/status) and seconds.
loader: the loader's GLM-130B-objective batches of --batch x --seq-length, synchronously.
overlap: --steps micro-batches fetched (a) synchronously, then (b) through pipeline.Prefetcher, while
  the "step" is a sleep as long as the loader's batch, a sleep as long as the small model's step, and
  the small model's real jitted forward+backward (glm-small, --step-seq tokens, which releases the
  GIL). Hidden = 1 - (time Prefetcher.get waited) / (the synchronous loader's time).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from helpers import bilingual_lines  # noqa: E402  (the tests' corpus builder)

from glmjax.data import pipeline  # noqa: E402
from glmjax.data.objective import ObjectiveConfig  # noqa: E402


def proc_status() -> dict[str, int]:
    """This process's memory counters from /proc/self/status, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def cpu_seconds() -> np.ndarray:
    """User + system CPU seconds of [this process, its finished children (the prepare workers)]."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return np.array([me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime])


# --- prepare ----------------------------------------------------------------------------------------
def write_corpus(work: str, mchars: float) -> tuple[list[str], str]:
    """Two .txt and two .jsonl files of `mchars` million characters in all, and a 2M-character sample
    of the first for the tokenizer."""
    rng = random.Random(0)
    lines = bilingual_lines(20000, 0)
    files = [os.path.join(work, n) for n in ("a.txt", "b.txt", "c.jsonl", "d.jsonl")]
    per_file = int(mchars * 1e6 / len(files))
    for path in files:
        with open(path, "w", encoding="utf-8") as f:
            size = 0
            while size < per_file:
                doc = " ".join(rng.sample(lines, rng.randint(2, 12)))
                text = json.dumps({"text": doc}, ensure_ascii=False) + "\n" if path.endswith(".jsonl") else doc + "\n\n"
                size += f.write(text)
    sample = os.path.join(work, "sample.txt")
    with open(files[0], encoding="utf-8") as src, open(sample, "w", encoding="utf-8") as dst:
        dst.write(src.read(2_000_000))
    return files, sample


def bench_prepare(work: str, mchars: float, workers: list[int]) -> tuple[dict[str, Any], str]:
    """Tokens/s of pipeline.prepare for each worker count; the outputs must be byte-identical."""
    from glmjax.data.tokenizer import train_tokenizer

    files, sample = write_corpus(work, mchars)
    tok_dir = os.path.join(work, "tok")
    train_tokenizer([sample], 8000, tok_dir)
    out: dict[str, Any] = {"corpus_bytes": sum(os.path.getsize(p) for p in files), "by_workers": {}}
    first = None
    for w in workers:
        dst = os.path.join(work, f"data-w{w}")
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        stats = pipeline.prepare(files, tok_dir, dst, workers=w)
        secs, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        out["corpus_tokens"] = stats.tokens
        out["by_workers"][w] = {"seconds": round(secs, 2), "tokens_per_s": round(stats.tokens / secs),
                                "cpu_seconds_parent": round(cpu[0], 2), "cpu_seconds_workers": round(cpu[1], 2),
                                "load_average_1min": os.getloadavg()[0]}
        if first is None:
            first = dst
        else:
            same = all(open(os.path.join(first, n), "rb").read() == open(os.path.join(dst, n), "rb").read()
                       for n in sorted(os.listdir(first)))
            out["by_workers"][w]["identical_to_first"] = same and sorted(os.listdir(first)) == sorted(os.listdir(dst))
    return out, first or ""


# --- index ------------------------------------------------------------------------------------------
def write_synthetic_index(path: str, n_docs: int, mean_tokens: int = 2000) -> int:
    """A prepared-corpus directory of n_docs documents whose token files are sparse (all ids 0)."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    per_shard = max(1, pipeline.SHARD_TOKENS // mean_tokens)
    shards, total = [], 0
    for k, first in enumerate(range(0, n_docs, per_shard)):
        lens = rng.integers(1, 2 * mean_tokens, min(per_shard, n_docs - first))
        offs = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        np.save(os.path.join(path, f"docs-{k:05d}.npy"), offs)
        with open(os.path.join(path, f"tokens-{k:05d}.bin"), "wb") as f:
            f.truncate(int(offs[-1]) * 4)  # a hole: no block is written
        shards.append({"tokens": f"tokens-{k:05d}.bin", "docs": f"docs-{k:05d}.npy",
                       "n_tokens": int(offs[-1]), "n_docs": len(lens)})
        total += int(offs[-1])
    specials = {"MASK": 1, "gMASK": 2, "sMASK": 3, "sop": 4, "eop": 5}
    manifest = {"format": "glmjax-tokens", "version": 1, "vocab_size": 64, "special_ids": specials,
                "eos_id": 6, "pad_id": 0, "sentence_ends": [], "shards": shards, "instructions": None}
    with open(os.path.join(path, pipeline.MANIFEST), "w") as f:
        json.dump(manifest, f)
    return total


def measure_index(path: str) -> dict[str, Any]:
    """(In a fresh process) memory and seconds of opening the index and building an epoch's order."""
    base = proc_status()
    t0 = time.perf_counter()
    shards = pipeline.TokenShards(path)
    t1 = time.perf_counter()
    opened = proc_status()
    loader = pipeline.GLMLoader(shards, ObjectiveConfig(seq_length=2048), global_batch=8)
    loader.epoch_order(0)
    t2 = time.perf_counter()
    ordered = proc_status()
    loader.batch_at(loader.chunks_per_epoch // 2)  # a batch from the middle of the epoch
    t3 = time.perf_counter()
    mib = lambda a, b, k: round((b[k] - a[k]) / 2 ** 20, 1)  # noqa: E731
    return {"documents": len(shards), "shards": len(shards.tokens), "tokens": shards.n_tokens,
            "open_seconds": round(t1 - t0, 2), "epoch_order_seconds": round(t2 - t1, 2),
            "one_batch_seconds": round(t3 - t2, 3),
            "private_mib_after_open": mib(base, opened, "RssAnon"),
            "private_mib_after_epoch_order": mib(base, ordered, "RssAnon"),
            "file_backed_mib_after_epoch_order": mib(base, ordered, "RssFile"),
            "peak_rss_growth_mib": round((ordered["VmHWM"] - base["VmRSS"]) / 2 ** 20, 1),
            "index_bytes_per_document": round(sum(x.nbytes for x in (
                shards.doc_lengths, shards.block_first_token, loader.epoch_order(0).order,
                loader.epoch_order(0).block_starts)) / len(shards), 3)}


def bench_index(work: str, n_docs: int) -> dict[str, Any]:
    """The synthetic index written, then measured by a child process (a clean RSS baseline)."""
    path = os.path.join(work, "index")
    t0 = time.perf_counter()
    write_synthetic_index(path, n_docs)
    written = time.perf_counter() - t0
    child = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure-index", path],
                           capture_output=True, text=True, check=True)
    result = json.loads(child.stdout.strip().splitlines()[-1])
    result["synthetic_write_seconds"] = round(written, 1)
    shutil.rmtree(path)
    return result


# --- loader and overlap -----------------------------------------------------------------------------
def bench_loader(data: str, seq: int, batch: int, batches: int) -> dict[str, Any]:
    """Synchronous loader throughput at the GLM-130B objective's defaults."""
    loader = pipeline.GLMLoader(pipeline.TokenShards(data), ObjectiveConfig(seq_length=seq), batch, seed=0)
    loader.batch_at(0)
    t0 = time.perf_counter()
    for j in range(1, batches + 1):
        loader.batch_at(j * batch)
    secs = (time.perf_counter() - t0) / batches
    return {"batch": [batch, seq], "seconds_per_batch": round(secs, 4), "sequences_per_s": round(batch / secs, 1),
            "tokens_per_s": round(batch * seq / secs)}


def run_steps(get: Callable[[int], dict], step: Callable[[dict], None], stride: int, n: int) -> tuple[float, float]:
    """(total seconds, seconds spent fetching) of n (fetch micro-batch, step on it) rounds, as the
    trainer does them."""
    fetch, t0 = 0.0, time.perf_counter()
    for j in range(n):
        t1 = time.perf_counter()
        batch = get(stride * (j + 1))
        fetch += time.perf_counter() - t1
        step(batch)
    return time.perf_counter() - t0, fetch


def small_model_step(data: str, seq: int) -> Callable[[dict], None]:
    """glm-small's jitted forward+backward on a micro-batch, compiled, blocking until done."""
    import jax
    import jax.numpy as jnp

    from glmjax import config as C
    from glmjax.model.api import init_params
    from glmjax.model.glm import GLM
    from glmjax.parallel.mesh import make_mesh

    vocab = pipeline.TokenShards(data).manifest["vocab_size"]
    mcfg = C.resolve("glm-small", overrides={"vocab_size": vocab, "max_sequence_length": seq})
    params = init_params(mcfg, jax.random.key(0), make_mesh(None))

    def loss(p, b):
        logits, _ = GLM(mcfg).apply({"params": p}, b["tokens"], b["position_ids"], prefix_mask=b["prefix_mask"],
                                    segment_ids=b["segment_ids"])
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), b["targets"][..., None], -1)[..., 0]
        return (nll * b["loss_mask"]).sum() / jnp.maximum(b["loss_mask"].sum(), 1)

    grad = jax.jit(jax.grad(loss))
    return lambda b: jax.block_until_ready(grad(params, b))


def overlap_case(loader: pipeline.GLMLoader, step: Callable[[dict], None], n: int) -> dict[str, Any]:
    """One kind of step: n synchronous rounds, then n rounds through the Prefetcher (after one warm-up
    round each). Hidden = 1 - time waiting in get / synchronous fetch time; the step's own time is
    the round's time less the fetch, so any slowdown the producer thread causes shows too."""
    stride = loader.global_batch
    step(loader.batch_at(0))
    sync, load = run_steps(loader.batch_at, step, stride, n)
    with pipeline.Prefetcher(loader, stride, depth=2) as pre:
        step(pre.get(0))  # the warm-up round: the producer starts, and runs ahead during this step
        pref, waited = run_steps(pre.get, step, stride, n)
    return {"rounds": n, "sync_seconds_per_round": round(sync / n, 5), "sync_fetch_seconds": round(load / n, 5),
            "prefetch_seconds_per_round": round(pref / n, 5), "prefetch_get_wait_seconds": round(waited / n, 6),
            "loader_time_hidden": round(1 - waited / load, 3),
            "step_seconds_sync_vs_with_producer": [round((sync - load) / n, 5), round((pref - waited) / n, 5)]}


def bench_overlap(data: str, seq: int, batch: int, n: int) -> dict[str, Any]:
    """The producer against three steps: a sleep as long as a batch, as long as glm-small's step, the real one."""
    cfg = ObjectiveConfig(seq_length=seq, window=min(512, seq // 4))
    loader = pipeline.GLMLoader(pipeline.TokenShards(data), cfg, batch, seed=0)
    loader.batch_at(0)
    t0 = time.perf_counter()
    for j in range(1, n + 1):
        loader.batch_at(j * batch)
    load = (time.perf_counter() - t0) / n
    real = small_model_step(data, seq)
    first = loader.batch_at(0)
    real(first)  # compile
    t0 = time.perf_counter()
    for _ in range(2):
        real(first)
    real_s = (time.perf_counter() - t0) / 2
    out: dict[str, Any] = {"micro_batch": [batch, seq], "sync_loader_seconds_per_batch": round(load, 5),
                           "loader_sequences_per_s": round(batch / load, 1), "glm_small_step_seconds": round(real_s, 3)}
    for name, step, rounds in (("sleep_as_long_as_the_loader", lambda b: time.sleep(load), 20 * n),
                               ("sleep_as_long_as_glm_small_step", lambda b: time.sleep(real_s), n),
                               ("glm_small_jitted_fwd_bwd", real, n)):
        out[name] = overlap_case(loader, step, rounds)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="prepare,index,loader,overlap", help="comma-separated parts to run")
    ap.add_argument("--prepare-mchars", type=float, default=24.0, help="prepare: corpus size, million characters")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--index-docs", type=int, default=2_000_000)
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--steps", type=int, default=6, help="overlap: micro-batches per case")
    ap.add_argument("--step-seq", type=int, default=256, help="overlap: glm-small's sequence length")
    ap.add_argument("--json-out", help="append the result as one JSON line")
    ap.add_argument("--measure-index", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.measure_index:
        print(json.dumps(measure_index(a.measure_index)))
        return
    parts = set(a.only.split(","))
    work = tempfile.mkdtemp(prefix="glmjax-bench-data-")
    result: dict[str, Any] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores",
                              "date": time.strftime("%Y-%m-%d")}
    try:
        data = ""
        if parts & {"prepare", "loader", "overlap"}:
            result["prepare"], data = bench_prepare(work, a.prepare_mchars, a.workers if "prepare" in parts else [1])
        if "index" in parts:
            result["index"] = bench_index(work, a.index_docs)
        if "loader" in parts:
            result["loader"] = bench_loader(data, a.seq_length, a.batch, a.batches)
        if "overlap" in parts:
            result["overlap"] = bench_overlap(data, a.step_seq, a.batch, a.steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if a.json_out:
        with open(a.json_out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
