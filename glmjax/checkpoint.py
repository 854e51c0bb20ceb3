"""Checkpoint I/O, in one place: the formats glmjax reads and writes, telling them apart, opening one
as a host tensor Source, reading its config, placing its parameters on a mesh, training checkpoints
(asynchronous orbax saves, restore onto any mesh) and training run directories.

Formats (`FORMAT:PATH` on the command line, or detected from the directory):
  run         a `glmjax train` run directory: run.json (model config), experiment.yaml, tokenizer/,
              metrics.jsonl, tensorboard/ and one orbax checkpoint of the training state per step
  orbax       a converted glmjax checkpoint: glmjax.json + params/ (glmjax/convert/orbax_format.py)
  sat         GLM-130B's SwissArmyTransformer shards (glmjax/convert/sat.py); needs a model config
  hf-chatglm  ChatGLM-6B's Hugging Face files (glmjax/convert/hf_chatglm.py)
Every PyTree glmjax saves with orbax has one zarr array per leaf (orbax_format.pytree_handler), so
parameters of a run read as a host Source leaf by leaf, like a converted checkpoint's.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np

from glmjax import config as C
from glmjax import storage
from glmjax.config import GLMConfig
from glmjax.convert import engine, hf_chatglm, orbax_format, sat
from glmjax.convert.engine import Source
from glmjax.convert.tables import sat_rules
from glmjax.errors import CheckpointError, GlmjaxError
from glmjax.outputs import atomic_dir, warn

FORMATS = ("run", "orbax", "sat", "hf-chatglm")
QUANTIZE_BITS = {None: 0, "int8": 8, "int4": 4}
# architecture fields: a checkpoint loads into a config only if these agree
ARCHITECTURE = ("num_layers", "hidden_size", "num_attention_heads", "inner_hidden_size", "vocab_size", "glu",
                "tie_word_embeddings", "position_encoding_2d")


def parse_location(text: str) -> tuple[str, str]:
    """`FORMAT:PATH` -> (format, path)."""
    fmt, sep, path = text.partition(":")
    if not sep or fmt not in FORMATS or not path:
        raise GlmjaxError(f"location {text!r} must be FORMAT:PATH with FORMAT one of {', '.join(FORMATS)}")
    return fmt, path


def detect_format(path: str) -> str:
    """The format of an existing checkpoint directory."""
    if not storage.isdir(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if storage.isfile(storage.join(path, RunDir.INFO)):
        return "run"
    if orbax_format.is_checkpoint(path):
        return "orbax"
    if storage.is_url(path):
        raise CheckpointError(f"{path}: not a run directory or glmjax checkpoint (SAT and Hugging Face files "
                              "are read from local disk)")
    if os.path.isfile(os.path.join(path, "latest")):
        return "sat"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf-chatglm"
    raise CheckpointError(f"{path}: not a checkpoint (no run.json, glmjax.json, SAT 'latest' or config.json)")


def _check_same(found: GLMConfig, cfg: GLMConfig | None, where: str) -> GLMConfig:
    if cfg is not None and cfg != found:
        diff = sorted(k for k, v in cfg.to_dict().items() if found.to_dict()[k] != v)
        raise GlmjaxError(f"--config differs from the checkpoint's own config ({where}) in {', '.join(diff)}")
    return found


def open_source(fmt: str, path: str, cfg: GLMConfig | None, step: int | None = None) -> tuple[GLMConfig, Source]:
    """(config, host Source) of a checkpoint. SAT files carry no config, so SAT needs `cfg`."""
    if fmt == "sat":
        if cfg is None:
            raise GlmjaxError("reading a SAT checkpoint needs --config (SAT files carry no model config)")
        return cfg, sat.sat_source(path, cfg)
    if fmt == "run":
        run = RunDir(path)
        found, step = _check_same(run.model_config(), cfg, path), run.step(step)
        return found, orbax_format.tree_source(run.state_dir(step), found, ("params",), f"{path} step {step}")
    found, source = orbax_format.orbax_source(path) if fmt == "orbax" else hf_chatglm.hf_source(path)
    return _check_same(found, cfg, path), source


def read_config(fmt: str, path: str, cfg: GLMConfig | None = None) -> GLMConfig:
    """The model config a checkpoint holds (SAT: `cfg`, which it cannot contradict)."""
    if fmt == "run":
        return _check_same(RunDir(path).model_config(), cfg, path)
    if fmt == "orbax":
        return _check_same(orbax_format.read_config(path), cfg, path)
    return open_source(fmt, path, cfg)[0]


def source_iteration(fmt: str, path: str, step: int | None = None) -> str | None:
    """GLM-130B's iteration (49300 for the release), carried through conversions; a run's step."""
    if fmt == "sat":
        return sat.find_shards(path)[0]
    if fmt == "orbax":
        return orbax_format.read_meta(path).get("sat_iteration")
    if fmt == "run":
        return str(RunDir(path).step(step))
    return None


def load_params(fmt: str, path: str, cfg: GLMConfig | None, mesh: Any, quantize: str | None = None,
                step: int | None = None) -> tuple[GLMConfig, Any]:
    """Parameters of any format placed on `mesh` (orbax and run directories restore shard by shard).

    quantize ("int8"/"int4"; None: as stored) gives GLM-130B's weight-only quantized parameters: a
    quantized SAT checkpoint of that width loads its bytes and scales as they are (scale groups =
    its tensor-parallel degree); a float checkpoint of any format is quantized on the host, one
    layer's kernel at a time, before it is placed. Returns (config, params), the config carrying
    quantization_bits/groups. A config with quantization_bits set asks for that width.
    """
    if quantize not in QUANTIZE_BITS:
        raise GlmjaxError(f"quantize must be int8 or int4 (or none), got {quantize!r}")
    if fmt == "run" and step is None:  # the newest step that loads; a damaged newer one is skipped
        return newest_that_loads(RunDir(path), lambda s: load_params(fmt, path, cfg, mesh, quantize, s))
    bits = QUANTIZE_BITS[quantize]
    if cfg is not None and cfg.quantization_bits:
        if bits and bits != cfg.quantization_bits:
            raise GlmjaxError(f"the config asks for int{cfg.quantization_bits} weights but {quantize} was requested")
        bits = cfg.quantization_bits
        cfg = cfg.replace(quantization_bits=0, quantization_groups=1)  # the stored (float) model
    if fmt in ("orbax", "run"):
        found = read_config(fmt, path)
        stored = found.quantization_bits
        if cfg is not None and cfg != found.replace(quantization_bits=0, quantization_groups=1):
            _check_same(found, cfg, path)
        if stored and bits and bits != stored:
            raise CheckpointError(f"{path} holds int{stored} weights; it cannot be loaded as int{bits}")
        if stored or not bits:  # restored as stored, each device reading its own shard
            if fmt == "orbax":
                return orbax_format.restore_params(path, mesh, found)
            run = RunDir(path)
            step = run.step(step)
            return found, orbax_format.restore_tree(run.state_dir(step), mesh, found, "params", f"{path} step {step}")
    if fmt == "sat" and bits and cfg is not None:
        stored = sat.sat_quantization_bits(path, cfg)
        if stored and stored != bits:
            raise CheckpointError(f"SAT checkpoint {path} is quantized to int{stored}; it cannot be loaded as "
                                  f"int{bits} (load it as int{stored}, or quantize a float checkpoint)")
        if stored:
            qcfg, tree = sat.read_sat_quantized(path, cfg)
            return qcfg, _place(tree, qcfg, mesh)
    cfg, source = open_source(fmt, path, cfg, step)
    if bits:
        qcfg, tree = quantize_source(cfg, source, bits)
        return qcfg, _place(tree, qcfg, mesh)
    return cfg, _place(engine.host_tree(sat_rules(cfg), cfg, source), cfg, mesh)


def newest_that_loads(run: RunDir, load: Callable[[int], Any]) -> Any:
    """load(step) of the newest committed step of `run` for which it raises no CheckpointError, with
    one warning naming the newer steps that failed; nothing in the run directory is moved (reads
    never modify it). When no step loads, the newest step's error."""
    steps = run.steps()
    if not steps:
        raise CheckpointError(f"{run.path} holds no complete checkpoint yet")
    failed: list[tuple[int, CheckpointError]] = []
    for step in reversed(steps):
        try:
            result = load(step)
        except CheckpointError as e:
            failed.append((step, e))
            continue
        if failed:
            warn(f"{run.path}: checkpoint of step {failed[0][0]} does not load ({failed[0][1]}); "
                 f"using step {step}" + (f" (steps {', '.join(str(s) for s, _ in failed)} skipped)"
                                         if len(failed) > 1 else ""))
        return result
    raise failed[0][1]


def _place(tree: Any, cfg: GLMConfig, mesh: Any) -> Any:
    from glmjax.model import api

    return api.shard_params(tree, cfg, mesh)


def quantize_source(cfg: GLMConfig, source: Source, bits: int) -> tuple[GLMConfig, dict[str, Any]]:
    """(quantized config, host tree): the four linear kernels of each layer quantized as GLM-130B does
    (per output unit, one scale group), read and quantized one layer at a time so the host never
    holds more than one float kernel beside the quantized model."""
    import jax.numpy as jnp

    from glmjax.model import quant

    qcfg = cfg.replace(quantization_bits=bits, quantization_groups=1)
    pdt = jnp.dtype(cfg.param_dtype)
    tree: dict[str, Any] = {}
    for rule, i in engine.ordered(sat_rules(cfg), cfg):
        name = rule.path[-1]
        if name in quant.KERNELS:
            q, scale = quant.quantize_kernel(source.get(rule.path, i), name, bits, 1)
            engine.put_param(tree, rule.path[:-1] + (name + "_q",), i, q, cfg.num_layers)
            engine.put_param(tree, rule.path[:-1] + (name + "_scale",), i, scale, cfg.num_layers)
        else:
            engine.put_param(tree, rule.path, i, np.asarray(source.get(rule.path, i), pdt), cfg.num_layers)
    return qcfg, tree


def check_architecture(found: GLMConfig, cfg: GLMConfig, where: str) -> None:
    """One line naming the architecture fields in which a checkpoint and a config differ."""
    diff = [k for k in ARCHITECTURE if getattr(found, k) != getattr(cfg, k)]
    if diff:
        raise CheckpointError(f"{where}: the checkpoint's model differs from the config in "
                              + ", ".join(f"{k} ({getattr(found, k)} vs {getattr(cfg, k)})" for k in diff))


def open_tokenizer(path: str) -> Any:
    """A tokenizer directory (or icetk model file), local or in a bucket: SentencePiece reads local
    files, so a bucket's copy is fetched into a temporary directory, loaded whole, then removed."""
    from glmjax.data.tokenizer import load_tokenizer

    if not storage.is_url(path):
        return load_tokenizer(path)
    import tempfile

    with tempfile.TemporaryDirectory() as local:
        for name in storage.listdir(path):
            with open(os.path.join(local, name), "wb") as f:
                f.write(storage.read_bytes(storage.join(path, name)))
        return load_tokenizer(local)


def load_model(checkpoint: str, mesh: Any, *, config: GLMConfig | None = None, quantize: str | None = None,
               tokenizer: str | None = None, step: int | None = None) -> tuple[GLMConfig, Any, Any]:
    """(config, parameters on `mesh`, tokenizer) of any checkpoint; the tokenizer is `tokenizer`, else
    the copy kept beside the checkpoint (a run directory's tokenizer/)."""
    fmt = detect_format(checkpoint)
    cfg, params = load_params(fmt, checkpoint, config, mesh, quantize=quantize, step=step)
    tok_path = tokenizer or storage.join(checkpoint, "tokenizer")
    if not storage.exists(tok_path):
        raise GlmjaxError(f"checkpoint {checkpoint} has no tokenizer (no {tok_path}); pass --tokenizer DIR "
                          f"(a glmjax tokenizer directory or icetk's ice_text.model)")
    tok = open_tokenizer(tok_path)
    if tok.vocab_size > cfg.vocab_size:
        raise GlmjaxError(f"the tokenizer has {tok.vocab_size} ids, the model only {cfg.vocab_size}")
    return cfg, params, tok


# --- training run directories ------------------------------------------------------------------------
class RunDir:
    """A `glmjax train` run directory: the files beside the step checkpoints, and its steps."""

    INFO = "run.json"
    EXPERIMENT = "experiment.yaml"
    TOKENIZER = "tokenizer"
    METRICS = "metrics.jsonl"

    def __init__(self, path: str):
        self.path = storage.normalize(path) if "://" in path else path

    def file(self, name: str) -> str:
        return storage.join(self.path, name)

    def model_config(self) -> GLMConfig:
        info = self.file(self.INFO)
        if not storage.isfile(info):
            raise CheckpointError(f"{self.path} is not a training run directory (no {self.INFO})")
        try:
            return C.from_dict(json.loads(storage.read_bytes(info).decode("utf-8"))["model"], source=info)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{info} is unreadable: {e}") from None

    def steps(self) -> list[int]:
        """Committed checkpoint steps, oldest first."""
        import orbax.checkpoint as ocp

        # listed, not opened through a CheckpointManager: that synchronises every process of a job
        return sorted(ocp.utils.checkpoint_steps(storage.epath(self.path))) if storage.isdir(self.path) else []

    def step(self, step: int | None = None) -> int:
        """`step` if it is committed, else the newest committed one; one clear error otherwise."""
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"{self.path} holds no complete checkpoint yet")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointError(f"{self.path} has no complete checkpoint of step {step} (steps: "
                                  f"{', '.join(map(str, steps))})")
        return step

    def state_dir(self, step: int) -> str:
        return storage.join(self.path, str(step), TrainCheckpoints.STATE)

    def write(self, cfg: GLMConfig, experiment_yaml: str, tokenizer_dir: str | None) -> None:
        """run.json, experiment.yaml and a copy of the tokenizer, each written whole then renamed, so
        `glmjax generate|forward|convert` need nothing else."""
        storage.makedirs(self.path)
        tok_copy = self.file(self.TOKENIZER)
        if tokenizer_dir and os.path.isdir(tokenizer_dir) and not storage.isdir(tok_copy):
            if storage.is_url(tok_copy):  # objects, each whole once uploaded
                storage.copy_tree(tokenizer_dir, tok_copy)
            else:
                with atomic_dir(tok_copy, overwrite=False) as tmp:
                    shutil.copytree(tokenizer_dir, tmp, dirs_exist_ok=True)
        info = {"model": cfg.to_dict(), "tokenizer": self.TOKENIZER if storage.isdir(tok_copy) else None}
        storage.write_bytes(self.file(self.INFO), json.dumps(info, indent=2).encode("utf-8"))
        storage.write_bytes(self.file(self.EXPERIMENT), experiment_yaml.encode("utf-8"))


class TrainCheckpoints:
    """Training-state checkpoints of a run directory through orbax's CheckpointManager: one step per
    folder, committed atomically, the newest `keep` kept. save() returns once the state is copied off
    the devices; the files are written in the background while training goes on, and the next save
    (and close) waits for it. A step killed mid-write is never committed, so restore never sees it."""

    STATE, META = "state", "meta"

    def __init__(self, directory: str, keep: int | None = None, create: bool = True):
        import orbax.checkpoint as ocp

        self.directory = storage.normalize(directory)
        self._mngr = ocp.CheckpointManager(
            storage.epath(self.directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=create),
            item_names=(self.STATE, self.META),
            item_handlers={self.STATE: orbax_format.pytree_handler(), self.META: ocp.JsonCheckpointHandler()})

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        import orbax.checkpoint as ocp

        self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                      meta=ocp.args.JsonSave(meta)))

    def saving(self) -> bool:
        """True while a save is still being written."""
        return self._mngr.is_saving_in_progress()

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
        """(state, meta) of `step`, each leaf placed like the matching jax.ShapeDtypeStruct/array of `like`."""
        import jax
        import orbax.checkpoint as ocp

        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
        args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))
        orbax_format.check_tree_dir(storage.join(self.directory, str(step), self.STATE), f"step {step}")
        try:
            restored = self._mngr.restore(step, args=ocp.args.Composite(state=args, meta=ocp.args.JsonRestore()))
        except Exception:
            orbax_format.quiet_abandoned_reads()
            raise
        return restored[self.STATE], dict(restored[self.META])

    def set_aside(self, step: int) -> str:
        """Rename a damaged step's folder to `<step>.damaged` (or `.damaged-N`), so orbax no longer
        lists it and a new save of that step does not collide; it is kept, never deleted. Returns
        the new path."""
        src = storage.join(self.directory, str(step))
        dst, n = f"{src}.damaged", 1
        while storage.exists(dst) or os.path.islink(dst):
            n += 1
            dst = f"{src}.damaged-{n}"
        storage.rename(src, dst)
        self.reload()
        return dst

    def reload(self) -> None:
        """Re-read the committed steps from disk (after a step folder was moved)."""
        self._mngr.reload()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()
