"""The README's commands run as written: every `glmjax` command line parses with the CLI, every `make`
line expands (make -n) to CLI commands that parse, and the ones a CPU runs in seconds -- `info` and
the tokenizer/data chain -- run for real."""
import os
import re
import shlex
import subprocess
import sys

import pytest
from helpers import bilingual_lines

from glmjax.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands() -> list[str]:
    """Command lines of the README's bash blocks: continuations joined, comments dropped."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def glmjax_argv(line: str) -> list[str]:
    """The arguments after `glmjax` (optional `[--flag ...]` groups of the synopsis left out)."""
    line = re.sub(r"\[--[^\]]*\]", "", line.split("|")[-1] if "| " in line else line)
    words = shlex.split(line)
    return words[words.index(next(w for w in words if w.endswith("glmjax"))) + 1:]


COMMANDS = readme_commands()
GLMJAX = [c for c in COMMANDS if re.search(r"(^|\s)\S*glmjax\s", c)]
MAKE = [c for c in COMMANDS if c.startswith("make ")]


def test_the_readme_has_its_commands():
    assert len(GLMJAX) >= 15 and len(MAKE) >= 6
    assert {"make demo", "make test"} <= set(MAKE)


@pytest.mark.parametrize("line", GLMJAX)
def test_every_glmjax_command_parses(line):
    build_parser().parse_args(glmjax_argv(line))


@pytest.mark.parametrize("line", MAKE)
def test_every_make_line_expands_to_commands_that_parse(line):
    r = subprocess.run(["make", "-n", *shlex.split(line)[1:]], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, CPU_MESH="8"))
    assert r.returncode == 0, r.stderr
    for cmd in r.stdout.replace("\\\n", " ").splitlines():
        if " -m glmjax " in cmd:
            build_parser().parse_args(shlex.split(cmd.split(" -m glmjax ", 1)[1]))


def run(line: str, cwd, stdin: str | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "glmjax", *glmjax_argv(line)]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run(argv, cwd=cwd, input=stdin, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, (line, r.stderr[-1500:])
    return r


def test_the_info_commands_run(tmp_path):
    info = [c for c in GLMJAX if " info " in c]
    assert len(info) >= 3
    for line in info:
        assert "parameters:" in run(line, ROOT).stdout


@pytest.mark.slow
def test_the_tokenizer_and_data_chain_runs_as_written(tmp_path):
    """The README's tokenizer/data block in a scratch directory holding corpus/ and tasks/."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "tasks").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("\n\n".join(bilingual_lines(1500, 11)) + "\n", encoding="utf-8")
    (tmp_path / "corpus" / "b.jsonl").write_text('{"text": "A list is a mutable sequence."}\n', encoding="utf-8")
    (tmp_path / "tasks" / "t.jsonl").write_text('{"input": "2 + 2 =", "target": "4"}\n', encoding="utf-8")
    os.symlink(os.path.join(ROOT, "experiments"), tmp_path / "experiments")
    chain = [c for c in GLMJAX if " tokenizer " in c or " data " in c]
    assert [glmjax_argv(c)[:2] for c in chain] == [["tokenizer", "train"], ["tokenizer", "encode"],
                                                  ["data", "prepare"], ["data", "inspect"]]
    for line in chain:
        stdin = re.match(r'echo "([^"]*)" \|', line)
        out = run(line, tmp_path, stdin[1] + "\n" if stdin else None).stdout
        if "encode" in line:
            assert len(out.split()) >= 3
    assert (tmp_path / "seqs.npz").exists() and (tmp_path / "data" / "manifest.json").exists()


def test_model_targets_simulate_cpu_devices_only_when_asked_or_without_an_accelerator():
    def train_line(*args):
        r = subprocess.run(["make", "-n", "train", *args], cwd=ROOT, capture_output=True, text=True)
        return next(x for x in r.stdout.splitlines() if " -m glmjax train " in x)

    assert train_line("CPU_MESH=4").startswith("XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu")
    assert train_line("CPU_MESH=").startswith(".venv/bin/python -m glmjax train")
    has_accelerator = any(os.path.exists(p) for p in ("/dev/nvidia0", "/dev/accel0")) or \
        any(n.isdigit() for n in (os.listdir("/dev/vfio") if os.path.isdir("/dev/vfio") else []))
    assert ("XLA_FLAGS" in train_line()) != has_accelerator
    forward = subprocess.run(["make", "-n", "forward", "CHECKPOINT=c", "INPUTS=i", "OUTPUT=o"], cwd=ROOT,
                             capture_output=True, text=True).stdout
    assert "--config" not in forward and "--tp" not in forward  # no default leaks in from convert's targets
