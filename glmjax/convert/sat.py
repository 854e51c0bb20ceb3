"""Reading GLM-130B's SwissArmyTransformer (SAT) checkpoints at any tensor-parallel degree.

Layout: `DIR/latest` holds the iteration; `DIR/<iter>/mp_rank_XX_model_states.pt` holds
`{'module': state_dict}`, one file per tensor-parallel rank. Shards are merged with GLM-130B's rules
(tools/convert_tp.py): QKV and the embedding along rows, the GeGLU weight half by half, the
row-parallel weights along columns, norms and output biases replicated. Files are memory-mapped and
tensors are read one at a time.
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from glmjax.config import GLMConfig
from glmjax.errors import CheckpointError

SHARD_RE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
# Buffers that SAT recomputes and never loads (GLM-130B issue #18); present in some files.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """How one SAT tensor maps to a glmjax parameter.

    split: how tensor-parallel ranks hold it -- 'rows' (dim 0), 'cols' (dim 1), 'glu' (each rank
    holds [its value rows; its gate rows]) or 'replicated'. to_jax turns the merged torch-layout
    array [out, in] into glmjax's layout.
    """

    sat_name: str  # with {i} for the layer index
    path: tuple[str, ...]
    shape: tuple[int, ...]  # merged torch-layout shape
    split: str
    to_jax: Callable[[np.ndarray], np.ndarray]

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.sat_name

    def shard_shape(self, tp: int) -> tuple[int, ...]:
        dim = {"rows": 0, "glu": 0, "cols": 1}.get(self.split)
        if dim is None:
            return self.shape
        return tuple(n // tp if d == dim else n for d, n in enumerate(self.shape))


def glm_rules(cfg: GLMConfig) -> list[TensorRule]:
    """The GLM-130B family table (GLM-130B, ChatGLM-6B-style configs, small GLMs)."""
    h, f, v, nh, d = (cfg.hidden_size, cfg.inner_hidden_size, cfg.vocab_size,
                      cfg.num_attention_heads, cfg.head_dim)
    ident = lambda w: w  # noqa: E731
    lay = "transformer.layers.{i}."
    rules = [TensorRule("transformer.word_embeddings.weight", ("word_embeddings",), (v, h), "rows", ident)]
    for ln in ("input_layernorm", "post_attention_layernorm"):
        rules += [TensorRule(lay + ln + ".weight", ("layers", ln, "scale"), (h,), "replicated", ident),
                  TensorRule(lay + ln + ".bias", ("layers", ln, "bias"), (h,), "replicated", ident)]
    att, mlp = ("layers", "attention"), ("layers", "mlp")
    rules += [
        # rows are [head][q|k|v][head_dim]: reshape, then put the input dim first
        TensorRule(lay + "attention.query_key_value.weight", att + ("qkv_kernel",), (3 * h, h), "rows",
                   lambda w: w.reshape(nh, 3, d, h).transpose(3, 0, 1, 2)),
        TensorRule(lay + "attention.query_key_value.bias", att + ("qkv_bias",), (3 * h,), "rows",
                   lambda w: w.reshape(nh, 3, d)),
        TensorRule(lay + "attention.dense.weight", att + ("dense_kernel",), (h, h), "cols",
                   lambda w: w.T.reshape(nh, d, h)),
        TensorRule(lay + "attention.dense.bias", att + ("dense_bias",), (h,), "replicated", ident),
        TensorRule(lay + "mlp.dense_4h_to_h.weight", mlp + ("wo_kernel",), (h, f), "cols", lambda w: w.T),
        TensorRule(lay + "mlp.dense_4h_to_h.bias", mlp + ("wo_bias",), (h,), "replicated", ident),
    ]
    if cfg.glu:  # merged rows are [all value rows; all gate rows]
        rules += [TensorRule(lay + "mlp.dense_h_to_4h.weight", mlp + ("wi_kernel",), (2 * f, h), "glu",
                             lambda w: w.reshape(2, f, h).transpose(2, 0, 1)),
                  TensorRule(lay + "mlp.dense_h_to_4h.bias", mlp + ("wi_bias",), (2 * f,), "glu",
                             lambda w: w.reshape(2, f))]
    else:
        rules += [TensorRule(lay + "mlp.dense_h_to_4h.weight", mlp + ("wi_kernel",), (f, h), "rows",
                             lambda w: w.T),
                  TensorRule(lay + "mlp.dense_h_to_4h.bias", mlp + ("wi_bias",), (f,), "rows", ident)]
    rules += [TensorRule("transformer.final_layernorm.weight", ("final_layernorm", "scale"), (h,),
                         "replicated", ident),
              TensorRule("transformer.final_layernorm.bias", ("final_layernorm", "bias"), (h,),
                         "replicated", ident)]
    if not cfg.tie_word_embeddings:
        rules.append(TensorRule("lm_head.weight", ("lm_head",), (v, h), "rows", ident))
    return rules


def merge_shards(parts: list[np.ndarray], split: str) -> np.ndarray:
    """Undo GLM-130B's tensor-parallel split of one tensor."""
    if split == "replicated" or len(parts) == 1:
        return parts[0]
    if split == "rows":
        return np.concatenate(parts, 0)
    if split == "cols":
        return np.concatenate(parts, 1)
    halves = [np.split(p, 2, axis=0) for p in parts]  # glu: values of every rank, then gates
    return np.concatenate([hv[0] for hv in halves] + [hv[1] for hv in halves], 0)


# --- files --------------------------------------------------------------------------------------
def find_shards(ckpt_dir: str) -> tuple[str, list[str]]:
    """Return (iteration, shard paths in rank order); one clear error for each layout problem."""
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"SAT checkpoint directory not found: {ckpt_dir}")
    latest = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(latest):
        raise CheckpointError(f"SAT checkpoint {ckpt_dir} has no 'latest' file naming its iteration")
    with open(latest, encoding="utf-8", errors="replace") as fh:
        iteration = fh.read().strip()
    it_dir = os.path.join(ckpt_dir, iteration)
    if not iteration or not os.path.isdir(it_dir):
        raise CheckpointError(f"SAT checkpoint {ckpt_dir}: 'latest' names iteration {iteration!r} "
                              f"but {it_dir} does not exist")
    ranks = {}
    for name in os.listdir(it_dir):
        m = SHARD_RE.match(name)
        if m:
            ranks[int(m.group(1))] = os.path.join(it_dir, name)
    if not ranks:
        raise CheckpointError(f"SAT checkpoint {it_dir} holds no mp_rank_XX_model_states.pt files")
    n = max(ranks) + 1
    missing = [r for r in range(n) if r not in ranks]
    if missing:
        raise CheckpointError(f"SAT checkpoint {it_dir}: shard mp_rank_{missing[0]:02d}_model_states.pt "
                              f"is missing (found ranks {sorted(ranks)})")
    return iteration, [ranks[r] for r in range(n)]


def _load_module(path: str) -> dict[str, Any]:
    try:
        import torch
    except ImportError as e:  # torch is an extra: only reading/writing PyTorch files needs it
        raise CheckpointError("reading SAT checkpoints needs PyTorch (CPU build is enough): "
                              "pip install 'glmjax[torch]'") from e
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # zip errors, pickle errors, EOF: all mean a damaged file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read {path}: truncated or corrupt ({first})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("module"), dict):
        raise CheckpointError(f"{path} is not a SAT model-states file (no 'module' state dict)")
    return obj["module"]


def _to_numpy(t: Any) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy()


def check_tp(cfg: GLMConfig, tp: int, where: str) -> None:
    """A tensor-parallel degree must divide the heads, the MLP width and the vocabulary."""
    for name, dim in (("num_attention_heads", cfg.num_attention_heads),
                      ("inner_hidden_size", cfg.inner_hidden_size), ("vocab_size", cfg.vocab_size)):
        if dim % tp:
            raise CheckpointError(f"{where}: {tp} tensor-parallel shards, but {name}={dim} is not "
                                  f"divisible by {tp}")


def iter_sat_tensors(ckpt_dir: str, cfg: GLMConfig, expect_tp: int | None = None
                     ) -> Iterator[tuple[TensorRule, int | None, np.ndarray]]:
    """Yield (rule, layer index or None, merged tensor in glmjax layout), one tensor at a time."""
    _, paths = find_shards(ckpt_dir)
    tp = len(paths)
    if expect_tp is not None and tp != expect_tp:
        raise CheckpointError(f"SAT checkpoint {ckpt_dir} has {tp} shards, expected {expect_tp}")
    check_tp(cfg, tp, f"SAT checkpoint {ckpt_dir}")
    shards = [_load_module(p) for p in paths]
    rules = glm_rules(cfg)
    expected = set()
    for rule in rules:
        layers = range(cfg.num_layers) if rule.per_layer else [None]
        expected.update(rule.sat_name.format(i=i) for i in layers)
    for path, sd in zip(paths, shards):
        keys = {k for k in sd if not k.endswith(IGNORED_SUFFIXES)}
        if keys - expected:
            extra = sorted(keys - expected)[0]
            hint = " (does the checkpoint have more layers than num_layers?)" if ".layers." in extra else ""
            raise CheckpointError(f"{path}: unexpected tensor {extra!r}{hint}")
        if expected - keys:
            raise CheckpointError(f"{path}: missing tensor {sorted(expected - keys)[0]!r}")
    for rule in rules:
        want = rule.shard_shape(tp)
        for i in range(cfg.num_layers) if rule.per_layer else [None]:
            key = rule.sat_name.format(i=i)
            parts = []
            for path, sd in zip(paths, shards):
                t = sd[key]
                if tuple(t.shape) != want:
                    raise CheckpointError(f"{path}: {key} has shape {tuple(t.shape)}, the config "
                                          f"implies {want} per shard at tp={tp}")
                parts.append(_to_numpy(t))
                if rule.split == "replicated" and not np.array_equal(parts[0], parts[-1]):
                    raise CheckpointError(f"{path}: replicated tensor {key} differs from rank 0's copy")
                if rule.split == "replicated":
                    parts = parts[:1]
            yield rule, i, rule.to_jax(merge_shards(parts, rule.split))


def read_sat_checkpoint(ckpt_dir: str, cfg: GLMConfig, dtype: str | None = None,
                        expect_tp: int | None = None) -> dict[str, Any]:
    """Read a SAT checkpoint into a glmjax parameter pytree of numpy arrays (layers stacked)."""
    import jax.numpy as jnp

    out_dtype = jnp.dtype(dtype or cfg.param_dtype)
    params: dict[str, Any] = {}
    for rule, i, arr in iter_sat_tensors(ckpt_dir, cfg, expect_tp):
        node = params
        for k in rule.path[:-1]:
            node = node.setdefault(k, {})
        leaf = rule.path[-1]
        if i is None:
            node[leaf] = np.asarray(arr, out_dtype)
        else:
            if leaf not in node:
                node[leaf] = np.empty((cfg.num_layers,) + arr.shape, out_dtype)
            node[leaf][i] = arr
    return params
