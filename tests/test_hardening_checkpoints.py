"""Checkpoints read and written defensively: an iteration cannot lead a conversion outside its output,
a missing or cut zarr chunk is never read as zeros, a damaged newest training checkpoint is skipped
(and kept aside by `train`), a resumed run marks the metrics lines it replaces, and `--tp 0` is refused."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from helpers import bilingual_lines, case_dir, prepared_corpus, tiny_experiment

from glmjax import checkpoint
from glmjax import config as C
from glmjax.cli import main
from glmjax.convert import run as convert_run
from glmjax.convert import sat
from glmjax.errors import CheckpointError
from glmjax.experiment import load_experiment
from glmjax.train.loop import Trainer

TINY = case_dir("glm130b_tiny_fp16rope")
CFG = os.path.join(TINY, "config.json")
LEAF = "layers.mlp.wi_kernel"


def tree_snapshot(root):
    """{relative path: sha256} of every file under root, and every directory (None)."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(d, name), root)] = None
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                out[os.path.relpath(os.path.join(d, name), root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def one_error(capsys, argv, fragment):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.startswith("glmjax: error: ") and len(err.splitlines()) == 1, err
    assert fragment in err and "Traceback" not in err, err
    return err


def damage_chunk(leaf_dir, how):
    """Delete or truncate the first chunk file of one zarr array."""
    chunk = sorted(p for p in os.listdir(leaf_dir) if p[0].isdigit())[0]
    path = os.path.join(leaf_dir, chunk)
    if how == "deleted":
        os.remove(path)
    else:
        with open(path, "r+b") as f:
            f.truncate(10)


# --- 1. an iteration is digits only -------------------------------------------------------------------
@pytest.fixture
def traversal_root(tmp_path):
    """root/victim/1/mp_rank_00_model_states.pt: where `../../victim/1` lands from root/a/evil and
    from root/b/<output>'s temporary sibling."""
    (tmp_path / "victim" / "1").mkdir(parents=True)
    shutil.copy(os.path.join(TINY, "ckpt_tp1", "1", "mp_rank_00_model_states.pt"), tmp_path / "victim" / "1")
    (tmp_path / "a" / "evil").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    return tmp_path


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_a_latest_file_climbing_out_of_its_checkpoint_is_refused_and_nothing_outside_changes(
        traversal_root, capsys, kind):
    r = traversal_root
    (r / "a" / "evil" / "latest").write_text("../../victim/1" if kind == "relative" else str(r / "victim" / "1"))
    before = tree_snapshot(r)
    one_error(capsys, ["convert", "--from", f"sat:{r / 'a' / 'evil'}", "--to", f"sat:{r / 'b' / 'out'}",
                       "--config", CFG, "--tp", "2"], "latest")
    assert tree_snapshot(r) == before  # the victim's bytes, and no output either


def test_an_orbax_sat_iteration_climbing_out_is_refused_and_nothing_outside_changes(traversal_root, capsys):
    r = traversal_root
    convert_run.convert(f"sat:{os.path.join(TINY, 'ckpt_tp1')}", f"orbax:{r / 'b' / 'ox'}", cfg=C.resolve(path=CFG))
    meta_path = r / "b" / "ox" / "glmjax.json"
    meta = json.loads(meta_path.read_text())
    meta["sat_iteration"] = "../../victim/1"
    meta_path.write_text(json.dumps(meta))
    before = tree_snapshot(r)
    one_error(capsys, ["convert", "--from", f"orbax:{r / 'b' / 'ox'}", "--to", f"sat:{r / 'b' / 'out'}",
                       "--tp", "2"], "sat_iteration")
    assert tree_snapshot(r) == before


def test_the_sat_writer_refuses_an_iteration_that_is_not_digits(tmp_path):
    cfg = C.resolve(path=CFG)
    source = sat.sat_source(os.path.join(TINY, "ckpt_tp1"), cfg)
    for bad in ("../x", "/tmp/x", "", "1/../..", "7a", "7\n", 7):
        with pytest.raises(CheckpointError, match="must be a string of digits"):
            sat.write_sat_checkpoint(str(tmp_path / "out"), source, cfg, 1, iteration=bad)
    assert not (tmp_path / "out").exists()


# --- 5. --tp is >= 1 ----------------------------------------------------------------------------------
@pytest.mark.parametrize("tp", ["0", "-2"])
def test_a_tp_below_one_is_refused_with_one_line(tmp_path, capsys, tp):
    one_error(capsys, ["convert", "--from", f"sat:{os.path.join(TINY, 'ckpt_tp1')}", "--to",
                       f"sat:{tmp_path / 'out'}", "--config", CFG, "--tp", tp], "--tp")
    assert not (tmp_path / "out").exists()


# --- 2. a missing or cut chunk is never zeros ----------------------------------------------------------
@pytest.fixture(scope="module")
def orbax_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ox")
    convert_run.convert(f"sat:{os.path.join(TINY, 'ckpt_tp2')}", f"orbax:{d / 'ox'}", cfg=C.resolve(path=CFG))
    return d / "ox"


@pytest.mark.parametrize("how", ["deleted", "truncated"])
def test_a_damaged_orbax_chunk_is_refused_by_convert(orbax_ckpt, tmp_path, capsys, how):
    ox = tmp_path / "ox"
    shutil.copytree(orbax_ckpt, ox)
    damage_chunk(ox / "params" / LEAF, how)
    one_error(capsys, ["convert", "--from", f"orbax:{ox}", "--to", f"sat:{tmp_path / 'out'}"], "wi_kernel")
    assert not (tmp_path / "out").exists()


# --- a tiny run with checkpoints at steps 1, 2, 3 -------------------------------------------------------
def write_experiment(d, ckpt, steps=3, every=1):
    small = "  num_layers: 2\n  hidden_size: 32\n  num_attention_heads: 2\n  inner_hidden_size: 64\n"
    return tiny_experiment(d / f"exp-{os.path.basename(str(ckpt))}-{steps}-{every}.yaml", d / "data", ckpt,
                           (d / "vocab").read_text(), model=small, steps=steps, every=every, seq=32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    tok = prepared_corpus(d, bilingual_lines(300, 5), 600)
    (d / "vocab").write_text(str(tok.vocab_size))
    return d


@pytest.fixture(scope="module")
def trained(corpus):
    run = corpus / "run"
    Trainer(load_experiment(write_experiment(corpus, run)), log=lambda m: None).run()
    assert checkpoint.RunDir(str(run)).steps() == [1, 2, 3]
    return run


DAMAGES = ["deleted data file", "truncated data file", "missing _METADATA"]


def damage_step(run, step, how):
    state = run / str(step) / "state"
    if how == "missing _METADATA":
        os.remove(state / "_METADATA")
    else:
        damage_chunk(state / f"params.{LEAF}", how.split()[0])


@pytest.mark.parametrize("how", ["deleted", "truncated"])
def test_a_damaged_run_chunk_is_refused_by_convert(trained, tmp_path, capsys, how):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    damage_chunk(run / "3" / "state" / f"params.{LEAF}", how)
    one_error(capsys, ["convert", "--from", f"run:{run}", "--to", f"sat:{tmp_path / 'out'}"], "wi_kernel")
    assert not (tmp_path / "out").exists()


# --- 3. the newest checkpoint that restores ----------------------------------------------------------
@pytest.mark.parametrize("how", DAMAGES)
def test_resume_skips_a_damaged_newest_checkpoint_and_keeps_it_aside(corpus, trained, tmp_path, capsys, how):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    damage_step(run, 3, how)
    damaged = tree_snapshot(run / "3")
    logs = []
    trainer = Trainer(load_experiment(write_experiment(corpus, run, steps=4)), log=logs.append)
    try:
        assert int(trainer.state.step) == 2 and any("step 2" in m for m in logs if "resumed" in m)
        assert trainer.checkpoints.all_steps() == [1, 2]
    finally:
        trainer.checkpoints.close()
    err = capsys.readouterr().err.strip().splitlines()
    warnings = [x for x in err if x.startswith("glmjax: warning:")]
    assert len(warnings) == 1 and "step 3" in warnings[0] and "3.damaged" in warnings[0], err
    assert not (run / "3").exists() and tree_snapshot(run / "3.damaged") == damaged  # kept as it was


def test_a_resumed_run_past_a_damaged_step_saves_that_step_again(corpus, trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    damage_step(run, 3, "truncated data file")
    Trainer(load_experiment(write_experiment(corpus, run, steps=4)), log=lambda m: None).run()
    assert checkpoint.RunDir(str(run)).steps()[-2:] == [3, 4] and (run / "3.damaged").is_dir()


def test_resume_moves_nothing_when_no_checkpoint_restores(corpus, trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for step in (1, 2, 3):
        damage_step(run, step, "missing _METADATA")
    before = tree_snapshot(run)
    err = one_error(capsys, ["train", write_experiment(corpus, run, steps=4)], "no checkpoint restores")
    assert "step 3" in err and tree_snapshot(run) == before


def forward_argv(run, tmp_path, output, *extra):
    import numpy as np

    inp = tmp_path / "in.npz"
    np.savez(inp, tokens=np.ones((1, 8), np.int32), position_ids=np.arange(8, dtype=np.int32)[None])
    return ["forward", "--checkpoint", str(run), "--inputs", str(inp), "--output", str(tmp_path / output), *extra]


@pytest.mark.parametrize("how", DAMAGES)
def test_forward_uses_the_newest_step_that_loads_warns_and_moves_nothing(trained, tmp_path, capsys, how):
    import numpy as np

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    damage_step(run, 3, how)
    before = tree_snapshot(run)
    assert main(forward_argv(run, tmp_path, "want.npz", "--step", "2")) == 0
    capsys.readouterr()
    assert main(forward_argv(run, tmp_path, "o.npz")) == 0
    err = capsys.readouterr().err.strip().splitlines()
    warnings = [x for x in err if x.startswith("glmjax: warning:")]
    assert len(warnings) == 1 and "step 3" in warnings[0] and "using step 2" in warnings[0], err
    with np.load(tmp_path / "o.npz") as got, np.load(tmp_path / "want.npz") as want:
        np.testing.assert_array_equal(got["logits"], want["logits"])
    assert tree_snapshot(run) == before  # reads never modify the run directory
    one_error(capsys, forward_argv(run, tmp_path, "bad.npz", "--step", "3"), "step 3")
    assert not (tmp_path / "bad.npz").exists()
    assert tree_snapshot(run) == before


# --- 4. a resumed run marks the metrics lines it replaces ---------------------------------------------
FAULTS = os.path.join(os.path.dirname(__file__), "helpers", "train_with_faults.py")


def train_process(exp, *faults):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, FAULTS, *faults, exp], env=env, capture_output=True, text=True,
                          timeout=600)


def test_a_run_resumed_before_its_last_logged_step_marks_the_superseded_lines(corpus):
    run = corpus / "killed"
    exp = write_experiment(corpus, run, steps=4, every=2)
    killed = train_process(exp, "--kill-after-step", "4")  # steps 1-3 logged, checkpoint 2 committed
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = train_process(exp)
    assert resumed.returncode == 0 and "step 2" in resumed.stdout, resumed.stderr[-2000:]
    records = [json.loads(x) for x in open(run / "metrics.jsonl")]
    marks = [i for i, x in enumerate(records) if x.get("event") == "resume"]
    assert len(marks) == 1 and records[marks[0]] == {"event": "resume", "step": 2, "superseded_steps": [3]}
    assert [x["step"] for x in records[:marks[0]]] == [1, 2, 3]
    assert [x["step"] for x in records[marks[0] + 1:]] == [3, 4]


def test_the_resume_marker_names_only_later_steps_and_never_joins_a_cut_line(tmp_path):
    from glmjax.train.report import Reporter

    rep = Reporter(str(tmp_path), total_steps=4, first_step=0, log=lambda m: None, progress=False)
    path = tmp_path / "metrics.jsonl"
    assert rep.mark_resume(0) == [] and not path.exists()  # a fresh run
    path.write_text('{"step": 1}\n{"step": 2}\n{"event": "rollback", "step": 5}\n{"step": 3, "lo')  # cut by a kill
    assert rep.mark_resume(2) == []  # an exact resume: nothing complete after step 2
    assert rep.mark_resume(1) == [2]
    rep.close()
    lines = path.read_text().splitlines()
    assert lines[-2] == '{"step": 3, "lo'
    assert json.loads(lines[-1]) == {"event": "resume", "step": 1, "superseded_steps": [2]}
