"""FLOPs counted from the shapes (XLA's cost analysis counts a scanned layer loop once) and the
time a roofline allows: each program takes the longest of its compute at the chip's dense 16-bit
peak, its HBM traffic at peak bandwidth and its collectives at the link bandwidth (all overlapped),
so a prediction is a floor on the time and the MFU it implies a ceiling. The serial time, the
collectives after the compute, bounds it from the other side for a run that overlaps nothing."""
from __future__ import annotations

from collections.abc import Sequence

from glmjax.config import GLMConfig
from glmjax.plan.hlo import Collective
from glmjax.plan.targets import Chip


def matmul_params(cfg: GLMConfig) -> int:
    """Parameters that take part in matmuls: every linear kernel and the output head (tied or not),
    not the embedding lookup, norms or biases' adds."""
    counts = cfg.param_counts()
    skip = ("word_embeddings", "layernorms", "final_layernorm", "lm_head")
    return sum(v for k, v in counts.items() if k not in skip) + cfg.vocab_size * cfg.hidden_size


def forward_flops_per_token(cfg: GLMConfig, keys: int) -> float:
    """One token's forward FLOPs attending over `keys` positions: 2 per matmul parameter, and
    4 x layers x hidden x keys for the scores and the weighted sum (GLM attends densely: prefix and
    causal parts are both computed)."""
    return 2.0 * matmul_params(cfg) + 4.0 * cfg.num_layers * cfg.hidden_size * keys


def model_flops_per_token(cfg: GLMConfig, seq_length: int) -> float:
    """Training FLOPs per token, PaLM's accounting (as MaxText and GLM-130B's 32.5% MFU): forward plus
    a backward of twice its cost, 6N + 12 x layers x hidden x sequence. Rematerialisation is not counted."""
    return 3.0 * forward_flops_per_token(cfg, seq_length)


def hardware_flops_per_token(cfg: GLMConfig, seq_length: int, remat: str) -> float:
    """Training FLOPs the chips execute: the model's plus what the remat policy recomputes (full: the
    whole forward again; dots_no_batch: the attention products, which it does not save; dots: none)."""
    recompute = {"full": forward_flops_per_token(cfg, seq_length),
                 "dots_no_batch": 4.0 * cfg.num_layers * cfg.hidden_size * seq_length}.get(remat, 0.0)
    return model_flops_per_token(cfg, seq_length) + recompute


def collective_seconds(ops: Sequence[Collective], chip: Chip) -> float:
    """Ring time of every collective: within a host (or a TPU slice) at the link bandwidth, across
    hosts at the network bandwidth, none overlapped with another."""
    total = 0.0
    for op in ops:
        bw = chip.network_bandwidth if op.across_hosts else chip.link_bandwidth
        total += op.count * op.wire_bytes / bw if bw else 0.0
    return total


def bound_seconds(flops_per_device: float, hbm_bytes_per_device: float, comm_seconds: float,
                  chip: Chip) -> dict[str, float]:
    """The three bounds of one program, the roofline time (their maximum: everything overlapped)
    and the serial time (collectives after the compute: nothing overlapped)."""
    compute = flops_per_device / chip.peak_flops
    memory = hbm_bytes_per_device / chip.hbm_bandwidth
    return {"compute": compute, "hbm": memory, "collectives": comm_seconds,
            "step": max(compute, memory, comm_seconds), "serial": max(compute, memory) + comm_seconds}
