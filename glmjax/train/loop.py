"""`glmjax train`: an experiment (glmjax/experiment.py) run in parts -- setup (mesh, data, state,
the compiled step, resume), step, rollback and save -- with orbax checkpoints of the whole state
(parameters, optimizer state, loss scale, step, consumed samples, RNG, data position) in a run
directory (glmjax/checkpoint.py). Saves are asynchronous: training goes on while one is written.
"""
from __future__ import annotations

import dataclasses
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from glmjax import checkpoint as ckpt
from glmjax import storage
from glmjax.convert.orbax_format import first_line
from glmjax.data import pipeline
from glmjax.errors import CheckpointError, ConfigError, GlmjaxError
from glmjax.experiment import Experiment
from glmjax.model.api import init_params
from glmjax.outputs import warn
from glmjax.parallel import distributed, rules
from glmjax.parallel.mesh import make_mesh
from glmjax.plan.roofline import model_flops_per_token
from glmjax.train import optim, precision
from glmjax.train import step as S
from glmjax.train.report import Reporter, device_peak_tflops


@dataclasses.dataclass
class Hooks:
    """Where tests and tools look into or interrupt a run (instead of environment variables):
    after_setup(trainer); after_step(trainer, metrics) -- metrics may be changed, e.g. to inject a
    loss spike; after_save(trainer, step) -- called once the save is dispatched and still in flight."""

    after_setup: Callable[[Trainer], None] | None = None
    after_step: Callable[[Trainer, dict[str, Any]], None] | None = None
    after_save: Callable[[Trainer, int], None] | None = None


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


def _savable(state: S.TrainState) -> dict[str, Any]:
    """The state as orbax saves it: the RNG key as its raw data, the loss scaler as a dict."""
    d = state._asdict()
    rng = state.rng
    d["rng"] = (jax.ShapeDtypeStruct(jax.eval_shape(jax.random.key_data, rng).shape, np.uint32, sharding=rng.sharding)
                if isinstance(rng, jax.ShapeDtypeStruct) else jax.random.key_data(rng))
    d["loss_scale"] = state.loss_scale._asdict()
    return d


def _from_savable(d: dict[str, Any]) -> S.TrainState:
    d = dict(d)
    d["rng"] = jax.random.wrap_key_data(d["rng"])
    d["loss_scale"] = precision.LossScale(**d["loss_scale"])
    return S.TrainState(**d)


class Trainer:
    """One training run: built by setup (the constructor), advanced by step(), rolled back on a
    spike, saved every train.checkpoint_every steps, on the last step and on SIGTERM."""

    def __init__(self, exp: Experiment, log: Callable[[str], None] = print, hooks: Hooks | None = None):
        self.exp, self.hooks, self._log = exp, hooks or Hooks(), log
        cfg, t = exp.model, exp.train
        self.mesh = make_mesh(t.mesh)
        dp = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if t.micro_batch % dp:
            raise ConfigError(f"train.micro_batch={t.micro_batch} is not divisible by the data parallelism "
                              f"data*fsdp={dp} of mesh {dict(self.mesh.shape)}")
        directory = storage.normalize(t.checkpoint_dir)  # a local path or a bucket URL (gs://...)
        self.run_dir = ckpt.RunDir(directory)
        if storage.is_url(exp.data.path):
            raise ConfigError(f"data.path {exp.data.path}: a prepared corpus is memory-mapped from local disk; copy "
                              "it to every host (or mount the bucket, e.g. with gcsfuse) and give that path")
        shards = pipeline.TokenShards(exp.data.path)
        self.loader = self._loader(shards)
        # micro-batches come at data_position, + micro_batch, ...: the next ones built while a step runs
        self.prefetch = pipeline.Prefetcher(self.loader, stride=t.micro_batch, depth=2)
        self.checkpoints = ckpt.TrainCheckpoints(directory, t.keep)
        latest = self.checkpoints.latest_step()
        if latest is not None:
            ckpt.check_architecture(self.run_dir.model_config(), cfg, f"resuming {t.checkpoint_dir}")
        t0 = time.perf_counter()
        self.step_fn = S.TrainStep(cfg, exp.optim, exp.loss_scale, self.mesh, t.micro_batch, exp.objective.seq_length)
        self.compile_seconds = time.perf_counter() - t0
        resumed = self._resume() if latest is not None else None
        if resumed is not None:
            step, (self.state, self.data_position) = resumed
            log(f"resumed from {t.checkpoint_dir} step {step} (data position {self.data_position})")
        else:
            self.state, self.data_position = self._fresh_state(), 0
        if jax.process_index() == 0:
            self.run_dir.write(cfg, exp.to_yaml(), shards.manifest.get("tokenizer"))
        self.report = Reporter(directory, t.steps, int(self.state.step), log,
                               enabled=jax.process_index() == 0)
        self.report.mark_resume(int(self.state.step))
        self.guard, self.rollbacks = SpikeGuard(t.spike_threshold, t.spike_window), 0
        self.flops_per_token = model_flops_per_token(cfg, exp.objective.seq_length)
        self.peak_tflops = t.peak_tflops or device_peak_tflops(self.mesh.devices.flat[0])
        self.last: dict[str, Any] = {}

    def _loader(self, shards: pipeline.TokenShards) -> pipeline.GLMLoader:
        """The loader of this process's rows of each micro-batch: the rows its devices hold under
        the batch sharding (every process builds only those; the union is the global batch)."""
        t = self.exp.train
        shape = (t.micro_batch, self.exp.objective.seq_length)
        rows = distributed.local_rows(rules.named(self.mesh, "batch", None), shape)
        per = len(rows)
        loader = pipeline.GLMLoader(shards, self.exp.objective, global_batch=t.micro_batch, seed=self.exp.data.seed,
                                    process_index=rows.start // per, process_count=t.micro_batch // per,
                                    model_vocab=self.exp.model.vocab_size)
        if jax.process_count() > 1:
            print(f"process {jax.process_index()} of {jax.process_count()}: builds rows [{rows.start}, {rows.stop}) "
                  f"of each micro-batch of {t.micro_batch}", flush=True)
        return loader

    def _fresh_state(self) -> S.TrainState:
        cfg, t = self.exp.model, self.exp.train
        if t.init_from:  # fine-tuning: a converted checkpoint's (or a run's) weights, a fresh optimizer
            fmt = ckpt.detect_format(t.init_from)
            found = cfg if fmt == "sat" else ckpt.read_config(fmt, t.init_from)
            ckpt.check_architecture(found, cfg, f"train.init_from {t.init_from}")
            if found.quantization_bits:
                raise ConfigError(f"train.init_from {t.init_from} holds quantized weights; start from float ones")
            sat_cfg = cfg.replace(param_dtype="float32") if fmt == "sat" else None
            params = ckpt.load_params(fmt, t.init_from, sat_cfg, self.mesh)[1]
            self._log(f"initialised from {t.init_from}")
        else:
            params = init_params(cfg, jax.random.key(t.seed), self.mesh)
        return S.init_state(cfg, params, self.exp.optim, self.exp.loss_scale, t.seed, self.mesh)

    def _resume(self) -> tuple[int, tuple[S.TrainState, int]]:
        """(step, restored) of the newest checkpoint that restores. Newer ones that do not (a deleted
        or truncated file, a missing _METADATA) are set aside as `<step>.damaged` -- kept, never
        deleted -- with one warning each, but only once an older step has restored: when none
        restores (a changed optimizer, say) nothing is moved and the newest step's error is raised."""
        failed: list[tuple[int, str]] = []
        for step in reversed(self.checkpoints.all_steps()):
            try:
                restored = self._restore(step)
            except Exception as e:  # orbax and tensorstore raise many types for a damaged step
                failed.append((step, first_line(e)))
                continue
            for bad, why in failed:
                kept = self._set_aside(bad)
                warn(f"{self.exp.train.checkpoint_dir}: checkpoint of step {bad} does not restore ({why}); "
                          f"kept aside as {kept}, resuming from step {step}")
            return step, restored
        bad, why = failed[0]
        raise CheckpointError(f"cannot resume {self.exp.train.checkpoint_dir}: no checkpoint restores "
                              f"(step {bad}: {why})")

    def _set_aside(self, step: int) -> str:
        """Process 0 renames the damaged step; every process then re-reads the step list."""
        kept = f"{self.checkpoints.directory}/{step}.damaged"
        if jax.process_index() == 0:
            kept = self.checkpoints.set_aside(step)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"glmjax set aside step {step}")
            self.checkpoints.reload()
        return kept

    def _restore(self, step: int) -> tuple[S.TrainState, int]:
        """Checkpoint `step` onto the shardings the step was compiled for: (state, data position)."""
        like = S.abstract_state(self.exp.model, self.exp.optim, self.exp.loss_scale)
        like = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), like,
                            self.step_fn.state_shardings)
        state, meta = self.checkpoints.restore(step, _savable(like))
        return _from_savable(state), int(meta["data_position"])

    def _micro_batches(self, n_micro: int) -> Iterator[dict[str, jax.Array]]:
        """This process's rows of each micro-batch (built ahead by the prefetcher), sent one at a time."""
        rows = self.exp.train.micro_batch
        for j in range(n_micro):
            local = self.prefetch.get(self.data_position + j * rows)
            yield {k: jax.make_array_from_process_local_data(self.step_fn.batch_shardings[k],
                                                             np.asarray(v, spec.dtype), spec.shape)
                   for k, v in local.items() for spec in (self.step_fn.batch_specs[k],)}

    def step(self) -> dict[str, Any]:
        """One optimizer step; returns its metrics as host numbers."""
        t0 = time.perf_counter()
        in_flight = self.checkpoints.saving()  # a save still being written while this step runs
        waited = self.prefetch.wait_seconds
        n_micro = optim.batch_size(self.exp.optim, int(self.state.consumed_samples)) // self.exp.train.micro_batch
        alpha = self.exp.model.egs_alpha_at(int(self.state.step))
        self.state, m = self.step_fn(self.state, self._micro_batches(n_micro), n_micro, alpha)
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        dt = time.perf_counter() - t0
        self.data_position += n_micro * self.exp.train.micro_batch
        m.update(step=int(self.state.step), batch_size=n_micro * self.exp.train.micro_batch, step_time=dt,
                 egs_alpha=alpha, tokens_per_s=m["tokens"] / dt, data_position=self.data_position,
                 checkpoint_in_flight=in_flight, data_wait=self.prefetch.wait_seconds - waited)
        if self.peak_tflops:
            tokens = m["batch_size"] * self.exp.objective.seq_length
            m["mfu"] = self.flops_per_token * tokens / dt / (self.peak_tflops * 1e12 * self.mesh.size)
        return m

    def rollback(self, m: dict[str, Any]) -> None:
        """Back to the last committed checkpoint; the data position stays past the spike's window."""
        self.checkpoints.wait()
        back = self.checkpoints.latest_step()
        self.state, back_position = self._restore(back)
        skipped, self.rollbacks = (back_position, self.data_position), self.rollbacks + 1
        t = self.exp.train
        self.report.log(f"step {m['step']}: loss {m['loss']:.4f} is a spike (> {t.spike_threshold} x moving "
                        f"average); rolled back to step {back}, skipping sequences [{skipped[0]}, {skipped[1]})")
        self.report.event({"event": "rollback", "step": m["step"], "loss": m["loss"], "to_step": back,
                           "skipped_data": list(skipped)})

    def save(self) -> None:
        """Dispatch an asynchronous save of the current state (the previous one is awaited first)."""
        step = int(self.state.step)
        self.checkpoints.save(step, _savable(self.state), {"data_position": self.data_position})
        if self.hooks.after_save:
            self.hooks.after_save(self, step)

    def run(self) -> dict[str, Any]:
        """Train to train.steps (or until SIGTERM/SIGINT); returns the last step's metrics."""
        t = self.exp.train
        if self.hooks.after_setup:
            self.hooks.after_setup(self)
        stop, stopping = _Stop(), False
        try:
            while int(self.state.step) < t.steps and not stopping:
                m = self.step()
                if self.hooks.after_step:
                    self.hooks.after_step(self, m)
                if not m["finite"]:
                    self.report.log(f"step {m['step']}: gradients or update not finite, skipped "
                                    f"(loss scale {m['loss_scale']:.0f})")
                if (self.guard.is_spike(m["loss"]) and self.checkpoints.latest_step() is not None
                        and self.rollbacks < t.max_rollbacks):
                    self.rollback(m)
                    continue
                self.last = m
                self.report.step(m, log_line=m["step"] % t.log_every == 0)
                stopping = distributed.any_process(stop.requested)  # every process saves, or none
                if m["step"] % t.checkpoint_every == 0 or m["step"] == t.steps or stopping:
                    self.save()
        finally:
            stop.restore()
            self.prefetch.close()
            self.report.close()
            self.checkpoints.close()
        if stopping:
            self._log(f"stopped by signal at step {int(self.state.step)}; checkpoint written")
        return self.last


def train(exp: Experiment, log: Callable[[str], None] = print, hooks: Hooks | None = None) -> dict[str, Any]:
    """Run (or resume) an experiment; returns the last metrics."""
    trainer = Trainer(exp, log, hooks)
    log(f"compiled the training step in {trainer.compile_seconds:.1f} s")
    return trainer.run()


def main(exp: Experiment, hooks: Hooks | None = None) -> int:
    """The CLI's entry: print the resolved experiment, train, one line on interruption."""
    primary = distributed.is_primary()
    log = lambda msg: primary and print(msg, flush=True)  # noqa: E731  (process 0 speaks for the job)
    log("experiment:\n" + "\n".join("  " + line for line in exp.to_yaml().splitlines()))
    try:
        train(exp, log=log, hooks=hooks)
    except GlmjaxError:
        raise
    except KeyboardInterrupt:
        print("glmjax: interrupted", file=sys.stderr)
        return 130
    return 0
