"""Corpus preparation and the deterministic, resumable, host-sliced GLM loader."""
import json
import os

import jax
import numpy as np
import pytest
from helpers import bilingual_lines

from glmjax.cli import main
from glmjax.data import pipeline
from glmjax.data.objective import ObjectiveConfig
from glmjax.data.tokenizer import train_tokenizer
from glmjax.errors import InputError
from glmjax.parallel.mesh import make_mesh


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    lines = bilingual_lines(3000, 2)
    (d / "a.txt").write_text("\n\n".join(lines[:1500]) + "\n", encoding="utf-8")
    with open(d / "b.jsonl", "wb") as f:
        for line in lines[1500:]:
            f.write((json.dumps({"text": line}, ensure_ascii=False) + "\n").encode())
        f.write(b"[1, 2]\n")  # line 1501: not an object
        f.write(b'{"body": "x"}\n')  # line 1502: no text field
        f.write(b"{not json\n")  # line 1503
        f.write(b'{"text": "caf\xe9"}\n')  # line 1504: latin-1 byte
        f.write((json.dumps({"text": " ".join(lines[:300])}) + "\n").encode())  # one very long document
    (d / "empty.txt").write_text("")
    with open(d / "instr.jsonl", "w") as f:
        for k in range(40):
            f.write(json.dumps({"input": f"Question {k}: what is {k} plus {k}?", "target": f"{2 * k}"}) + "\n")
    tok = train_tokenizer([str(d / "a.txt")], 1500, str(d / "tok"))
    return d, tok


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    d, _ = corpus
    out = tmp_path_factory.mktemp("prep") / "data"
    stats = pipeline.prepare([str(d / "*.txt"), str(d / "b.jsonl")], str(d / "tok"), str(out),
                             instructions=[str(d / "instr.jsonl")], seq_length=512)
    return out, stats


def test_prepare_counts_and_names_bad_input(prepared, capsys):
    out, stats = prepared
    assert stats.files == 4 and stats.empty_files == 1  # a.txt, b.jsonl, empty.txt, instr.jsonl
    assert (stats.bad_json, stats.missing_field, stats.bad_utf8) == (2, 1, 1)
    assert stats.long_documents == 1 and stats.instructions == 40
    assert any("b.jsonl:1504: not UTF-8" in w for w in stats.warnings)
    assert any("b.jsonl:1501: a JSON list, not an object" in w for w in stats.warnings)
    assert any("b.jsonl:1502: no string field 'text'" in w for w in stats.warnings)
    shards = pipeline.TokenShards(str(out))
    assert len(shards) == stats.documents and sum(len(shards.document(k)) for k in range(len(shards))) == stats.tokens


def test_long_documents_are_split_not_dropped(prepared):
    out, _ = prepared
    shards = pipeline.TokenShards(str(out))
    cfg = ObjectiveConfig(seq_length=256, window=64, gpt_prob=1.0, multitask_ratio=0.0, min_gmask_ratio=0.2)
    loader = pipeline.GLMLoader(shards, cfg, global_batch=1, seed=0)
    longest = max(range(len(shards)), key=lambda k: len(shards.document(k)))
    assert len(shards.document(longest)) > 3 * cfg.seq_length
    seen = np.concatenate([loader._stream_at(i).take(cfg.seq_length) for i in range(loader.chunks_per_epoch)])
    doc = shards.document(longest)
    # the epoch's chunks cover the stream: the long document appears whole, across sequences
    starts = np.flatnonzero(seen == doc[0])
    assert any(np.array_equal(seen[s:s + len(doc)], doc) for s in starts)


def _loaders(shards, cfg, hosts, seed):
    """The loader of one process, and the loaders of `hosts` processes, over a global batch of 8."""
    one = pipeline.GLMLoader(shards, cfg, global_batch=8, seed=seed)
    return one, [pipeline.GLMLoader(shards, cfg, global_batch=8, seed=seed, process_index=h, process_count=hosts)
                 for h in range(hosts)]


@pytest.mark.parametrize("hosts", [2, 4])
def test_batches_do_not_depend_on_the_number_of_hosts(prepared, hosts):
    out, _ = prepared
    shards = pipeline.TokenShards(str(out))
    cfg = ObjectiveConfig(seq_length=256, window=64)
    one, many = _loaders(shards, cfg, hosts, seed=5)
    for _ in range(3):
        want = one.next_batch()
        parts = [m.next_batch() for m in many]
        for k in want:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), want[k])


def test_resume_from_saved_state_sees_the_same_batches(prepared):
    out, _ = prepared
    shards = pipeline.TokenShards(str(out))
    cfg = ObjectiveConfig(seq_length=256, window=64)
    straight = pipeline.GLMLoader(shards, cfg, global_batch=4, seed=7)
    batches = [straight.next_batch() for _ in range(6)]
    first = pipeline.GLMLoader(shards, cfg, global_batch=4, seed=7)
    for _ in range(3):
        first.next_batch()
    state = json.loads(json.dumps(first.state()))  # it is small and goes into checkpoints as is
    resumed = pipeline.GLMLoader(shards, cfg, global_batch=4, seed=7)
    resumed.restore(state)
    for want in batches[3:]:
        got = resumed.next_batch()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    with pytest.raises(InputError, match="saved with seed 7"):
        pipeline.GLMLoader(shards, cfg, global_batch=4, seed=8).restore(state)


def test_global_batch_is_sharded_over_data_and_fsdp(prepared):
    out, _ = prepared
    loader = pipeline.GLMLoader(pipeline.TokenShards(str(out)), ObjectiveConfig(seq_length=128, window=32),
                                global_batch=8, seed=0)
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    batch = pipeline.global_batch_on_mesh(loader.next_batch(), mesh)
    assert batch["tokens"].shape == (8, 128)
    assert batch["tokens"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    assert all(s.data.shape == (2, 128) for s in batch["tokens"].addressable_shards)


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(prepared):
    out, _ = prepared
    shards = pipeline.TokenShards(str(out))
    with pytest.raises(InputError, match="the model's vocabulary only 1024"):
        pipeline.GLMLoader(shards, ObjectiveConfig(seq_length=128, window=32), global_batch=1, model_vocab=1024)


def test_data_cli_prepare_and_inspect(corpus, prepared, tmp_path, capsys):
    d, _ = corpus
    out, _ = prepared
    assert main(["data", "prepare", "--tokenizer", str(d / "tok"), "--input", str(d / "a.txt"),
                 "--out", str(tmp_path / "p")]) == 0
    assert "tokens/s" in capsys.readouterr().out
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"model:\n  preset: glm-130b\ndata:\n  path: {out}\n  seed: 3\nobjective:\n  seq_length: 2048\n")
    assert main(["data", "inspect", "--config", str(cfg), "--num-samples", "40", "--output",
                 str(tmp_path / "s.npz"), "objective.gpt_prob=0.5"]) == 0
    printed = capsys.readouterr().out
    assert "mask_ratio" in printed and "gmask_sequences" in printed
    with np.load(tmp_path / "s.npz") as z:
        assert set(z.files) == {"tokens", "targets", "loss_mask", "position_ids", "prefix_mask", "segment_ids"}
        assert z["tokens"].shape == (40, 2048)
    assert main(["data", "prepare", "--tokenizer", str(d / "tok"), "--input", str(d / "nope*.txt"),
                 "--out", str(tmp_path / "q")]) == 2
    assert "input not found" in capsys.readouterr().err
    assert main(["data", "prepare", "--tokenizer", str(d / "tok"), "--input", str(d / "empty.txt"),
                 "--out", str(tmp_path / "q")]) == 2
    assert "no documents" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "q")
    cfg.write_text(f"model:\n  preset: glm-130b\ndata:\n  path: {out}\n  sead: 3\n")
    assert main(["data", "inspect", "--config", str(cfg)]) == 2
    assert "unknown data key 'sead'" in capsys.readouterr().err


# --- the data path at scale: index as arrays, rows per process, background producer, parallel prepare ---
def test_epoch_order_and_starts_are_arrays_that_match_the_per_document_reference(prepared):
    out, _ = prepared
    shards = pipeline.TokenShards(str(out))
    assert shards.doc_lengths.dtype == np.uint32 and not any(isinstance(v, list) and len(v) == len(shards)
                                                         for v in vars(shards).values())
    cfg = ObjectiveConfig(seq_length=128, window=32)
    loader = pipeline.GLMLoader(shards, cfg, global_batch=2, seed=11)
    docs = [shards.document(k) for k in range(len(shards))]
    for epoch in (0, 1):
        # the loader before issue 12: a permutation, then a Python list of lengths in that order
        order = np.random.default_rng([11, 1, epoch]).permutation(len(shards))
        starts = np.concatenate([[0], np.cumsum([len(docs[k]) + 1 for k in order])])
        got = loader.epoch_order(epoch)
        assert got.order.dtype == np.uint32 and got.block_starts.dtype == np.int64
        np.testing.assert_array_equal(got.order, order)
        np.testing.assert_array_equal(got.block_starts, np.append(starts[:-1][::pipeline.STARTS_EVERY], starts[-1]))
        for chunk in range(0, loader.chunks_per_epoch, 7):
            stream = loader._stream_at(epoch * loader.chunks_per_epoch + chunk)
            doc = int(np.searchsorted(starts, chunk * cfg.seq_length, side="right") - 1)
            assert stream.state() == (doc, chunk * cfg.seq_length - int(starts[doc]))
            np.testing.assert_array_equal(stream.documents[doc], docs[order[doc]])


@pytest.mark.parametrize("hosts", [1, 2, 4])
def test_each_process_builds_only_its_rows_and_together_the_global_batch(prepared, hosts):
    out, _ = prepared
    shards = pipeline.TokenShards(str(out))
    cfg = ObjectiveConfig(seq_length=128, window=32)
    one, loaders = _loaders(shards, cfg, hosts, seed=2)
    for position in (0, 8, 21):
        rows = [list(m.rows_at(position)) for m in loaders]
        assert sorted(r for rs in rows for r in rs) == list(range(position, position + 8))  # a partition
        assert all(len(rs) == 8 // hosts for rs in rows)
        want = one.batch_at(position)
        parts = [m.batch_at(position) for m in loaders]
        for k in want:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), want[k])
            assert all(p[k].dtype == want[k].dtype for p in parts)
    one.next_sequence = 16
    np.testing.assert_array_equal(one.next_batch()["tokens"], one.batch_at(16)["tokens"])
    assert one.state()["next_sequence"] == 24


def _prefetch_threads():
    import threading

    return [t for t in threading.enumerate() if t.name.startswith("glmjax-prefetch")]


def test_prefetcher_gives_the_synchronous_batches_and_restarts_on_a_jump(prepared):
    out, _ = prepared
    loader = pipeline.GLMLoader(pipeline.TokenShards(str(out)), ObjectiveConfig(seq_length=128, window=32),
                                global_batch=2, seed=4)
    with pipeline.Prefetcher(loader, stride=2, depth=2) as pre:
        for position in (0, 2, 4, 6, 40, 42, 4, 6):  # contiguous, a jump ahead, a jump back (a resume)
            got, want = pre.get(position), loader.batch_at(position)
            assert set(got) == set(want)
            for k in want:
                assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k])
        assert pre.restarts == 3 and len(_prefetch_threads()) == 1
    assert not _prefetch_threads()
    with pytest.raises(RuntimeError, match="closed"):
        pre.get(8)


def test_prefetcher_raises_the_threads_error_as_itself_and_close_ends_the_thread(prepared, monkeypatch):
    out, _ = prepared
    loader = pipeline.GLMLoader(pipeline.TokenShards(str(out)), ObjectiveConfig(seq_length=128, window=32),
                                global_batch=2, seed=4)
    bad = InputError("corpus shard file tokens-00000.bin is truncated")
    good = loader.batch_at

    def batch_at(position):
        if position == 4:
            raise bad
        return good(position)

    monkeypatch.setattr(loader, "batch_at", batch_at)
    pre = pipeline.Prefetcher(loader, stride=2, depth=3)
    pre.get(0), pre.get(2)
    with pytest.raises(InputError) as e:
        pre.get(4)
    assert e.value is bad and not _prefetch_threads()  # the stream ended with its error
    np.testing.assert_array_equal(pre.get(6)["tokens"], good(6)["tokens"])  # and a new one starts
    pre.close()
    assert not _prefetch_threads()
    with pytest.raises(InputError, match="stride and depth"):
        pipeline.Prefetcher(loader, stride=0)


def test_prepare_in_two_processes_writes_the_same_bytes(corpus, tmp_path, monkeypatch, capsys):
    d, tok = corpus
    monkeypatch.setattr(pipeline, "SHARD_TOKENS", 20000)  # several shards
    monkeypatch.setattr(pipeline, "BLOCK_BYTES", 8192)  # many blocks per file, cut inside paragraphs' runs
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        stats = pipeline.prepare([str(d / "*.txt"), str(d / "b.jsonl")], str(d / "tok"), str(out),
                                 instructions=[str(d / "instr.jsonl")], seq_length=512, workers=workers)
        runs[workers] = (out, stats, capsys.readouterr().err)
    (one, s1, err1), (two, s2, err2) = runs[1], runs[2]
    names = sorted(os.listdir(one))
    assert names == sorted(os.listdir(two)) and sum(n.startswith("tokens-") for n in names) >= 3
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert s1 == s2 and err1 == err2 and err1.count("glmjax: warning:") == 5  # the same warnings, in order
    assert "b.jsonl:1504: not UTF-8" in err1 and s1.long_documents == 1
    # and the same documents as reading the files one document at a time
    ref, stats = [], pipeline.Stats()
    for path in pipeline.expand_inputs([str(d / "*.txt"), str(d / "b.jsonl")]):
        ref += [ids for ids in map(tok.encode, pipeline.read_documents(path, stats)) if ids]
    shards = pipeline.TokenShards(str(one))
    assert len(shards) == len(ref) and all(shards.document(k).tolist() == ref[k] for k in range(len(ref)))
    capsys.readouterr()


def test_prepare_workers_below_one_is_one_error_line(corpus, tmp_path, capsys):
    d, _ = corpus
    assert main(["data", "prepare", "--tokenizer", str(d / "tok"), "--input", str(d / "a.txt"),
                 "--out", str(tmp_path / "p"), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "glmjax: error: --workers must be >= 1, got 0" and not (tmp_path / "p").exists()
    with pytest.raises(InputError, match="--workers must be an integer >= 1"):
        pipeline.prepare([str(d / "a.txt")], str(d / "tok"), str(tmp_path / "q"), workers=-1)
