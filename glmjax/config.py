"""GLM model configuration: one frozen dataclass, named presets, JSON/YAML files and key=value
overrides -- and the typed field parsing every config section uses (glmjax/experiment.py).

Field names follow the GLM-130B / SAT / ChatGLM ecosystem so that a SAT or Hugging Face config
reads over directly. The config is passed explicitly to every module; there is no global config.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from glmjax.errors import ConfigError

FLOAT_DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")

# Keys that SAT checkpoints' configs and ../shared/reference's make_reference.py write beside the
# model fields. They describe how a file was produced, not the model, so loading accepts and drops them.
GENERATOR_KEYS = frozenset({
    "seed", "weight_std_scale", "embedding_std", "gmask_id", "sop_id", "seq_len",
    "context_text_lengths", "decode_context_text_length", "decode_steps", "decode_mode",
    "decode_batch", "tp",
})

# `rotary_mode` (make_reference.py) names the SAT version whose rotary tables to reproduce.
ROTARY_MODES = {"sat0.2": "float16", "sat0.4": "float32"}


@dataclasses.dataclass(frozen=True)
class GLMConfig:
    """Architecture and numerics of a GLM model (GLM-130B, ChatGLM-6B, or a small one)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    inner_hidden_size: int  # per GLU branch for GeGLU; the MLP width otherwise
    vocab_size: int
    max_sequence_length: int = 2048
    layernorm_epsilon: float = 1e-5
    position_encoding_2d: bool = False  # ChatGLM's 2-D rotary (positions + block positions)
    glu: bool = True  # GeGLU with exact-erf gelu (GLM-130B); False: plain MLP with tanh gelu (ChatGLM)
    tie_word_embeddings: bool = True  # output head = word embedding (GLM-130B); False: lm_head
    rotary_dtype: str = "float16"  # tables as GLM-130B's released fp16 model computes them
    rotary_base: float = 10000.0
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype of matmuls; norms and softmax always run in float32
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    # alpha of embedding gradient shrink (1.0 = off; GLM-130B: 0.1): a number, or a piecewise-linear
    # schedule ((step, alpha), ...) held constant outside its points, as GLM-130B's run changed it
    embedding_grad_shrink: float | tuple[tuple[int, float], ...] = 1.0
    remat_policy: str = "none"
    init_std: float | None = None  # embedding init std; None: sqrt(1/(3*hidden)) (GLM-130B's 0.0052)
    # DeepNorm residual scale; None: sqrt(2 * num_layers). ChatGLM's modeling code fixes it at sqrt(56)
    # (28 layers) whatever num_layers is, so ChatGLM-family imports pin it.
    residual_alpha: float | None = None
    # weight-only quantization of the four linear kernels per layer (glmjax/model/quant.py): 0 = none,
    # 8 or 4 bits; groups = scales per output unit of the row-parallel kernels (a GLM-130B quantized
    # checkpoint's tensor-parallel degree; 1 when quantizing at load)
    quantization_bits: int = 0
    quantization_groups: int = 1

    def __post_init__(self) -> None:
        _validate(self)

    # --- derived quantities -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def deepnorm_alpha(self) -> float:
        """DeepNorm residual scale: the residual adds the normalised input times sqrt(2N)."""
        return self.residual_alpha if self.residual_alpha is not None else math.sqrt(2.0 * self.num_layers)

    @property
    def embedding_init_std(self) -> float:
        return self.init_std if self.init_std is not None else math.sqrt(1.0 / (3 * self.hidden_size))

    def egs_alpha_at(self, step: int) -> float:
        """Embedding-gradient-shrink alpha at training step `step` (linear between schedule points)."""
        return egs_alpha_at(self.embedding_grad_shrink, step)

    def param_counts(self) -> dict[str, int]:
        """Parameter count per tensor family, from the shapes alone."""
        h, f, v, n = self.hidden_size, self.inner_hidden_size, self.vocab_size, self.num_layers
        wi = (2 if self.glu else 1) * f
        per_layer = {
            "layernorms": 4 * h,
            "query_key_value": 3 * h * h + 3 * h,
            "dense": h * h + h,
            "dense_h_to_4h": h * wi + wi,
            "dense_4h_to_h": f * h + h,
        }
        counts = {"word_embeddings": v * h, "final_layernorm": 2 * h}
        counts.update({k: n * c for k, c in per_layer.items()})
        if not self.tie_word_embeddings:
            counts["lm_head"] = v * h
        return counts

    def num_params(self) -> int:
        return sum(self.param_counts().values())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> GLMConfig:
        return from_dict({**self.to_dict(), **changes})


def _fail(msg: str) -> None:
    raise ConfigError(msg)


def _validate(c: GLMConfig) -> None:
    for name in ("num_layers", "hidden_size", "num_attention_heads", "inner_hidden_size",
                 "vocab_size", "max_sequence_length"):
        v = getattr(c, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            _fail(f"config: {name} must be a positive integer, got {v!r}")
    if c.hidden_size % c.num_attention_heads:
        _fail(f"config: num_attention_heads={c.num_attention_heads} does not divide "
              f"hidden_size={c.hidden_size}")
    rot_unit = 4 if c.position_encoding_2d else 2
    if c.head_dim % rot_unit:
        _fail(f"config: head dim {c.head_dim} must be a multiple of {rot_unit} for "
              f"{'2-D' if c.position_encoding_2d else '1-D'} rotary")
    for name in ("rotary_dtype", "param_dtype", "dtype"):
        if getattr(c, name) not in FLOAT_DTYPES:
            _fail(f"config: {name} must be one of {', '.join(FLOAT_DTYPES)}, got {getattr(c, name)!r}")
    if c.remat_policy not in REMAT_POLICIES:
        _fail(f"config: remat_policy must be one of {', '.join(REMAT_POLICIES)}, got {c.remat_policy!r}")
    if not (isinstance(c.layernorm_epsilon, (int, float)) and c.layernorm_epsilon > 0):
        _fail(f"config: layernorm_epsilon must be > 0, got {c.layernorm_epsilon!r}")
    for name in ("hidden_dropout", "attention_dropout"):
        v = getattr(c, name)
        if not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
            _fail(f"config: {name} must be in [0, 1), got {v!r}")
    egs_alpha_at(c.embedding_grad_shrink, 0)  # validates the number or schedule
    if c.residual_alpha is not None and not c.residual_alpha > 0:
        _fail(f"config: residual_alpha must be > 0, got {c.residual_alpha!r}")
    if c.rotary_base <= 1:
        _fail(f"config: rotary_base must be > 1, got {c.rotary_base!r}")
    if c.quantization_bits not in (0, 4, 8):
        _fail(f"config: quantization_bits must be 0, 4 or 8, got {c.quantization_bits!r}")
    if not (isinstance(c.quantization_groups, int) and c.quantization_groups >= 1
            and c.num_attention_heads % c.quantization_groups == 0
            and c.inner_hidden_size % c.quantization_groups == 0):
        _fail(f"config: quantization_groups must be >= 1 and divide the heads and inner_hidden_size, "
              f"got {c.quantization_groups!r}")
    for name in ("position_encoding_2d", "glu", "tie_word_embeddings"):
        if not isinstance(getattr(c, name), bool):
            _fail(f"config: {name} must be true or false, got {getattr(c, name)!r}")


def egs_alpha_at(schedule: float | Sequence[Sequence[float]], step: int) -> float:
    """Alpha of a constant or of a piecewise-linear [[step, alpha], ...] schedule at `step`."""
    import numpy as np

    what = "embedding_grad_shrink"
    if isinstance(schedule, (int, float)) and not isinstance(schedule, bool):
        points = [(0, float(schedule))]
    else:
        try:
            points = [(int(s), float(a)) for s, a in schedule]
        except (TypeError, ValueError):
            _fail(f"config: {what} must be a number or [[step, alpha], ...], got {schedule!r}")
    steps = [s for s, _ in points]
    if not points or steps != sorted(set(steps)) or any(not 0.0 <= a <= 1.0 for _, a in points):
        _fail(f"config: {what} must be in [0, 1] (a schedule: increasing steps), got {schedule!r}")
    return float(np.interp(step, steps, [a for _, a in points]))


PRESETS: dict[str, dict[str, Any]] = {
    # GLM-130B (configs/model_glm_130b.sh): 128,697,794,560 parameters.
    "glm-130b": dict(num_layers=70, hidden_size=12288, num_attention_heads=96,
                     inner_hidden_size=32768, vocab_size=150528, max_sequence_length=2048,
                     param_dtype="float16", dtype="float16", embedding_grad_shrink=0.1,
                     remat_policy="full"),
    # ChatGLM-6B (Hugging Face THUDM/chatglm-6b, vocabulary after the 2023-04 image-token removal).
    "chatglm-6b": dict(num_layers=28, hidden_size=4096, num_attention_heads=32,
                       inner_hidden_size=16384, vocab_size=130528, max_sequence_length=2048,
                       position_encoding_2d=True, glu=False, tie_word_embeddings=False,
                       param_dtype="float16", dtype="float16"),
    # The reference fixtures' size (../shared/reference): 2 layers, hidden 64, GLU inner 170.
    "glm-tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=4, inner_hidden_size=170,
                     vocab_size=1024, max_sequence_length=64),
    # Every dimension divisible by 8: sharding tests on any 8-device mesh.
    "glm-test": dict(num_layers=2, hidden_size=64, num_attention_heads=8, inner_hidden_size=128,
                     vocab_size=1024, max_sequence_length=128),
    # A few million parameters: the CPU demo.
    "glm-small": dict(num_layers=4, hidden_size=256, num_attention_heads=8, inner_hidden_size=688,
                      vocab_size=8192, max_sequence_length=256),
    # ~1.2B parameters for single-accelerator benchmarks.
    "glm-1b": dict(num_layers=24, hidden_size=2048, num_attention_heads=16, inner_hidden_size=5504,
                   vocab_size=50304, max_sequence_length=2048, param_dtype="float32",
                   dtype="bfloat16"),
}

_FIELDS = {f.name: f for f in dataclasses.fields(GLMConfig)}


def from_dict(d: Mapping[str, Any], *, source: str = "config") -> GLMConfig:
    """Build a config from a mapping; unknown keys are an error, `rotary_mode` is translated."""
    d = dict(d)
    if "rotary_mode" in d:
        mode = d.pop("rotary_mode")
        if mode not in ROTARY_MODES:
            _fail(f"{source}: rotary_mode must be one of {', '.join(ROTARY_MODES)}, got {mode!r}")
        d.setdefault("rotary_dtype", ROTARY_MODES[mode])
    return build(GLMConfig, d, source, "config")


# --- typed fields: the one parser of every config section ---------------------------------------
def build(cls: type, values: Mapping[str, Any], source: str, section: str) -> Any:
    """A frozen config dataclass from a mapping: unknown and missing keys refused, every value
    coerced to its field's type (numbers in any notation, finite floats only), in one clear line."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        _fail(f"{source}: unknown {section} key {unknown[0]!r} (known: {', '.join(fields)})")
    missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and n not in values]
    if missing:
        _fail(f"{source}: missing required {section} key {missing[0]!r}")
    hints = _hints(cls)
    prefix = "" if section == "config" else f"{section}."
    return cls(**{k: coerce(v, hints[k], f"{source}: {prefix}{k}") for k, v in values.items()})


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(value: Any, kind: Any, where: str) -> Any:
    """`value` as type `kind` (int, float, bool, str, Optional/union, tuple[...]); else one error.

    YAML 1.1 reads `1e-3` as text, so numeric text is accepted for numbers; floats must be finite;
    an integral float is an int; lists become tuples."""
    try:
        return _coerce(value, kind)
    except (TypeError, ValueError):
        _fail(f"{where} must be {_describe(kind)}, got {value!r}")


def _coerce(value: Any, kind: Any) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is not type(None):
                with contextlib.suppress(TypeError, ValueError):
                    return _coerce(value, a)
        raise ValueError(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if len(value) != len(args):
            raise ValueError(value)
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    if kind is bool:
        if not isinstance(value, bool):
            raise TypeError(value)
        return value
    if kind is int:
        if isinstance(value, bool):
            raise TypeError(value)
        if isinstance(value, str):
            value = float(value) if any(c in value for c in ".eE") else int(value)
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(value)
            value = int(value)
        if not isinstance(value, int):
            raise TypeError(value)
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError(value)
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(value)
        return value
    if kind is str:
        if not isinstance(value, str):
            raise TypeError(value)
        return value
    return value


def _describe(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (types.UnionType, typing.Union):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of ({_describe(args[0])})"
        return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(kind, str(kind))


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Parse `key=value` strings; values are YAML scalars (ints, floats, booleans, strings, lists)."""
    import yaml

    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            _fail(f"override {item!r} is not of the form key=value")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def load_file(path: str) -> dict[str, Any]:
    """Read a JSON or YAML file holding a mapping (one clear error if it is not one)."""
    import yaml

    if not os.path.isfile(path):
        _fail(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        _fail(f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start})")
    kind = "JSON" if path.endswith(".json") else "YAML"
    try:
        data = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        _fail(f"config file {path} is not valid {kind}: {str(e).splitlines()[0]}")
    if not isinstance(data, dict):
        _fail(f"config file {path} must hold a mapping of keys to values")
    return data


def is_experiment(data: Mapping[str, Any]) -> bool:
    """An experiment file keeps the model under `model:` (beside data:, train:, ...)."""
    return isinstance(data.get("model"), dict)


def model_from_section(section: Mapping[str, Any], source: str) -> GLMConfig:
    """An experiment's `model:` section: `preset: NAME` plus overrides, or every field."""
    values = dict(section)
    preset = values.pop("preset", None)
    if preset is None:
        if not values:
            _fail(f"{source}: the model needs `preset: NAME` ({', '.join(PRESETS)}) or every GLMConfig field")
        return from_dict(values, source=source)
    if preset not in PRESETS:
        _fail(f"{source}: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    return from_dict({**PRESETS[preset], **values}, source=source)


def resolve(preset: str | None = None, path: str | None = None,
            overrides: Sequence[str] | Mapping[str, Any] = ()) -> GLMConfig:
    """Preset or file (a model config, or an experiment's `model:` section), then overrides (`key=value`
    or `model.key=value`): the one way every model-only entry point builds a config."""
    if (preset is None) == (path is None):
        _fail("give exactly one of a preset name or a config file")
    extra = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    extra = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in extra.items()}
    if preset is not None:
        return model_from_section({"preset": preset, **extra}, f"preset {preset}")
    data = load_file(path)
    if is_experiment(data):
        section = data["model"]
    else:  # a model config file, perhaps with the keys make_reference.py writes beside the model
        section = {k: v for k, v in data.items() if k not in GENERATOR_KEYS}
    return model_from_section({**section, **extra}, path)
