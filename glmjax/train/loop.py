"""`glmjax train`: experiment config -> data -> sharded state -> steps -> metrics -> orbax checkpoints.

An experiment file has sections model:, data:, objective:, optim:, loss_scale:, train:. A run resumes
from the newest complete checkpoint in train.checkpoint_dir: parameters, optimizer state, loss scale,
step, consumed samples, RNG and the data position.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from glmjax import config as C
from glmjax.data import pipeline
from glmjax.data.objective import ObjectiveConfig
from glmjax.errors import ConfigError, GlmjaxError
from glmjax.model.api import init_params
from glmjax.parallel import rules
from glmjax.parallel.mesh import make_mesh
from glmjax.train import optim, precision
from glmjax.train import step as S
from glmjax.train.report import Reporter, device_peak_tflops


@dataclasses.dataclass(frozen=True)
class RunConfig:
    steps: int = 100
    micro_batch: int = 8  # rows of one micro-batch (global); a step runs global_batch / micro_batch of them
    mesh: str | None = None
    checkpoint_dir: str = "runs/train"
    checkpoint_every: int = 50
    keep: int = 3
    log_every: int = 1
    seed: int = 1234
    # embedding gradient shrink alpha (GLM-130B: 0.1): a number, or a piecewise-linear schedule
    # [[step, alpha], ...] held constant outside its points (e.g. [[0, 0.1], [5000, 1.0]])
    egs_alpha: float | tuple[tuple[int, float], ...] = 1.0
    init_from: str | None = None  # a glmjax (orbax) checkpoint whose parameters start a new run
    peak_tflops: float | None = None  # per device, for MFU; default: report.PEAK_TFLOPS by device kind
    spike_threshold: float = 3.0  # a loss above this multiple of its moving average is a spike
    spike_window: int = 20  # steps in the loss moving average (and before the guard arms)
    max_rollbacks: int = 5

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch", "checkpoint_every", "keep", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train: {name} must be positive, got {getattr(self, name)}")
        egs_alpha_at(self.egs_alpha, 0)  # validates the schedule


def egs_alpha_at(schedule: float | Sequence[Sequence[float]], step: int) -> float:
    """Embedding-gradient-shrink alpha at `step`: a constant, or linear between [step, alpha] points."""
    if isinstance(schedule, (int, float)):
        points = [(0, float(schedule))]
    else:
        try:
            points = [(int(s), float(a)) for s, a in schedule]
        except (TypeError, ValueError):
            raise ConfigError(f"train.egs_alpha must be a number or [[step, alpha], ...], got {schedule!r}") from None
    steps = [s for s, _ in points]
    if not points or steps != sorted(set(steps)) or any(not 0.0 <= a <= 1.0 for _, a in points):
        raise ConfigError(f"train.egs_alpha schedule needs increasing steps and alphas in [0, 1], got {schedule!r}")
    return float(np.interp(step, steps, [a for _, a in points]))


def _section(raw: dict[str, Any], name: str, cls: type, source: str) -> Any:
    values = dict(raw.get(name) or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown {name} key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    if "rampup_batch_size" in values and values["rampup_batch_size"] is not None:
        values["rampup_batch_size"] = tuple(values["rampup_batch_size"])
    if isinstance(values.get("egs_alpha"), list):
        values["egs_alpha"] = tuple(tuple(p) if isinstance(p, list) else p for p in values["egs_alpha"])
    return cls(**values)


def load_experiment(path: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """All sections of an experiment file, `section.key=value` overrides applied, each validated."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"experiment file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections")
    sections = ("model", "data", "objective", "optim", "loss_scale", "train")
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"{path}: unknown section {unknown[0]!r} (sections: {', '.join(sections)})")
    raw = {k: dict(raw.get(k) or {}) for k in sections}
    for key, value in C.parse_overrides(overrides).items():
        section, _, name = key.partition(".")
        if section not in sections or not name:
            raise ConfigError(f"override {key!r} must be SECTION.KEY with SECTION one of {', '.join(sections)}")
        raw[section][name] = value
    model_raw = dict(raw["model"])
    preset = model_raw.pop("preset", None)
    model = C.resolve(preset, overrides=model_raw) if preset else C.from_dict(model_raw, source=f"{path} model")
    obj = dict(raw["objective"])
    obj.setdefault("seq_length", model.max_sequence_length)
    obj.setdefault("position_encoding_2d", model.position_encoding_2d)
    data = dict(raw["data"])
    if "path" not in data:
        raise ConfigError(f"{path}: data.path is required (a directory written by `glmjax data prepare`)")
    run = _section(raw, "train", RunConfig, path)
    opt = _section(raw, "optim", optim.OptimConfig, path)
    start = opt.rampup_batch_size[0] if opt.rampup_batch_size else opt.global_batch
    if opt.global_batch % run.micro_batch or start % run.micro_batch:
        raise ConfigError(f"{path}: global batch {opt.global_batch} and the ramp's start {start} must be multiples "
                          f"of train.micro_batch={run.micro_batch}")
    return {"model": model, "data": data, "objective": ObjectiveConfig(**obj), "optim": opt,
            "loss_scale": _section(raw, "loss_scale", precision.LossScaleConfig, path), "train": run}


class _Stop:
    """SIGTERM / SIGINT: finish the step, write a checkpoint, exit (preemption)."""

    def __init__(self):
        self.requested = False
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


def model_flops_per_token(cfg: C.GLMConfig, seq_length: int) -> float:
    """Training FLOPs per token, PaLM's accounting (as MaxText): 6 x the matmul parameters (forward
    and backward, the embedding lookup excluded, a tied output head counted once) plus 12 x layers x
    hidden x sequence for the attention scores and the weighted sum. Rematerialisation is not
    counted, so this is model FLOPs utilisation, not hardware FLOPs."""
    counts = cfg.param_counts()
    matmul = sum(v for k, v in counts.items() if k not in ("word_embeddings", "layernorms", "final_layernorm"))
    matmul += cfg.vocab_size * cfg.hidden_size  # the output head, tied or not
    return 6.0 * matmul + 12.0 * cfg.num_layers * cfg.hidden_size * seq_length


class SpikeGuard:
    """Watches the loss: a loss above `threshold` x its moving average (once `window` steps are in)
    asks for a rollback to the last committed checkpoint, skipping the data since then."""

    def __init__(self, threshold: float, window: int):
        self.threshold, self.window, self.history = threshold, window, []

    def is_spike(self, loss: float) -> bool:
        if not np.isfinite(loss):
            return False  # non-finite steps were skipped by the step itself
        recent = self.history[-self.window:]
        spike = len(recent) >= self.window and loss > self.threshold * float(np.mean(recent))
        if not spike:
            self.history.append(loss)
        return spike


RUN_INFO = "run.json"


def write_run_info(directory: str, cfg: C.GLMConfig, tokenizer_dir: str | None) -> None:
    """The model config and a copy of the tokenizer beside the checkpoints, so `glmjax generate
    --checkpoint DIR` needs nothing else."""
    import shutil

    os.makedirs(directory, exist_ok=True)
    tok_copy = os.path.join(directory, "tokenizer")
    if tokenizer_dir and os.path.isdir(tokenizer_dir) and not os.path.isdir(tok_copy):
        shutil.copytree(tokenizer_dir, tok_copy + ".tmp", dirs_exist_ok=True)
        os.replace(tok_copy + ".tmp", tok_copy)
    tmp = os.path.join(directory, RUN_INFO + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"model": cfg.to_dict(), "tokenizer": "tokenizer" if os.path.isdir(tok_copy) else None}, f,
                  indent=2)
    os.replace(tmp, os.path.join(directory, RUN_INFO))


def restore_run_params(directory: str, mesh: Any, step: int | None = None) -> tuple[C.GLMConfig, Any, int]:
    """Only the parameters of a training checkpoint (newest complete step by default) on `mesh`."""
    import orbax.checkpoint as ocp

    from glmjax.model.api import abstract_params, param_shardings

    info_path = os.path.join(directory, RUN_INFO)
    if not os.path.isfile(info_path):
        raise GlmjaxError(f"{directory} is not a training run directory (no {RUN_INFO})")
    with open(info_path) as f:
        cfg = C.from_dict(json.load(f)["model"], source=info_path)
    mngr = ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "meta"))
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise GlmjaxError(f"{directory} holds no complete checkpoint yet")
    import flax.linen as nn

    shardings = param_shardings(cfg, mesh)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.unbox(abstract_params(cfg)), shardings)
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"params": target}, restore_args=ocp.checkpoint_utils.construct_restore_args({"params": target}),
        partial_restore=True)))
    mngr.close()
    return cfg, restored["state"]["params"], step


def _manager(directory: str, keep: int):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(os.path.abspath(directory), options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=True, create=True),
        item_names=("state", "meta"))


def _savable(state: S.TrainState) -> dict[str, Any]:
    d = state._asdict()
    d["rng"] = jax.random.key_data(state.rng)
    d["loss_scale"] = state.loss_scale._asdict()
    return d


def _from_savable(d: dict[str, Any]) -> S.TrainState:
    d = dict(d)
    d["rng"] = jax.random.wrap_key_data(d["rng"])
    d["loss_scale"] = precision.LossScale(**d["loss_scale"])
    return S.TrainState(**d)


def _restore(mngr, step: int, like: S.TrainState) -> tuple[S.TrainState, int]:
    """Checkpoint `step` onto the shardings of `like`: (state, data position)."""
    import orbax.checkpoint as ocp

    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _savable(like))
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                          meta=ocp.args.JsonRestore()))
    return _from_savable(restored["state"]), int(restored["meta"]["data_position"])


def train(exp: dict[str, Any], log=print) -> dict[str, Any]:
    """Run (or resume) an experiment; returns the last metrics."""
    import orbax.checkpoint as ocp

    cfg, run, oc, lc = exp["model"], exp["train"], exp["optim"], exp["loss_scale"]
    mesh = make_mesh(run.mesh)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if run.micro_batch % dp:
        raise ConfigError(f"train.micro_batch={run.micro_batch} is not divisible by the data parallelism "
                          f"data*fsdp={dp} of mesh {dict(mesh.shape)}")
    shards = pipeline.TokenShards(exp["data"]["path"])
    loader = pipeline.GLMLoader(shards, exp["objective"], global_batch=run.micro_batch,
                                seed=int(exp["data"].get("seed", 0)), process_index=jax.process_index(),
                                process_count=jax.process_count(), model_vocab=cfg.vocab_size)
    max_micro = oc.global_batch // run.micro_batch
    mngr = _manager(run.checkpoint_dir, run.keep)
    if run.init_from and mngr.latest_step() is None:  # fine-tuning: converted weights, fresh optimizer
        from glmjax.convert.orbax_format import read_config, restore_params

        saved = read_config(run.init_from)
        arch = ("num_layers", "hidden_size", "num_attention_heads", "inner_hidden_size", "vocab_size", "glu",
                "tie_word_embeddings", "position_encoding_2d")
        diff = [k for k in arch if getattr(saved, k) != getattr(cfg, k)]
        if diff:
            raise ConfigError(f"train.init_from {run.init_from}: its {diff[0]} is {getattr(saved, diff[0])}, "
                              f"the model's {getattr(cfg, diff[0])}")
        params = restore_params(run.init_from, mesh, cfg.replace(param_dtype="float32"))[1]
        log(f"initialised from {run.init_from}")
    else:
        params = init_params(cfg, jax.random.key(run.seed), mesh)
    state = S.init_state(cfg, params, oc, lc, run.seed)
    step_fn = S.make_train_step(cfg, oc, lc, mesh, state)
    data_position = 0
    latest = mngr.latest_step()
    if latest is not None:
        state, data_position = _restore(mngr, latest, state)
        log(f"resumed from {run.checkpoint_dir} step {latest} (data position {data_position})")
    if jax.process_index() == 0:
        write_run_info(run.checkpoint_dir, cfg, shards.manifest.get("tokenizer"))
    report = Reporter(run.checkpoint_dir, run.steps, int(state.step), log, enabled=jax.process_index() == 0)
    guard, rollbacks = SpikeGuard(run.spike_threshold, run.spike_window), 0
    flops_per_token = model_flops_per_token(cfg, exp["objective"].seq_length)
    peak_tflops = run.peak_tflops or device_peak_tflops(mesh.devices.flat[0])
    spike_at = int(os.environ.get("GLMJAX_TEST_SPIKE_AT_STEP", "0"))  # tests: an injected loss spike
    stop = _Stop()
    kill_after = int(os.environ.get("GLMJAX_TEST_SIGKILL_AFTER_STEP", "0"))  # tests: a real kill -9
    last: dict[str, Any] = {}
    try:
        while int(state.step) < run.steps and not stop.requested:
            t0 = time.perf_counter()
            consumed = int(state.consumed_samples)
            n_micro = optim.batch_size(oc, consumed) // run.micro_batch
            rows = []
            for j in range(max_micro):  # unused micro-batches are zeros: fixed shapes, one program
                if j < n_micro:
                    loader.next_sequence = data_position + j * run.micro_batch
                    rows.append(loader.next_batch())
                else:
                    rows.append(jax.tree.map(np.zeros_like, rows[0]))
            local = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
            batch = {k: jax.make_array_from_process_local_data(
                rules.named(mesh, None, "batch", *((None,) * (v.ndim - 2))), v) for k, v in local.items()}
            lr = optim.learning_rate(oc, consumed)
            egs_alpha = egs_alpha_at(run.egs_alpha, int(state.step))
            state, m = step_fn(state, batch, n_micro, lr, egs_alpha)
            data_position += n_micro * run.micro_batch
            step = int(state.step)
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            dt = time.perf_counter() - t0
            m.update(step=step, batch_size=n_micro * run.micro_batch, step_time=dt, egs_alpha=egs_alpha,
                     tokens_per_s=m["tokens"] / dt, data_position=data_position)
            if peak_tflops:
                seq_tokens = n_micro * run.micro_batch * exp["objective"].seq_length
                m["mfu"] = flops_per_token * seq_tokens / dt / (peak_tflops * 1e12 * mesh.size)
            if spike_at and step == spike_at:
                m["loss"] *= 100.0
            if not m["finite"]:
                report.log(f"step {step}: gradients not finite, update skipped (loss scale {m['loss_scale']:.0f})")
            if guard.is_spike(m["loss"]) and mngr.latest_step() is not None and rollbacks < run.max_rollbacks:
                mngr.wait_until_finished()
                back = mngr.latest_step()
                state, back_position = _restore(mngr, back, state)
                skipped, rollbacks = (back_position, data_position), rollbacks + 1
                event = {"event": "rollback", "step": step, "loss": m["loss"], "to_step": back,
                         "skipped_data": list(skipped)}
                report.log(f"step {step}: loss {m['loss']:.4f} is a spike (> {run.spike_threshold} x moving "
                           f"average); rolled back to step {back}, skipping sequences [{skipped[0]}, {skipped[1]})")
                report.event(event)
                continue  # the data position stays past the window that caused the spike
            last = m
            report.step(m, log_line=step % run.log_every == 0)
            if step % run.checkpoint_every == 0 or step == run.steps or stop.requested:
                mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_savable(state)),
                                                        meta=ocp.args.JsonSave({"data_position": data_position})))
                if kill_after and step >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)  # mid-save: the async write is still running
                mngr.wait_until_finished()
            if kill_after and step >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        stop.restore()
        report.close()
        mngr.wait_until_finished()
        mngr.close()
    if stop.requested:
        log(f"stopped by signal at step {int(state.step)}; checkpoint written")
    return last


def main(path: str, overrides: Sequence[str]) -> int:
    exp = load_experiment(path, overrides)
    if os.environ.get("GLMJAX_DISTRIBUTED") == "1":  # multi-host: coordinator from the TPU pod / SLURM env
        jax.distributed.initialize()
    try:
        train(exp, log=lambda msg: print(msg, flush=True))
    except GlmjaxError:
        raise
    except KeyboardInterrupt:
        print("glmjax: interrupted", file=sys.stderr)
        return 130
    return 0

