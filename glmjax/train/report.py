"""Where a training run's numbers go: a JSONL file, TensorBoard event files and the console (a
progress bar with ETA on a terminal, plain log lines otherwise). Only process 0 writes."""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from glmjax import storage

# Dense (no sparsity) bf16/fp16 peak TFLOP/s per device (vendor data sheets), by a lower-case
# substring of jax's device_kind; the first match wins, so the more specific names come first.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756.0), ("h200", 989.0), ("h100", 989.0), ("a100", 312.0), ("v100", 125.0),
    ("v5 lite", 197.0), ("v5e", 197.0), ("v5p", 459.0), ("v6 lite", 918.0), ("v6e", 918.0), ("v4", 275.0),
)


def peak_tflops_for(device_kind: str) -> float | None:
    """The peak of a known accelerator kind, None for CPUs and unknown kinds."""
    kind = device_kind.lower()
    if kind.strip() == "tpu v5":  # v5p reports itself as "TPU v5"
        return 459.0
    return next((peak for key, peak in PEAK_TFLOPS if key in kind), None)


def device_peak_tflops(device: Any) -> float | None:
    """peak_tflops_for(device.device_kind); MFU is not reported for None unless train.peak_tflops is set."""
    return peak_tflops_for(getattr(device, "device_kind", ""))


SCALARS = ("loss", "accuracy", "learning_rate", "grad_norm", "embedding_grad_norm", "loss_scale", "egs_alpha",
           "tokens_per_s", "step_time", "data_wait", "batch_size", "mfu")


class Reporter:
    """metrics.jsonl and TensorBoard events under `directory`, console lines through `log`."""

    def __init__(self, directory: str, total_steps: int, first_step: int, log: Callable[[str], None],
                 enabled: bool = True, progress: bool | None = None):
        self.enabled, self.total, self.times = enabled, total_steps, []
        self.path = storage.join(directory, "metrics.jsonl")
        self.tb, self.bar, self._log = None, None, log
        if not enabled:
            return
        from tensorboardX import SummaryWriter
        from tqdm import tqdm

        self.tb = SummaryWriter(storage.join(directory, "tensorboard"), flush_secs=10)  # gs:// and s3:// too
        # progress=None: a bar only on a terminal, so logs of batch jobs stay plain lines
        show = sys.stderr.isatty() if progress is None else progress
        if show:
            self.bar = tqdm(total=total_steps, initial=first_step, unit="step", dynamic_ncols=True)

    def log(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            self._log(msg)

    def event(self, record: dict[str, Any]) -> None:
        """A guard or resume action (rollback, resume, ...): into the JSONL file, beside the steps."""
        if self.enabled:
            storage.append_text(self.path, json.dumps(record) + "\n")

    def mark_resume(self, step: int) -> list[int]:
        """Before a run (re)started at `step` logs anything: when metrics.jsonl already has lines of
        later steps (a kill after logging past the last checkpoint), a record
        {"event": "resume", "step": step, "superseded_steps": [...]} telling readers that the lines
        to come replace those. Returns the superseded steps ([] and nothing written when none)."""
        if not self.enabled or not storage.isfile(self.path):
            return []
        later: set[int] = set()
        data = storage.read_bytes(self.path)
        for line in data.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut short by the kill
                continue
            if isinstance(rec, dict) and "event" not in rec and isinstance(rec.get("step"), int) and rec["step"] > step:
                later.add(rec["step"])
        if data and not data.endswith(b"\n"):  # never glue the marker onto a cut line
            storage.append_text(self.path, "\n")
        if later:
            self.event({"event": "resume", "step": step, "superseded_steps": sorted(later)})
        return sorted(later)

    def step(self, m: dict[str, Any], log_line: bool) -> None:
        if not self.enabled:
            return
        step = int(m["step"])
        storage.append_text(self.path, json.dumps(m) + "\n")
        for k in SCALARS:
            if k in m and np.isfinite(m[k]):
                self.tb.add_scalar(f"train/{k}", m[k], step)
        self.times.append(m["step_time"])
        eta = float(np.mean(self.times[-20:])) * (self.total - step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}")
        if log_line:
            self.log(f"step {step}/{self.total} loss {m['loss']:.4f} acc {m['accuracy']:.3f} "
                     f"lr {m['learning_rate']:.3g} gnorm {m['grad_norm']:.3f} scale {m['loss_scale']:.0f} "
                     f"{m['tokens_per_s']:.0f} tok/s" + (f" mfu {m['mfu']:.1%}" if "mfu" in m else "")
                     + f" eta {int(eta // 60)}m{int(eta % 60):02d}s")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
