"""The experiment schema: one frozen dataclass per section of an experiment file, and the one loader
that `glmjax train`, `glmjax data inspect` and `glmjax info --config` use.

An experiment file (YAML or JSON) has the sections
  model:       a preset plus overrides (`preset: glm-130b`), or every GLMConfig field
  data:        a corpus written by `glmjax data prepare` (DataConfig)
  objective:   GLM-130B's blank-infilling proportions (glmjax/data/objective.py:ObjectiveConfig)
  optim:       AdamW, schedules, clipping, batch ramp (glmjax/train/optim.py:OptimConfig)
  loss_scale:  float16 dynamic loss scaling (glmjax/train/precision.py:LossScaleConfig)
  train:       steps, micro-batches, mesh, checkpoints, spike guard (TrainConfig)
Unknown sections and keys are refused; every value is parsed by its field's type
(glmjax/config.py:build); overrides are `section.key=value`. A later section is one entry of SECTIONS.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from glmjax import config as C
from glmjax.data.objective import ObjectiveConfig
from glmjax.errors import ConfigError
from glmjax.train.optim import OptimConfig
from glmjax.train.precision import LossScaleConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the prepared corpus is, and the seed of its shuffles and of the objective's draws."""

    path: str
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How a run proceeds: steps, micro-batch rows, mesh, checkpoints and the loss-spike guard."""

    steps: int = 100
    micro_batch: int = 8  # rows of one micro-batch (global); a step runs batch_size / micro_batch of them
    mesh: str | None = None
    checkpoint_dir: str = "runs/train"
    checkpoint_every: int = 50
    keep: int = 3
    log_every: int = 1
    seed: int = 1234  # parameter initialisation and dropout
    init_from: str | None = None  # a checkpoint (any format, or a run directory) whose parameters start the run
    peak_tflops: float | None = None  # per device, for MFU; default: report.PEAK_TFLOPS by device kind
    spike_threshold: float = 3.0  # a loss above this multiple of its moving average is a spike
    spike_window: int = 20  # steps in the loss moving average (and before the guard arms)
    max_rollbacks: int = 5

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch", "checkpoint_every", "keep", "log_every", "spike_window"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train: {name} must be positive, got {getattr(self, name)}")
        if self.max_rollbacks < 0 or self.spike_threshold <= 1.0:
            raise ConfigError(f"train: need max_rollbacks >= 0 and spike_threshold > 1, got "
                              f"{self.max_rollbacks} and {self.spike_threshold}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError(f"train: peak_tflops must be > 0, got {self.peak_tflops}")


SECTIONS: dict[str, type] = {"data": DataConfig, "objective": ObjectiveConfig, "optim": OptimConfig,
                             "loss_scale": LossScaleConfig, "train": TrainConfig}
ORDER = ("model", *SECTIONS)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Every section, resolved and validated."""

    model: C.GLMConfig
    data: DataConfig
    objective: ObjectiveConfig
    optim: OptimConfig
    loss_scale: LossScaleConfig
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        """Plain nested data (lists for tuples): what `info --config` prints and a run directory keeps."""
        return {name: _plain(dataclasses.asdict(getattr(self, name))) for name in ORDER}

    def to_yaml(self) -> str:
        """Sections and keys one per line (lists inline), readable back by load_experiment."""
        import yaml

        class Dumper(yaml.SafeDumper):
            """Mappings in block style, lists inline."""

        Dumper.add_representer(dict, lambda d, x: d.represent_mapping("tag:yaml.org,2002:map", x.items(), False))
        Dumper.add_representer(list, lambda d, x: d.represent_sequence("tag:yaml.org,2002:seq", x, True))
        return yaml.dump(self.to_dict(), Dumper=Dumper, sort_keys=False)


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def split_overrides(items: Sequence[str], default_section: str | None = None) -> dict[str, dict[str, Any]]:
    """`section.key=value` strings by section; with `default_section`, a bare `key=value` belongs to it."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in C.parse_overrides(items).items():
        section, dot, name = key.partition(".")
        if not dot and default_section:
            section, name = default_section, key
        if section not in ORDER or not name:
            raise ConfigError(f"override {key!r} must be SECTION.KEY=VALUE with SECTION one of {', '.join(ORDER)}")
        out.setdefault(section, {})[name] = value
    return out


def load_experiment(path: str, overrides: Sequence[str] = (), default_section: str | None = None) -> Experiment:
    """The experiment in `path` with overrides applied, every section validated (one clear line)."""
    raw = C.load_file(path)
    unknown = sorted(set(raw) - set(ORDER))
    if unknown:
        raise ConfigError(f"{path}: unknown section {unknown[0]!r} (sections: {', '.join(ORDER)})")
    sections: dict[str, dict[str, Any]] = {}
    for name in ORDER:
        value = raw.get(name)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{path}: section {name!r} must be a mapping of keys to values, got {value!r}")
        sections[name] = dict(value or {})
    for name, values in split_overrides(overrides, default_section).items():
        sections[name].update(values)
    return from_sections(sections, path)


def from_sections(sections: Mapping[str, Mapping[str, Any]], source: str) -> Experiment:
    """Build and cross-check the sections: objective shapes follow the model, batches divide."""
    model = C.model_from_section(sections.get("model") or {}, f"{source} model")
    if "path" not in (sections.get("data") or {}):
        raise ConfigError(f"{source}: data.path is required (a directory written by `glmjax data prepare`)")
    obj = dict(sections.get("objective") or {})
    obj.setdefault("seq_length", model.max_sequence_length)
    if obj.setdefault("position_encoding_2d", model.position_encoding_2d) != model.position_encoding_2d:
        raise ConfigError(f"{source}: objective.position_encoding_2d must equal the model's "
                          f"({model.position_encoding_2d})")
    built = {name: C.build(cls, obj if name == "objective" else sections.get(name) or {}, source, name)
             for name, cls in SECTIONS.items()}
    exp = Experiment(model=model, **built)
    _check(exp, source)
    return exp


def _check(exp: Experiment, source: str) -> None:
    o, t = exp.optim, exp.train
    if exp.objective.seq_length > exp.model.max_sequence_length:
        raise ConfigError(f"{source}: objective.seq_length={exp.objective.seq_length} exceeds the model's "
                          f"max_sequence_length={exp.model.max_sequence_length}")
    start = o.rampup_batch_size[0] if o.rampup_batch_size else o.global_batch
    if o.global_batch % t.micro_batch or start % t.micro_batch:
        raise ConfigError(f"{source}: global batch {o.global_batch} and the ramp's start {start} must be multiples "
                          f"of train.micro_batch={t.micro_batch}")
