"""Plans: the real training step (glmjax/train/step.py's two programs) or the real generation program
(glmjax/infer/decode.py's prefill + decode loop) compiled ahead of time for a target from shapes
alone, with XLA's memory per device, the exact parameter and optimizer bytes, FLOPs counted from
the shapes, the collectives of the optimized HLO and a roofline time. Nothing is ever allocated."""
from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from glmjax.config import REMAT_POLICIES, GLMConfig
from glmjax.errors import ConfigError, GlmjaxError
from glmjax.experiment import Experiment
from glmjax.parallel.mesh import make_mesh
from glmjax.plan import roofline
from glmjax.plan.hlo import Collective, collectives
from glmjax.plan.targets import GiB, Target, compile_devices, compiler_options, human_bytes, quiet_native_stderr

BYTES_KEYS = ("params", "optimizer", "temp", "output", "total")
GPU_PREALLOCATED = 0.75  # the share of a GPU's memory jax's allocator takes unless told otherwise


@dataclasses.dataclass
class Plan:
    """What one configuration needs on one target, per device; `refused`: why the compiler said no."""

    kind: str  # "train" | "generate"
    target: Target
    mesh: dict[str, int]
    setting: dict[str, Any]
    per_device: dict[str, int | None]
    programs: dict[str, dict[str, int]]
    flops_per_step: float
    hardware_flops_per_step: float
    bounds: dict[str, float] | None  # roofline seconds: compute, hbm, collectives, step
    collectives: dict[str, list[Collective]]  # per program, counts per run of that program
    runs: dict[str, int]  # runs of each program per step
    compile_seconds: dict[str, float]
    refused: str | None = None
    generation: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def fits(self) -> bool:
        total = self.per_device["total"]
        return self.refused is None and total is not None and total <= self.target.chip.memory_bytes

    @property
    def predicted_mfu(self) -> float | None:
        """Model FLOPs utilisation at the roofline time (a ceiling)."""
        return self._mfu("step")

    @property
    def serial_mfu(self) -> float | None:
        """Model FLOPs utilisation if no collective overlapped the compute."""
        return self._mfu("serial")

    def _mfu(self, key: str) -> float | None:
        if not self.bounds:
            return None
        return self.flops_per_step / (self.bounds[key] * self.target.chips * self.target.chip.peak_flops)

    def verdict(self) -> str:
        """The one line: `fits: 31.2 of 32 GiB` or `does not fit: needs 47.9 GiB of 32 GiB`."""
        have, total = self.target.chip.memory_bytes, self.per_device["total"]
        why = f" ({self.refused})" if self.refused else ""
        if total is None:
            return f"does not fit: needs more than {human_bytes(have)} per device{why}"
        amount = human_bytes(total)
        amount = amount.removesuffix(" GiB") if total >= GiB and have >= GiB else amount
        amount = f"at least {amount}" if self.refused else amount
        if self.fits:
            return f"fits: {amount} of {human_bytes(have)} per device"
        return f"does not fit: needs {amount} of {human_bytes(have)} per device{why}"

    def collective_rows(self) -> list[dict[str, Any]]:
        """Collectives per step: executions, bytes on each device, ring seconds at the link bandwidths."""
        rows = []
        for program, ops in self.collectives.items():
            runs = self.runs.get(program, 1)
            for op in ops:
                priced = bool(self.target.chip.peak_flops)
                seconds = roofline.collective_seconds([op], self.target.chip) * runs if priced else None
                rows.append({"program": program, "kind": op.kind, "group_size": op.group_size,
                             "across_hosts": op.across_hosts, "count": op.count * runs,
                             "bytes_per_device": op.count * runs * op.bytes, "seconds": seconds})
        return rows

    def to_json(self) -> dict[str, Any]:
        b = self.bounds
        return {
            "kind": self.kind, "target": self.target.name, "devices": self.target.chips,
            "device_kind": self.target.chip.device_kind, "hosts": self.target.hosts, "mesh": self.mesh,
            "setting": self.setting, "fits": self.fits, "refused": self.refused,
            "device_memory_bytes": self.target.chip.memory_bytes, "per_device_bytes": self.per_device,
            "programs": self.programs, "flops_per_step": self.flops_per_step,
            "hardware_flops_per_step": self.hardware_flops_per_step,
            "predicted_step_seconds": b["step"] if b else None, "predicted_bounds_seconds": b,
            "predicted_mfu": self.predicted_mfu, "predicted_step_seconds_serial": b["serial"] if b else None,
            "predicted_mfu_serial": self.serial_mfu, "collectives": self.collective_rows(),
            "compile_seconds": self.compile_seconds, **({"generation": self.generation} if self.generation else {}),
        }


# --- compiling -------------------------------------------------------------------------------------
# the TPU compiler's two ways of saying how much it needed: one program's total, or its temporaries
_USED = re.compile(r"Used\s+([\d.]+)([KMGT]?)\s+of\s+[\d.]+[KMGT]?\s+hbm", re.I)
_TEMPS = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\)", re.I)
_SCALE = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _out_of_memory(e: BaseException) -> dict[str, Any] | None:
    """For a compile that ran out of device memory: the reason, and the bytes the compiler said
    one program needs (`used`) or its temporaries need (`temp`); None for any other failure."""
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    out: dict[str, Any] = {"reason": "the compiler ran out of device memory: " + text.strip().splitlines()[0][:200]}
    for key, pattern in (("used", _USED), ("temp", _TEMPS)):
        m = pattern.search(text)
        if m:
            out[key] = int(float(m.group(1)) * _SCALE[m.group(2).upper()])
    return out


def _refused(plan: Plan, oom: dict[str, Any], resident: int) -> Plan:
    """A plan the compiler refused for memory: its temporaries if it said them, and a total that is
    a lower bound (what stays on the device, or what the compiler said, whichever is larger)."""
    plan.refused = oom["reason"]
    temp = oom.get("temp")
    plan.per_device.update(temp=temp, total=max(resident + (temp or 0), oom.get("used", 0)))
    return plan


class _OutOfMemory(Exception):
    """A compile the compiler refused for device memory; `info` as _out_of_memory reads it."""

    def __init__(self, info: dict[str, Any]):
        super().__init__(info["reason"])
        self.info = info


def _compile(what: str, target: Target, build: Callable[[], Any]) -> Any:
    """build() under the compilers' quieted stderr. A compiler's refusal for memory raises
    _OutOfMemory; any other refusal is one clear error naming the program and the reason."""
    try:
        with quiet_native_stderr():
            return build()
    except jax.errors.JaxRuntimeError as e:
        oom = _out_of_memory(e)
        if oom is not None:
            raise _OutOfMemory(oom) from None
        line = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise GlmjaxError(f"the {what} does not compile for {target.name}: {line}") from None


def memory(compiled: Any) -> dict[str, int]:
    """XLA's per-device bytes of one compiled program, and their peak (arguments + outputs not
    aliased to arguments + temporaries)."""
    m = compiled.memory_analysis()
    out = {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
           "alias": int(m.alias_size_in_bytes), "temp": int(m.temp_size_in_bytes)}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def device_bytes(shapes: Any, shardings: Any) -> int:
    """Exact bytes one device holds of a tree of abstract arrays under their shardings (the
    largest shard where shards differ)."""
    total = 0
    for x, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings, is_leaf=lambda s: hasattr(s, "shard_shape"))):
        total += int(np.prod(sh.shard_shape(tuple(x.shape)))) * _itemsize(x.dtype)
    return total


def _itemsize(dtype: Any) -> int:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return 8  # a threefry key: two uint32
    return np.dtype(dtype).itemsize


def _hosts(mesh: jax.sharding.Mesh) -> list[int]:
    return [int(d.process_index) for d in mesh.devices.flat]


# --- training ---------------------------------------------------------------------------------------
def plan_training(exp: Experiment, target: Target, mesh_spec: str | None = None) -> Plan:
    """Compile the experiment's training step for `target` (its mesh, or `mesh_spec`) and account
    for one step at the full global batch."""
    from glmjax.train import step as S

    cfg, t = exp.model, exp.train
    seq, micro = exp.objective.seq_length, t.micro_batch
    n_micro = exp.optim.global_batch // micro
    mesh = make_mesh(mesh_spec or t.mesh or "fsdp=-1", compile_devices(target))
    setting = {"remat_policy": cfg.remat_policy, "micro_batch": micro, "micro_batches": n_micro,
               "global_batch": exp.optim.global_batch, "seq_length": seq, "dtype": cfg.dtype}
    shapes = S.abstract_state(cfg, exp.optim, exp.loss_scale)
    shardings = S.state_shardings(cfg, exp.optim, exp.loss_scale, mesh)
    params = device_bytes(shapes.params, shardings.params)
    optimizer = device_bytes(shapes.opt_state, shardings.opt_state)
    tokens = exp.optim.global_batch * seq
    flops = roofline.model_flops_per_token(cfg, seq) * tokens
    hw_flops = roofline.hardware_flops_per_token(cfg, seq, cfg.remat_policy) * tokens
    plan = Plan("train", target, dict(mesh.shape), setting, dict.fromkeys(BYTES_KEYS), {}, flops, hw_flops,
                None, {}, {"accumulate": n_micro, "update": 1}, {})
    start = time.perf_counter()
    try:
        step = _compile("training step", target, lambda: S.TrainStep(cfg, exp.optim, exp.loss_scale, mesh, micro, seq,
                                                                   compiler_options(target)))
    except _OutOfMemory as e:
        plan.compile_seconds["total"] = time.perf_counter() - start
        plan.per_device.update(params=params, optimizer=optimizer)
        return _refused(plan, e.info, device_bytes(shapes, shardings) + params)  # + the accumulator
    plan.compile_seconds["total"] = time.perf_counter() - start
    plan.programs = {name: memory(c) for name, c in step.programs.items()}
    # the state and the accumulator stay on the devices between the programs, whichever arguments a
    # program uses (jit drops unused ones: accumulate never sees Adam's moments); the micro-batch and
    # each program's temporaries and fresh (not donated) outputs come on top
    resident = device_bytes(shapes, shardings) + device_bytes(step.acc_specs, step.acc_shardings)
    batch = device_bytes(step.batch_specs, step.batch_shardings)
    extra = {name: m["output"] - m["alias"] + m["temp"] + (batch if name == "accumulate" else 0)
             for name, m in plan.programs.items()}
    peak = max(extra, key=extra.get)
    total = resident + extra[peak]
    temp = plan.programs[peak]["temp"]
    plan.setting["peak_program"] = peak
    plan.per_device.update(params=params, optimizer=optimizer, temp=temp, output=total - temp - params - optimizer,
                           total=total)
    hosts = _hosts(mesh)
    plan.collectives = {name: collectives(c.as_text(), hosts) for name, c in step.programs.items()}
    if target.chip.peak_flops:
        plan.bounds = _training_bounds(plan, cfg, mesh, n_micro)
    return plan


def _training_bounds(plan: Plan, cfg: GLMConfig, mesh: jax.sharding.Mesh, n_micro: int) -> dict[str, float]:
    """Roofline of one step: n_micro accumulate runs and one update. HBM traffic counted: the
    compute-dtype weights in every pass (forward, backward, a full remat's second forward), the
    float32 master read, the float32 gradient accumulator read and written, and the update's reads
    and writes of parameters, gradients and both Adam moments; activations are not counted."""
    chip, chips = plan.target.chip, plan.target.chips
    n_params = cfg.num_params()
    passes = 2 + (cfg.remat_policy == "full")
    weights = n_params * np.dtype(cfg.dtype).itemsize / mesh.shape["tensor"]
    micro_hbm = passes * weights + 12.0 * n_params / chips
    micro_flops = plan.hardware_flops_per_step / n_micro / chips
    acc = roofline.bound_seconds(micro_flops, micro_hbm,
                                 roofline.collective_seconds(plan.collectives["accumulate"], chip), chip)
    upd = roofline.bound_seconds(0.0, 32.0 * n_params / chips,
                                 roofline.collective_seconds(plan.collectives["update"], chip), chip)
    return {k: n_micro * acc[k] + upd[k] for k in acc}


def micro_batch_candidates(exp: Experiment, mesh_spec: str | None, target: Target, limit: int = 6) -> list[int]:
    """Micro-batch rows worth trying: multiples of the data parallelism that divide the global batch
    and the batch ramp's start (as the experiment requires)."""
    from glmjax.parallel.mesh import parse_mesh_spec

    sizes = parse_mesh_spec(mesh_spec or exp.train.mesh or "fsdp=-1", target.chips)
    dp = sizes["data"] * sizes["fsdp"]
    g, ramp = exp.optim.global_batch, exp.optim.rampup_batch_size
    start = ramp[0] if ramp else g
    return [m for m in range(dp, g + 1, dp) if g % m == 0 and start % m == 0][:limit]


def search(load: Callable[[Sequence[str]], Experiment], target: Target, meshes: Sequence[str | None],
           log: Callable[[str], None]) -> tuple[Plan | None, list[Plan]]:
    """Try remat policies x micro-batch sizes (x meshes): the fastest predicted plan that fits, and
    every plan tried. A micro-batch that does not fit ends that policy's sizes (memory grows with it)."""
    if not target.chip.peak_flops:
        raise GlmjaxError(f"--search ranks configurations by their predicted time, and {target.name} has no "
                          f"published peak: plan for a TPU or GPU target")
    tried: list[Plan] = []
    for mesh in meshes:
        base = load([])
        for remat in REMAT_POLICIES:
            for micro in micro_batch_candidates(base, mesh, target):
                try:
                    exp = load([f"model.remat_policy={remat}", f"train.micro_batch={micro}"])
                except ConfigError as e:
                    log(f"  skip remat {remat}, micro-batch {micro}: {e}")
                    continue
                plan = plan_training(exp, target, mesh)
                tried.append(plan)
                log("  " + summary(plan))
                if not plan.fits:
                    break
    fitting = [p for p in tried if p.fits and p.bounds]
    best = min(fitting, key=lambda p: p.bounds["step"]) if fitting else None
    return best, tried


# --- generation -------------------------------------------------------------------------------------
def plan_generation(cfg: GLMConfig, target: Target, batch: int, prompt: int, new: int,
                    quantize: str | None = None, mesh_spec: str | None = None) -> Plan:
    """Compile the generation program (prefill of `batch` prompts of `prompt` tokens, then `new`
    greedy decode steps through the KV cache) for `target`; the mesh defaults to tensor parallel
    over every device, as GLM-130B serves."""
    from glmjax.infer.decode import GenerateConfig, Generator, prepare
    from glmjax.model.api import abstract_params, param_shardings
    from glmjax.model.layouts import GLM130B_IDS

    if batch < 1 or prompt < 1 or new < 1:
        raise GlmjaxError(f"--batch, --prompt and --new must be >= 1, got {batch}, {prompt}, {new}")
    bits = {"int8": 8, "int4": 4, None: 0}[quantize]
    if bits:
        cfg = cfg.replace(quantization_bits=bits, quantization_groups=1)
    mesh = make_mesh(mesh_spec or "tensor=-1", compile_devices(target))
    ids = GLM130B_IDS
    prompts = [[ids.pad] * max(prompt - 2, 0) + [ids.gmask, ids.sop][-prompt:]] * batch
    prepared = prepare(prompts, ids, cfg, new, batch_multiple=mesh.shape["data"] * mesh.shape["fsdp"])
    b, p = prepared.arrays["tokens"].shape
    gen = Generator(cfg, None, mesh)
    params = device_bytes(nn.unbox(abstract_params(cfg)), param_shardings(cfg, mesh))
    slots = p + new
    kv_total = 2 * cfg.num_layers * b * slots * cfg.hidden_size * np.dtype(cfg.dtype).itemsize
    kv_device = kv_total // (mesh.shape["tensor"] * mesh.shape["data"] * mesh.shape["fsdp"])
    per_token = roofline.forward_flops_per_token(cfg, slots)
    flops = per_token * b * (p + new)
    setting = {"batch": batch, "compiled_batch": b, "prompt": prompt, "prompt_bucket": p, "new_tokens": new,
               "weights": f"int{bits}" if bits else cfg.param_dtype, "dtype": cfg.dtype, "strategy": "greedy"}
    plan = Plan("generate", target, dict(mesh.shape), setting, dict.fromkeys(BYTES_KEYS), {}, flops, flops, None,
                {}, {"generate": 1}, {})
    plan.generation = {"kv_cache_bytes": kv_total, "kv_cache_bytes_per_device": kv_device}
    start = time.perf_counter()
    try:
        compiled = _compile("generation program", target,
                            lambda: gen.lower_generate(prepared, GenerateConfig(max_new_tokens=new))
                            .compile(compiler_options(target)))
    except _OutOfMemory as e:
        plan.compile_seconds["total"] = time.perf_counter() - start
        plan.per_device.update(params=params, optimizer=0)
        return _refused(plan, e.info, params)
    plan.compile_seconds["total"] = time.perf_counter() - start
    plan.programs = {"generate": memory(compiled)}
    m = plan.programs["generate"]
    plan.per_device.update(params=params, optimizer=0, temp=m["temp"], output=max(0, m["total"] - m["temp"] - params),
                           total=m["total"])
    text, hosts = compiled.as_text(), _hosts(mesh)
    plan.collectives = {"generate": collectives(text, hosts, default_trip=new)}
    if target.chip.peak_flops:
        prefill_ops = collectives(text, hosts, default_trip=0)
        _generation_bounds(plan, per_token * b, params, kv_device, prefill_ops)
    return plan


def _generation_bounds(plan: Plan, flops_per_position: float, params: int, kv_device: int,
                       prefill_ops: list[Collective]) -> None:
    """Prefill at its roofline, then each decode step at its own: every step reads all weights and
    the whole cache (the HBM floor per token), computes one token per row, runs its collectives."""
    chip, chips = plan.target.chip, plan.target.chips
    p, new = plan.setting["prompt_bucket"], plan.setting["new_tokens"]
    prefill_comm = roofline.collective_seconds(prefill_ops, chip)
    decode_comm = (roofline.collective_seconds(plan.collectives["generate"], chip) - prefill_comm) / new
    pre = roofline.bound_seconds(flops_per_position * p / chips, params + kv_device, prefill_comm, chip)
    tok = roofline.bound_seconds(flops_per_position / chips, params + kv_device, decode_comm, chip)
    plan.bounds = {k: pre[k] + new * tok[k] for k in pre}
    plan.generation.update(prefill_seconds=pre["step"], per_token_seconds=tok["step"],
                           per_token_hbm_floor_seconds=tok["hbm"])


# --- text -------------------------------------------------------------------------------------------
def summary(plan: Plan) -> str:
    """One line per plan tried by the search."""
    s = plan.setting
    t = (f"{plan.bounds['step']:.3g}-{plan.bounds['serial']:.3g} s/step, MFU {plan.serial_mfu:.1%}-"
         f"{plan.predicted_mfu:.1%}") if plan.bounds and plan.fits else ""
    return (f"remat {s['remat_policy']:<13} micro-batch {s['micro_batch']:>5} x {s['micro_batches']:<3} "
            f"{plan.verdict()}{'; ' + t if t else ''} (compiled in {plan.compile_seconds.get('total', 0):.0f} s)")


def report(plan: Plan) -> list[str]:
    """The plan as lines of text; the verdict comes last."""
    tg, s = plan.target, plan.setting
    mesh = ",".join(f"{k}={v}" for k, v in plan.mesh.items())
    lines = [f"target: {tg.name}: {tg.chips} x {tg.chip.device_kind} on {tg.hosts} host(s), mesh {mesh}"]
    if plan.kind == "train":
        lines.append(f"step: {s['micro_batches']} micro-batch(es) of {s['micro_batch']} x {s['seq_length']} tokens "
                     f"(global batch {s['global_batch']}), remat {s['remat_policy']}, compute {s['dtype']}")
    else:
        lines.append(f"generate: batch {s['batch']} (compiled {s['compiled_batch']}), prompt {s['prompt']} "
                     f"(bucket {s['prompt_bucket']}), {s['new_tokens']} new tokens, {s['weights']} weights")
    lines.append(f"compiled in {plan.compile_seconds.get('total', 0.0):.1f} s on this machine")
    notes = {"params": "parameters (exact, from the shardings)", "optimizer": "optimizer state (exact)",
             "temp": "activations and temporaries (XLA)",
             "output": ("gradient accumulator, " if plan.kind == "train" else "") + "inputs, outputs (XLA)",
             "total": "a lower bound: the state, and what the compiler said" if plan.refused
             else "what stays on the device + the largest program's needs"}
    lines.append("per device:")
    for k in BYTES_KEYS:
        v = plan.per_device[k]
        lines.append(f"  {k:<10} {'?' if v is None else human_bytes(v):>11}  {notes[k]}")
    if plan.generation:
        g = plan.generation
        lines.append(f"  kv cache   {human_bytes(g['kv_cache_bytes_per_device']):>11}  "
                     f"of {human_bytes(g['kv_cache_bytes'])} "
                     f"for {s['compiled_batch']} x {s['prompt_bucket'] + s['new_tokens']} slots (in temp)")
    lines.append(f"flops per step: {plan.flops_per_step:.3e} model"
                 + (f", {plan.hardware_flops_per_step:.3e} executed with remat {s['remat_policy']}"
                    if plan.kind == "train" else "") + " (counted from the shapes)")
    lines += _roofline_lines(plan)
    rows = plan.collective_rows()
    if rows:
        lines.append("collectives per step (optimized HLO, loops multiplied out):")
        for r in rows:
            where = {"cuda": "across hosts" if r["across_hosts"] else "within a host",
                     "tpu": "in the slice"}.get(tg.chip.platform, "")  # ICI joins a slice's hosts
            sec = f"  {r['seconds']:.3g} s" if r["seconds"] is not None else ""
            lines.append(f"  {r['program']:<10} {r['kind']:<18} groups of {r['group_size']:<4} {where:<13} "
                         f"{r['count']:>7} x {human_bytes(r['bytes_per_device'] / max(r['count'], 1)):>11}{sec}")
    total = plan.per_device["total"]
    if tg.chip.platform == "cuda" and plan.fits and total > GPU_PREALLOCATED * tg.chip.memory_bytes:
        lines.append(f"note: jax takes {GPU_PREALLOCATED:.0%} of a GPU's memory by default; this needs "
                     f"{total / tg.chip.memory_bytes:.0%}: run with XLA_PYTHON_CLIENT_MEM_FRACTION=.95")
    lines.append(plan.verdict())
    return lines


def _roofline_lines(plan: Plan) -> list[str]:
    b = plan.bounds
    if plan.refused:
        return []
    if not b:
        return [f"roofline: not offered for {plan.target.chip.name} devices (no published peak)"]
    per = "step" if plan.kind == "train" else "call"
    hfu = plan.hardware_flops_per_step / plan.flops_per_step
    out = [f"roofline: {b['step']:.3g} s per {per} (compute {b['compute']:.3g} s, HBM {b['hbm']:.3g} s, "
           f"collectives {b['collectives']:.3g} s, overlapped) -> MFU {plan.predicted_mfu:.1%} at most"
           + (f", HFU {plan.predicted_mfu * hfu:.1%}" if plan.kind == "train" else ""),
           f"  nothing overlapped: {b['serial']:.3g} s per {per} -> MFU {plan.serial_mfu:.1%}"]
    if plan.generation:
        g = plan.generation
        out.append(f"  prefill {g['prefill_seconds'] * 1e3:.3g} ms; per token {g['per_token_seconds'] * 1e3:.3g} ms "
                   f"(HBM floor {g['per_token_hbm_floor_seconds'] * 1e3:.3g} ms: weights + cache read each step)")
    return out

