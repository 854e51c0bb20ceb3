"""The hardware a plan compiles for: one table of chips (memory, peak FLOP/s, HBM and interconnect
bandwidth, each from its vendor's published figures), target names in MaxText's convention
(`v4-512`, `v5e-256`) or `<gpu>x<count>` (`a100-40gbx768`), and compile-only devices for a target.

XLA compiles for hardware that is not there: TPUs through libtpu's topology description (the
`plan-tpu` extra), NVIDIA GPUs through the CUDA plugin and an XLA GPU target config (the
`plan-gpu` extra) rendered here from the chip's table entry; `cpu:N` is the simulated CPU mesh.
"""
from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

from glmjax.errors import GlmjaxError

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator: what a plan needs to know about it. Bandwidths in bytes/s per direction."""

    name: str
    platform: str  # "tpu" | "cuda" | "cpu"
    memory_bytes: int
    peak_flops: float  # dense bf16/fp16 matmul with float32 accumulation
    hbm_bandwidth: float
    link_bandwidth: float  # between chips of one host (NVLink/PCIe) or of one TPU slice (ICI)
    network_bandwidth: float  # per chip between hosts (InfiniBand/Ethernet); TPUs: ICI as well
    chips_per_host: int
    device_kind: str  # jax's device_kind
    tpu_version: str = ""  # libtpu's topology prefix
    cores_per_chip: int = 1  # TensorCores per chip: MaxText's v4-N / v5p-N count cores
    gpu: dict[str, Any] = dataclasses.field(default_factory=dict)  # XLA's GpuDeviceInfo fields


# Sources. TPUs: cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e} (peak bf16 per chip, HBM capacity and
# bandwidth; ICI per direction = half the bidirectional per-chip figure: v5e 400, v5p 1200, v6e 800
# GB/s; v4's is the pod's all-reduce bandwidth, 1.1 PB/s, over its 4096 chips).
# NVIDIA: the A100 data sheet (312 TFLOP/s dense fp16/bf16, 1,555 / 2,039 GB/s, NVLink 3 600 GB/s
# both ways); the H100 SXM data sheet (989 TFLOP/s dense bf16, 3.35 TB/s, NVLink 4 900 GB/s both
# ways); DGX A100 / H100 (one 200 / 400 Gb/s InfiniBand port per GPU); the Ampere GA102 whitepaper
# for the RTX 3090 (82 SMs, 71 TFLOP/s fp16 tensor with fp32 accumulation, 936 GB/s GDDR6X, PCIe
# 4.0 x16); the Turing TU102 whitepaper for the RTX 2080 Ti (68 SMs, 53.8 TFLOP/s fp16 with fp32
# accumulation, 616 GB/s GDDR6, PCIe 3.0 x16). GeForce hosts are assumed joined by 100 Gb/s
# Ethernet. GPU SM counts, shared memory, L2 and clocks are the cards' CUDA device properties.
_AMPERE_SM80 = dict(core_count=108, fpus_per_core=64, shared_memory_per_core=167936,
                    shared_memory_per_block_optin=166912, threads_per_core_limit=2048,
                    l2_cache_size=41943040, clock_rate_ghz=1.41, cc=(8, 0))
CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("v4", "tpu", 32 * GiB, 275e12, 1200e9, 268e9, 268e9, 4, "TPU v4", "v4", 2),
    Chip("v5e", "tpu", 16 * GiB, 197e12, 819e9, 200e9, 200e9, 4, "TPU v5 lite", "v5e", 1),
    Chip("v5p", "tpu", 95 * GiB, 459e12, 2765e9, 600e9, 600e9, 4, "TPU v5", "v5p", 2),
    Chip("v6e", "tpu", 32 * GiB, 918e12, 1638e9, 400e9, 400e9, 4, "TPU v6 lite", "v6e", 1),
    Chip("a100-40gb", "cuda", 40 * GiB, 312e12, 1555e9, 300e9, 25e9, 8, "NVIDIA A100-SXM4-40GB",
         gpu=_AMPERE_SM80),
    Chip("a100-80gb", "cuda", 80 * GiB, 312e12, 2039e9, 300e9, 25e9, 8, "NVIDIA A100-SXM4-80GB",
         gpu=_AMPERE_SM80),
    Chip("h100-80gb", "cuda", 80 * GiB, 989e12, 3350e9, 450e9, 50e9, 8, "NVIDIA H100 80GB HBM3",
         gpu=dict(core_count=132, fpus_per_core=128, shared_memory_per_core=233472,
                  shared_memory_per_block_optin=232448, threads_per_core_limit=2048,
                  l2_cache_size=52428800, clock_rate_ghz=1.98, cc=(9, 0))),
    Chip("rtx3090", "cuda", 24 * GiB, 71e12, 936e9, 32e9, 12.5e9, 8, "NVIDIA GeForce RTX 3090",
         gpu=dict(core_count=82, fpus_per_core=128, shared_memory_per_core=102400,
                  shared_memory_per_block_optin=101376, threads_per_core_limit=1536,
                  l2_cache_size=6291456, clock_rate_ghz=1.695, cc=(8, 6))),
    Chip("rtx2080ti", "cuda", 11 * GiB, 53.8e12, 616e9, 16e9, 12.5e9, 8, "NVIDIA GeForce RTX 2080 Ti",
         gpu=dict(core_count=68, fpus_per_core=64, shared_memory_per_core=65536,
                  shared_memory_per_block_optin=65536, threads_per_core_limit=1024,
                  l2_cache_size=5767168, clock_rate_ghz=1.545, cc=(7, 5))),
)}
# 3-D TPU slices (v4, v5p) by chip count, 2-D ones (v5e, v6e): the shapes Cloud TPU creates
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
              256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Target:
    """`chips` of one kind, as a target name asks for them."""

    name: str
    chip: Chip
    chips: int

    @property
    def hosts(self) -> int:
        return max(1, -(-self.chips // self.chip.chips_per_host))

    @property
    def topology(self) -> tuple[int, ...]:
        """The TPU slice's chip grid (TPUs only)."""
        shapes = _SHAPES_2D if self.chip.cores_per_chip == 1 else _SHAPES_3D
        return shapes[self.chips]


def compiler_options(target: Target) -> dict[str, Any]:
    """XLA options of a compile for `target`: GPUs compile without Triton GEMM fusions, whose tile
    sizes XLA picks by autotuning on a present GPU (deviceless it fails); their matmuls go to cuBLAS."""
    return {"xla_gpu_enable_triton_gemm": False} if target.chip.platform == "cuda" else {}


def cpu_chip(memory_bytes: int) -> Chip:
    """A simulated CPU device: no published peak, so the roofline is not offered for it."""
    return Chip("cpu", "cpu", memory_bytes, 0.0, 0.0, 0.0, 0.0, 1 << 30, "cpu")


def parse_target(name: str) -> Target:
    """`v4-512` (TensorCores, as Cloud TPU and MaxText count v4/v5p), `v5e-256` (chips),
    `a100-40gbx768`, `cpu:8`. One clear error listing the known chips otherwise."""
    raw = name.strip().lower()
    known = ", ".join(CHIPS)
    if raw.startswith("cpu:"):
        n = _count(raw[4:], name)
        return Target(raw, cpu_chip(_host_memory() // n), n)
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", raw)
    if m and m.group(1) in CHIPS and CHIPS[m.group(1)].platform == "tpu":
        chip = CHIPS[m.group(1)]
        cores = _count(m.group(2), name)
        chips = cores // chip.cores_per_chip
        shapes = _SHAPES_2D if chip.cores_per_chip == 1 else _SHAPES_3D
        names = ", ".join(f"{chip.name}-{c * chip.cores_per_chip}" for c in shapes)
        if cores % chip.cores_per_chip or chips not in shapes:
            raise GlmjaxError(f"target {name!r}: a {chip.name} slice of {cores} "
                              f"{'TensorCores' if chip.cores_per_chip > 1 else 'chips'} is not one Cloud TPU "
                              f"creates (slices of {names})")
        return Target(raw, chip, chips)
    m = re.fullmatch(r"([a-z0-9-]+)x(\d+)", raw)
    if m and m.group(1) in CHIPS and CHIPS[m.group(1)].platform == "cuda":
        chip, n = CHIPS[m.group(1)], _count(m.group(2), name)
        if n > chip.chips_per_host and n % chip.chips_per_host:
            raise GlmjaxError(f"target {name!r}: more than {chip.chips_per_host} GPUs must fill whole hosts of "
                              f"{chip.chips_per_host}")
        return Target(raw, chip, n)
    raise GlmjaxError(f"unknown target {name!r}: give cpu:N, a TPU slice such as v4-512 or v5e-256, or "
                      f"<gpu>x<count> such as a100-40gbx768 (chips: {known})")


def _count(raw: str, name: str) -> int:
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise GlmjaxError(f"target {name!r}: the count must be a positive integer, got {raw!r}")
    return n


def _host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * GiB


def gpu_target_config(chip: Chip) -> str:
    """XLA's GpuTargetConfigProto text for `chip` (what --xla_gpu_target_config_filename reads)."""
    g = chip.gpu
    major, minor = g["cc"]
    fields = dict(threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=49152,
                  shared_memory_per_core=g["shared_memory_per_core"],
                  threads_per_core_limit=g["threads_per_core_limit"], core_count=g["core_count"],
                  fpus_per_core=g["fpus_per_core"], block_dim_limit_x=2**31 - 1, block_dim_limit_y=65535,
                  block_dim_limit_z=65535, memory_bandwidth=int(chip.hbm_bandwidth),
                  l2_cache_size=g["l2_cache_size"], clock_rate_ghz=g["clock_rate_ghz"],
                  device_memory_size=chip.memory_bytes,
                  shared_memory_per_block_optin=g["shared_memory_per_block_optin"])
    body = "".join(f"  {k}: {v}\n" for k, v in fields.items())
    body += f"  cuda_compute_capability {{ major: {major} minor: {minor} }}\n"
    body += "  registers_per_core_limit: 65536\n  registers_per_block_limit: 65536\n"
    return (f"gpu_device_info {{\n{body}}}\nplatform_name: \"CUDA\"\n"
            f"dnn_version_info {{ major: 9 minor: 8 patch: 0 }}\ndevice_description_str: \"{chip.device_kind}\"\n")


def compile_devices(target: Target) -> list[Any]:
    """Devices of `target` that XLA compiles for (never runs on); one clear error naming the extra
    to install when the compiler for that platform is missing."""
    import jax

    if target.chip.platform == "cpu":
        devices = jax.devices("cpu")
        if len(devices) < target.chips:
            raise GlmjaxError(f"target {target.name} needs {target.chips} CPU devices, this process has "
                              f"{len(devices)}: set XLA_FLAGS=--xla_force_host_platform_device_count="
                              f"{target.chips} (make plan sets it)")
        return devices[:target.chips]
    from jax.experimental import topologies

    chip = target.chip
    try:
        with quiet_native_stderr():
            if chip.platform == "tpu":
                shape = "x".join(map(str, target.topology))
                desc = topologies.get_topology_desc(
                    platform="tpu", topology_name=f"{chip.tpu_version}:{shape}",
                    chip_config_name="megacore" if chip.cores_per_chip > 1 else "default",
                    chips_per_host_bounds=(2, 2, 1), num_slices=1)
            else:
                per_host = min(target.chips, chip.chips_per_host)
                desc = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(chip),
                                                    topology=f"1x{target.hosts}x{per_host}")
    except Exception as e:  # the plugin is missing, or refuses this topology
        hint = ""
        if not _has_compiler(chip.platform):
            extra = "plan-tpu" if chip.platform == "tpu" else "plan-gpu"
            hint = f"; install the compiler: pip install 'glmjax[{extra}]'"
        raise GlmjaxError(f"cannot make compile-only {chip.name} devices: {_first_line(e)}{hint}") from None
    devices = list(desc.devices)
    if len(devices) != target.chips:
        raise GlmjaxError(f"target {target.name}: the {chip.platform} topology gave {len(devices)} devices, "
                          f"not {target.chips}")
    return devices


def _has_compiler(platform: str) -> bool:
    import importlib.util

    if platform == "tpu":
        return importlib.util.find_spec("libtpu") is not None
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


# What libtpu and the CUDA plugin print to fd 2 about the hardware they do not find: noise in a plan.
_NOISE = ("cudart_stub", "InitGoogle", "absl::InitializeLog", "TPU_WORKER_HOSTNAMES", "TPU accelerator type",
          "Source Location Trace", "libtpu_init_utils", "TPU_ACCELERATOR_TYPE", "host bounds for accelerator",
          "could not determine TPU")


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """The compilers' native stderr (fd 2) captured for the block and replayed without the lines
    that only say no TPU or GPU is attached, which is the point of a plan."""
    sys.stderr.flush()
    saved = os.dup(2)
    ours = not faulthandler.is_enabled()  # one enabled already (pytest's, a user's) keeps its own file
    with tempfile.TemporaryFile() as tmp, os.fdopen(os.dup(saved), "w") as real:
        os.dup2(tmp.fileno(), 2)
        if ours:
            faulthandler.enable(file=real)  # a compiler that crashes still says where, on the real stderr
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if ours:
                faulthandler.disable()
            tmp.seek(0)
            kept = [ln for ln in tmp.read().decode("utf-8", "replace").splitlines()
                    if ln.strip() and not any(n in ln for n in _NOISE) and not ln.startswith("===")]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")


def human_bytes(n: float) -> str:
    """31.2 GiB, 11.4 MiB, 512 B: one decimal, the largest unit that keeps the number >= 1."""
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
