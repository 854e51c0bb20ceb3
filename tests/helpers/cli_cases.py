"""Run many `glmjax` command lines in one process (jax is imported once): `python cli_cases.py ROOT`
reads a JSON list of cases {"name", "argv", "stdin" (text or null), "stdin_bytes" (hex or null),
"cwd"} from stdin and prints one JSON object per case: its exit status, stderr lines, whether a
traceback was printed, and the files under ROOT that the case created, changed or removed."""
import contextlib
import io
import json
import os
import sys
import traceback

from glmjax.cli import main


def snapshot(root: str) -> dict[str, tuple[int, int]]:
    """path -> (size, mtime_ns) of every file and directory under root (symlinks not followed)."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            st = os.lstat(p)
            out[p] = (st.st_size if not os.path.isdir(p) else 0, st.st_mtime_ns if not os.path.isdir(p) else 0)
    return out


def run_case(case: dict, root: str) -> dict:
    before = snapshot(root)
    out, err = io.StringIO(), io.StringIO()
    raw = bytes.fromhex(case["stdin_bytes"]) if case.get("stdin_bytes") else (case.get("stdin") or "").encode()
    old_stdin, old_cwd = sys.stdin, os.getcwd()
    sys.stdin = io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8")
    os.chdir(case.get("cwd") or root)
    traced = False
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(case["argv"])
            except SystemExit as e:  # argparse
                rc = e.code
            except BaseException:  # an uncaught exception is a defect: record its traceback
                traceback.print_exc()
                rc, traced = 1, True
    finally:
        sys.stdin, _ = old_stdin, os.chdir(old_cwd)
    after = snapshot(root)
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    text = err.getvalue()
    return {"name": case["name"], "rc": rc, "stderr": text.splitlines(), "traceback": traced or "Traceback" in text,
            "changed": [os.path.relpath(p, root) for p in changed]}


if __name__ == "__main__":
    root = sys.argv[1]
    for case in json.load(sys.stdin):
        print(json.dumps(run_case(case, root)), flush=True)
