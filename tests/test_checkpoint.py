"""A training run directory is a checkpoint format like the others: `convert --from run:DIR` (to SAT
at tp 2, to Hugging Face ChatGLM for a ChatGLM-shaped run), `forward`, `generate` and
`train.init_from` read it, with the same logits; and the orbax layout glmjax writes directly is the
one the pinned orbax reads."""
import json
import math
import os
import re

import jax
import numpy as np
import pytest
from helpers import assert_close_scaled, bilingual_lines, case_dir, prepared_corpus, tiny_experiment

from glmjax import checkpoint
from glmjax.cli import main
from glmjax.experiment import load_experiment
from glmjax.parallel.mesh import make_mesh
from glmjax.train.loop import Trainer

GLM = """  num_layers: 2
  hidden_size: 64
  num_attention_heads: 4
  inner_hidden_size: 128
"""
CHATGLM = f"""  num_layers: 2
  hidden_size: 64
  num_attention_heads: 4
  inner_hidden_size: 256
  position_encoding_2d: true
  glu: false
  tie_word_embeddings: false
  residual_alpha: {math.sqrt(56)!r}
"""


def write_experiment(d, model: str, vocab: int, ckpt, steps=2, extra=""):
    return tiny_experiment(d / f"exp-{os.path.basename(str(ckpt))}.yaml", d / "data", ckpt, vocab, model=model,
                           steps=steps, mesh="data=2,fsdp=2,tensor=2", extra=extra)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    tok = prepared_corpus(d, bilingual_lines(400, 7), 700)
    return d, tok.vocab_size


def trained(corpus, name, model):
    d, vocab = corpus
    run = d / name
    if not (run / checkpoint.RunDir.INFO).exists():
        Trainer(load_experiment(write_experiment(d, model, vocab, run)), log=lambda m: None).run()
    return run


@pytest.fixture(scope="module")
def glm_run(corpus):
    return trained(corpus, "glm", GLM)


@pytest.fixture(scope="module")
def chatglm_run(corpus):
    return trained(corpus, "chatglm", CHATGLM)


def inputs(tmp_path, cfg, rows=3, s=40):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (rows, s)).astype(np.int32)
    pos = np.broadcast_to(np.arange(s, dtype=np.int32), (rows, s))
    if cfg.position_encoding_2d:
        pos = np.stack([np.minimum(pos, s // 2), np.maximum(pos - s // 2, 0)], 1).astype(np.int32)
    path = tmp_path / "in.npz"
    np.savez(path, tokens=tokens, position_ids=pos, prefix_mask=np.arange(s)[None].repeat(rows, 0) < s // 2,
             segment_ids=np.ones((rows, s), np.int32))
    return str(path)


def forward(capsys, checkpoint_dir, inp, out, *extra):
    assert main(["forward", "--checkpoint", str(checkpoint_dir), "--inputs", inp, "--output", str(out),
                 "--mesh", "data=2,fsdp=2,tensor=2", *extra]) == 0, capsys.readouterr().err
    with np.load(out) as z:
        return z["logits"]


def test_a_run_directory_is_detected_and_its_steps_listed(glm_run):
    assert checkpoint.detect_format(str(glm_run)) == "run"
    run = checkpoint.RunDir(str(glm_run))
    assert run.steps() == [1, 2] and run.step() == 2
    with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint of step 7"):
        run.step(7)
    assert (glm_run / "experiment.yaml").exists() and (glm_run / "tokenizer").is_dir()


def test_a_run_converts_to_sat_at_tp2_with_the_same_logits(glm_run, tmp_path, capsys):
    cfg = checkpoint.RunDir(str(glm_run)).model_config()
    inp = inputs(tmp_path, cfg)
    want = forward(capsys, glm_run, inp, tmp_path / "run.npz")
    assert main(["convert", "--from", f"run:{glm_run}", "--to", f"sat:{tmp_path / 'sat'}", "--tp", "2",
                 "--verify", "--verify-tokens", "48"]) == 0, capsys.readouterr().err
    assert "OK" in capsys.readouterr().out
    shards = sorted(os.listdir(tmp_path / "sat" / "2"))
    assert shards == ["mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]  # iteration = the run's step
    got = forward(capsys, tmp_path / "sat", inp, tmp_path / "sat.npz", "--config", str(glm_run / "run.json"))
    assert_close_scaled(got, want)
    earlier = forward(capsys, glm_run, inp, tmp_path / "run1.npz", "--step", "1")
    assert np.abs(earlier - want).max() > 1e-3  # --step 1 really is the other checkpoint


def test_a_chatglm_shaped_run_converts_to_hugging_face_with_the_same_logits(chatglm_run, tmp_path, capsys):
    cfg = checkpoint.RunDir(str(chatglm_run)).model_config()
    inp = inputs(tmp_path, cfg)
    want = forward(capsys, chatglm_run, inp, tmp_path / "run.npz")
    assert main(["convert", "--from", f"run:{chatglm_run}", "--to", f"hf-chatglm:{tmp_path / 'hf'}",
                 "--safetensors"]) == 0, capsys.readouterr().err
    got = forward(capsys, tmp_path / "hf", inp, tmp_path / "hf.npz")
    assert_close_scaled(got, want)


def test_init_from_a_run_directory_starts_from_its_parameters(corpus, glm_run):
    d, vocab = corpus
    exp = load_experiment(write_experiment(d, GLM, vocab, d / "finetune", extra=f"  init_from: {glm_run}\n"))
    trainer = Trainer(exp, log=lambda m: None)
    want = checkpoint.load_params("run", str(glm_run), None, make_mesh(None))[1]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), trainer.state.params, want)
    trainer.checkpoints.close()


def test_resuming_with_another_architecture_names_the_fields(corpus, glm_run, capsys):
    d, vocab = corpus
    path = write_experiment(d, GLM, vocab, glm_run, steps=3)
    assert main(["train", path, "model.hidden_size=128"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "hidden_size (64 vs 128)" in err, err


def test_bad_run_locations_are_one_line(glm_run, tmp_path, capsys):
    for argv, msg in (
        (["convert", "--from", f"run:{glm_run}", "--to", f"sat:{tmp_path / 'x'}", "--step", "9"],
         "no complete checkpoint of step 9"),
        (["convert", "--from", f"run:{tmp_path}", "--to", f"sat:{tmp_path / 'y'}"], "not a training run directory"),
        (["convert", "--from", f"sat:{glm_run}", "--to", f"run:{tmp_path / 'z'}"], "run directories are written by"),
        (["convert", "--from", f"orbax:{glm_run}", "--to", f"sat:{tmp_path / 'w'}", "--step", "1"],
         "--step selects a checkpoint of a training run"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("glmjax: error: ") and len(err.splitlines()) == 1 and msg in err, (argv, err)


def test_the_orbax_layout_glmjax_writes_directly_is_the_pinned_orbaxs(tmp_path):
    """glmjax streams converted tensors into orbax's per-leaf zarr layout and reads run directories
    leaf by leaf; a new orbax that lays files out otherwise must fail here (setup.cfg pins the range)."""
    import orbax.checkpoint as ocp

    from glmjax import config as C
    from glmjax.convert import orbax_format, run

    cfg = C.resolve(path=os.path.join(case_dir("glm130b_tiny_fp16rope"), "config.json"))
    run.convert(f"sat:{os.path.join(case_dir('glm130b_tiny_fp16rope'), 'ckpt_tp2')}", f"orbax:{tmp_path / 'ox'}",
                cfg=cfg)
    _, source = orbax_format.orbax_source(str(tmp_path / "ox"))
    with ocp.PyTreeCheckpointer() as c:  # orbax's own reader on what glmjax wrote
        tree = c.restore(str(tmp_path / "ox" / "params"))
    np.testing.assert_array_equal(np.asarray(tree["layers"]["mlp"]["wi_kernel"]),
                                  source.get(("layers", "mlp", "wi_kernel"), None))
    saver = checkpoint.TrainCheckpoints(str(tmp_path / "state"), keep=1)
    params = jax.tree.map(np.asarray, tree)
    saver.save(5, {"params": params, "step": np.int32(5)}, {"data_position": 0})
    saver.close()
    leaf = orbax_format.tree_source(str(tmp_path / "state" / "5" / "state"), cfg, ("params",), "state")
    np.testing.assert_array_equal(leaf.get(("word_embeddings",), None), params["word_embeddings"])
    pin = re.search(r"orbax-checkpoint>=([\d.]+),<([\d.]+)", open(os.path.join(
        os.path.dirname(os.path.dirname(__file__)), "setup.cfg")).read())
    version = tuple(int(x) for x in ocp.__version__.split(".")[:2])
    assert pin and tuple(int(x) for x in pin[1].split(".")[:2]) <= version < tuple(int(x) for x in pin[2].split("."))


def test_run_json_records_the_model(glm_run):
    info = json.loads((glm_run / "run.json").read_text())
    assert info["model"]["num_layers"] == 2 and info["tokenizer"] == "tokenizer"
