"""Files on disk, safely. Every output glmjax writes is written whole: into a private temporary beside its destination,
renamed into place only when complete, so an interrupted run never leaves a half-written file or
directory under the output's name and never loses the previous one.

Temporaries carry the writer's PID (`.NAME.partial-PID`, `.NAME.old-PID`, `.NAME.tmp-PID-<random>`), so
the next run for the same destination can tell what a killed run left behind and clear it up; the
leftovers of a process that still runs are never touched. (PIDs are checked on this machine only:
two hosts must not write one destination on a shared file system at the same time.) A file name read
from a file (a corpus manifest, a weight index) is taken only as a plain name inside its directory
(inside)."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import IO

from glmjax.errors import GlmjaxError

# temporaries this process is writing now: its own PID alone cannot tell (a container reuses PIDs)
_ACTIVE: set[str] = set()


def inside(root: str, name: object, what: str) -> str:
    """root/name for a file name that a file (manifest, index) names: a plain name, never a path that
    climbs out of root or is absolute; one clear error otherwise."""
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name
            or (os.altsep and os.altsep in name)):
        raise GlmjaxError(f"{what} names {name!r}: only a plain file name inside {root} is allowed")
    return os.path.join(root, name)


def warn(msg: str) -> None:
    """One `glmjax: warning: ...` line on stderr."""
    print(f"glmjax: warning: {msg}", file=sys.stderr)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (another user's process counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def _remove(path: str) -> None:
    """Delete a file, a link (never what it points to) or a directory tree; gone already is fine."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _leftovers(dst: str) -> list[tuple[str, str, int]]:
    """(path, kind, pid) of the temporaries beside dst: kind partial | old | tmp."""
    parent, base = os.path.split(dst)
    pattern = re.compile(rf"\.{re.escape(base)}\.(?:(partial|old)-(\d+)|(tmp)-(\d+)-.+)")
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    found = []
    for name in sorted(names):
        m = pattern.fullmatch(name)
        if m:
            kind, pid = (m[1], m[2]) if m[1] else (m[3], m[4])
            found.append((os.path.join(parent, name), kind, int(pid)))
    return found


def recover_stale(dst: str) -> None:
    """Clear what killed runs (dead PIDs) left beside dst, one warning line each.

    Partial outputs and temporary files are removed. `.NAME.old-PID` is the previous complete output
    that a run moved aside just before renaming its new one into place: with NAME missing it is put
    back (the newest, if several), otherwise it is removed.
    """
    dst = os.path.abspath(dst)
    olds = []
    for path, kind, pid in _leftovers(dst):
        if path in _ACTIVE or (pid != os.getpid() and pid_alive(pid)):
            continue
        if kind == "old":
            olds.append(path)
            continue
        _remove(path)
        warn(f"removed {path}, left by an interrupted run (process {pid})")
    for path in sorted(olds, key=lambda p: os.lstat(p).st_mtime_ns, reverse=True):
        if not os.path.lexists(dst):
            try:
                os.rename(path, dst)
            except OSError as e:
                raise GlmjaxError(f"cannot restore {dst} from {path}, the previous output an interrupted run "
                                  f"moved aside ({e.strerror}); move it back by hand") from None
            warn(f"restored {dst} from {path}: an interrupted run had moved it aside before replacing it")
        else:
            _remove(path)
            warn(f"removed {path}, the previous output an interrupted run had already replaced")


def _check_dir_destination(dst: str, overwrite: bool) -> None:
    if os.path.islink(dst) and not os.path.exists(dst):
        raise GlmjaxError(f"output {dst} is a dangling symbolic link (to {os.readlink(dst)})")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise GlmjaxError(f"output {dst} exists and is not a directory")
    if os.path.exists(dst) and not overwrite:
        raise GlmjaxError(f"output {dst} exists; pass --overwrite to replace it")


def _probe_writable(directory: str, dst: str) -> None:
    """Create and delete a temporary in `directory`: the one sure test (root passes os.access on /proc)."""
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(dst)}.tmp-{os.getpid()}-")
    except OSError as e:
        raise GlmjaxError(f"cannot write output {dst}: cannot create files in {directory} ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def check_output(path: str, *, directory: bool = False, overwrite: bool = False) -> str:
    """Refuse, in one line and before any work, a destination no write could succeed on; returns it
    absolute. A directory output (atomic_dir) may have missing parents and first has the leftovers of
    killed runs cleared (recover_stale); a file output (atomic_file) needs its directory to exist.
    """
    if not path:
        raise GlmjaxError("empty output path")
    from glmjax import storage

    if storage.is_url(path):
        raise GlmjaxError(f"output {path}: this command writes to local disk (training runs write to buckets); "
                          "write here, then copy it (e.g. gcloud storage cp -r)")
    dst = storage.normalize(path)  # absolute; a file:// URL is its path
    if directory:
        recover_stale(dst)
        _check_dir_destination(dst, overwrite)
    elif os.path.islink(dst) and not os.path.exists(dst):
        raise GlmjaxError(f"output {dst} is a dangling symbolic link (to {os.readlink(dst)})")
    elif os.path.isdir(dst):
        raise GlmjaxError(f"output {dst} is a directory; give a file name")
    parent = ancestor = os.path.dirname(dst)
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise GlmjaxError(f"cannot write output {dst}: {ancestor} is not a directory")
    if ancestor != parent and not directory:
        raise GlmjaxError(f"output directory does not exist: {parent}")
    _probe_writable(ancestor, dst)
    return dst


def _file_mode() -> int:
    """Permissions an ordinary open() would give a new file (mkstemp makes 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w", encoding: str = "utf-8") -> Iterator[IO]:
    """An open temporary beside `path` to write; renamed over `path` only when the block completes.

    The temporary comes from mkstemp (an unpredictable name created with O_EXCL, so a planted file or
    symbolic link is never written through); on any failure or interrupt it is removed.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes text ('w') or bytes ('wb'), not {mode!r}")
    dst = os.path.abspath(path)
    parent, base = os.path.split(dst)
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{base}.tmp-{os.getpid()}-")
    except OSError as e:
        raise GlmjaxError(f"cannot write output {dst}: {e.strerror}") from None
    _ACTIVE.add(tmp)
    try:
        with os.fdopen(fd, mode, encoding=None if mode == "wb" else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        _ACTIVE.discard(tmp)


def _make_parents(parent: str) -> list[str]:
    """os.makedirs(parent); returns the directories it created, deepest first (to undo on failure)."""
    made, p = [], parent
    while not os.path.lexists(p):
        made.append(p)
        p = os.path.dirname(p)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise GlmjaxError(f"cannot create directory {parent}: {e.strerror}") from None
    return made


def _undo_parents(made: list[str]) -> None:
    for d in made:
        with contextlib.suppress(OSError):
            os.rmdir(d)


@contextlib.contextmanager
def atomic_dir(dst: str, overwrite: bool) -> Iterator[str]:
    """A temporary sibling of dst to write into; renamed to dst only when the block completes.

    An existing dst is refused unless overwrite, and then replaced only after the new one is
    complete. On any failure or interrupt the temporary (and any parent directory made for it) is
    removed, so no half-written directory ever carries the output's name; what a killed run left is
    cleared first (recover_stale).
    """
    dst = os.path.abspath(dst)
    recover_stale(dst)
    _check_dir_destination(dst, overwrite)
    parent, base = os.path.split(dst)
    made = _make_parents(parent)
    tmp, old = (os.path.join(parent, f".{base}.{kind}-{os.getpid()}") for kind in ("partial", "old"))
    if tmp in _ACTIVE:
        raise GlmjaxError(f"output {dst} is being written by this process already")
    _ACTIVE.update((tmp, old))
    try:
        _remove(tmp)
        try:
            os.mkdir(tmp)
        except OSError as e:
            raise GlmjaxError(f"cannot create {tmp}: {e.strerror}") from None
        try:
            yield tmp
        except BaseException:
            _remove(tmp)
            raise
        _replace_dir(tmp, dst, old)
    except BaseException:
        _undo_parents(made)
        raise
    finally:
        _ACTIVE.difference_update((tmp, old))


def _replace_dir(tmp: str, dst: str, old: str) -> None:
    """Rename tmp to dst; an existing dst is first moved to `old` and deleted only afterwards."""
    moved = os.path.lexists(dst)
    if moved:
        _remove(old)
        os.rename(dst, old)
    os.rename(tmp, dst)
    if moved:
        _remove(old)
