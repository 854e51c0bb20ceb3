"""Several processes as one job, on this machine exactly as the hosts of a pod (`glmjax launch`: a
coordinator on 127.0.0.1, 4 simulated CPU devices per process, collectives over gloo): training,
forward, generation and convert --verify give the single-process results; checkpoints cross
process counts and meshes; a killed process ends the job in bounded time with one line and the
job resumes from its last committed checkpoint. Every job is bounded by a timeout."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import bilingual_lines, prepared_corpus, tiny_experiment

from glmjax import checkpoint
from glmjax.cli import main
from glmjax.parallel.mesh import make_mesh

JOB_TIMEOUT = 240  # seconds for any one job of this file (they take 10-40 s here)
MESH = "data=2,fsdp=2,tensor=2"  # the batch axes span the two processes


def launch(*argv, processes=2, timeout=JOB_TIMEOUT, env=None):
    """`glmjax launch --processes N --devices-per-process 8/N -- argv`, waited for."""
    cmd = [sys.executable, "-m", "glmjax", "launch", "--processes", str(processes),
           "--devices-per-process", str(8 // processes), "--heartbeat-timeout", "10", "--", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def losses(run_dir):
    """step -> loss of the last record of each step in metrics.jsonl (a resumed run replaces lines)."""
    out = {}
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        rec = json.loads(line)
        if "event" not in rec:
            out[rec["step"]] = rec["loss"]
    return out


def params_of(run_dir, step):
    _, params = checkpoint.load_params("run", str(run_dir), None, make_mesh(None), step=step)
    return {"/".join(str(k) for k in path): np.asarray(v) for path, v in
            __import__("jax").tree_util.tree_flatten_with_path(params)[0]}


def assert_losses_match(got, want, steps):
    # one float32 ulp (~5e-7 at a loss of 6): gloo sums the cross-process reductions in another order
    for s in steps:
        assert abs(got[s] - want[s]) <= 1e-6 * abs(want[s]), (s, got[s], want[s])


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A corpus, an experiment, and the reference: one process on 8 devices, 12 steps, every 2 saved."""
    d = tmp_path_factory.mktemp("multiprocess")
    tok = prepared_corpus(d, bilingual_lines(300, 3), 600, layout="compact")
    exp = tiny_experiment(d / "exp.yaml", d / "data", d / "one", tok.vocab_size, steps=12, every=2, mesh=MESH,
                          extra="  keep: 10\n")
    assert main(["train", exp]) == 0
    return d, exp


def copy_until(src, dst, step):
    """A copy of run directory `src` holding only its checkpoints up to `step`."""
    shutil.copytree(src, dst)
    for name in os.listdir(dst):
        if name.isdigit() and int(name) > step:
            shutil.rmtree(os.path.join(dst, name))


def _children(pid):
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(p))
            except (OSError, IndexError, ValueError):
                pass
    return sorted(out)


def test_two_processes_train_like_one_and_resume_after_kill(job):
    """2 processes x 4 devices train as 1 x 8 on the same mesh; kill -9 of one mid-run ends the job in
    bounded time with one line; the job restarted resumes from the last committed checkpoint."""
    d, exp = job
    run = d / "two"
    cmd = [sys.executable, "-m", "glmjax", "launch", "--processes", "2", "--devices-per-process", "4", "--",
           "train", exp, f"train.checkpoint_dir={run}", "train.steps=6"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + JOB_TIMEOUT
    while not (os.path.isdir(run / "4") and os.path.isfile(run / "metrics.jsonl")
               and 5 in losses(run)) and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    assert p.poll() is None, p.communicate()
    victim = _children(p.pid)[-1]
    os.kill(victim, signal.SIGKILL)
    t0 = time.time()
    out, err = p.communicate(timeout=60)
    assert time.time() - t0 < 30, "the job outlived a dead process"
    assert p.returncode == 128 + signal.SIGKILL
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("glmjax: error: launch: process ") and "SIGKILL" in errors[0], err
    # each process built only its rows, together the whole micro-batch of 8
    assert "process 0 of 2: builds rows [0, 4) of each micro-batch of 8" in out
    assert "[process 1] process 1 of 2: builds rows [4, 8) of each micro-batch of 8" in out
    committed = max(int(n) for n in os.listdir(run) if n.isdigit())
    assert committed >= 4
    r = launch("train", exp, f"train.checkpoint_dir={run}", "train.steps=6")
    assert r.returncode == 0, r.stderr
    assert f"resumed from {run} step {committed}" in r.stdout
    one = losses(d / "one")
    assert_losses_match(losses(run), one, range(1, 7))
    want, got = params_of(d / "one", 6), params_of(run, 6)
    # Not bitwise: the losses differ in the last float32 bit, and Adam's m / sqrt(v) turns that into
    # parameter differences of up to 4e-6 (measured) where a gradient is near zero -- a small part of
    # one step's largest change (the learning rate, 1e-2)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-5)


def test_checkpoints_cross_process_counts_and_meshes_and_sigterm_stops_every_process(job):
    """Step 4 of the 1-process run continues in 2 processes on another mesh. A 2-process run sent
    SIGTERM (a preemption) stops every process at the same step with a checkpoint, which continues
    in 1 process on another mesh. Both reach the reference's losses."""
    d, exp = job
    one = losses(d / "one")
    copy_until(d / "one", d / "one-then-two", 4)
    r = launch("train", exp, f"train.checkpoint_dir={d / 'one-then-two'}", "train.steps=6",
               "train.mesh=data=2,tensor=4")
    assert r.returncode == 0, r.stderr
    assert f"resumed from {d / 'one-then-two'} step 4" in r.stdout
    assert_losses_match(losses(d / "one-then-two"), one, (5, 6))

    run = d / "two-stopped"
    p = subprocess.Popen([sys.executable, "-m", "glmjax", "launch", "--processes", "2", "--devices-per-process", "4",
                          "--", "train", exp, f"train.checkpoint_dir={run}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + JOB_TIMEOUT
    while not (os.path.isfile(run / "metrics.jsonl") and 2 in losses(run)) and time.time() < deadline:
        assert p.poll() is None, p.communicate()
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=JOB_TIMEOUT)
    assert p.returncode == 0, err
    stopped = int(out.split("stopped by signal at step ")[1].split(";")[0])
    assert 2 <= stopped < 12 and max(int(n) for n in os.listdir(run) if n.isdigit()) == stopped
    assert main(["train", exp, f"train.checkpoint_dir={run}", "train.mesh=data=4,tensor=2"]) == 0
    assert_losses_match(losses(run), one, range(1, 13))


def test_forward_generate_and_convert_in_two_processes(job, tmp_path):
    d, exp = job
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 500, (4, 32)).astype(np.int32)
    np.savez(tmp_path / "in.npz", tokens=tokens, position_ids=np.tile(np.arange(32, dtype=np.int32), (4, 1)),
             prefix_mask=np.tile(np.arange(32) < 8, (4, 1)))
    common = ["--checkpoint", str(d / "one"), "--mesh", "data=2,tensor=4"]
    assert main(["forward", *common, "--inputs", str(tmp_path / "in.npz"), "--output", str(tmp_path / "f1.npz")]) == 0
    r = launch("forward", *common, "--inputs", str(tmp_path / "in.npz"), "--output", str(tmp_path / "f2.npz"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("wrote ") == 1  # process 0 alone writes and reports
    want, got = np.load(tmp_path / "f1.npz")["logits"], np.load(tmp_path / "f2.npz")["logits"]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()

    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                                                    ("the cat [MASK] on", "hello", "abc [gMASK]")))
    gen = ["generate", *common, "--input-file", str(tmp_path / "prompts.jsonl"), "--max-new-tokens", "6"]
    assert main([*gen, "--output", str(tmp_path / "g1.jsonl")]) == 0
    r = launch(*gen, "--output", str(tmp_path / "g2.jsonl"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "g2.jsonl").read_text() == (tmp_path / "g1.jsonl").read_text()

    r = launch("convert", "--from", f"run:{d / 'one'}", "--to", f"orbax:{tmp_path / 'conv'}", "--verify",
               "--verify-tokens", "48", "--mesh", "data=2,tensor=4")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("wrote ") == 1 and r.stdout.count(": OK") == 1, r.stdout
    assert checkpoint.detect_format(str(tmp_path / "conv")) == "orbax"


def test_a_host_of_a_pod_stops_when_another_dies(job):
    """Two launchers as two hosts (one process each, the job from GLMJAX_* variables, as on a pod):
    kill -9 of one host's process; the other host's launcher ends within the heartbeat timeout
    with one line, not a hang or a stack dump."""
    d, exp = job
    port = __import__("glmjax.launch", fromlist=["free_port"]).free_port()
    hosts = []
    for i in range(2):
        env = dict(os.environ, GLMJAX_COORDINATOR=f"127.0.0.1:{port}", GLMJAX_NUM_PROCESSES="2",
                   GLMJAX_PROCESS_ID=str(i), XLA_FLAGS="--xla_force_host_platform_device_count=4")
        hosts.append(subprocess.Popen([sys.executable, "-m", "glmjax", "launch", "--heartbeat-timeout", "5", "--",
                                       "train", exp, f"train.checkpoint_dir={d / 'pod'}", "train.steps=1000"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    deadline = time.time() + JOB_TIMEOUT
    while not (os.path.isfile(d / "pod" / "metrics.jsonl") and losses(d / "pod")) and time.time() < deadline:
        assert all(h.poll() is None for h in hosts), [h.communicate() for h in hosts]
        time.sleep(0.2)
    os.kill(_children(hosts[1].pid)[0], signal.SIGKILL)
    t0 = time.time()
    _, err = hosts[0].communicate(timeout=60)
    hosts[1].communicate(timeout=60)
    assert time.time() - t0 < 5 + 20, "the surviving host outlived the heartbeat timeout"
    assert hosts[0].returncode != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [next(line for line in lines if line.startswith("glmjax: error:"))], err
    assert "another process of the job died" in lines[0]


def test_each_launched_process_is_told_how_to_join():
    from glmjax.launch import LaunchConfig, process_env

    local = LaunchConfig(("train", "x.yaml"), processes=2, devices_per_process=4, heartbeat_timeout_s=7)
    env = process_env(local, 1, 1234, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_foo"})
    assert env["GLMJAX_COORDINATOR"] == "127.0.0.1:1234" and env["GLMJAX_PROCESS_ID"] == "1"
    assert env["GLMJAX_NUM_PROCESSES"] == "2" and env["GLMJAX_HEARTBEAT_TIMEOUT"] == "7"
    assert env["XLA_FLAGS"] == "--xla_foo --xla_force_host_platform_device_count=4" and env["JAX_PLATFORMS"] == "cpu"
    pod = process_env(LaunchConfig(("train", "x.yaml")), 0, 1234, {})
    assert pod["GLMJAX_DISTRIBUTED"] == "1" and "GLMJAX_COORDINATOR" not in pod and "XLA_FLAGS" not in pod
    given = {"GLMJAX_COORDINATOR": "10.0.0.1:8476", "GLMJAX_NUM_PROCESSES": "4", "GLMJAX_PROCESS_ID": "3"}
    host = process_env(LaunchConfig(("train", "x.yaml")), 0, 1234, given)
    assert {k: host[k] for k in given} == given and "GLMJAX_DISTRIBUTED" not in host


@pytest.mark.parametrize("argv, message", [
    (["launch", "--processes", "2"], "launch needs a glmjax command after `--`"),
    (["launch", "--processes", "0", "--", "info", "--preset", "glm-test"], "--processes must be >= 1"),
    (["launch", "--", "launch", "--", "info"], "launch cannot launch itself"),
    (["launch", "--heartbeat-timeout", "0", "--", "info", "--preset", "glm-test"], "--heartbeat-timeout must be"),
])
def test_launch_bad_input_is_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("glmjax: error: ") and message in err[0]
