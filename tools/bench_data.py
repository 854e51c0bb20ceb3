"""Throughput of `glmjax data prepare` and of the GLM loader, beside a training-step reference.

    python tools/bench_data.py [--docs 20000] [--vocab 8000] [--seq-length 2048] [--batch 8]

Builds a bilingual corpus (Python's own documentation text and synthetic Chinese), trains a
tokenizer on it, prepares it, then times the loader's batches and, for comparison, a jitted
forward+backward of the glm-small model on one batch on this machine.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from test_tokenizer import bilingual_lines  # noqa: E402  (the tests' corpus builder)

from glmjax import config as C  # noqa: E402
from glmjax.data import pipeline  # noqa: E402
from glmjax.data.objective import ObjectiveConfig  # noqa: E402
from glmjax.data.tokenizer import train_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=10)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="glmjax-bench-data-")
    rng = random.Random(0)
    lines = bilingual_lines(a.docs * 4, 0)
    with open(os.path.join(work, "corpus.txt"), "w", encoding="utf-8") as f:
        for _ in range(a.docs):
            f.write(" ".join(rng.sample(lines, 4)) + "\n\n")
    tok = train_tokenizer([os.path.join(work, "corpus.txt")], a.vocab, os.path.join(work, "tok"))
    t0 = time.perf_counter()
    stats = pipeline.prepare([os.path.join(work, "corpus.txt")], os.path.join(work, "tok"), os.path.join(work, "data"))
    prep_s = time.perf_counter() - t0
    cfg = ObjectiveConfig(seq_length=a.seq_length)
    loader = pipeline.GLMLoader(pipeline.TokenShards(os.path.join(work, "data")), cfg, a.batch, seed=0)
    loader.next_batch()
    t0 = time.perf_counter()
    for _ in range(a.batches):
        batch = loader.next_batch()
    load_s = (time.perf_counter() - t0) / a.batches

    import jax
    import jax.numpy as jnp

    from glmjax.model.api import init_params
    from glmjax.model.glm import GLM
    from glmjax.parallel.mesh import make_mesh

    mcfg = C.resolve("glm-small", overrides={"vocab_size": tok.vocab_size, "max_sequence_length": a.seq_length})
    params = init_params(mcfg, jax.random.key(0), make_mesh(None))

    def loss(p, b):
        logits, _ = GLM(mcfg).apply({"params": p}, b["tokens"], b["position_ids"], prefix_mask=b["prefix_mask"],
                                    segment_ids=b["segment_ids"])
        lp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(lp, b["targets"][..., None], -1)[..., 0]
        return (nll * b["loss_mask"]).sum() / jnp.maximum(b["loss_mask"].sum(), 1)

    step = jax.jit(jax.grad(loss))
    jax.block_until_ready(step(params, batch))
    t0 = time.perf_counter()
    jax.block_until_ready(step(params, batch))
    step_s = time.perf_counter() - t0
    tokens = a.batch * a.seq_length
    result = {"corpus_tokens": stats.tokens, "tokenizer_pieces": tok.num_text,
              "prepare_tokens_per_s": round(stats.tokens / prep_s), "loader_tokens_per_s": round(tokens / load_s),
              "loader_seconds_per_batch": round(load_s, 4),
              "glm_small_fwd_bwd_seconds_per_batch": round(step_s, 3), "batch": [a.batch, a.seq_length],
              "machine": f"{os.cpu_count()} cores"}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
