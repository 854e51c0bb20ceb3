"""Outputs and inputs at the edges: leftovers of killed runs cleared (or put back), single-file outputs
through fresh temporaries that never follow a planted link, destinations refused before any work,
tokenizers never silently replaced, corrupt corpora and bad inputs as one `glmjax: error:` line."""
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest
from helpers import assert_close_scaled, bilingual_lines, case_dir, prepared_corpus

from glmjax import outputs
from glmjax.cli import main
from glmjax.data import pipeline
from glmjax.errors import GlmjaxError, InputError
from glmjax.infer.decode import GenerateConfig

TINY = case_dir("glm130b_tiny_fp16rope")
SAT, CFG, REF = (os.path.join(TINY, n) for n in ("ckpt_tp2", "config.json", "reference.npz"))
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")


def one_error_line(capsys) -> str:
    """The command's stderr, which must be exactly one `glmjax: error:` line (warnings aside)."""
    lines = [x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith("glmjax: warning:")]
    assert len(lines) == 1 and lines[0].startswith("glmjax: error: "), lines
    return lines[0]


def dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()
    return p.pid


def snapshot(d) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(r, f), d): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(d) for f in fs}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A compact-layout tokenizer (tok/) and a prepared corpus (data/) the tiny model's vocabulary holds."""
    d = tmp_path_factory.mktemp("corpus")
    prepared_corpus(d, bilingual_lines(300, 3), 600, layout="compact")
    return d


# --- 1. leftovers of interrupted runs -------------------------------------------------------------------
def kill_once_partial(argv, prefix):
    """Start `glmjax ARGV`, kill -9 it (no handler runs) once its `PREFIX.partial-PID` appears; the partial."""
    p = subprocess.Popen([sys.executable, "-m", "glmjax", *argv], env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    partial = prefix.parent / f"{prefix.name}.partial-{p.pid}"
    deadline = time.monotonic() + 120
    while not partial.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    p.kill()
    p.wait()
    return partial


def test_convert_killed_mid_write_leaves_a_partial_that_the_next_run_removes(tmp_path, capsys):
    out = tmp_path / "OUT"
    argv = ["convert", "--from", f"sat:{SAT}", "--to", f"orbax:{out}", "--config", CFG]
    partial = kill_once_partial(argv, tmp_path / ".OUT")
    assert partial.is_dir() and not out.exists(), "the conversion ended before it could be killed"
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"glmjax: warning: removed {partial}" in err
    assert sorted(os.listdir(tmp_path)) == ["OUT"]
    from glmjax.checkpoint import load_params
    from glmjax.config import resolve
    from glmjax.parallel.mesh import make_mesh

    mesh = make_mesh(None)
    _, got = load_params("orbax", str(out), None, mesh)
    _, want = load_params("sat", SAT, resolve(path=CFG), mesh)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)


def test_old_output_of_a_dead_run_is_put_back_when_the_output_is_missing(tmp_path, capsys):
    """Killed between its two renames, a run leaves the previous complete output as .NAME.old-PID."""
    old = tmp_path / f".out.old-{dead_pid()}"
    old.mkdir()
    (old / "weights").write_text("complete")
    with pytest.raises(GlmjaxError, match="exists; pass --overwrite"):
        with outputs.atomic_dir(str(tmp_path / "out"), overwrite=False):
            raise AssertionError("atomic_dir must refuse before its body runs")
    assert (tmp_path / "out" / "weights").read_text() == "complete"
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert f"glmjax: warning: restored {tmp_path / 'out'} from {old}" in capsys.readouterr().err


def test_newest_of_several_dead_old_outputs_is_restored_and_the_rest_removed(tmp_path):
    olds = [tmp_path / f".out.old-{dead_pid()}" for _ in range(2)]
    for k, old in enumerate(olds):
        old.mkdir()
        (old / "v").write_text(str(k))
        os.utime(old, ns=(10**18 + k, 10**18 + k))
    outputs.recover_stale(str(tmp_path / "out"))
    assert (tmp_path / "out" / "v").read_text() == "1"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_stale_old_and_partial_beside_a_present_output_are_removed(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("new")
    pid = dead_pid()
    for name in (f".out.old-{pid}", f".out.partial-{pid}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x").write_text("stale")
    (tmp_path / f".out.npz.tmp-{pid}-abc123").write_text("stale")  # an atomic_file temporary
    with outputs.atomic_dir(str(tmp_path / "out"), overwrite=True) as tmp:
        pathlib.Path(tmp, "keep").write_text("newer")
    outputs.recover_stale(str(tmp_path / "out.npz"))
    assert sorted(os.listdir(tmp_path)) == ["out"] and (tmp_path / "out" / "keep").read_text() == "newer"
    assert capsys.readouterr().err.count("glmjax: warning: removed") == 3


def test_leftovers_of_a_live_process_are_never_touched(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = [f".out.partial-{live.pid}", f".out.old-{live.pid}"]
        for name in names:
            (tmp_path / name).mkdir()
        outputs.recover_stale(str(tmp_path / "out"))  # out is missing, yet the live run's .old stays
        assert sorted(os.listdir(tmp_path)) == sorted(names)
    finally:
        live.kill()
        live.wait()


def test_leftovers_under_this_processes_pid_that_it_is_not_writing_are_stale(tmp_path):
    """A restarted container hands out the same PIDs again: the killed run may have had ours."""
    (tmp_path / f".out.old-{os.getpid()}").mkdir()
    (tmp_path / f".out.partial-{os.getpid()}").mkdir()
    with outputs.atomic_file(str(tmp_path / "f")):
        with outputs.atomic_dir(str(tmp_path / "g"), overwrite=False) as tmp:
            for dst in ("out", "f", "g"):
                outputs.recover_stale(str(tmp_path / dst))  # ours, being written: kept
            assert os.path.isdir(tmp)
    assert sorted(os.listdir(tmp_path)) == ["f", "g", "out"]


def test_data_prepare_removes_the_partial_of_a_killed_prepare(corpus, tmp_path, capsys):
    partial = tmp_path / f".data.partial-{dead_pid()}"
    (partial / "sub").mkdir(parents=True)
    (partial / "tokens-00000.bin").write_bytes(b"\0" * 64)
    assert main(["data", "prepare", "--tokenizer", str(corpus / "tok"), "--input", str(corpus / "corpus.txt"),
                 "--out", str(tmp_path / "data")]) == 0
    assert f"glmjax: warning: removed {partial}" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["data"] and len(pipeline.TokenShards(str(tmp_path / "data"))) > 0


# --- 2. single-file outputs through fresh temporaries ---------------------------------------------------
def test_atomic_file_writes_whole_and_leaves_nothing_on_failure(tmp_path):
    dst = tmp_path / "f.txt"
    with pytest.raises(RuntimeError):
        with outputs.atomic_file(str(dst)) as f:
            f.write("half")
            raise RuntimeError("stop")
    assert os.listdir(tmp_path) == []
    with outputs.atomic_file(str(dst)) as f:
        f.write("whole")
    assert dst.read_text() == "whole" and os.listdir(tmp_path) == ["f.txt"]
    mask = os.umask(0)
    os.umask(mask)
    assert dst.stat().st_mode & 0o777 == 0o666 & ~mask  # an ordinary file's mode, not mkstemp's 0600


def _plant(link, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, link)
    return victim


def test_forward_output_never_follows_a_link_at_the_old_temporary_name(tmp_path, capsys):
    out = tmp_path / "out.npz"
    victim = _plant(tmp_path / f".out.npz.tmp-{os.getpid()}.npz", tmp_path)
    with np.load(REF) as z:
        np.savez(tmp_path / "in.npz", **{k: z[k] for k in ("tokens", "position_ids", "attention_mask")})
        want = z["logits"]
    assert main(["forward", "--checkpoint", SAT, "--config", CFG, "--inputs", str(tmp_path / "in.npz"),
                 "--output", str(out)]) == 0
    assert victim.read_text() == "precious"
    with np.load(out) as z:
        assert_close_scaled(z["logits"], want)


def test_data_inspect_output_never_follows_a_link_at_the_old_temporary_name(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    victim = _plant(tmp_path / f".s.npz.tmp-{os.getpid()}.npz", tmp_path)
    (tmp_path / "exp.yaml").write_text(f"model: {{preset: glm-test}}\ndata: {{path: {corpus / 'data'}}}\n"
                                       "objective: {seq_length: 64, window: 16}\n")
    assert main(["data", "inspect", "--config", "exp.yaml", "--num-samples", "2", "--output", "s.npz"]) == 0
    assert victim.read_text() == "precious"
    with np.load(tmp_path / "s.npz") as z:
        assert z["tokens"].shape == (2, 64)


def test_generate_output_never_follows_a_link_at_the_old_temporary_name(tmp_path, monkeypatch):
    """The model is stubbed: what is pinned is how the results reach --output."""
    from glmjax import checkpoint
    from glmjax.config import resolve
    from glmjax.infer import blanks, decode

    cfg = resolve(path=CFG)
    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: (cfg, {"w": np.zeros(2, np.float32)},
                                                                    types.SimpleNamespace(vocab_size=512)))
    monkeypatch.setattr(decode, "Generator", lambda *a, **k: None)
    monkeypatch.setattr(blanks, "fill_blanks", lambda gen, tok, prompts, gc, on_token=None:
                        [blanks.Filled(p, p.replace("[MASK]", "x"), ["x"]) for p in prompts])
    out = tmp_path / "out.jsonl"
    victim = _plant(tmp_path / "out.jsonl.tmp", tmp_path)
    (tmp_path / "in.jsonl").write_text('{"prompt": "a [MASK] b"}\n\n{"prompt": "c [MASK]"}\n')
    assert main(["generate", "--checkpoint", SAT, "--input-file", str(tmp_path / "in.jsonl"),
                 "--output", str(out)]) == 0
    assert victim.read_text() == "precious" and os.path.islink(tmp_path / "out.jsonl.tmp")
    assert [json.loads(x)["text"] for x in out.read_text().splitlines()] == ["a x b", "c x"]
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl", "out.jsonl.tmp", "victim.txt"]


def test_tokenizer_save_replaces_links_at_its_file_names_instead_of_writing_through_them(corpus, tmp_path):
    from glmjax.data.tokenizer import CONFIG_FILE, MODEL_FILE, load_tokenizer

    (tmp_path / "t").mkdir()
    victim = _plant(tmp_path / "t" / CONFIG_FILE, tmp_path)
    os.symlink(victim, tmp_path / "t" / MODEL_FILE)
    load_tokenizer(str(corpus / "tok")).save(str(tmp_path / "t"))
    assert victim.read_text() == "precious"
    assert not any(os.path.islink(tmp_path / "t" / n) for n in (CONFIG_FILE, MODEL_FILE))
    assert load_tokenizer(str(tmp_path / "t")).encode("A [MASK] b") == load_tokenizer(str(corpus / "tok")).encode(
        "A [MASK] b")


# --- 3. destinations refused before any work ------------------------------------------------------------
def _destination_cases(r):
    """(argv, fragment): every checkpoint / config is missing, so an error naming the destination shows
    it was checked before anything loaded."""
    fwd = ["forward", "--checkpoint", str(r / "nockpt"), "--inputs", str(r / "noin.npz"), "--output"]
    gen = ["generate", "--checkpoint", str(r / "nockpt"), "--prompt", "a [MASK]", "--output"]
    ins = ["data", "inspect", "--config", str(r / "noexp.yaml"), "--output"]
    cvt = ["convert", "--from", f"orbax:{r / 'nockpt'}", "--to"]
    prep = ["data", "prepare", "--tokenizer", str(r / "notok"), "--input", str(r / "no.txt"), "--out"]
    return [
        ([*fwd, str(r / "afile" / "o.npz")], "afile is not a directory"),
        ([*fwd, "/proc/glmjax-out.npz"], "cannot create files in /proc"),
        ([*fwd, str(r / "dangling.npz")], "dangling symbolic link"),
        ([*fwd, str(r / "adir")], "is a directory"),
        ([*fwd, str(r / "missing" / "o.npz")], "output directory does not exist"),
        ([*gen, str(r / "missing" / "o.jsonl")], "output directory does not exist"),
        ([*gen, str(r / "adir")], "is a directory"),
        ([*gen, str(r / "dangling.npz")], "dangling symbolic link"),
        ([*ins, str(r / "adir")], "is a directory"),
        ([*ins, str(r / "missing" / "s.npz")], "output directory does not exist"),
        ([*ins, str(r / "afile" / "s.npz")], "afile is not a directory"),
        ([*cvt, f"sat:{r / 'afile' / 'deeper' / 'o'}"], "afile is not a directory"),
        ([*cvt, f"sat:{r / 'dangling.npz'}"], "dangling symbolic link"),
        ([*cvt, f"sat:{r / 'afile'}"], "exists and is not a directory"),
        ([*cvt, "sat:/proc/glmjax-out"], "cannot create files in /proc"),
        ([*prep, str(r / "afile" / "d")], "afile is not a directory"),
        ([*prep, str(r / "adir")], "exists; pass --overwrite"),
    ]


@pytest.mark.parametrize("k", range(len(_destination_cases(pathlib.Path("/")))))
def test_unwritable_destination_is_one_line_before_any_work(tmp_path, capsys, k):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    os.symlink(tmp_path / "nowhere" / "x", tmp_path / "dangling.npz")
    argv, fragment = _destination_cases(tmp_path)[k]
    before = sorted(os.listdir(tmp_path))
    assert main(argv) == 2
    assert fragment in one_error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == before and os.listdir(tmp_path / "adir") == []


# --- 4. tokenizer train never silently replaces a tokenizer ---------------------------------------------
def test_tokenizer_train_refuses_an_existing_output_without_overwrite(corpus, tmp_path, capsys):
    shutil.copytree(corpus / "tok", tmp_path / "tok")
    before = snapshot(tmp_path / "tok")
    argv = ["tokenizer", "train", "--input", str(corpus / "corpus.txt"), "--layout", "compact",
            "--out", str(tmp_path / "tok")]
    assert main([*argv, "--vocab-size", "520"]) == 2
    assert "exists; pass --overwrite" in one_error_line(capsys)
    assert snapshot(tmp_path / "tok") == before
    assert main([*argv, "--vocab-size", "100", "--overwrite"]) == 2  # training fails: the old one stays
    assert "tokenizer training failed" in one_error_line(capsys)
    assert snapshot(tmp_path / "tok") == before and sorted(os.listdir(tmp_path)) == ["tok"]
    assert main([*argv, "--vocab-size", "520", "--overwrite"]) == 0
    from glmjax.data.tokenizer import load_tokenizer

    assert load_tokenizer(str(tmp_path / "tok")).num_text <= 520 < load_tokenizer(str(corpus / "tok")).num_text
    assert sorted(os.listdir(tmp_path)) == ["tok"]
    assert sorted(os.listdir(tmp_path / "tok")) == ["glmjax_tokenizer.json", "tokenizer.model"]


def test_interrupted_tokenizer_training_keeps_the_old_tokenizer_and_leaves_no_partial(corpus, tmp_path,
                                                                                        monkeypatch, capsys):
    import sentencepiece as spm

    shutil.copytree(corpus / "tok", tmp_path / "tok")
    before = snapshot(tmp_path / "tok")

    def interrupted(**kwargs):
        open(kwargs["model_prefix"] + ".model", "wb").write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(spm.SentencePieceTrainer, "Train", interrupted)
    assert main(["tokenizer", "train", "--input", str(corpus / "corpus.txt"), "--out", str(tmp_path / "tok"),
                 "--overwrite"]) == 130
    assert snapshot(tmp_path / "tok") == before and sorted(os.listdir(tmp_path)) == ["tok"]
    assert main(["tokenizer", "train", "--input", str(corpus / "corpus.txt"), "--out",
                 str(tmp_path / "new" / "deep" / "tok")]) == 130
    assert sorted(os.listdir(tmp_path)) == ["tok"]  # no half-made parents either


# --- 5. corrupt corpora fail loudly ---------------------------------------------------------------------
def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep(len(data))])


CORRUPTIONS = {
    "manifest not JSON": (lambda d: (d / "manifest.json").write_text("{not json"), "not JSON"),
    "manifest without shards": (lambda d: _edit_manifest(d, lambda m: m.pop("shards")), "no list 'shards'"),
    "manifest without special ids": (lambda d: _edit_manifest(d, lambda m: m["special_ids"].pop("gMASK")),
                                     "special_ids lacks 'gMASK'"),
    "manifest a list": (lambda d: (d / "manifest.json").write_text("[1]"), "not a glmjax-tokens manifest"),
    "tokens missing": (lambda d: (d / "tokens-00000.bin").unlink(), "tokens-00000.bin is missing"),
    "tokens truncated": (lambda d: _truncate(d / "tokens-00000.bin", lambda n: n - 4), "is truncated"),
    "tokens torn mid-id": (lambda d: _truncate(d / "tokens-00000.bin", lambda n: n - 2), "tokens-00000.bin"),
    "docs missing": (lambda d: (d / "docs-00000.npy").unlink(), "docs-00000.npy is missing"),
    "docs truncated": (lambda d: _truncate(d / "docs-00000.npy", lambda n: n - 8), "docs-00000.npy is truncated"),
    "docs header only": (lambda d: _truncate(d / "docs-00000.npy", lambda n: 20), "docs-00000.npy"),
    "docs fewer documents": (lambda d: np.save(d / "docs-00000.npy", np.delete(np.load(d / "docs-00000.npy"), 1)),
                             "does not match its shard"),
}


def _edit_manifest(d, change):
    m = json.loads((d / "manifest.json").read_text())
    change(m)
    (d / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupt_corpus_is_one_clear_error(corpus, tmp_path, name):
    corrupt, fragment = CORRUPTIONS[name]
    shutil.copytree(corpus / "data", tmp_path / "data")
    corrupt(tmp_path / "data")
    with pytest.raises(InputError) as e:
        pipeline.TokenShards(str(tmp_path / "data"))
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_corrupt_corpus_through_data_inspect_is_one_line(corpus, tmp_path, capsys):
    shutil.copytree(corpus / "data", tmp_path / "data")
    _truncate(tmp_path / "data" / "docs-00000.npy", lambda n: n - 8)
    (tmp_path / "exp.yaml").write_text(f"model: {{preset: glm-test}}\ndata: {{path: {tmp_path / 'data'}}}\n"
                                       "objective: {seq_length: 64, window: 16}\n")
    assert main(["data", "inspect", "--config", str(tmp_path / "exp.yaml"), "--output", str(tmp_path / "s.npz")]) == 2
    assert "docs-00000.npy" in one_error_line(capsys)
    assert not (tmp_path / "s.npz").exists()


# --- 6. inputs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arrays, fragment", [
    ({"tokens": np.zeros((0, 8), np.int32), "position_ids": np.zeros((0, 8), np.int32)}, "(batch 0)"),
    ({"tokens": np.zeros((2, 0), np.int32), "position_ids": np.zeros((2, 0), np.int32)}, "(sequence 0)"),
    ({"tokens": np.zeros((2, 8), np.int32), "position_ids": np.zeros((2, 8), np.int32),
      "attention_mask": np.zeros((2, 1, 8, 8), bool), "prefix_mask": np.ones((2, 8), bool)}, "not both"),
    ({"tokens": np.zeros((2, 8), np.int32), "position_ids": np.zeros((2, 8), np.int32),
      "attention_mask": np.zeros((2, 1, 8, 8), bool), "segment_ids": np.ones((2, 8), np.int32)}, "not both"),
    ({"tokens": np.zeros((2, 8), np.int32), "position_ids": np.zeros((2, 8), np.int32),
      "prefix_mask": np.ones((2, 8), np.float32)}, "prefix_mask must be a bool or integer array"),
])
def test_forward_inputs_the_model_would_misread_are_one_line(tmp_path, capsys, arrays, fragment):
    np.savez(tmp_path / "in.npz", **arrays)
    assert main(["forward", "--checkpoint", SAT, "--config", CFG, "--inputs", str(tmp_path / "in.npz"),
                 "--output", str(tmp_path / "o.npz")]) == 2
    assert fragment in one_error_line(capsys)
    assert not (tmp_path / "o.npz").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--input-file", "BAD_UTF8"], "bad.jsonl:2: not UTF-8"),
    (["--input-file", "PROMPT_42"], "p42.jsonl:1: \"prompt\" must be a string, got int"),
    (["--input-file", "EMPTY"], "holds no prompts"),
    (["--input-file", "PROMPT_42", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--prompt", "a [MASK]", "--length-penalty", "nan"], "length_penalty must be a finite number"),
    (["--prompt", "a [MASK]", "--length-penalty", "inf"], "length_penalty must be a finite number"),
    (["--prompt", "a [MASK]", "--temperature", "nan"], "temperature must be a finite number"),
    (["--prompt", "a [MASK]", "--temperature", "inf"], "temperature must be a finite number"),
    (["--prompt", "a [MASK]", "--top-p", "nan"], "top_p must be a finite number"),
    (["--prompt", "a [MASK]", "--max-new-tokens", "0"], "max_new_tokens must be >= 1, got 0"),
    (["--prompt", "a [MASK]", "--max-new-tokens", "-3"], "max_new_tokens must be >= 1, got -3"),
    (["--output", "OUT"], "--output holds the results of --prompt or --input-file"),
])
def test_bad_generate_input_is_one_line_before_any_weights_load(tmp_path, capsys, args, fragment):
    (tmp_path / "bad.jsonl").write_bytes(b'{"prompt": "ok [MASK]"}\n{"prompt": "caf\xe9"}\n')
    (tmp_path / "p42.jsonl").write_text('{"prompt": 42}\n')
    (tmp_path / "empty.jsonl").write_text("\n\n")
    names = {"BAD_UTF8": "bad.jsonl", "PROMPT_42": "p42.jsonl", "EMPTY": "empty.jsonl", "OUT": "o.txt"}
    args = [str(tmp_path / names[a]) if a in names else a for a in args]
    assert main(["generate", "--checkpoint", str(tmp_path / "absent"), *args]) == 2
    assert fragment in one_error_line(capsys)


def test_generate_config_refuses_non_finite_numbers():
    for field in ("temperature", "top_p", "length_penalty"):
        for bad in (float("nan"), float("inf"), -float("inf"), "0.5"):
            with pytest.raises(InputError, match=f"{field} must be a finite number"):
                GenerateConfig(**{field: bad})
    GenerateConfig(strategy="beam", length_penalty=np.float32(0.5))  # numpy numbers are numbers


@pytest.mark.parametrize("action", ["encode", "decode"])
def test_non_utf8_stdin_to_the_tokenizer_is_one_line(corpus, monkeypatch, capsys, action):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"A \xff 12"), encoding="utf-8"))
    assert main(["tokenizer", action, "--tokenizer", str(corpus / "tok")]) == 2
    assert "standard input is not UTF-8 (invalid start byte at byte 2)" in one_error_line(capsys)


def test_file_names_read_from_a_manifest_or_an_index_never_leave_their_directory(corpus, tmp_path, capsys):
    """A corpus manifest or a Hugging Face weight index naming `../x` or `/x` is refused in one line."""
    d = corpus
    for bad in ("../victim.bin", "/etc/passwd"):
        data = tmp_path / f"data{len(bad)}"
        shutil.copytree(d / "data", data)
        manifest = json.loads((data / "manifest.json").read_text())
        manifest["shards"][0]["tokens"] = bad
        (data / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(GlmjaxError, match="only a plain file name"):
            pipeline.TokenShards(str(data))
    from glmjax import config as C
    from glmjax.convert.hf_chatglm import config_to_hf

    hf = tmp_path / "hf"
    hf.mkdir()
    cfg = C.resolve("glm-test", overrides={"position_encoding_2d": True, "glu": False,
                                           "tie_word_embeddings": False})
    (hf / "config.json").write_text(json.dumps(config_to_hf(cfg, "float32")))
    (tmp_path / "victim.bin").write_bytes(b"x")
    (hf / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "../victim.bin"}}))
    assert main(["convert", "--from", f"hf-chatglm:{hf}", "--to", f"orbax:{tmp_path / 'out'}"]) == 2
    assert "only a plain file name" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_convert_overwrite_killed_mid_write_keeps_the_previous_output(tmp_path, capsys):
    """kill -9 while `convert --overwrite` writes its replacement: the old output is still there, whole;
    the next run clears the partial and replaces it."""
    out = tmp_path / "OUT"
    assert main(["convert", "--from", f"sat:{SAT}", "--to", f"orbax:{out}", "--config", CFG, "--dtype",
                 "float16"]) == 0
    before = snapshot(out)
    argv = ["convert", "--from", f"sat:{SAT}", "--to", f"orbax:{out}", "--config", CFG, "--overwrite"]
    partial = kill_once_partial(argv, tmp_path / ".OUT")
    assert partial.is_dir(), "the conversion ended before it could be killed"
    assert snapshot(out) == before  # the previous output, byte for byte
    capsys.readouterr()
    assert main(argv) == 0
    assert f"removed {partial}" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["OUT"] and snapshot(out) != before
