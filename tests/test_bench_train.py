"""tools/bench_train.py: the training-throughput benchmark runs the real step and reports sane figures."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import bench_train  # noqa: E402


def test_bench_train_reports_throughput_and_mfu(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    rc = bench_train.main(["--preset", "glm-test", "--mesh", "data=2,fsdp=2,tensor=2", "--seq-length", "16",
                           "--micro-batch", "8", "--micro-steps", "2", "--steps", "2", "--warmup", "1",
                           "--cpu-peak-size", "256", "--json-out", str(out)])
    stdout = capsys.readouterr().out
    assert rc == 0
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result == json.loads(out.read_text().splitlines()[-1])
    assert result["devices"] == 8 and result["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert result["tokens_per_step"] == 2 * 8 * 16
    assert result["tokens_per_s"] > 0 and 0 < result["step_time_min_s"] <= result["step_time_mean_s"]
    assert 0 < result["mfu"] and result["peak_source"].startswith("measured")
    assert result["num_params"] == 149_248 and result["compile_s"] > 0
    assert "MFU" in stdout and "tokens/s" in stdout


def test_bench_train_bad_input_is_one_line_and_nonzero(capsys):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_train.py"), "--preset", "glm-test",
                        "--mesh", "data=2,tensr=4"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench_train: error: mesh spec") and "'tensr'" in lines[0]
    rc = bench_train.main(["--preset", "glm-test", "--mesh", "data=4,fsdp=2", "--micro-batch", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not divisible by the data parallelism data*fsdp=8" in err[0]
