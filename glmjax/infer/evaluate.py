"""Held-out loss of a model on a prepared corpus: the training objective's sequences (blank infilling
and [gMASK] spans, the same seed -> the same sequences), deterministic forward, mean token NLL."""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from glmjax.config import GLMConfig
from glmjax.data import pipeline
from glmjax.data.objective import ObjectiveConfig
from glmjax.model.api import data_parallelism, pad_rows, param_shardings
from glmjax.model.glm import GLM
from glmjax.parallel import rules


def heldout_loss(cfg: GLMConfig, params: Any, mesh: Mesh, data_dir: str, objective: ObjectiveConfig,
                 batches: int = 8, batch_size: int = 16, seed: int = 0) -> dict[str, float]:
    """{'loss', 'perplexity', 'accuracy', 'tokens'} over `batches` x `batch_size` held-out sequences.

    batch_size need not divide the mesh: rows are padded to data*fsdp with a zero loss mask."""
    model = GLM(cfg)
    loader = pipeline.GLMLoader(pipeline.TokenShards(data_dir), objective, global_batch=batch_size, seed=seed,
                                model_vocab=cfg.vocab_size)

    def sums(params, b):
        with nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
            logits, _ = model.apply({"params": params}, b["tokens"], b["position_ids"], prefix_mask=b["prefix_mask"],
                                    segment_ids=b["segment_ids"])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        nll = -jnp.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]
        mask = b["loss_mask"].astype(jnp.float32)
        return (nll * mask).sum(), ((logits.argmax(-1) == b["targets"]) * mask).sum(), mask.sum()

    fn = jax.jit(sums, in_shardings=(param_shardings(cfg, mesh), None))
    total = np.zeros(3)
    with jax.set_mesh(mesh):
        for _ in range(batches):
            b, _ = pad_rows(loader.next_batch(), data_parallelism(mesh), zero=("loss_mask",))
            arrays = {k: jax.device_put(v, rules.named(mesh, "batch", *((None,) * (v.ndim - 1))))
                      for k, v in b.items()}
            total += np.array([float(x) for x in fn(params, arrays)])
    loss = total[0] / max(total[2], 1.0)
    return {"loss": loss, "perplexity": math.exp(loss), "accuracy": total[1] / max(total[2], 1.0),
            "tokens": int(total[2])}
