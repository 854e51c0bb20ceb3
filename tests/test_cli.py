"""`glmjax info` and `glmjax forward`: outputs, and one error line + exit 2 for each bad input."""
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import assert_close_scaled, case_dir

from glmjax.cli import main

TINY = case_dir("glm130b_tiny_fp16rope")
CKPT, CONFIG, REF = (os.path.join(TINY, n) for n in ("ckpt_tp2", "config.json", "reference.npz"))


def test_info_prints_config_count_and_bytes(capsys):
    assert main(["info", "--preset", "glm-130b"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 128,697,794,560" in out
    assert "float16: 257,395,589,120" in out and "float32: 514,791,178,240" in out
    assert "num_layers: 70" in out and "rotary_dtype: float16" in out


def test_info_from_file_with_overrides(capsys):
    assert main(["info", "--config", CONFIG, "num_layers=4"]) == 0
    assert "num_layers: 4" in capsys.readouterr().out


def test_forward_cli_on_a_mesh_writes_reference_logits(tmp_path):
    """A real subprocess, as a researcher runs it: 8 simulated devices, a 3-axis mesh."""
    inputs = tmp_path / "in.npz"
    with np.load(REF) as z:
        tile = lambda x: np.concatenate([x] * 2)
        np.savez(inputs, tokens=tile(z["tokens"]), position_ids=tile(z["position_ids"]),
                 attention_mask=tile(z["attention_mask"]))
        want = tile(z["logits"])
        want_h = tile(z["hidden_states_layer1"])
    out = tmp_path / "out.npz"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "glmjax", "forward", "--checkpoint", CKPT, "--config", CONFIG,
                        "--inputs", str(inputs), "--output", str(out), "--mesh", "data=2,fsdp=2,tensor=-1",
                        "--hidden-states"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "'tensor': 2" in r.stdout
    with np.load(out) as z:
        assert z["logits"].dtype == np.float32
        assert_close_scaled(z["logits"], want)
        assert_close_scaled(z["hidden_states_layer1"], want_h, what="hidden_states_layer1")
    assert sorted(os.listdir(tmp_path)) == ["in.npz", "out.npz"]  # no temporary left behind


def test_forward_cli_runs_3_rows_on_a_mesh_of_data_parallelism_4(tmp_path, capsys):
    """Rows are padded to data*fsdp inside; the output holds the 3 real rows, SAT's numbers."""
    pick = [0, 1, 1]
    with np.load(REF) as z:
        np.savez(tmp_path / "in.npz", **{k: z[k][pick] for k in ("tokens", "position_ids", "attention_mask")})
        want, want_h = z["logits"][pick], z["hidden_states_layer0"][pick]
    out = tmp_path / "out.npz"
    assert main(["forward", "--checkpoint", CKPT, "--config", CONFIG, "--inputs", str(tmp_path / "in.npz"),
                 "--output", str(out), "--mesh", "data=2,fsdp=2,tensor=2", "--hidden-states"]) == 0
    assert "logits [3, 24, 1024]" in capsys.readouterr().out
    with np.load(out) as z:
        assert_close_scaled(z["logits"], want)
        assert_close_scaled(z["hidden_states_layer0"], want_h, what="hidden_states_layer0")


def _inputs(tmp_path, **change):
    with np.load(REF) as z:
        arrays = {k: z[k] for k in ("tokens", "position_ids", "attention_mask")}
    arrays.update(change)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    p = tmp_path / "in.npz"
    np.savez(p, **arrays)
    return str(p)


def _bad_tokens():
    with np.load(REF) as z:
        t = z["tokens"].copy()
    t[1, 3] = 5000
    return t


@pytest.mark.parametrize("case, msg", [
    ({"tokens": "unknown"}, "unknown token id 5000 at (1, 3): the vocabulary has 1024 ids"),
    ({"tokens": "long"}, "sequence length 80 exceeds max_sequence_length=64"),
    ({"attention_mask": np.zeros((2, 24, 24), bool)}, "attention_mask must be bool [2, 1, 24, 24]"),
    ({"position_ids": np.zeros((2, 2, 24), np.int64)}, "position_ids must be integer [2, 24] for 1-D rotary"),
    ({"position_ids": None}, "inputs need 'tokens' [b, s] and 'position_ids'"),
    ({"position_ids": np.full((2, 24), 64)}, "position_ids must lie in [0, 64)"),
    ({"mesh": "data=3"}, "needs 3 devices, but"),
    ({"mesh": "fsdp=2,tensor=4"}, "dimension 2 (size 170) is not divisible by mesh axis 'tensor'"),
    ({"checkpoint": "missing"}, "checkpoint not found"),
    ({"inputs": "missing"}, "inputs file not found"),
    ({"inputs": "garbage"}, "not a valid .npz"),
    ({"config": "unknown-key"}, "unknown config key 'bogus'"),
    ({"output": "no-dir"}, "output directory does not exist"),
])
def test_forward_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, case, msg):
    change = {k: v for k, v in case.items() if k in ("tokens", "position_ids", "attention_mask")}
    if change.get("tokens") == "unknown":
        change["tokens"] = _bad_tokens()
    elif change.get("tokens") == "long":
        change = {"tokens": np.zeros((2, 80), np.int64), "position_ids": np.zeros((2, 80), np.int64),
                  "attention_mask": None}
    inputs = _inputs(tmp_path, **change)
    ckpt, config, out = CKPT, CONFIG, tmp_path / "out.npz"
    if case.get("checkpoint"):
        ckpt = str(tmp_path / "nowhere")
    if case.get("inputs") == "missing":
        inputs = str(tmp_path / "none.npz")
    if case.get("inputs") == "garbage":
        (tmp_path / "g.npz").write_bytes(b"not a zip")
        inputs = str(tmp_path / "g.npz")
    if case.get("config"):
        config = str(tmp_path / "c.json")
        with open(CONFIG) as f:
            text = f.read()
        (tmp_path / "c.json").write_text(text.replace("{", '{"bogus": 1, ', 1))
    if case.get("output"):
        out = tmp_path / "nodir" / "out.npz"
    argv = ["forward", "--checkpoint", ckpt, "--config", config, "--inputs", inputs, "--output", str(out)]
    if case.get("mesh"):
        argv += ["--mesh", case["mesh"]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("glmjax: error: ") and len(err.splitlines()) == 1, err
    assert msg in err, err
    assert not out.exists()
