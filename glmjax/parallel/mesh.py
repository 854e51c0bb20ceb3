"""Device meshes from a spec such as `data=2,fsdp=2,tensor=2` (`-1` fills the rest), Auto axis types."""
from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

from glmjax.errors import MeshError

MESH_AXES = ("data", "fsdp", "tensor")


def parse_mesh_spec(spec: str | None, num_devices: int) -> dict[str, int]:
    """Resolve a spec to a size per axis of MESH_AXES; absent axes get 1, one `-1` fills the rest."""
    sizes = {a: 1 for a in MESH_AXES}
    if spec is None or not spec.strip():
        return sizes
    seen, fill = set(), None
    for part in spec.split(","):
        name, sep, raw = part.strip().partition("=")
        name = name.strip()
        if not sep:
            raise MeshError(f"mesh spec {spec!r}: {part.strip()!r} is not axis=size")
        if name not in MESH_AXES:
            raise MeshError(f"mesh spec {spec!r}: unknown axis {name!r} (axes: {', '.join(MESH_AXES)})")
        if name in seen:
            raise MeshError(f"mesh spec {spec!r}: axis {name!r} given twice")
        seen.add(name)
        try:
            n = int(raw)
        except ValueError:
            raise MeshError(f"mesh spec {spec!r}: size of {name!r} is not an integer: "
                            f"{raw.strip()!r}") from None
        if n == -1:
            if fill is not None:
                raise MeshError(f"mesh spec {spec!r}: only one axis may be -1")
            fill = name
        elif n < 1:
            raise MeshError(f"mesh spec {spec!r}: size of {name!r} must be >= 1 or -1, got {n}")
        else:
            sizes[name] = n
    fixed = 1
    for a in MESH_AXES:
        if a != fill:
            fixed *= sizes[a]
    if fill is not None:
        if num_devices % fixed:
            raise MeshError(f"mesh spec {spec!r}: {num_devices} devices are not divisible by {fixed}")
        sizes[fill] = num_devices // fixed
    total = 1
    for a in MESH_AXES:
        total *= sizes[a]
    if total != num_devices:
        raise MeshError(f"mesh spec {spec!r} needs {total} devices, but {num_devices} are available")
    return sizes


def make_mesh(spec: str | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), with Auto axes for sharding rules.

    Without a spec the mesh spans one device, so a plain run never needs a batch divisible by the
    device count.
    """
    if devices is None:
        devices = jax.devices() if spec else jax.devices()[:1]
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=list(devices))
