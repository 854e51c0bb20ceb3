"""Streaming reads and writes of PyTorch `.pt`/`.bin` files without holding a whole file in memory.

Writing: torch.save's zip layout is produced by torch itself with `skip_data` over uninitialised
tensors (never touched, so never resident), then each tensor's bytes are written into its reserved
record one at a time, and the CRC-32s (data descriptors, central directory) and the
`.data/serialization_id` that torch derives from them are patched. The result is byte for byte what
`torch.save` writes for the same tensors, at the memory cost of one tensor.
"""
from __future__ import annotations

import os
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from glmjax.errors import CheckpointError

_DESCRIPTOR = 0x08074B50
_CENTRAL = 0x02014B50
_MASK64 = (1 << 64) - 1
CHUNK = 64 << 20  # bytes per write/CRC step


def require_torch():
    try:
        import torch
    except ImportError as e:
        raise CheckpointError("PyTorch checkpoints need PyTorch (a CPU build is enough): "
                              "pip install 'glmjax[torch]'") from e
    return torch


def torch_dtype(np_dtype: Any):
    torch = require_torch()
    name = np.dtype(np_dtype).name
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
            "int8": torch.int8, "uint8": torch.uint8, "int32": torch.int32,
            "int64": torch.int64}[name]


def to_numpy(t: Any) -> np.ndarray:
    """A torch tensor as numpy without a float32 detour (bfloat16 via a bit view)."""
    torch = require_torch()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def load_mmap(path: str) -> Any:
    """torch.load with memory mapping (tensors are read when touched); one clear error if damaged."""
    torch = require_torch()
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # zip, pickle and EOF errors all mean a damaged file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read {path}: truncated or corrupt ({first})") from None


def _hash_combine(seed: int, value: int) -> int:
    """c10::hash_combine on 64-bit size_t, as torch folds record CRCs into serialization_id."""
    return (seed ^ ((value + 0x9E3779B9 + ((seed << 6) & _MASK64) + (seed >> 2)) & _MASK64)) & _MASK64


class StreamingTorchFile:
    """A torch.save file whose tensor bytes are written one at a time, in any order of files.

    Opening lays out the whole zip (torch.save with skip_data over uninitialised placeholders);
    write(i, array) fills tensor i's record; close() patches the CRC-32s and the serialization id.
    """

    def __init__(self, path: str, specs: Sequence[tuple[str, tuple[int, ...], Any]],
                 wrap: Callable[[dict], Any] = lambda sd: {"module": sd}):
        torch = require_torch()
        self.path, self.specs = path, list(specs)
        placeholders = {k: torch.empty(tuple(s), dtype=torch_dtype(d)) for k, s, d in self.specs}
        with torch.serialization.skip_data():
            torch.save(wrap(placeholders), path)
        del placeholders
        with zipfile.ZipFile(path) as z:
            self.infos = z.infolist()
            self.central_start = z.start_dir
        self.prefix = self.infos[0].filename.split("/", 1)[0] + "/"
        self.by_name = {self._name(i): i for i in self.infos}
        self.crcs = {self._name(i): i.CRC for i in self.infos}
        self.done: set[int] = set()
        self.f = open(path, "r+b")

    def _name(self, info: zipfile.ZipInfo) -> str:
        return info.filename[len(self.prefix):]

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        self.f.seek(info.header_offset + 26)
        n, e = struct.unpack("<HH", self.f.read(4))
        return info.header_offset + 30 + n + e

    def write(self, index: int, arr: np.ndarray) -> None:
        key, shape, dtype = self.specs[index]
        arr = np.ascontiguousarray(arr)
        if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
            raise CheckpointError(f"{key}: got {arr.dtype} {arr.shape}, expected {np.dtype(dtype)} {tuple(shape)}")
        name = f"data/{index}"
        self.f.seek(self._data_offset(self.by_name[name]))
        crc, buf = 0, memoryview(arr.reshape(-1).view(np.uint8))
        for start in range(0, len(buf), CHUNK):
            piece = buf[start:start + CHUNK]
            self.f.write(piece)
            crc = zlib.crc32(piece, crc)
        self.crcs[name] = crc
        self.done.add(index)

    def abort(self) -> None:
        """Stop without finishing: the file stays incomplete (its directory is discarded)."""
        self.f.close()

    def close(self) -> None:
        """Patch CRCs and serialization_id (20 digits of record-name hash + 20 of combined CRCs)."""
        f = self.f
        if len(self.done) != len(self.specs):
            f.close()
            raise CheckpointError(f"{self.path}: {len(self.specs)} tensors declared, {len(self.done)} written")
        sid_name = ".data/serialization_id"
        combined = 0
        for info in self.infos:
            if self._name(info) != sid_name:
                combined = _hash_combine(combined, self.crcs[self._name(info)])
        sid_info = self.by_name[sid_name]
        f.seek(self._data_offset(sid_info))
        old = f.read(sid_info.file_size)
        new = old[:20] + f"{combined:020d}".encode()
        f.seek(self._data_offset(sid_info))
        f.write(new)
        self.crcs[sid_name] = zlib.crc32(new)
        for info in self.infos:  # data descriptors follow each record's data
            f.seek(self._data_offset(info) + info.file_size)
            if struct.unpack("<I", f.read(4))[0] == _DESCRIPTOR:
                f.write(struct.pack("<I", self.crcs[self._name(info)]))
        f.seek(self.central_start)  # the central directory repeats every CRC
        for info in self.infos:
            pos = f.tell()
            head = f.read(46)
            if struct.unpack("<I", head[:4])[0] != _CENTRAL:
                raise CheckpointError(f"{self.path}: unexpected zip layout while writing")
            n, e, c = struct.unpack("<HHH", head[28:34])
            f.seek(pos + 16)
            f.write(struct.pack("<I", self.crcs[self._name(info)]))
            f.seek(pos + 46 + n + e + c)
        f.close()


def save_streaming(path: str, specs: Sequence[tuple[str, tuple[int, ...], Any]],
                   tensors: Iterable[np.ndarray], wrap: Callable[[dict], Any] = lambda sd: {"module": sd}
                   ) -> None:
    """Write `wrap(state_dict)` as torch.save would, pulling tensor data one array at a time.

    specs: (key, shape, numpy dtype) in state-dict order; tensors yields the arrays in that order.
    """
    out = StreamingTorchFile(path, specs, wrap)
    try:
        for index, arr in enumerate(tensors):
            out.write(index, arr)
    except BaseException:
        out.abort()
        raise
    out.close()
