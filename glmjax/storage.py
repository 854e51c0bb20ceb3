"""Where a run's files live: local paths and bucket URLs (gs://, s3://, az://) through one layer,
etils.epath (orbax's own), so `train.checkpoint_dir: gs://bucket/run` reaches orbax, tensorstore and
TensorBoard as the URL it is. Local paths keep their guarantees (outputs.py: files written whole
then renamed); an object in a bucket appears whole when its upload completes, so URLs are written
directly. `file://` URLs are local paths.
"""
from __future__ import annotations

import os
from typing import Any

from glmjax.errors import InputError

BUCKET_SCHEMES = ("gs", "s3", "az")


def is_url(path: Any) -> bool:
    """A bucket URL (a `file://` URL is a local path)."""
    return "://" in str(path) and not str(path).startswith("file://")


def normalize(path: Any) -> str:
    """A local path made absolute (`file://` stripped), or a bucket URL kept verbatim; any other
    scheme is one clear error."""
    text = os.fspath(path) if not isinstance(path, str) else path
    if text.startswith("file://"):
        return os.path.abspath(text[len("file://"):])
    if "://" in text:
        scheme = text.split("://", 1)[0]
        if scheme not in BUCKET_SCHEMES:
            raise InputError(f"{text}: unsupported URL scheme {scheme}:// (local paths, file://, "
                             f"{', '.join(s + '://' for s in BUCKET_SCHEMES)})")
        return text
    return os.path.abspath(text)


def join(base: str, *names: str) -> str:
    """base/name/... for a local path or a URL (never os.path on a URL's '//')."""
    if is_url(base):
        return "/".join([base.rstrip("/"), *names])
    return os.path.join(base, *names)


def epath(path: str) -> Any:
    """The etils.epath.Path of a normalized path or URL (what orbax takes)."""
    from etils import epath as ep

    return ep.Path(path)


def exists(path: str) -> bool:
    return epath(path).exists() if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return epath(path).is_dir() if is_url(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
    return epath(path).is_file() if is_url(path) else os.path.isfile(path)


def listdir(path: str) -> list[str]:
    return sorted(p.name for p in epath(path).iterdir()) if is_url(path) else sorted(os.listdir(path))


def makedirs(path: str) -> None:
    if is_url(path):
        epath(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def read_bytes(path: str) -> bytes:
    if is_url(path):
        return epath(path).read_bytes()
    with open(path, "rb") as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    """The file written whole: locally a temporary renamed over it, in a bucket one upload."""
    from glmjax.outputs import atomic_file

    if is_url(path):
        epath(path).write_bytes(data)
        return
    with atomic_file(path, "wb") as f:
        f.write(data)


def append_text(path: str, text: str) -> None:
    """Lines added at the end: locally an append; a bucket object cannot grow, so it is rewritten
    (metrics files stay small: a line per step)."""
    if not is_url(path):
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
        return
    p = epath(path)
    p.write_text((p.read_text() if p.exists() else "") + text)


def rename(src: str, dst: str) -> None:
    if is_url(src):
        epath(src).rename(dst)
    else:
        os.rename(src, dst)


def copy_tree(src: str, dst: str) -> None:
    """A local directory copied file by file into `dst` (a URL or a path; dst/... created)."""
    for root, _, files in os.walk(src):
        rel = os.path.relpath(root, src)
        target = dst if rel == "." else join(dst, *rel.split(os.sep))
        makedirs(target)
        for name in files:
            write_bytes(join(target, name), read_bytes(os.path.join(root, name)))


def kvstore(path: str) -> Any:
    """The tensorstore key-value store of a file or folder: its own URL syntax for buckets."""
    if is_url(path):
        return path if path.endswith("/") else path + "/"
    return {"driver": "file", "path": path}
