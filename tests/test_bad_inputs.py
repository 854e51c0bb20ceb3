"""A table of bad inputs across every command, run in one subprocess (tests/helpers/cli_cases.py): each
ends with a non-zero exit, exactly one `glmjax: error:` line (the last), no traceback, and no file
created, changed or removed anywhere under the scratch tree -- outputs included."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import bilingual_lines, case_dir, prepared_corpus, tiny_experiment

from glmjax import config as C
from glmjax.convert import run as convert_run

TINY = case_dir("glm130b_tiny_fp16rope")
CFG = os.path.join(TINY, "config.json")
CASES_SCRIPT = os.path.join(os.path.dirname(__file__), "helpers", "cli_cases.py")



def _npz(path, b=2, s=8, **extra):
    tokens = np.zeros((b, s), np.int32)
    np.savez(path, tokens=tokens, position_ids=np.zeros((b, s), np.int32), **extra)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """Checkpoints, corpora, inputs and traps the cases point at (everything under one root)."""
    root = tmp_path_factory.mktemp("bad")
    shutil.copytree(os.path.join(TINY, "ckpt_tp2"), root / "sat")
    convert_run.convert(f"sat:{root / 'sat'}", f"orbax:{root / 'ox'}", cfg=C.resolve(path=CFG))
    for name in ("ox_missing", "ox_truncated"):
        shutil.copytree(root / "ox", root / name)
    chunk = sorted((root / "ox_missing" / "params" / "layers.mlp.wi_kernel").glob("0.*"))[0]
    chunk.unlink()
    chunk = sorted((root / "ox_truncated" / "params" / "layers.mlp.wi_kernel").glob("0.*"))[0]
    chunk.write_bytes(chunk.read_bytes()[:10])
    # a SAT checkpoint whose `latest` climbs out of it, and a victim file where it lands
    (root / "a" / "evil").mkdir(parents=True)
    (root / "a" / "evil" / "latest").write_text("../../victim/1")
    (root / "victim" / "1").mkdir(parents=True)
    shutil.copy(os.path.join(TINY, "ckpt_tp1", "1", "mp_rank_00_model_states.pt"), root / "victim" / "1")
    (root / "b").mkdir()
    prepared_corpus(root, bilingual_lines(300, 3), 600, layout="compact")  # a vocabulary the tiny model holds
    for name in ("data_bad_manifest", "data_missing_shard"):
        shutil.copytree(root / "data", root / name)
    (root / "data_bad_manifest" / "manifest.json").write_text("{not json")
    (root / "data_missing_shard" / "tokens-00000.bin").unlink()
    exp = lambda path, data: tiny_experiment(path, data, root / "never-written", 22000)  # noqa: E731
    exp(root / "exp.yaml", root / "data")
    for name, data in (("exp_bad_manifest.yaml", "data_bad_manifest"),
                       ("exp_missing_shard.yaml", "data_missing_shard")):
        exp(root / name, root / data)
    (root / "bad_utf8.yaml").write_bytes(b"model:\n  preset: glm-test\n  # \xff\xfe\n")
    exp(root / "list_section.yaml", root / "data")
    with open(root / "list_section.yaml", "a") as f:
        f.write("objective: [1, 2]\n")
    _npz(root / "in.npz")
    _npz(root / "batch0.npz", b=0)
    _npz(root / "seq0.npz", s=0)
    _npz(root / "mask_and_prefix.npz", attention_mask=np.zeros((2, 1, 8, 8), bool),
         prefix_mask=np.zeros((2, 8), bool))
    np.savez(root / "bad_token.npz", tokens=np.full((1, 4), 5000, np.int32), position_ids=np.zeros((1, 4), np.int32))
    (root / "adir").mkdir()
    (root / "afile").write_text("x")
    os.symlink(root / "nowhere" / "x.npz", root / "dangling.npz")
    (root / "prompts_bad_utf8.jsonl").write_bytes(b'{"prompt": "ok [MASK]"}\n{"prompt": "\xff"}\n')
    (root / "prompts_42.jsonl").write_text('{"prompt": 42}\n')
    (root / "prompts.jsonl").write_text('{"prompt": "A [MASK] b"}\n')
    (root / "corpus_empty.txt").write_text("")
    return root


def cases(r) -> list[tuple[str, list[str], str]]:
    """(name, argv, a fragment the error line must contain)."""
    exp, sat, ox = str(r / "exp.yaml"), str(r / "sat"), str(r / "ox")
    gen = ["generate", "--checkpoint", sat, "--config", CFG, "--tokenizer", str(r / "tok")]
    fwd = ["forward", "--checkpoint", sat, "--config", CFG]
    return [
        # info / experiment schema
        ("info missing file", ["info", "--config", str(r / "nope.yaml")], "not found"),
        ("info non-UTF-8", ["info", "--config", str(r / "bad_utf8.yaml")], "not UTF-8"),
        ("info list section", ["info", "--config", str(r / "list_section.yaml")], "must be a mapping"),
        ("rotary_base list", ["info", "--config", exp, "rotary_base=[1]"], "rotary_base"),
        ("residual_alpha list", ["info", "--config", exp, "residual_alpha=[2]"], "residual_alpha"),
        ("rotary_base nan", ["info", "--config", exp, "rotary_base=.nan"], "rotary_base"),
        ("steps text", ["info", "--config", exp, "train.steps=abc"], "train.steps"),
        ("steps fraction", ["info", "--config", exp, "train.steps=2.5"], "train.steps"),
        ("global batch 0", ["info", "--config", exp, "optim.global_batch=0"], "global_batch"),
        ("ramp start = global", ["info", "--config", exp, "optim.rampup_batch_size=[8, 8, 16]"], "rampup_batch_size"),
        ("loss scale 0", ["info", "--config", exp, "loss_scale.initial=0"], "loss_scale"),
        ("lr inf", ["info", "--config", exp, "optim.lr=.inf"], "optim.lr"),
        ("weight decay nan", ["info", "--config", exp, "optim.weight_decay=.nan"], "optim.weight_decay"),
        ("typo in data", ["info", "--config", exp, "data.sead=3"], "unknown data key 'sead'"),
        ("heads do not divide", ["info", "--preset", "glm-test", "num_attention_heads=5"], "does not divide"),
        # train: refused before anything is written
        ("train non-UTF-8", ["train", str(r / "bad_utf8.yaml")], "not UTF-8"),
        ("train mesh too big", ["train", exp, "train.mesh=data=16"], "needs 16 devices"),
        ("train no corpus", ["train", exp, f"data.path={r / 'nope'}"], "not a prepared corpus"),
        ("train bad manifest", ["train", str(r / "exp_bad_manifest.yaml")], "manifest"),
        ("train missing shard", ["train", str(r / "exp_missing_shard.yaml")], "tokens-00000.bin"),
        # forward
        ("forward no checkpoint", ["forward", "--checkpoint", str(r / "nope"), "--inputs", str(r / "in.npz"),
                                   "--output", str(r / "o.npz")], "not found"),
        ("forward batch 0", [*fwd, "--inputs", str(r / "batch0.npz"), "--output", str(r / "o.npz")], "batch"),
        ("forward sequence 0", [*fwd, "--inputs", str(r / "seq0.npz"), "--output", str(r / "o.npz")], "sequence"),
        ("forward mask and compact", [*fwd, "--inputs", str(r / "mask_and_prefix.npz"), "--output", str(r / "o.npz")],
         "attention_mask"),
        ("forward unknown token", [*fwd, "--inputs", str(r / "bad_token.npz"), "--output", str(r / "o.npz")],
         "unknown token id"),
        ("forward output is a dir", [*fwd, "--inputs", str(r / "in.npz"), "--output", str(r / "adir")], "adir"),
        ("forward parent is a file", [*fwd, "--inputs", str(r / "in.npz"), "--output", str(r / "afile" / "o.npz")],
         "afile"),
        ("forward output in /proc", [*fwd, "--inputs", str(r / "in.npz"), "--output", "/proc/glmjax-out.npz"], "/proc"),
        ("forward dangling symlink", [*fwd, "--inputs", str(r / "in.npz"), "--output", str(r / "dangling.npz")],
         "dangling.npz"),
        # convert
        ("convert traversal", ["convert", "--from", f"sat:{r / 'a' / 'evil'}", "--to", f"sat:{r / 'b' / 'out'}",
                               "--config", CFG], "latest"),
        ("convert tp 0", ["convert", "--from", f"orbax:{ox}", "--to", f"sat:{r / 'out_tp0'}", "--tp", "0"], "--tp"),
        ("convert missing chunk", ["convert", "--from", f"orbax:{r / 'ox_missing'}", "--to", f"sat:{r / 'o1'}"],
         "wi_kernel"),
        ("convert truncated chunk", ["convert", "--from", f"orbax:{r / 'ox_truncated'}", "--to", f"sat:{r / 'o2'}"],
         "wi_kernel"),
        ("convert sat without config", ["convert", "--from", f"sat:{sat}", "--to", f"orbax:{r / 'o3'}"], "--config"),
        ("convert onto itself", ["convert", "--from", f"orbax:{ox}", "--to", f"orbax:{ox}"], "same directory"),
        ("convert to a run dir", ["convert", "--from", f"orbax:{ox}", "--to", f"run:{r / 'o4'}"], "run directories"),
        ("convert existing output", ["convert", "--from", f"sat:{sat}", "--to", f"orbax:{ox}", "--config", CFG],
         "--overwrite"),
        ("convert parent is a file", ["convert", "--from", f"orbax:{ox}", "--to", f"sat:{r / 'afile' / 'o'}"], "afile"),
        # tokenizer
        ("tokenizer out exists", ["tokenizer", "train", "--input", str(r / "corpus.txt"), "--vocab-size", "600",
                                  "--out", str(r / "tok")], "--overwrite"),
        ("tokenizer no input", ["tokenizer", "train", "--input", str(r / "nope.txt"), "--out", str(r / "tok2")],
         "not found"),
        ("tokenizer encode without one", ["tokenizer", "encode"], "--tokenizer"),
        # data
        ("prepare no input", ["data", "prepare", "--tokenizer", str(r / "tok"), "--input", str(r / "nope*.txt"),
                              "--out", str(r / "d1")], "input not found"),
        ("prepare empty corpus", ["data", "prepare", "--tokenizer", str(r / "tok"), "--input",
                                  str(r / "corpus_empty.txt"), "--out", str(r / "d2")], "no documents"),
        ("prepare existing output", ["data", "prepare", "--tokenizer", str(r / "tok"), "--input",
                                     str(r / "corpus.txt"), "--out", str(r / "data")], "--overwrite"),
        ("inspect 0 samples", ["data", "inspect", "--config", exp, "--num-samples", "0", "--output",
                               str(r / "s.npz")], "num-samples"),
        ("inspect bad manifest", ["data", "inspect", "--config", str(r / "exp_bad_manifest.yaml"), "--output",
                                  str(r / "s.npz")], "manifest"),
        ("inspect output is a dir", ["data", "inspect", "--config", exp, "--output", str(r / "adir")], "adir"),
        # generate (all refused before any weights load)
        ("generate non-UTF-8 line", [*gen, "--input-file", str(r / "prompts_bad_utf8.jsonl")],
         "prompts_bad_utf8.jsonl:2"),
        ("generate prompt 42", [*gen, "--input-file", str(r / "prompts_42.jsonl")], "prompts_42.jsonl:1"),
        ("generate batch size 0", [*gen, "--input-file", str(r / "prompts.jsonl"), "--batch-size", "0"], "batch-size"),
        ("generate length penalty nan", [*gen, "--prompt", "a [MASK]", "--length-penalty", "nan"], "length"),
        ("generate temperature inf", [*gen, "--prompt", "a [MASK]", "--temperature", "inf"], "temperature"),
        ("generate output dir missing", [*gen, "--prompt", "a [MASK]", "--output", str(r / "nowhere" / "o.txt")],
         "nowhere"),
        ("generate output is a dir", [*gen, "--prompt", "a [MASK]", "--output", str(r / "adir")], "adir"),
        ("generate no checkpoint", ["generate", "--checkpoint", str(r / "nope"), "--prompt", "a"], "not found"),
        # usage mistakes are bad input too
        ("forward without inputs", ["forward", "--checkpoint", sat], "required: --inputs"),
        ("convert tp text", ["convert", "--from", f"orbax:{ox}", "--to", f"sat:{r / 'o5'}", "--tp", "abc"],
         "invalid int value"),
        ("unknown strategy", [*gen, "--prompt", "a", "--strategy", "best"], "invalid choice"),
    ]


def test_every_bad_input_is_one_error_line_and_leaves_every_file_as_it_was(scratch):
    table = cases(scratch)
    assert len(table) >= 40
    payload = [{"name": n, "argv": argv, "stdin": None} for n, argv, _ in table]
    payload.append({"name": "encode non-UTF-8 stdin", "argv": ["tokenizer", "encode", "--tokenizer",
                                                               str(scratch / "tok")], "stdin_bytes": "41ff42"})
    expect = {n: frag for n, _, frag in table} | {"encode non-UTF-8 stdin": "UTF-8"}
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, CASES_SCRIPT, str(scratch)], input=json.dumps(payload), capture_output=True,
                       text=True, env=env, timeout=900)
    results = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(payload), r.stderr[-3000:]
    failures = []
    for res in results:
        errors = [x for x in res["stderr"] if x.startswith("glmjax: error: ")]
        ok = (res["rc"] not in (0, None) and len(errors) == 1 and res["stderr"][-1] == errors[0]
              and not res["traceback"] and not res["changed"] and expect[res["name"]] in errors[0])
        if not ok:
            failures.append(f"{res['name']}: rc={res['rc']} changed={res['changed'][:3]} stderr={res['stderr'][-3:]}")
    assert not failures, "\n".join(failures)
