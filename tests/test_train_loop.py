"""`glmjax train` as a real process: exact resume after kill -9, a kill during an asynchronous save,
one compilation of the step per process, and bad experiment files. Faults are injected through the
trainer's hooks by tests/helpers/train_with_faults.py."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from helpers import bilingual_lines, prepared_corpus

from glmjax.cli import main


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    tok = prepared_corpus(d, bilingual_lines(1500, 4), 800)
    (d / "exp.yaml").write_text(f"""
model:
  num_layers: 2
  hidden_size: 64
  num_attention_heads: 4
  inner_hidden_size: 128
  vocab_size: {tok.vocab_size}
  max_sequence_length: 128
  hidden_dropout: 0.1
  attention_dropout: 0.1
data:
  path: {d / 'data'}
  seed: 3
objective:
  window: 32
optim:
  lr: 0.002
  min_lr: 0.0002
  warmup_samples: 16
  decay_samples: 400
  rampup_batch_size: [8, 8, 16]
  global_batch: 16
train:
  steps: 6
  micro_batch: 8
  mesh: data=2,fsdp=2,tensor=2
  checkpoint_every: 3
  keep: 3
""")
    return d


FAULTS = os.path.join(os.path.dirname(__file__), "helpers", "train_with_faults.py")


def run(exp_dir, ckpt, *extra, faults=()):
    """The trainer in its own process (JAX logs each XLA compilation, so the test can count them)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               JAX_LOG_COMPILES="1")
    return subprocess.run([sys.executable, FAULTS, *faults, str(exp_dir / "exp.yaml"), f"train.checkpoint_dir={ckpt}",
                           *extra], env=env, capture_output=True, text=True, timeout=600)


def step_compilations(proc):
    """How many times this process compiled the training step's two programs."""
    return {name: proc.stderr.count(f"Compiling jit({name})") for name in ("accumulate", "update")}


def metrics(ckpt):
    out = {}
    with open(os.path.join(ckpt, "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            out[m["step"]] = m  # a resumed run rewrites the steps after its checkpoint
    return out


def final_params(ckpt, step):
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as c:
        return c.restore(os.path.join(ckpt, str(step), "state"))["params"]


@pytest.fixture(scope="module")
def straight(experiment):
    """6 steps without interruption on data=2,fsdp=2,tensor=2 (checkpoints at 3 and 6)."""
    r = run(experiment, experiment / "a")
    assert r.returncode == 0, r.stderr[-2000:]
    assert step_compilations(r) == {"accumulate": 1, "update": 1}
    return experiment / "a"


@pytest.mark.slow
def test_kill_9_then_resume_is_exact_and_a_kill_during_save_keeps_the_previous_checkpoint(experiment, straight):
    d = experiment
    ref = metrics(straight)
    assert sorted(ref) == [1, 2, 3, 4, 5, 6] and all(np.isfinite(m["loss"]) for m in ref.values())
    assert ref[1]["batch_size"] == 8 and ref[6]["batch_size"] == 16  # the ramp, one compiled step
    # saves are asynchronous: the step after each save ran while its files were being written
    assert ref[4]["checkpoint_in_flight"] and not ref[1]["checkpoint_in_flight"]

    killed = run(d, d / "b", faults=("--kill-after-step", "4"))  # checkpoint 3 committed, step 4 dies
    assert killed.returncode == -signal.SIGKILL
    resumed = run(d, d / "b")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout and "step 3" in resumed.stdout
    assert step_compilations(resumed) == {"accumulate": 1, "update": 1}  # restored state fits the program
    got = metrics(d / "b")
    for step in range(1, 7):
        assert got[step]["loss"] == ref[step]["loss"], step  # bitwise on CPU
    import jax

    jax.tree.map(np.testing.assert_array_equal, final_params(d / "b", 6), final_params(d / "a", 6))

    mid_save = run(d, d / "c", faults=("--kill-during-save", "6"))  # killed while step 6 is being written
    assert mid_save.returncode == -signal.SIGKILL and "killing during the save of step 6: in flight True" in \
        mid_save.stdout
    assert not os.path.isdir(d / "c" / "6")  # never committed
    again = run(d, d / "c")
    assert again.returncode == 0 and "step 3" in again.stdout
    assert metrics(d / "c")[6]["loss"] == ref[6]["loss"]


@pytest.mark.slow
def test_a_checkpoint_resumes_onto_a_different_mesh(experiment, straight):
    """Step 3 of the 8-device data=2,fsdp=2,tensor=2 run, resumed on one device and on fsdp=8:
    the same run up to float32 reduction order."""
    import shutil

    import jax

    ref = metrics(straight)
    for name, mesh in (("one", ""), ("fsdp8", "fsdp=8")):
        ckpt = experiment / f"mesh_{name}"
        shutil.copytree(straight, ckpt)
        shutil.rmtree(ckpt / "6")
        r = run(experiment, ckpt, f"train.mesh={mesh}")
        assert r.returncode == 0 and "step 3" in r.stdout, r.stderr[-2000:]
        got = metrics(ckpt)
        for step in (4, 5, 6):
            assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5), (name, step)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     final_params(ckpt, 6), final_params(straight, 6))


def test_metrics_go_to_jsonl_and_tensorboard_event_files(tmp_path):
    from glmjax.train.report import Reporter

    lines = []
    rep = Reporter(str(tmp_path), total_steps=4, first_step=0, log=lines.append, progress=False)
    for step in (1, 2, 3):
        rep.step({"step": step, "loss": 5.0 - step, "accuracy": 0.1, "learning_rate": 1e-3, "grad_norm": 1.0,
                  "embedding_grad_norm": 0.5, "loss_scale": 1.0, "tokens_per_s": 100.0, "step_time": 2.0,
                  "batch_size": 8, "egs_alpha": 0.1}, log_line=step != 2)
    rep.close()
    assert [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert len(lines) == 2 and lines[-1].startswith("step 3/4 loss 2.0000") and lines[-1].endswith("eta 0m02s")
    (event_file,) = list((tmp_path / "tensorboard").iterdir())
    data = event_file.read_bytes()
    for tag in (b"train/loss", b"train/grad_norm", b"train/embedding_grad_norm", b"train/egs_alpha",
                b"train/tokens_per_s", b"train/learning_rate"):
        assert data.count(tag + b"\x15") == 3, tag  # Summary.Value: tag, then simple_value (field 2)


def test_egs_alpha_is_a_constant_or_a_piecewise_linear_schedule_of_the_model():
    from glmjax import config as C
    from glmjax.errors import ConfigError

    assert C.resolve("glm-130b").egs_alpha_at(12345) == pytest.approx(0.1)
    cfg = C.resolve("glm-test", overrides=["embedding_grad_shrink=[[0, 0.1], [100, 1.0]]"])
    assert [cfg.egs_alpha_at(s) for s in (0, 50, 100, 500)] == pytest.approx([0.1, 0.55, 1.0, 1.0])
    for bad in ("[[10, 0.1], [5, 1.0]]", "[[0, 1.5]]", "fast"):
        with pytest.raises(ConfigError, match="embedding_grad_shrink"):
            C.resolve("glm-test", overrides=[f"embedding_grad_shrink={bad}"])


@pytest.mark.parametrize("override, msg", [
    ("train.stepz=3", "unknown train key 'stepz'"),
    ("data.sead=3", "unknown data key 'sead'"),
    ("train.egs_alpha=0.1", "unknown train key 'egs_alpha'"),
    ("train.steps=2.5", "train.steps must be an integer"),
    ("train.mesh=data=3", "needs 3 devices"),
    ("train.micro_batch=6", "must be multiples of train.micro_batch=6"),
    ("optim.lr=-1", "need 0 < min_lr <= lr"),
    ("model.num_attention_heads=5", "does not divide hidden_size"),
])
def test_bad_experiments_fail_at_start_with_one_line(experiment, capsys, override, msg):
    assert main(["train", str(experiment / "exp.yaml"), override,
                 f"train.checkpoint_dir={experiment / 'bad'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("glmjax: error: ") and len(err.splitlines()) == 1 and msg in err, err


def test_mfu_accounting_reproduces_glm130bs_reported_32_5_percent():
    """GLM-130B: 48 samples/s of 2048 tokens on 768 A100s (312 TFLOPS bf16/fp16 peak) -> MFU 32.5%."""
    from glmjax import config as C
    from glmjax.plan.roofline import model_flops_per_token

    per_token = model_flops_per_token(C.resolve("glm-130b"), 2048)
    assert per_token == pytest.approx(6 * 128.7e9 + 12 * 70 * 12288 * 2048, rel=0.01)
    mfu = per_token * 48 * 2048 / (768 * 312e12)
    assert 0.31 < mfu < 0.34


def test_spike_guard_arms_after_its_window():
    from glmjax.train.loop import SpikeGuard

    g = SpikeGuard(threshold=3.0, window=3)
    assert not any(g.is_spike(x) for x in (9.0, 100.0, 8.0))  # not armed yet
    assert not g.is_spike(7.0) and g.is_spike(200.0) and not g.is_spike(float("nan"))
    assert g.history[-1] == 7.0  # a spike does not enter the average


@pytest.mark.slow
def test_spike_rolls_back_to_the_last_checkpoint_and_skips_its_data(experiment):
    d = experiment
    r = run(d, d / "spike", "train.steps=8", "train.spike_window=2", "train.spike_threshold=3.0",
            faults=("--spike-at-step", "5"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rolled back to step 3" in r.stdout
    lines = [json.loads(x) for x in open(d / "spike" / "metrics.jsonl")]
    event = next(x for x in lines if x.get("event") == "rollback")
    assert event["step"] == 5 and event["to_step"] == 3 and event["skipped_data"][1] > event["skipped_data"][0]
    steps = [x for x in lines if "event" not in x]
    after = [x for x in steps if x["step"] == 4][-1]  # step 4 again, now on the data after the window
    assert after["data_position"] > event["skipped_data"][1]
    assert max(x["step"] for x in steps) == 8
    assert os.path.isdir(d / "spike" / "3")  # the committed checkpoint it used is still there
