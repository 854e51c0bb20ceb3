"""Every output glmjax writes is written whole: into a private temporary beside its destination,
renamed into place only when complete, so an interrupted run never leaves a half-written file or
directory under the output's name and never loses the previous one."""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

from glmjax.errors import GlmjaxError


@contextlib.contextmanager
def atomic_dir(dst: str, overwrite: bool) -> Iterator[str]:
    """A temporary sibling of dst to write into; renamed to dst only when the block completes.

    An existing dst is refused unless overwrite, and then replaced only after the new one is
    complete. On any failure or interrupt the temporary is removed, so no half-written directory
    ever carries the checkpoint's name.
    """
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not overwrite:
        raise GlmjaxError(f"output {dst} exists; pass --overwrite to replace it")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(dst)}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(dst):
        old = os.path.join(parent, f".{os.path.basename(dst)}.old-{os.getpid()}")
        os.rename(dst, old)
    os.rename(tmp, dst)
    if old:
        shutil.rmtree(old, ignore_errors=True)
