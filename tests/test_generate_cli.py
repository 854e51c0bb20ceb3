"""`glmjax generate` end to end on a run directory written by `glmjax train`: blank filling of
[MASK]/[gMASK] prompts, JSONL in/out, stdin mode, quantized weights, and one-line errors."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import bilingual_lines, prepared_corpus

from glmjax.cli import main
from glmjax.data import pipeline

ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 40-step training run: run.json, tokenizer/ and an orbax checkpoint."""
    d = tmp_path_factory.mktemp("gen")
    tok = prepared_corpus(d, bilingual_lines(400, 5), 600)
    (d / "exp.yaml").write_text(f"""
model: {{num_layers: 2, hidden_size: 64, num_attention_heads: 4, inner_hidden_size: 128,
        vocab_size: {tok.vocab_size}, max_sequence_length: 64}}
data: {{path: {d / 'data'}}}
objective: {{window: 32}}
optim: {{lr: 0.005, min_lr: 0.0005, warmup_samples: 16, decay_samples: 320, rampup_batch_size: null,
        global_batch: 8}}
train: {{steps: 40, micro_batch: 8, checkpoint_dir: {d / 'run'}, checkpoint_every: 40}}
""")
    assert main(["train", str(d / "exp.yaml")]) == 0
    assert (d / "run" / "run.json").is_file() and (d / "run" / "tokenizer").is_dir()
    (d / "heldout.txt").write_text("\n\n".join(bilingual_lines(300, 77)) + "\n", encoding="utf-8")
    pipeline.prepare([str(d / "heldout.txt")], str(d / "tok"), str(d / "run" / "heldout_data"))
    return d / "run"


def generate(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "glmjax", "generate", *args], env=ENV, capture_output=True,
                          text=True, input=stdin, timeout=600)


def test_mask_and_gmask_prompts_are_filled_blank_by_blank(run_dir, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt": "one [MASK] two [MASK] three"}) + "\n"
                   + json.dumps({"prompt": "a prompt without a mask"}) + "\n")
    out = tmp_path / "out.jsonl"
    r = generate("--checkpoint", str(run_dir), "--input-file", str(inp), "--output", str(out),
                 "--max-new-tokens", "4", "--mesh", "data=2,tensor=2,fsdp=2")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 2
    assert len(rows[0]["blanks"]) == 2 and "[MASK]" not in rows[0]["text"]
    assert rows[0]["text"].startswith("one") and "two" in rows[0]["text"] and rows[0]["text"].endswith("three")
    assert len(rows[1]["blanks"]) == 1 and rows[1]["text"].startswith("a prompt without a mask")
    assert "[gMASK]" not in rows[1]["text"]
    assert "float32 weights" in r.stderr


def test_stdin_mode_streams_and_quantized_weights_load(run_dir):
    r = generate("--checkpoint", str(run_dir), "--max-new-tokens", "3", "--quantize", "int4",
                 stdin="first [MASK] prompt\n\n")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "int4 weights" in r.stderr and "first" in r.stdout and "prompt" in r.stdout


@pytest.mark.parametrize("args, msg", [
    (["--prompt", "   "], "empty prompt"),
    (["--prompt", "word " * 200], "exceeds the model's context of 64"),
    (["--prompt", "x [XMASK] y"], "unknown special token [XMASK]"),
    (["--prompt", "x [eop] y"], "special token [eop]"),
    (["--prompt", "x", "--strategy", "sample", "--num-beams", "4"], "--num-beams only applies to --strategy beam"),
    (["--prompt", "x", "--strategy", "beam", "--top-p", "0.7"], "--top-p only applies to --strategy sample"),
    (["--prompt", "x", "--strategy", "beam", "--num-beams", "0"], "num_beams must be >= 1"),
])
def test_bad_generation_input_is_one_clear_line(run_dir, capsys, args, msg):
    assert main(["generate", "--checkpoint", str(run_dir), "--max-new-tokens", "4", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("glmjax: error: ") and msg in err, err


def test_a_checkpoint_without_a_tokenizer_is_refused(run_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(run_dir, bare)
    shutil.rmtree(bare / "tokenizer")
    assert main(["generate", "--checkpoint", str(bare), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "has no tokenizer" in err and "--tokenizer" in err


def test_int8_keeps_heldout_perplexity_within_1_percent_and_int4_is_reported(run_dir):
    import jax
    import numpy as np

    from glmjax.checkpoint import load_params
    from glmjax.data.objective import ObjectiveConfig
    from glmjax.infer.evaluate import heldout_loss
    from glmjax.model import api, quant
    from glmjax.parallel.mesh import make_mesh

    mesh = make_mesh(None)
    cfg, params = load_params("run", str(run_dir), None, mesh)
    obj = ObjectiveConfig(seq_length=cfg.max_sequence_length, window=32)
    data = str(run_dir / "heldout_data")
    ppl = {"float": heldout_loss(cfg, params, mesh, data, obj, batches=4, seed=99)["perplexity"]}
    host = jax.tree.map(np.asarray, jax.device_get(params))
    for bits in (8, 4):
        qcfg = cfg.replace(quantization_bits=bits)
        qparams = api.shard_params(quant.quantize_params(host, bits), qcfg, mesh)
        ppl[f"int{bits}"] = heldout_loss(qcfg, qparams, mesh, data, obj, batches=4, seed=99)["perplexity"]
    print(f"held-out perplexity: {ppl}")  # the INT4 increase is reported (pytest -s)
    assert ppl["float"] < 0.5 * cfg.vocab_size  # trained: far below a uniform guess
    assert abs(ppl["int8"] / ppl["float"] - 1) < 0.01
    assert ppl["int4"] / ppl["float"] - 1 < 0.25


def test_beam_search_returns_every_hypothesis_of_the_last_blank(run_dir, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"prompt": "one [MASK] two [MASK] three"}) + "\n")
    assert main(["generate", "--checkpoint", str(run_dir), "--input-file", str(inp), "--output", str(out),
                 "--strategy", "beam", "--num-beams", "3", "--max-new-tokens", "4", "--min-gen-length", "1"]) == 0
    (row,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(row["blanks"]) == 2 and len(row["beams"]) == 3
    assert row["beams"][0] == row["text"]  # the best hypothesis is the answer
    assert all(b.startswith("one") and b.endswith("three") and "[MASK]" not in b for b in row["beams"])


def test_contradicting_strategy_flags_fail_before_any_weights_load(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "absent"), "--prompt", "x", "--strategy", "greedy",
                 "--temperature", "0.7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--temperature only applies to --strategy sample" in err, err
