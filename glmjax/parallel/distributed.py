"""One job over several processes (the hosts of a TPU pod, the nodes or GPUs of a cluster, or local
processes started by `glmjax launch`): joining it, and the few host-side steps that differ from a
single process -- who writes files, how a sharded result reaches the host, a barrier.

Every process runs the same program on its own devices; arrays are global (jax.Array over all
devices of the job), each process feeding and holding only its addressable shards.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# A process whose peers stop answering gives up after this long (jax's default is 100 s); short
# enough that a dead host ends the job promptly, long enough for a busy host to keep up.
HEARTBEAT_TIMEOUT_S = 60


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """How this process joins the job. coordinator_address None: from the cluster's environment
    (TPU VM metadata, SLURM variables), as jax.distributed.initialize detects it."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S
    initialization_timeout_s: int = 300


def initialize(job: JobConfig) -> None:
    """Join the job (before any other jax call). Collectives between CPU processes go over gloo; a
    local coordinator (127.0.0.1) listens on the loopback interface only, not on every interface."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    bind = job.coordinator_address if _is_loopback(job.coordinator_address) else None
    jax.distributed.initialize(coordinator_address=job.coordinator_address, num_processes=job.num_processes,
                               process_id=job.process_id, coordinator_bind_address=bind,
                               heartbeat_timeout_seconds=job.heartbeat_timeout_s,
                               initialization_timeout=job.initialization_timeout_s,
                               shutdown_timeout_seconds=job.heartbeat_timeout_s)


def _is_loopback(address: str | None) -> bool:
    return address is not None and address.rsplit(":", 1)[0] in ("127.0.0.1", "localhost", "[::1]")


def is_primary() -> bool:
    """Process 0: the one that writes run files, metrics and command outputs."""
    import jax

    return jax.process_index() == 0


def process_count() -> int:
    import jax

    return jax.process_count()


def to_host(x: Any) -> np.ndarray:
    """A (possibly sharded over several processes) array as one numpy array on every process."""
    import jax

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def barrier(name: str, timeout_s: int = 24 * 3600) -> None:
    """Wait until every process of the job reaches `name` (a no-op in one process). Through the
    coordination service, not a device collective, so one process may work alone for hours (a
    conversion written by process 0) while the others wait."""
    import jax

    if jax.process_count() > 1:  # jax exposes its coordination client only here (multihost_utils'
        # sync_global_devices is a device all-reduce, which gloo or NCCL time out on long waits)
        from jax._src import distributed as jax_distributed

        jax_distributed.global_state.client.wait_at_barrier(name, timeout_s * 1000)


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any (e.g. a stop signal seen by one host)."""
    import jax

    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())


def local_rows(sharding: Any, global_shape: tuple[int, ...]) -> range:
    """The rows (dimension 0) of a global array of `global_shape` that this process's devices hold
    under `sharding`: the rows this process must build and feed. A contiguous range (the device
    mesh orders devices by process), checked."""
    held = sorted({idx[0].indices(global_shape[0])[:2] for idx in
                   sharding.addressable_devices_indices_map(tuple(global_shape)).values()})
    start, stop = held[0][0], max(b for _, b in held)
    covered = set()
    for a, b in held:
        covered.update(range(a, b))
    if len(covered) != stop - start:
        raise ValueError(f"this process holds rows {held} of the batch: not one contiguous range")
    return range(start, stop)
