"""`glmjax convert`: bit-exact round trips, GLM-130B's split and quantization rules, orbax across
meshes, atomic outputs, and one clear error per bad input."""
import os
import zipfile

import jax
import numpy as np
import pytest
import torch
from helpers import assert_close_scaled, case_dir, split_like_convert_tp, write_sat

from glmjax import config as C
from glmjax import outputs
from glmjax.cli import main
from glmjax.convert import engine, orbax_format, run
from glmjax.convert.sat import sat_source
from glmjax.convert.tables import sat_rules
from glmjax.errors import CheckpointError, GlmjaxError
from glmjax.model import api, quant
from glmjax.parallel.mesh import make_mesh

TINY = ("glm130b_tiny_fp16rope", "glm130b_tiny_fp32rope")


def files_of(d):
    return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("case", TINY)
def test_sat_to_orbax_to_sat_is_byte_identical_to_the_fixture(tmp_path, case, tp):
    """The SAT files glmjax writes are the bytes GLM-130B's tools (torch.save) wrote."""
    src = os.path.join(case_dir(case), f"ckpt_tp{tp}")
    cfg_path = os.path.join(case_dir(case), "config.json")
    assert main(["convert", "--from", f"sat:{src}", "--to", f"orbax:{tmp_path}/ox",
                 "--config", cfg_path]) == 0
    assert main(["convert", "--from", f"orbax:{tmp_path}/ox", "--to", f"sat:{tmp_path}/sat",
                 "--tp", str(tp)]) == 0
    assert files_of(tmp_path / "sat") == files_of(src)
    for rel in files_of(src):
        with open(os.path.join(src, rel), "rb") as a, open(tmp_path / "sat" / rel, "rb") as b:
            assert a.read() == b.read(), rel


def _random_glm_sat(cfg, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for rule, i in engine.ordered(sat_rules(cfg), cfg):
        sd[rule.key(i)] = torch.randn(rule.shape, generator=g).to(dtype)
    return sd


@pytest.fixture(scope="module")
def glm_test_cfg():
    return C.resolve("glm-test")  # 8 heads, MLP 128, vocab 1024: splits 1, 2, 4 and 8 ways


def test_tp2_to_orbax_to_tp4_to_orbax_keeps_every_parameter(tmp_path, glm_test_cfg):
    cfg = glm_test_cfg
    sd = _random_glm_sat(cfg)
    write_sat(str(tmp_path / "tp2"), split_like_convert_tp(sd, 2))
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(__import__("json").dumps(cfg.to_dict()))
    steps = [("sat", "tp2", "orbax", "a", []), ("orbax", "a", "sat", "tp4", ["--tp", "4"]),
             ("sat", "tp4", "orbax", "b", [])]
    for sf, s, df, d, extra in steps:
        cfg_args = ["--config", str(cfg_file)] if sf == "sat" else []
        assert main(["convert", "--from", f"{sf}:{tmp_path / s}", "--to", f"{df}:{tmp_path / d}",
                     *cfg_args, *extra]) == 0
    _, a = orbax_format.orbax_source(str(tmp_path / "a"))
    _, b = orbax_format.orbax_source(str(tmp_path / "b"))
    for rule, i in engine.ordered(sat_rules(cfg), cfg):
        np.testing.assert_array_equal(a.get(rule.path, i), b.get(rule.path, i))
    # the tp4 files hold exactly what GLM-130B's convert_tp.py puts in each rank
    for r, want in enumerate(split_like_convert_tp(sd, 4)):
        got = torch.load(tmp_path / "tp4" / "7" / f"mp_rank_{r:02d}_model_states.pt",
                         weights_only=True)["module"]
        for k, v in want.items():
            assert torch.equal(got[k], v), k


def glm130b_quantize(w, bits):
    """GLM-130B's quantization (quantization/functional.py + the int4 compression), restated in torch
    half arithmetic."""
    w = w.half()
    scale = (w.abs().max(dim=-1).values / ((2 ** (bits - 1)) - 1)).half()
    q = torch.round(w / scale[:, None]).to(torch.int8)
    if bits == 4:
        q = (q[:, 0::2] << 4) | (q[:, 1::2] & 0x0F)
    return q, scale


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_sat_layout_matches_glm130b(tmp_path, glm_test_cfg, bits):
    cfg = glm_test_cfg.replace(param_dtype="float16")
    sd = _random_glm_sat(cfg, dtype=torch.float16)
    write_sat(str(tmp_path / "src"), [sd])
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(__import__("json").dumps(cfg.to_dict()))
    assert main(["convert", "--from", f"sat:{tmp_path / 'src'}", "--to", f"sat:{tmp_path / 'q'}", "--config",
                 str(cfg_file), "--tp", "2", "--quantize", f"int{bits}"]) == 0
    quantized = {r.key(i) for r, i in engine.ordered(sat_rules(cfg), cfg) if r.quantizable}
    for r, want in enumerate(split_like_convert_tp(sd, 2)):
        got = torch.load(tmp_path / "q" / "7" / f"mp_rank_{r:02d}_model_states.pt",
                         weights_only=True)["module"]
        for k, v in want.items():
            if k in quantized:  # scales per shard row, as convert_tp.py quantizes after re-sharding
                q, scale = glm130b_quantize(v, bits)
                assert torch.equal(got[k], q), k
                assert torch.equal(got[k + "_scale"], scale), k
            else:
                assert torch.equal(got[k], v), k
    # reading it back dequantizes shard by shard: within half a quantization step (the row's scale)
    # of every weight -- plus what GLM-130B's float16 arithmetic adds: the rounding of w / scale
    # (half a float16 ulp of the quotient, in steps) and of q * scale
    src = sat_source(str(tmp_path / "q"), cfg)
    for rule in (r for r in sat_rules(cfg) if r.quantizable):
        for layer in range(cfg.num_layers):
            key = rule.key(layer)
            got = rule.from_jax(src.get(rule.path, layer)).astype(np.float64)
            want = sd[key].double().numpy()
            steps = [np.repeat(glm130b_quantize(s[key], bits)[1].double().numpy()[:, None], s[key].shape[1], 1)
                     for s in split_like_convert_tp({key: sd[key]}, 2)]
            step = rule.from_jax(engine.merge_to_jax(rule, steps))
            quotient_ulp = np.spacing(np.abs(want / step).astype(np.float16)).astype(np.float64)
            bound = step * (0.5 + quotient_ulp / 2) + np.spacing(np.abs(got).astype(np.float16))
            assert (np.abs(got - want) <= bound).all(), key
            assert np.abs(got - want).max() > 0.1 * step.max()  # it was quantized


def test_quantization_on_known_values():
    q, scale = quant.quantize_rows(np.array([[127.0, -63.5, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]), 8)
    assert scale.dtype == np.float16 and scale.tolist() == [1.0, 0.0]
    assert q.tolist() == [[127, -64, 0, 1], [0, 0, 0, 0]]  # round half to even, as torch.round
    q4, scale4 = quant.quantize_rows(np.array([[7.0, -7.0, 1.0, -1.0], [3.5, -1.75, 0.0, 0.25]]), 4)
    assert scale4.tolist() == [1.0, 0.5]
    # even column in the high nibble: (7 << 4) | (-7 & 0xF) = 0x79, (1 << 4) | (-1 & 0xF) = 0x1F
    assert q4.view(np.uint8).tolist() == [[0x79, 0x1F], [0x7C, 0x00]]  # -3.5 rounds to -4
    np.testing.assert_array_equal(quant.dequantize_rows(q4, scale4, 4),
                                  np.array([[7, -7, 1, -1], [3.5, -2, 0, 0]], np.float16))


def test_quantized_source_without_its_scales_is_an_error(tmp_path, glm_test_cfg):
    cfg = glm_test_cfg.replace(param_dtype="float16")
    sd = _random_glm_sat(cfg, dtype=torch.float16)
    key = "transformer.layers.0.mlp.dense_4h_to_h.weight"
    sd[key] = glm130b_quantize(sd[key], 8)[0]
    write_sat(str(tmp_path / "q"), [sd])
    with pytest.raises(CheckpointError, match=f"quantized {key} has no {key}_scale"):
        sat_source(str(tmp_path / "q"), cfg).get(("layers", "mlp", "wo_kernel"), 0)


def test_orbax_checkpoint_saved_on_one_mesh_restores_on_another(tmp_path, glm_test_cfg):
    cfg = glm_test_cfg
    mesh_a, mesh_b = make_mesh("tensor=4,fsdp=2"), make_mesh("data=8")
    params = api.init_params(cfg, jax.random.key(3), mesh_a)
    with outputs.atomic_dir(str(tmp_path / "ck"), overwrite=False) as tmp:
        orbax_format.save_params(tmp, cfg, params)
    cfg_b, restored = orbax_format.restore_params(str(tmp_path / "ck"), mesh_b)
    assert cfg_b == cfg
    assert restored["layers"]["mlp"]["wi_kernel"].sharding.mesh.shape == mesh_b.shape
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), params, restored)
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, cfg.vocab_size, (8, 32)).astype(np.int32),
             "position_ids": np.broadcast_to(np.arange(32), (8, 32)).astype(np.int32),
             "prefix_mask": np.arange(32)[None].repeat(8, 0) < 16}
    la, _ = api.make_forward(cfg, mesh_a)(params, batch)
    lb, _ = api.make_forward(cfg, mesh_b)(restored, batch)
    assert_close_scaled(np.asarray(lb), np.asarray(la), rel=1e-6)


# --- safety -------------------------------------------------------------------------------------
TINY_SAT = os.path.join(case_dir("glm130b_tiny_fp16rope"), "ckpt_tp2")
TINY_CFG = os.path.join(case_dir("glm130b_tiny_fp16rope"), "config.json")


def test_existing_output_needs_overwrite_and_is_replaced_only_when_complete(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "precious").write_text("x")
    with pytest.raises(GlmjaxError, match="exists; pass --overwrite"):
        run.convert(f"sat:{TINY_SAT}", f"orbax:{dst}", cfg=C.resolve(path=TINY_CFG))
    assert (dst / "precious").exists()
    run.convert(f"sat:{TINY_SAT}", f"orbax:{dst}", cfg=C.resolve(path=TINY_CFG), overwrite=True)
    assert orbax_format.is_checkpoint(str(dst)) and not (dst / "precious").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_interrupted_conversion_leaves_no_checkpoint_and_keeps_the_old_one(tmp_path, monkeypatch, exc):
    dst = tmp_path / "out"
    run.convert(f"sat:{TINY_SAT}", f"sat:{dst}", cfg=C.resolve(path=TINY_CFG), tp=2)
    before = {rel: (dst / rel).read_bytes() for rel in files_of(dst)}
    real = engine.shard_from_jax
    calls = {"n": 0}

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 7:
            raise exc("stop")
        return real(*args)

    monkeypatch.setattr(engine, "shard_from_jax", failing)
    with pytest.raises(exc):
        run.convert(f"sat:{TINY_SAT}", f"sat:{dst}", cfg=C.resolve(path=TINY_CFG), tp=1, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no partial directory left behind
    assert {rel: (dst / rel).read_bytes() for rel in files_of(dst)} == before


def test_a_partial_directory_is_not_a_checkpoint(tmp_path):
    partial = tmp_path / ".out.partial-123"
    (partial / "params").mkdir(parents=True)
    assert not orbax_format.is_checkpoint(str(partial))
    with pytest.raises(CheckpointError, match="not a glmjax checkpoint"):
        orbax_format.read_config(str(partial))


# --- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, msg", [
    (["--from", "pt:/x", "--to", "orbax:/y"], "must be FORMAT:PATH"),
    (["--from", f"sat:{TINY_SAT}", "--to", "orbax:OUT"], "needs --config"),
    (["--from", f"sat:{TINY_SAT}", "--to", "orbax:OUT", "--config", TINY_CFG, "--quantize", "int8"],
     "--quantize writes GLM-130B's quantized SAT layout"),
    (["--from", f"sat:{TINY_SAT}", "--to", "orbax:OUT", "--config", TINY_CFG, "--tp", "2"],
     "--tp applies to SAT output only"),
    (["--from", f"sat:{TINY_SAT}", "--to", "sat:OUT", "--config", TINY_CFG, "--tp", "3"],
     "3 tensor-parallel shards, but num_attention_heads=4"),
    (["--from", f"sat:{TINY_SAT}", "--to", "hf-chatglm:OUT", "--config", TINY_CFG],
     "hf-chatglm format holds ChatGLM-architecture models"),
    (["--from", "orbax:MISSING", "--to", "sat:OUT"], "is not a glmjax checkpoint"),
    (["--from", "hf-chatglm:MISSING", "--to", "sat:OUT"], "directory not found"),
    (["--from", f"sat:{TINY_SAT}", "--to", f"sat:{TINY_SAT}", "--config", TINY_CFG], "same directory"),
])
def test_bad_conversions_are_one_error_line(tmp_path, capsys, argv, msg):
    argv = [a.replace("OUT", str(tmp_path / "out")).replace("MISSING", str(tmp_path / "none")) for a in argv]
    assert main(["convert", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("glmjax: error: ") and len(err.splitlines()) == 1 and msg in err, err
    assert not (tmp_path / "out").exists()


def test_orbax_with_a_missing_parameter_is_an_error(tmp_path):
    run.convert(f"sat:{TINY_SAT}", f"orbax:{tmp_path / 'ox'}", cfg=C.resolve(path=TINY_CFG))
    import shutil

    shutil.rmtree(tmp_path / "ox" / "params" / "layers.mlp.wo_kernel")
    with pytest.raises(CheckpointError, match="parameter layers/mlp/wo_kernel is missing or unreadable"):
        run.convert(f"orbax:{tmp_path / 'ox'}", f"sat:{tmp_path / 'sat'}")
    assert not (tmp_path / "sat").exists()


def test_config_that_contradicts_the_checkpoint(tmp_path, capsys):
    run.convert(f"sat:{TINY_SAT}", f"orbax:{tmp_path / 'ox'}", cfg=C.resolve(path=TINY_CFG))
    assert main(["convert", "--from", f"orbax:{tmp_path / 'ox'}", "--to", f"sat:{tmp_path / 's'}",
                 "--config", TINY_CFG, "num_layers=3"]) == 2
    err = capsys.readouterr().err
    assert "differs from the checkpoint's own config" in err and "in num_layers" in err


# --- --verify -------------------------------------------------------------------------------------
def test_verify_reports_logit_agreement_and_fails_above_tolerance(tmp_path, capsys):
    long_case = case_dir("glm130b_long_hd128_fp16rope")
    src = f"sat:{os.path.join(long_case, 'ckpt_tp2')}"
    cfg = os.path.join(long_case, "config.json")
    assert main(["convert", "--from", src, "--to", f"orbax:{tmp_path / 'a'}", "--config", cfg,
                 "--verify"]) == 0
    out = capsys.readouterr().out
    assert "verify (512-token prompt): max |logit diff| 0 " in out and "OK" in out
    assert main(["convert", "--from", src, "--to", f"sat:{tmp_path / 'q'}", "--config", cfg, "--tp", "2",
                 "--quantize", "int8", "--verify", "--max-kl", "0"]) == 1
    assert "ABOVE TOLERANCE" in capsys.readouterr().out
    assert orbax_format.is_checkpoint(str(tmp_path / "a"))


def test_written_files_are_plain_torch_zip(tmp_path):
    run.convert(f"sat:{TINY_SAT}", f"sat:{tmp_path / 's'}", cfg=C.resolve(path=TINY_CFG), tp=2)
    for name in os.listdir(tmp_path / "s" / "1"):
        with zipfile.ZipFile(tmp_path / "s" / "1" / name) as z:
            assert z.testzip() is None  # every CRC-32 checks out


def test_sat_iteration_travels_through_orbax(tmp_path):
    src = tmp_path / "it"
    import shutil

    shutil.copytree(TINY_SAT, src)
    os.chmod(src, 0o755)
    os.chmod(src / "latest", 0o644)
    os.rename(src / "1", src / "49300")
    (src / "latest").write_text("49300")
    run.convert(f"sat:{src}", f"orbax:{tmp_path / 'ox'}", cfg=C.resolve(path=TINY_CFG))
    run.convert(f"orbax:{tmp_path / 'ox'}", f"sat:{tmp_path / 'back'}", tp=2)
    assert (tmp_path / "back" / "latest").read_text() == "49300"
    assert sorted(os.listdir(tmp_path / "back" / "49300")) == sorted(os.listdir(src / "49300"))


def test_forward_runs_an_orbax_checkpoint_without_a_config(tmp_path):
    run.convert(f"sat:{TINY_SAT}", f"orbax:{tmp_path / 'ox'}", cfg=C.resolve(path=TINY_CFG))
    ref = os.path.join(case_dir("glm130b_tiny_fp16rope"), "reference.npz")
    assert main(["forward", "--checkpoint", str(tmp_path / "ox"), "--inputs", ref,
                 "--output", str(tmp_path / "out.npz")]) == 0
    with np.load(tmp_path / "out.npz") as z, np.load(ref) as r:
        assert_close_scaled(z["logits"], r["logits"])
