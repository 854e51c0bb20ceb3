"""ChatGLM-6B's Hugging Face files, read and written tensor by tensor.

A directory holds `config.json` and either `pytorch_model.bin` / `pytorch_model-XXXXX-of-XXXXX.bin`
with `pytorch_model.bin.index.json`, or `model.safetensors` / `model-XXXXX-of-XXXXX.safetensors`
with `model.safetensors.index.json`. Safetensors are read through a memory map and written
sequentially by glmjax itself (the format is an 8-byte header length, a JSON header, raw bytes).
"""
from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np

from glmjax import config as C
from glmjax.config import GLMConfig
from glmjax.convert import engine
from glmjax.convert.engine import Source
from glmjax.convert.tables import hf_chatglm_rules
from glmjax.convert.torch_files import TorchZipReader, save_streaming
from glmjax.errors import CheckpointError
from glmjax.outputs import inside

INV_FREQ = "transformer.layers.{i}.attention.rotary_emb.inv_freq"
# modeling_chatglm.py builds every GLMBlock with its default num_layers=28: alpha = sqrt(2 * 28)
CHATGLM_ALPHA = math.sqrt(56.0)
_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I8": "int8", "U8": "uint8",
              "I32": "int32", "I64": "int64"}


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


# --- config --------------------------------------------------------------------------------------
def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> GLMConfig:
    """A GLMConfig from ChatGLM's config.json (ChatGLM computes its rotary tables in float16)."""
    keys = ("num_layers", "hidden_size", "num_attention_heads", "inner_hidden_size", "vocab_size",
            "max_sequence_length", "layernorm_epsilon", "position_encoding_2d")
    missing = [k for k in keys if k not in hf]
    if missing:
        raise CheckpointError(f"{source}: ChatGLM config lacks {missing[0]!r}")
    if hf.get("quantization_bit", 0):
        raise CheckpointError(f"{source}: quantized ChatGLM checkpoints (quantization_bit="
                              f"{hf['quantization_bit']}) are not a conversion source")
    dt = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}.get(hf.get("torch_dtype"),
                                                                                  "float16")
    return C.from_dict({**{k: hf[k] for k in keys}, "glu": False, "tie_word_embeddings": False,
                        "rotary_dtype": "float16", "param_dtype": dt, "dtype": dt,
                        "residual_alpha": CHATGLM_ALPHA}, source=source)


def config_to_hf(cfg: GLMConfig, dtype: str) -> dict[str, Any]:
    return {"architectures": ["ChatGLMModel"], "model_type": "chatglm",
            "bos_token_id": 130004, "eos_token_id": 130005, "mask_token_id": 130000,
            "gmask_token_id": 130001, "pad_token_id": 3,
            "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
            "num_attention_heads": cfg.num_attention_heads, "inner_hidden_size": cfg.inner_hidden_size,
            "vocab_size": cfg.vocab_size, "max_sequence_length": cfg.max_sequence_length,
            "layernorm_epsilon": cfg.layernorm_epsilon, "position_encoding_2d": cfg.position_encoding_2d,
            "torch_dtype": dtype, "use_cache": True, "quantization_bit": 0, "pre_seq_len": None,
            "prefix_projection": False}


def check_chatglm_shape(cfg: GLMConfig) -> None:
    """hf-chatglm files are run by modeling_chatglm.py: refuse models it would compute differently."""
    if cfg.glu or cfg.tie_word_embeddings or not cfg.position_encoding_2d:
        raise CheckpointError("the hf-chatglm format holds ChatGLM-architecture models (plain MLP, "
                              "separate lm_head, 2-D rotary)")
    if not math.isclose(cfg.deepnorm_alpha, CHATGLM_ALPHA, rel_tol=1e-12):
        raise CheckpointError(f"modeling_chatglm.py uses DeepNorm alpha sqrt(56) for every model, this "
                              f"config uses {cfg.deepnorm_alpha:.6g}: its logits would change")
    if cfg.rotary_dtype != "float16":
        raise CheckpointError("modeling_chatglm.py computes rotary tables in float16, this config in float32")


# --- safetensors ---------------------------------------------------------------------------------
class SafetensorsReader:
    """A .safetensors file's index; tensor bytes are read with pread when asked for (nothing mapped)."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read {path}: truncated or corrupt ({e})") from None
        size = os.path.getsize(path)
        self.tensors: dict[str, tuple[int, tuple[int, ...], np.dtype]] = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            start, end = info["data_offsets"]
            if 8 + n + end > size:
                raise CheckpointError(f"cannot read {path}: truncated ({key} ends past the end of the file)")
            self.tensors[key] = (8 + n + start, tuple(info["shape"]), _np_dtype(_ST_DTYPES[info["dtype"]]))

    def read(self, key: str) -> np.ndarray:
        offset, shape, dt = self.tensors[key]
        out = np.empty(shape, dt)
        with open(self.path, "rb") as f:
            f.seek(offset)
            if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
                raise CheckpointError(f"cannot read {self.path}: truncated ({key})")
        return out


def _write_safetensors(path: str, specs: list[tuple[str, tuple[int, ...], Any]],
                       tensors: Iterator[np.ndarray]) -> None:
    rev = {v: k for k, v in _ST_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape, dt in specs:
        nbytes = int(np.prod(shape)) * np.dtype(dt).itemsize
        header[key] = {"dtype": rev[np.dtype(dt).name], "shape": list(shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for (key, shape, dt), arr in zip(specs, tensors):
            arr = np.ascontiguousarray(arr, dtype=dt)
            if arr.shape != tuple(shape):
                raise CheckpointError(f"{key}: shape {arr.shape}, expected {tuple(shape)}")
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))


# --- reading -------------------------------------------------------------------------------------
def _weight_files(ckpt_dir: str) -> list[str]:
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if os.path.isfile(os.path.join(ckpt_dir, index)):
            try:
                with open(os.path.join(ckpt_dir, index), encoding="utf-8") as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{ckpt_dir}/{index} is not a weight index: {e}") from None
            paths = [inside(ckpt_dir, name, os.path.join(ckpt_dir, index)) for name in files]
            for name, path in zip(files, paths):
                if not os.path.isfile(path):
                    raise CheckpointError(f"{ckpt_dir}: {index} names {name}, which is missing")
            return paths
        if os.path.isfile(os.path.join(ckpt_dir, single)):
            return [os.path.join(ckpt_dir, single)]
    raise CheckpointError(f"{ckpt_dir} holds no ChatGLM weights (model*.safetensors or pytorch_model*.bin)")


def hf_source(ckpt_dir: str) -> tuple[GLMConfig, Source]:
    """Config and random access to the tensors of a ChatGLM Hugging Face directory."""
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"Hugging Face checkpoint directory not found: {ckpt_dir}")
    cfg_path = os.path.join(ckpt_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{ckpt_dir} has no config.json")
    with open(cfg_path) as f:
        cfg = config_from_hf(json.load(f), cfg_path)
    readers: dict[str, Any] = {}  # key -> a reader that holds it
    for path in _weight_files(ckpt_dir):
        if path.endswith(".safetensors"):
            reader = SafetensorsReader(path)
            keys = list(reader.tensors)
        else:
            reader = TorchZipReader(path)
            if not isinstance(reader.obj, dict):
                raise CheckpointError(f"{path} does not hold a state dict")
            keys = list(reader.obj)
        readers.update({k: reader for k in keys})
    rules = hf_chatglm_rules(cfg)
    expected = {r.key(i) for r, i in engine.ordered(rules, cfg)}
    keys = {k for k in readers if not k.endswith("rotary_emb.inv_freq")}
    if keys - expected:
        extra = sorted(keys - expected)[0]
        raise CheckpointError(f"{readers[extra].path}: unexpected tensor {extra!r}")
    if expected - keys:
        raise CheckpointError(f"{ckpt_dir}: missing tensor {sorted(expected - keys)[0]!r}")
    by_path = {r.path: r for r in rules}

    def meta(key: str) -> tuple[tuple[int, ...], np.dtype]:
        r = readers[key]
        if isinstance(r, SafetensorsReader):
            return r.tensors[key][1], r.tensors[key][2]
        return r.obj[key].shape, r.obj[key].dtype

    for r, i in engine.ordered(rules, cfg):
        if meta(r.key(i))[0] != r.shape:
            raise CheckpointError(f"{readers[r.key(i)].path}: {r.key(i)} has shape {meta(r.key(i))[0]}, "
                                  f"the config implies {r.shape}")

    def get(p: engine.Path, i: int | None) -> np.ndarray:
        key = by_path[p].key(i)
        r = readers[key]
        return by_path[p].to_jax(r.read(key) if isinstance(r, SafetensorsReader) else r.read(r.obj[key]))

    def dtype(p: engine.Path) -> np.dtype:
        rule = by_path[p]
        return meta(rule.key(0 if rule.per_layer else None))[1]

    return cfg, Source(get=get, dtype=dtype)


# --- writing -------------------------------------------------------------------------------------
def write_hf(out_dir: str, source: Source, cfg: GLMConfig, *, dtype: str | None = None,
             safetensors: bool = False, shard_bytes: int = 2 << 30) -> list[str]:
    """Write config.json, weight shards of at most ~shard_bytes and the index, one tensor at a time."""
    from glmjax.convert.sat import sat_inv_freq

    check_chatglm_shape(cfg)
    rules = hf_chatglm_rules(cfg)
    inv = sat_inv_freq(cfg)
    items: list[tuple[str, tuple[int, ...], np.dtype, Any]] = []
    for rule, i in engine.ordered(rules, cfg):
        dt = np.dtype(dtype) if dtype else np.dtype(source.dtype(rule.path))
        items.append((rule.key(i), rule.shape, dt, (rule, i)))
        if rule.name.endswith("input_layernorm.bias"):
            items.append((INV_FREQ.format(i=i), inv.shape, inv.dtype, None))
    shards: list[list[int]] = [[]]
    size = 0
    for n, (_, shape, dt, _) in enumerate(items):
        nbytes = int(np.prod(shape)) * dt.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes
    total = len(shards)
    stem, ext = ("model", "safetensors") if safetensors else ("pytorch_model", "bin")
    names = ([f"{stem}.{ext}"] if total == 1 else
             [f"{stem}-{k + 1:05d}-of-{total:05d}.{ext}" for k in range(total)])

    def produce(n: int) -> np.ndarray:
        key, shape, dt, ref = items[n]
        if ref is None:
            return inv
        rule, i = ref
        return rule.from_jax(source.get(rule.path, i)).astype(dt, copy=False)

    written = []
    weight_map = {}
    for name, members in zip(names, shards):
        specs = [(items[n][0], items[n][1], items[n][2]) for n in members]
        path = os.path.join(out_dir, name)
        gen = (produce(n) for n in members)
        if safetensors:
            _write_safetensors(path, specs, gen)
        else:
            save_streaming(path, specs, gen, wrap=lambda sd: sd)
        weight_map.update({items[n][0]: name for n in members})
        written.append(path)
    if total > 1:
        total_size = sum(int(np.prod(s)) * d.itemsize for _, s, d, _ in items)
        with open(os.path.join(out_dir, f"{names[0].split('-')[0]}.{ext}.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, f, indent=2)
    out_dtype = dtype or np.dtype(source.dtype(("word_embeddings",))).name
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg, out_dtype), f, indent=2)
    return written
