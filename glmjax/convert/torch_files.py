"""Streaming reads and writes of PyTorch `.pt`/`.bin` files without holding a whole file in memory.

Reading needs no torch: the zip's data.pkl is unpickled with an allow-list into tensor descriptors
and each tensor's bytes are read with pread when asked for.

Writing: torch.save's zip layout is produced by torch itself with `skip_data` over uninitialised
tensors (never touched, so never resident), then each tensor's bytes are written into its reserved
record one at a time, and the CRC-32s (data descriptors, central directory) and the
`.data/serialization_id` that torch derives from them are patched. The result is byte for byte what
`torch.save` writes for the same tensors, at the memory cost of one tensor.
"""
from __future__ import annotations

import dataclasses
import io
import os
import pickle
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


_STORAGE_DTYPES = {"FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
                   "DoubleStorage": "float64", "CharStorage": "int8", "ByteStorage": "uint8",
                   "ShortStorage": "int16", "IntStorage": "int32", "LongStorage": "int64", "BoolStorage": "bool"}


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """A tensor of a torch zip file: where its bytes are, not the bytes."""

    storage: str
    dtype: np.dtype
    offset: int  # in elements, into the storage
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class TorchZipReader:
    """Reads torch.save zip files (SAT model states, Hugging Face .bin) without torch.

    data.pkl is unpickled with an allow-list that turns tensors into LazyTensor descriptors; a
    tensor's bytes are read with pread into a fresh array only when asked for, so nothing of the
    file stays mapped or resident afterwards.
    """

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint file not found: {path}")
        try:
            with zipfile.ZipFile(path) as z:
                infos = z.infolist()
                pkl = next(i for i in infos if i.filename.endswith("/data.pkl") or i.filename == "data.pkl")
                prefix = pkl.filename[: -len("data.pkl")]
                raw = z.read(pkl)
            self.records = {i.filename[len(prefix):]: i for i in infos}
            self.fd = os.open(path, os.O_RDONLY)
            self.obj = _LazyUnpickler(io.BytesIO(raw)).load()
        except CheckpointError:
            raise
        except Exception as e:  # BadZipFile, StopIteration, UnpicklingError, EOFError, ...
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"cannot read {path}: truncated or corrupt ({first})") from None
        self._data_start: dict[str, int] = {}

    def _start(self, storage: str) -> int:
        if storage not in self._data_start:
            info = self.records.get(f"data/{storage}")
            if info is None:
                raise CheckpointError(f"cannot read {self.path}: truncated or corrupt (no record data/{storage})")
            head = os.pread(self.fd, 30, info.header_offset)
            n, e = struct.unpack("<HH", head[26:30])
            self._data_start[storage] = info.header_offset + 30 + n + e
        return self._data_start[storage]

    def read(self, t: LazyTensor) -> np.ndarray:
        """The tensor's values as a new C-contiguous array."""
        count = int(np.prod(t.shape)) if t.shape else 1
        itemsize = t.dtype.itemsize
        contiguous = all(st == int(np.prod(t.shape[d + 1:])) for d, st in enumerate(t.stride) if t.shape[d] > 1)
        if not contiguous:  # rare in checkpoints: read the span and let numpy apply the strides
            span = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride))
            base = self.read(LazyTensor(t.storage, t.dtype, t.offset, (span,), (1,)))
            return np.lib.stride_tricks.as_strided(base, t.shape, [st * itemsize for st in t.stride]).copy()
        out = np.empty(t.shape, t.dtype)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        pos, done = self._start(t.storage) + t.offset * itemsize, 0
        while done < count * itemsize:
            got = os.preadv(self.fd, [buf[done:done + CHUNK]], pos + done)
            if got <= 0:
                raise CheckpointError(f"cannot read {self.path}: truncated or corrupt (tensor data ends early)")
            done += got
        return out

    def close(self) -> None:
        os.close(self.fd)


class _LazyUnpickler(pickle.Unpickler):
    """Unpickles torch's data.pkl into plain dicts of LazyTensor; refuses any other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        raise pickle.UnpicklingError(f"unsupported object {module}.{name} in a weights file")

    def persistent_load(self, pid: Any) -> Any:
        kind, storage_type, key, _location, _numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {kind!r}")
        return storage_type, key


def _rebuild(storage: tuple[str, str], offset: int, shape: tuple[int, ...], stride: tuple[int, ...],
             *_: Any) -> LazyTensor:
    storage_type, key = storage
    dt = _STORAGE_DTYPES[storage_type]
    if dt == "bfloat16":
        import ml_dtypes

        dtype = np.dtype(ml_dtypes.bfloat16)
    else:
        dtype = np.dtype(dt)
    return LazyTensor(key, dtype, offset, tuple(shape), tuple(stride))


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
