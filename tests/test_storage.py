"""The path layer (glmjax/storage.py): local paths, file:// URLs and bucket URLs reach every file of a
run unmangled. A bucket is stood in for by fsspec's in-memory file system registered as gs:// (what
etils.epath hands gs:// to); orbax's and tensorstore's own I/O and TensorBoard's uploads to a real
bucket cannot run here, so for those the test checks that they receive the URL verbatim."""
import json

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from helpers import tiny_experiment

from glmjax import checkpoint, storage
from glmjax.cli import main
from glmjax.config import resolve
from glmjax.errors import GlmjaxError, InputError
from glmjax.train.report import Reporter


class FakeBucket(MemoryFileSystem):
    """gs:// kept in memory, one store per test."""

    protocol = ("gs",)
    store: dict = {}
    pseudo_dirs = [""]


@pytest.fixture
def bucket():
    from etils.epath import backend

    def forget():  # etils keeps one file system per scheme
        type(backend.fsspec_backend)._get_filesystem.cache_clear()

    FakeBucket.store, FakeBucket.pseudo_dirs = {}, [""]
    FakeBucket.clear_instance_cache()
    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, FakeBucket, clobber=True)
    forget()
    yield fsspec.filesystem("gs")
    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, "gcsfs.GCSFileSystem", clobber=True)
    forget()


def test_paths_and_urls_are_normalized_without_mangling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.normalize("runs/x") == str(tmp_path / "runs" / "x")
    assert storage.normalize(f"file://{tmp_path}/r") == str(tmp_path / "r")
    assert storage.normalize("gs://bucket/run") == "gs://bucket/run"
    assert storage.join("gs://bucket/run/", "3", "state") == "gs://bucket/run/3/state"
    assert storage.kvstore("gs://bucket/run/p.x") == "gs://bucket/run/p.x/"
    with pytest.raises(InputError, match="unsupported URL scheme http://"):
        storage.normalize("http://example.com/run")


def test_a_run_directory_in_a_bucket_holds_its_files(bucket, tmp_path):
    """run.json, experiment.yaml, the tokenizer copy and the step list, written and read back."""
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.model").write_bytes(b"\x00model bytes")
    (tok / "glmjax_tokenizer.json").write_text('{"layout": "compact"}')
    cfg = resolve("glm-test", None, [])
    run = checkpoint.RunDir("gs://bucket/runs/a")
    run.write(cfg, "model: {}\n", str(tok))
    assert bucket.cat("gs://bucket/runs/a/tokenizer/tokenizer.model") == b"\x00model bytes"
    assert json.loads(bucket.cat("gs://bucket/runs/a/run.json"))["tokenizer"] == "tokenizer"
    assert bucket.cat("gs://bucket/runs/a/experiment.yaml") == b"model: {}\n"
    assert run.model_config() == cfg
    assert checkpoint.detect_format("gs://bucket/runs/a") == "run"
    assert run.steps() == []
    for name in ("_CHECKPOINT_METADATA", "commit_success.txt"):  # orbax marks a committed bucket step so
        bucket.pipe(f"gs://bucket/runs/a/4/{name}", b"{}")
    assert run.steps() == [4] and run.state_dir(4) == "gs://bucket/runs/a/4/state"


def test_metrics_and_tensorboard_of_a_bucket_run(bucket, monkeypatch):
    """metrics.jsonl grows by rewriting the object (buckets cannot append); TensorBoard receives
    the URL as given (tensorboardX uploads gs:// itself)."""
    import tensorboardX

    seen = []

    class Recorder:
        def __init__(self, logdir, **kw):
            seen.append(logdir)

        def add_scalar(self, *a):
            pass

        def close(self):
            pass

    monkeypatch.setattr(tensorboardX, "SummaryWriter", Recorder)
    rep = Reporter("gs://bucket/r", 10, 0, log=lambda m: None, progress=False)
    m = {"step": 1, "loss": 2.0, "accuracy": 0.1, "learning_rate": 1e-3, "grad_norm": 1.0, "loss_scale": 1.0,
         "tokens_per_s": 1.0, "step_time": 0.1}
    rep.step(m, log_line=False)
    rep.step(dict(m, step=2), log_line=False)
    rep.close()
    assert seen == ["gs://bucket/r/tensorboard"]
    assert [json.loads(x)["step"] for x in bucket.cat("gs://bucket/r/metrics.jsonl").splitlines()] == [1, 2]
    again = Reporter("gs://bucket/r", 10, 1, log=lambda m: None, progress=False)
    assert again.mark_resume(1) == [2]
    assert json.loads(bucket.cat("gs://bucket/r/metrics.jsonl").splitlines()[-1])["event"] == "resume"


def test_training_checkpoints_get_the_bucket_url(bucket, monkeypatch):
    from orbax.checkpoint._src.path import gcs_utils

    # orbax asks the bucket's own API whether it has a hierarchical namespace: a network call
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    ckpts = checkpoint.TrainCheckpoints("gs://bucket/run")
    assert ckpts.directory == "gs://bucket/run"
    assert str(ckpts._mngr.directory) == "gs://bucket/run"  # orbax hands it to tensorstore's gcs driver
    ckpts.close()


def test_bucket_inputs_and_outputs_that_need_local_disk_are_one_line(tmp_path, capsys):
    """A corpus is memory-mapped and command outputs are local files: a URL there is one error line."""
    exp = tiny_experiment(tmp_path / "e.yaml", "gs://bucket/data", "gs://bucket/run", 600)
    assert main(["train", exp]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.path gs://bucket/data" in err[0] and "memory-mapped" in err[0]
    from glmjax.outputs import check_output

    with pytest.raises(GlmjaxError, match="writes to local disk"):
        check_output("gs://bucket/out.npz")
