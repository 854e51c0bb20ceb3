"""The launch targets of the Makefile (tpu-*, slurm-train) and tools/slurm/: DRY_RUN=1 prints exactly
the commands a real run executes (checked against stand-ins for gcloud, sbatch and git that record
their arguments), the remote train command survives two shells with its overrides intact, each SLURM
process gets its GPUs, and a missing variable is one `glmjax: error:` line."""
import configparser
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from importlib.metadata import version

import pytest

from glmjax.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the Makefile's launch variables: none may leak in from the environment running the tests
LAUNCH_VARS = """TPU_NAME ZONE PROJECT ACCELERATOR_TYPE RUNTIME_VERSION TPU_CREATE_FLAGS EXPERIMENT TPU_DIR TPU_LOG
TPU_PID TPU_PYTHON GIT_REF TPU_ARCHIVE WORKER NODES GPUS_PER_NODE PROCESSES_PER_NODE PARTITION ACCOUNT
TIME_LIMIT SLURM_FLAGS ARGS DRY_RUN VENV JAX_LOCAL_DEVICE_IDS CUDA_VISIBLE_DEVICES GLMJAX_PYTHON""".split()
POD = ["TPU_NAME=glm-pod", "ZONE=us-central2-b"]
AT = "glm-pod --zone=us-central2-b"
TPU_EXP = "experiments/glm-130b-pretrain-tpuv4.yaml"
GPU_EXP = "experiments/glm-130b-pretrain-a100.yaml"
# overrides as a user types them for ARGS: shell words with a space and a quote inside values
ARGS = """ARGS=train.steps=10 "data.path=/data/my corpus" "train.checkpoint_dir=gs://b/it's\""""
ARGV = ["train.steps=10", "data.path=/data/my corpus", "train.checkpoint_dir=gs://b/it's"]

FAKE = """#!{python}
# a stand-in for {name}: records its arguments; gcloud with FAKE_WORKER=1 also runs --command as a
# worker would, in $HOME
import json, os, subprocess, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(["{name}", *sys.argv[1:]]) + "\\n")
for a in sys.argv[1:]:
    if a.startswith("--command=") and os.environ.get("FAKE_WORKER") == "1":
        sys.exit(subprocess.run(["bash", "-c", a[len("--command="):]], cwd=os.environ["HOME"]).returncode)
"""
# a stand-in for the worker's .venv/bin/glmjax: writes its arguments, then runs
# until SIGTERM
FAKE_GLMJAX = """#!/bin/bash
trap 'echo stopped by SIGTERM; exit 0' TERM
printf '%s\\n' "$@" > "$HOME/argv.tmp"
mv "$HOME/argv.tmp" "$HOME/argv"
echo training
for i in $(seq 600); do sleep 0.05; done
"""


@pytest.fixture
def fakes(tmp_path):
    """A PATH whose gcloud, sbatch and git only record their calls, and a scratch HOME."""
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    bin_dir.mkdir()
    home.mkdir()
    for name in ("gcloud", "sbatch", "git"):
        (bin_dir / name).write_text(FAKE.format(python=sys.executable, name=name))
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith(("MAKE", "MFLAGS"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", HOME=str(home), FAKE_LOG=str(tmp_path / "calls"))
    return env


def calls(env) -> list[list[str]]:
    path = env["FAKE_LOG"]
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def make(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def dry(env, *args: str) -> list[str]:
    """The lines `make ... DRY_RUN=1` prints; it succeeds and calls nothing."""
    r = make(env, *args, "DRY_RUN=1")
    assert r.returncode == 0, r.stderr
    assert calls(env) == [], "a dry run ran a command"
    return r.stdout.splitlines()


def remote(line: str) -> str:
    """The command a worker's shell gets from one printed gcloud ssh line."""
    return next(w for w in shlex.split(line) if w.startswith("--command="))[len("--command="):]


def test_tpu_create_prints_the_gcloud_create_command_with_type_and_runtime(fakes):
    assert dry(fakes, "tpu-create", *POD) == [
        f"gcloud compute tpus tpu-vm create {AT} --accelerator-type=v4-8 --version=tpu-ubuntu2204-base"]
    assert dry(fakes, "tpu-create", *POD, "ACCELERATOR_TYPE=v5p-64", "RUNTIME_VERSION=v2-alpha-tpuv5",
               "PROJECT=my-proj", "TPU_CREATE_FLAGS=--spot") == [
        "gcloud compute tpus tpu-vm create glm-pod --zone=us-central2-b --project=my-proj "
        "--accelerator-type=v5p-64 --version=v2-alpha-tpuv5 --spot"]


def test_tpu_setup_ships_the_commit_and_installs_the_tpu_extra_on_every_worker(fakes):
    pack, copy, install = dry(fakes, "tpu-setup", *POD)
    assert pack == "git archive --format=tar.gz -o /tmp/glmjax-src.tar.gz HEAD"
    assert copy == ("gcloud compute tpus tpu-vm scp /tmp/glmjax-src.tar.gz glm-pod:glmjax-src.tar.gz"
                    " --zone=us-central2-b --worker=all")
    assert install.startswith(f"gcloud compute tpus tpu-vm ssh {AT} --worker=all --command='")
    assert remote(install) == (
        "mkdir -p glmjax && tar -xzf glmjax-src.tar.gz -C glmjax && cd glmjax"
        ' && (python3.11 -c "import ensurepip" 2>/dev/null || (sudo apt-get -o DPkg::Lock::Timeout=600 update -qq'
        " && sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq python3.11 python3.11-venv))"
        " && python3.11 -m venv .venv && .venv/bin/pip install --quiet --upgrade pip"
        ' && .venv/bin/pip install --quiet -e ".[tpu]"')
    assert dry(fakes, "tpu-setup", *POD, "GIT_REF=v1.0")[0].endswith(" v1.0")


def test_tpu_train_runs_glmjax_train_with_the_experiment_and_overrides_on_every_worker(fakes):
    (line,) = dry(fakes, "tpu-train", *POD, f"EXPERIMENT={TPU_EXP}", ARGS)
    assert line.startswith(f"gcloud compute tpus tpu-vm ssh {AT} --worker=all --command='")
    assert remote(line) == (
        f"cd glmjax && {{ setsid nohup .venv/bin/glmjax launch -- train {TPU_EXP} train.steps=10"
        """ "data.path=/data/my corpus" "train.checkpoint_dir=gs://b/it's\""""
        " >> ~/glmjax-train.log 2>&1 < /dev/null & echo $! > ~/glmjax-train.pid; }")
    # the worker's shell splits the overrides back into the words typed, and the CLI takes them
    words = shlex.split(remote(line).split(">>")[0].split("{", 1)[1])
    assert words[words.index(".venv/bin/glmjax") + 1:] == ["launch", "--", "train", TPU_EXP, *ARGV]
    build_parser().parse_args(words[words.index(".venv/bin/glmjax") + 1:])


def test_tpu_train_on_a_worker_starts_a_detached_logged_run_that_tpu_stop_ends(fakes):
    """gcloud's stand-in runs the remote commands in a local shell, as one worker of the pod would."""
    home = fakes["HOME"]
    glmjax = os.path.join(home, "glmjax", ".venv", "bin", "glmjax")
    os.makedirs(os.path.dirname(glmjax))
    open(glmjax, "w").write(FAKE_GLMJAX)
    os.chmod(glmjax, 0o755)
    env = dict(fakes, FAKE_WORKER="1")
    printed = dry(fakes, "tpu-train", *POD, f"EXPERIMENT={TPU_EXP}", ARGS)
    r = make(env, "tpu-train", *POD, f"EXPERIMENT={TPU_EXP}", ARGS)
    assert r.returncode == 0, r.stderr
    assert calls(env) == [shlex.split(printed[0])]  # the printed command is the one that ran
    pid = None
    try:
        deadline = time.time() + 20
        while not os.path.exists(os.path.join(home, "argv")) and time.time() < deadline:
            time.sleep(0.05)
        pid = int(open(os.path.join(home, "glmjax-train.pid")).read())
        assert open(os.path.join(home, "argv")).read().splitlines() == [
            "launch", "--", "train", TPU_EXP, *ARGV]
    finally:
        r = make(env, "tpu-stop", *POD)
        if r.returncode and pid:
            os.kill(pid, signal.SIGKILL)
    assert r.returncode == 0, r.stderr
    deadline = time.time() + 20
    while "stopped by SIGTERM" not in open(os.path.join(home, "glmjax-train.log")).read():
        assert time.time() < deadline, "tpu-stop did not end the run"
        time.sleep(0.05)
    assert open(os.path.join(home, "glmjax-train.log")).read().splitlines() == ["training", "stopped by SIGTERM"]


def test_tpu_logs_tails_worker_0_unless_told_and_stop_and_delete_name_the_tpu(fakes):
    assert dry(fakes, "tpu-logs", *POD) == [
        f"gcloud compute tpus tpu-vm ssh {AT} --worker=0 --command='tail -n 100 -F ~/glmjax-train.log'"]
    (every,) = dry(fakes, "tpu-logs", *POD, "WORKER=all")
    assert every.startswith(f"gcloud compute tpus tpu-vm ssh {AT} --worker=all --command='tail ")
    assert dry(fakes, "tpu-stop", *POD) == [
        f"gcloud compute tpus tpu-vm ssh {AT} --worker=all --command='kill -TERM $(cat ~/glmjax-train.pid)'"]
    assert dry(fakes, "tpu-delete", *POD) == [f"gcloud compute tpus tpu-vm delete {AT}"]


@pytest.mark.parametrize("target, args", [
    ("tpu-create", POD), ("tpu-setup", POD), ("tpu-delete", POD),
    ("slurm-train", [f"EXPERIMENT={GPU_EXP}", "NODES=2", "PROCESSES_PER_NODE=8", "PARTITION=gpu", ARGS]),
])
def test_a_real_run_executes_exactly_the_printed_commands(fakes, target, args):
    printed = dry(fakes, target, *args)
    r = make(fakes, target, *args)
    assert r.returncode == 0, r.stderr
    assert calls(fakes) == [shlex.split(line) for line in printed]


def test_launch_targets_leave_the_local_venv_alone(fakes, tmp_path):
    venv = tmp_path / "venv"
    for target in ("tpu-create", "tpu-setup", "tpu-train", "tpu-logs", "tpu-stop", "tpu-delete"):
        dry(fakes, target, *POD, f"EXPERIMENT={TPU_EXP}", f"VENV={venv}")
    dry(fakes, "slurm-train", f"EXPERIMENT={GPU_EXP}", f"VENV={venv}")
    assert not venv.exists()


@pytest.mark.parametrize("target, args, missing", [
    ("tpu-create", ["ZONE=z"], "TPU_NAME"),
    ("tpu-setup", ["TPU_NAME=t"], "ZONE"),
    ("tpu-train", POD, "EXPERIMENT"),
    ("tpu-logs", [], "TPU_NAME"),
    ("tpu-stop", ["TPU_NAME=t"], "ZONE"),
    ("tpu-delete", ["ZONE=z"], "TPU_NAME"),
    ("slurm-train", [], "EXPERIMENT"),
])
def test_a_missing_variable_is_one_glmjax_error_and_nothing_runs(fakes, target, args, missing):
    for dry_run in ([], ["DRY_RUN=1"]):
        r = make(fakes, target, *args, *dry_run)
        assert r.returncode != 0 and r.stdout == ""
        (line,) = r.stderr.splitlines()
        assert f"glmjax: error: make {target} needs {missing}=" in line
    assert calls(fakes) == []


def test_bad_dry_run_values_and_a_missing_experiment_file_are_glmjax_errors(fakes):
    r = make(fakes, "tpu-create", *POD, "DRY_RUN=yes")
    assert r.returncode != 0 and "glmjax: error: DRY_RUN=yes: 1 prints the commands" in r.stderr
    r = make(fakes, "slurm-train", "EXPERIMENT=experiments/no-such.yaml", "DRY_RUN=1")
    assert r.returncode != 0 and "glmjax: error: EXPERIMENT=experiments/no-such.yaml: no such file" in r.stderr
    assert len(r.stderr.splitlines()) == 1 and calls(fakes) == []


def test_slurm_train_submits_the_sbatch_script_with_nodes_processes_and_gpus(fakes):
    assert dry(fakes, "slurm-train", f"EXPERIMENT={GPU_EXP}") == [
        f"sbatch --job-name=glmjax --nodes=1 --ntasks-per-node=1 --gres=gpu:8 tools/slurm/train.sbatch {GPU_EXP}"]
    (line,) = dry(fakes, "slurm-train", f"EXPERIMENT={GPU_EXP}", "NODES=96", "PROCESSES_PER_NODE=8",
                  "GPUS_PER_NODE=8", "PARTITION=gpu", "ACCOUNT=lab", "TIME_LIMIT=48:00:00",
                  "SLURM_FLAGS=--signal=TERM@600 --exclusive", ARGS)
    assert line == (
        "sbatch --job-name=glmjax --nodes=96 --ntasks-per-node=8 --gres=gpu:8 --partition=gpu --account=lab"
        f" --time=48:00:00 --signal=TERM@600 --exclusive tools/slurm/train.sbatch {GPU_EXP} train.steps=10"
        """ "data.path=/data/my corpus" "train.checkpoint_dir=gs://b/it's\"""")
    assert shlex.split(line)[-4:] == [GPU_EXP, *ARGV]


def script(env, name: str, *args: str, **slurm: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", f"tools/slurm/{name}", *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(env, **slurm), timeout=60)


def test_the_sbatch_script_starts_the_processes_with_srun(fakes):
    r = script(fakes, "train.sbatch", GPU_EXP, *ARGV, DRY_RUN="1", SLURM_SUBMIT_DIR=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"srun --kill-on-bad-exit=1 --label bash tools/slurm/task.sh {GPU_EXP} train.steps=10"
        """ 'data.path=/data/my corpus' 'train.checkpoint_dir=gs://b/it'\\''s'"""]
    assert shlex.split(r.stdout)[-4:] == [GPU_EXP, *ARGV]


@pytest.mark.parametrize("visible, tasks, localid, ids", [
    ("0,1,2,3,4,5,6,7", "1", "0", "0,1,2,3,4,5,6,7"),  # one process per node: all its GPUs
    ("0,1,2,3,4,5,6,7", "8", "5", "5"),                # one process per GPU: GPU SLURM_LOCALID
    ("0,1,2,3,4,5,6,7", "2", "1", "4,5,6,7"),          # two per node: the second half
    ("3", "8", "3", "0"),                              # Slurm bound this process to one GPU
])
def test_each_slurm_process_runs_glmjax_train_distributed_on_its_gpus(fakes, visible, tasks, localid, ids):
    r = script(fakes, "task.sh", GPU_EXP, *ARGV, DRY_RUN="1", CUDA_VISIBLE_DEVICES=visible,
               SLURM_NTASKS_PER_NODE=tasks, SLURM_LOCALID=localid)
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.splitlines()
    assert line.startswith(f"env JAX_LOCAL_DEVICE_IDS={ids} .venv/bin/python -m glmjax launch -- train ")
    words = shlex.split(line)
    assert words[words.index("glmjax") + 1:] == ["launch", "--", "train", GPU_EXP, *ARGV]
    build_parser().parse_args(words[words.index("glmjax") + 1:])


def test_slurm_scripts_refuse_an_uneven_gpu_split_a_missing_experiment_and_running_outside_slurm(fakes):
    r = script(fakes, "task.sh", GPU_EXP, DRY_RUN="1", CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7",
               SLURM_NTASKS_PER_NODE="3", SLURM_LOCALID="0")
    assert r.returncode == 2 and r.stderr.startswith("glmjax: error: 8 GPUs on this node do not split evenly")
    r = script(fakes, "train.sbatch", DRY_RUN="1")
    assert r.returncode == 2 and r.stderr.startswith("glmjax: error: train.sbatch needs the experiment file")
    r = script(fakes, "train.sbatch", GPU_EXP)
    assert r.returncode == 2 and r.stderr.startswith("glmjax: error: train.sbatch runs inside a SLURM job")
    assert r.stdout == "" and len(r.stderr.splitlines()) == 1


def test_the_accelerator_extras_pin_jax_to_the_tested_version_and_tpu_brings_buckets():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    extras = {k: v.split() for k, v in cfg["options.extras_require"].items()}
    jax = version("jax")
    # a TPU VM's runs write to gs:// buckets: the bucket extra comes with it
    assert extras["tpu"] == [f"jax[tpu]=={jax}", "libtpu==0.0.42.1", *extras["gcs"]]
    assert extras["gcs"] == ["gcsfs>=2024.2", "google-cloud-storage>=2.14"]
    assert extras["cuda12"] == [f"jax[cuda12]=={jax}"] and extras["cuda13"] == [f"jax[cuda13]=={jax}"]
