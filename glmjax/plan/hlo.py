"""The collectives of an optimized HLO module, counted as often as they run: an op inside the
scanned layer loop runs once per layer, so each computation's ops are multiplied by the trip counts
of the while loops that call it (XLA's `known_trip_count`; a loop without one, such as the decode
loop that may stop early, runs `default_trip` times). XLA's cost analysis counts loop bodies once."""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute", "ragged-all-to-all",
         "collective-broadcast")
_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
          "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\dm\d\w*)?)\[([\d,]*)\]")
_CALLS = re.compile(r"\b(calls|to_apply|body|condition|branch_computations|true_computation|false_computation)="
                    r"(\{[^}]*\}|%?[\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective op of the program: `count` executions per run, `bytes` of its result on each
    device per execution, over groups of `group_size` devices (`across_hosts`: a group spans hosts)."""

    kind: str
    count: int
    bytes: float
    group_size: int
    across_hosts: bool

    @property
    def wire_bytes(self) -> float:
        """Bytes each device sends per execution with ring algorithms (n devices in a group)."""
        n = max(self.group_size, 1)
        if n == 1:
            return 0.0
        factor = {"all-reduce": 2 * (n - 1) / n, "all-gather": (n - 1) / n, "reduce-scatter": n - 1.0,
                  "all-to-all": (n - 1) / n}.get(self.kind, 1.0)
        return factor * self.bytes


def _computations(text: str) -> tuple[dict[str, list[str]], str | None]:
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = m.group(1)
                comps[current] = []
                if line.startswith("ENTRY"):
                    entry = current
        elif line.startswith("}"):
            current = None
        else:
            comps[current].append(line)
    return comps, entry


def _top_level(types: str) -> list[str]:
    """The elements of a tuple type `(a, (b, c), d)` (the type itself when it is not a tuple)."""
    types = types.strip()
    if not types.startswith("("):
        return [types]
    parts, depth, start = [], 0, 1
    for i, ch in enumerate(types):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                parts.append(types[start:i])
        elif ch == "," and depth == 1:
            parts.append(types[start:i])
            start = i + 1
    return [p for p in parts if p.strip()]


def _bytes(types: str) -> float:
    return sum(_BYTES.get(dt, 4) * float(np.prod([int(d) for d in dims.split(",") if d]))
               for dt, dims in _ARRAY.findall(types))


def _result_bytes(types: str, kind: str, opcode: str) -> float:
    """Bytes of the collective's result on one device. An async start of a gather, scatter or
    permute returns (operands, results, ...): its results are the second element."""
    if opcode.endswith("-start") and kind != "all-reduce":
        parts = _top_level(types)
        if len(parts) >= 2:
            return _bytes(parts[1])
    return _bytes(types)


def _groups(line: str, num_devices: int) -> list[list[int]]:
    """The device groups of a collective (logical ids in the program's device order)."""
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if m:
        shape = [int(x) for x in m.group(1).split(",")]
        dims = [int(x) for x in m.group(2).split(",")]
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return ids.reshape(-1, shape[-1]).tolist()
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if m:
        axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
        names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
        chosen = [names.index(a) for a in re.findall(r"'(\w+)'", m.group(2)) if a in names]
        ids = np.arange(int(np.prod(sizes))).reshape(sizes)
        rest = [i for i in range(len(sizes)) if i not in chosen]
        size = int(np.prod([sizes[i] for i in chosen])) if chosen else 1
        return ids.transpose(rest + chosen).reshape(-1, size).tolist()
    m = re.search(r"(?:replica_groups|source_target_pairs)=(\{(?:\{[\d,]*\},?)*\})", line)
    if m:
        groups = [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m.group(1)[1:-1])]
        if groups and any(groups):
            return groups
    return [list(range(num_devices))]


def _counted_trip(condition: list[str]) -> int | None:
    """The trip count of a loop whose condition is `counter < N` with one integer constant N (how
    TPU's optimized HLO shows a scan, without XLA's known_trip_count); None for any other condition."""
    root = next((ln for ln in condition if ln.lstrip().startswith("ROOT")), "")
    if "compare(" not in root or "direction=LT" not in root:
        return None
    constants = re.findall(r"=\s*[su]32\[\]\S*\s+constant\((\d+)\)", "\n".join(condition))
    return int(constants[0]) if len(constants) == 1 else None


def collectives(text: str, hosts: Sequence[int], default_trip: int = 1) -> list[Collective]:
    """Every collective of the optimized HLO `text`, aggregated by (kind, group size, across hosts).
    hosts[i]: the host of the program's i-th device (its process index)."""
    comps, entry = _computations(text)
    found: dict[tuple[str, int, bool], list[float]] = {}

    def record(kind: str, line: str, mult: int, size: float) -> None:
        groups = _groups(line, len(hosts))
        across = any(len({hosts[i] for i in g if i < len(hosts)}) > 1 for g in groups)
        acc = found.setdefault((kind, len(groups[0]), across), [0, 0.0])
        acc[0] += mult
        acc[1] += mult * size

    def visit(name: str, mult: int, depth: int) -> None:
        if depth > 64 or name not in comps:
            return
        for line in comps[name]:
            m = _INSTR.match(line)
            if not m:
                continue
            types, opcode = m.group(1), m.group(2)
            kind = opcode[:-6] if opcode.endswith("-start") else opcode
            if kind in KINDS:
                record(kind, line, mult, _result_bytes(types, kind, opcode))
            if opcode.endswith("-done") or opcode == "async-update":
                continue  # the same work as its -start
            fused = re.search(r"calls=%?(all-reduce-scatter[\w.\-]*)", line) if opcode == "fusion" else None
            if fused:  # TPU's reduce-scatter: an all-reduce fused with the slice each device keeps
                inner = next((ln for ln in comps.get(fused.group(1), []) if " all-reduce(" in ln), line)
                record("reduce-scatter", inner, mult, _bytes(types))
                continue
            trip = 1
            if opcode == "while":
                t = _TRIP.search(line)
                cond = re.search(r"condition=%?([\w.\-]+)", line)
                trip = int(t.group(1)) if t else _counted_trip(comps.get(cond.group(1) if cond else "", []))
                trip = default_trip if trip is None else trip
            for attr, ref in _CALLS.findall(line):
                targets = re.findall(r"%?([\w.\-]+)", ref)
                factor = trip if attr == "body" else (trip + 1 if attr == "condition" else 1)
                for target in targets:
                    visit(target, mult * factor, depth + 1)

    if entry is not None:
        visit(entry, 1, 0)
    return [Collective(kind, int(c), b / c if c else 0.0, size, across)
            for (kind, size, across), (c, b) in sorted(found.items())]
