"""`glmjax launch`: run any glmjax command as one job of several processes, and watch over it.

Local (`--processes N`): N processes on this machine form one distributed job exactly as the hosts
of a pod do -- a coordinator on 127.0.0.1 only, each process with `--devices-per-process` simulated
CPU devices when given -- for tests and for trying the pod path on a laptop. On a pod or cluster
(no `--processes`): one process on this host, joining the job from the cluster's own environment
(TPU VM metadata, SLURM variables) or from GLMJAX_COORDINATOR, GLMJAX_NUM_PROCESSES and
GLMJAX_PROCESS_ID when they are set; the same command line runs on every host.

The launcher passes process 0's output through unchanged, prefixes the others' with
`[process i]`, prints a `glmjax:` line shared by all processes once, and when one process dies
ends the others at once and says so in one line (a dead host otherwise stops its peers only after
the heartbeat timeout, with a C++ stack dump, which it folds into that line).
"""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO

from glmjax.errors import InputError
from glmjax.parallel.distributed import HEARTBEAT_TIMEOUT_S

# environment of each launched process, read by glmjax.cli (the one place that reads it)
ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "GLMJAX_COORDINATOR", "GLMJAX_NUM_PROCESSES", "GLMJAX_PROCESS_ID"
ENV_HEARTBEAT, ENV_CLUSTER = "GLMJAX_HEARTBEAT_TIMEOUT", "GLMJAX_DISTRIBUTED"
# jax's coordination-service log lines and the abort dump that follows them when a peer is lost
_COORDINATION_LOG = re.compile(r"^[EF]\d{4} .*(coordination_service|client\.h|coordination)")
_PEER_LOST = "Terminating process because the JAX distributed service detected fatal errors"
PEER_DIED_LINE = "glmjax: error: another process of the job died"  # glmjax.cli's line for a lost peer


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """processes None: one process joining the cluster's job (pod / SLURM)."""

    command: tuple[str, ...]
    processes: int | None = None
    devices_per_process: int | None = None
    port: int | None = None
    heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(lc: LaunchConfig, index: int, port: int, base: dict[str, str]) -> dict[str, str]:
    """The environment of process `index`: how it joins the job, and its simulated devices."""
    env = dict(base, PYTHONUNBUFFERED="1", **{ENV_HEARTBEAT: str(lc.heartbeat_timeout_s)})
    if lc.processes is None:  # a host of a bigger job: as the environment says, else the cluster's
        if not env.get(ENV_COORDINATOR):
            env[ENV_CLUSTER] = "1"
    else:
        env.update({ENV_COORDINATOR: f"127.0.0.1:{port}", ENV_NUM_PROCESSES: str(lc.processes),
                    ENV_PROCESS_ID: str(index)})
    if lc.devices_per_process is not None:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={lc.devices_per_process}"])
        env["JAX_PLATFORMS"] = "cpu"
    return env


def _die_with_parent() -> None:
    """In a launched process (Linux): SIGKILL when the launcher dies, even by kill -9, so no orphan
    keeps the job's devices or waits on its peers."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _Job:
    """The running processes and the threads copying their output."""

    def __init__(self, lc: LaunchConfig):
        self.lc, self.n = lc, lc.processes or 1
        self.lock = threading.Lock()
        self.shared_lines: set[str] = set()
        self.said_error = [False] * self.n
        self.peer_lost = [False] * self.n
        self.ending = False
        port = lc.port or free_port()
        cmd = [sys.executable, "-m", "glmjax", *lc.command]
        # own sessions: a Ctrl-C reaches the launcher alone, which passes it on as SIGTERM
        self.procs = [subprocess.Popen(cmd, env=process_env(lc, i, port, dict(os.environ)), stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                       preexec_fn=_die_with_parent)
                      for i in range(self.n)]
        self.threads = [threading.Thread(target=self._copy, args=(i, stream, out), daemon=True)
                        for i, p in enumerate(self.procs)
                        for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr))]
        for t in self.threads:
            t.start()

    def _copy(self, i: int, stream: IO[bytes], out: IO[str]) -> None:
        folding = False  # inside jax's coordination error and abort dump: folded into the launcher's line
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace")
            if out is sys.stderr:
                if _COORDINATION_LOG.match(line):
                    folding = True
                if _PEER_LOST in line:
                    self.peer_lost[i] = True
                if folding and not line.startswith("glmjax:"):
                    continue
                folding = False
            if "peer ranks" in line:  # gloo's connection chatter on CPU jobs
                continue
            self._write(i, line, out)

    def _write(self, i: int, line: str, out: IO[str]) -> None:
        with self.lock:
            if self.ending and i != 0 and not line.startswith("glmjax:"):
                return  # the others' noise while they are being ended
            if line.startswith(PEER_DIED_LINE):  # a consequence: the launcher names the cause at the end
                self.peer_lost[i] = True
                return
            if line.startswith("glmjax:"):  # every process says the same: print it once
                self.said_error[i] |= line.startswith("glmjax: error:")
                if line in self.shared_lines:
                    return
                self.shared_lines.add(line)
            elif i:
                line = f"[process {i}] {line}"
            out.write(line)
            out.flush()

    def signal_all(self, sig: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass

    def finish(self) -> int:
        for p in self.procs:
            p.wait()
        for t in self.threads:
            t.join(timeout=5)
        return 0


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def run(lc: LaunchConfig) -> int:
    """Start the job and wait for it. The first process to fail ends the others (SIGKILL: without it
    they would wait for the dead one until the heartbeat timeout); SIGINT/SIGTERM to the launcher go
    to every process as SIGTERM (training then saves a checkpoint and stops), a second one as
    SIGKILL; returns the job's exit status."""
    if not lc.command:
        raise InputError("launch needs a glmjax command after `--`, e.g. `glmjax launch --processes 2 -- train x.yaml`")
    if lc.processes is not None and lc.processes < 1:
        raise InputError(f"--processes must be >= 1, got {lc.processes}")
    if lc.devices_per_process is not None and lc.devices_per_process < 1:
        raise InputError(f"--devices-per-process must be >= 1, got {lc.devices_per_process}")
    if lc.heartbeat_timeout_s < 1:
        raise InputError(f"--heartbeat-timeout must be >= 1 second, got {lc.heartbeat_timeout_s}")
    if lc.command[0] == "launch":
        raise InputError("launch cannot launch itself")
    job = _Job(lc)
    received = []

    def forward(signum, frame):  # the first signal asks for a checkpoint and a stop; a second insists
        received.append(signum)
        job.signal_all(signal.SIGTERM if len(received) == 1 else signal.SIGKILL)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _watch(job)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _watch(job: _Job) -> int:
    """Poll until every process has ended, or one fails; then end the rest and name the cause: the
    first process that failed on its own (not one that only lost a peer, nor one ended here)."""
    while True:
        codes = [p.poll() for p in job.procs]
        if any(c not in (None, 0) for c in codes):
            break
        if all(c is not None for c in codes):
            return job.finish()
        time.sleep(0.1)
    with job.lock:
        job.ending = True
    ended_here = {i for i, c in enumerate(codes) if c is None}
    job.signal_all(signal.SIGKILL)
    job.finish()
    codes = [p.returncode for p in job.procs]
    failed = [i for i, c in enumerate(codes) if c != 0 and i not in ended_here]
    cause = next((i for i in failed if not job.peer_lost[i]), failed[0])
    code = codes[cause]
    if not job.said_error[cause]:
        who = f"process {cause} of {job.n}" if job.lc.processes else "this host's process"
        what = ("another process of the job died (its peers stopped hearing from it)" if job.peer_lost[cause]
                else f"{who} {_describe(code)}")
        others = "; the other processes were stopped" if job.n > 1 else ""
        print(f"glmjax: error: launch: {what}{others}; a training run resumes from its last checkpoint",
              file=sys.stderr, flush=True)
    return 128 - code if code < 0 else code


def main(argv: Sequence[str], processes: int | None, devices_per_process: int | None, port: int | None,
         heartbeat_timeout_s: int) -> int:
    """The CLI's entry: `argv` is the glmjax command after `--`."""
    command = tuple(argv[1:] if argv and argv[0] == "--" else argv)
    return run(LaunchConfig(command, processes, devices_per_process, port, heartbeat_timeout_s))
