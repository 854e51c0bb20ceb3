"""The SAT checkpoint reader: any tensor-parallel degree, and one clear error per broken layout."""
import os
import shutil

import numpy as np
import pytest
import torch
from helpers import case_dir, split_like_convert_tp, write_sat

from glmjax import config as C
from glmjax.convert.sat import read_sat_checkpoint
from glmjax.convert.tables import sat_rules
from glmjax.errors import CheckpointError

TINY = case_dir("glm130b_tiny_fp16rope")


def random_sat_state(cfg, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for rule in sat_rules(cfg):
        for i in range(cfg.num_layers) if rule.per_layer else [None]:
            sd[rule.key(i)] = torch.randn(rule.shape, generator=g).to(dtype)
    return sd


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_tensor_parallel_degree_reads_to_the_same_parameters(tmp_path, dtype):
    cfg = C.resolve("glm-test", overrides={"param_dtype": "float32"})  # 8 heads, mlp 128, vocab 1024
    sd = random_sat_state(cfg, dtype=dtype)
    # SAT files may carry this ignored buffer (convert_tp.py even chunks it, as the tp2 fixture shows)
    sd["mixins.rotary-embedding.rotary_emb.inv_freq"] = torch.ones(8, dtype=torch.float16)
    results = {}
    for tp in (1, 2, 4, 8):
        write_sat(str(tmp_path / f"tp{tp}"), split_like_convert_tp(sd, tp))
        results[tp] = read_sat_checkpoint(str(tmp_path / f"tp{tp}"), cfg, expect_tp=tp)
    import jax

    for tp in (2, 4, 8):
        jax.tree.map(np.testing.assert_array_equal, results[tp], results[1])
    # the glmjax layout is what the model computes with: q/k/v per head, value then gate
    p, h, d = results[1], cfg.hidden_size, cfg.head_dim
    qkv = sd["transformer.layers.1.attention.query_key_value.weight"].float().numpy()
    np.testing.assert_array_equal(p["layers"]["attention"]["qkv_kernel"][1][:, 3, 1, :],
                                  qkv[(3 * 3 + 1) * d:(3 * 3 + 2) * d].T)  # head 3's k rows
    wi = sd["transformer.layers.0.mlp.dense_h_to_4h.weight"].float().numpy()
    f = cfg.inner_hidden_size
    np.testing.assert_array_equal(p["layers"]["mlp"]["wi_kernel"][0][:, 1, :], wi[f:].T)  # gate
    dense = sd["transformer.layers.0.attention.dense.weight"].float().numpy()
    np.testing.assert_array_equal(p["layers"]["attention"]["dense_kernel"][0].reshape(h, h), dense.T)


def test_fixture_tp1_and_tp2_merge_bit_exactly(tiny_cases):
    cfg, _ = tiny_cases["glm130b_tiny_fp16rope"]
    a = read_sat_checkpoint(os.path.join(TINY, "ckpt_tp1"), cfg)
    b = read_sat_checkpoint(os.path.join(TINY, "ckpt_tp2"), cfg)
    import jax

    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture
def tiny_copy(tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(os.path.join(TINY, "ckpt_tp2"), dst)
    os.chmod(dst, 0o755)
    for root, dirs, files in os.walk(dst):
        for n in dirs + files:
            os.chmod(os.path.join(root, n), 0o755)
    return dst


def _cfg(**kw):
    return C.resolve(path=os.path.join(TINY, "config.json"), overrides=kw)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="directory not found"):
        read_sat_checkpoint(str(tmp_path / "nope"), _cfg())


def test_missing_latest(tiny_copy):
    os.remove(tiny_copy / "latest")
    with pytest.raises(CheckpointError, match="has no 'latest' file"):
        read_sat_checkpoint(str(tiny_copy), _cfg())


def test_latest_names_a_missing_iteration(tiny_copy):
    (tiny_copy / "latest").write_text("49300")
    with pytest.raises(CheckpointError, match="names iteration '49300'"):
        read_sat_checkpoint(str(tiny_copy), _cfg())


def test_missing_shard(tiny_copy):
    os.remove(tiny_copy / "1" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt is missing"):
        read_sat_checkpoint(str(tiny_copy), _cfg())


def test_lost_last_shard_shows_as_shapes_contradicting_the_config(tiny_copy):
    os.remove(tiny_copy / "1" / "mp_rank_01_model_states.pt")
    with pytest.raises(CheckpointError, match=r"has shape \(512, 64\), the config implies \(1024, 64\)"):
        read_sat_checkpoint(str(tiny_copy), _cfg())


def test_shard_count_that_does_not_divide_the_heads(tiny_copy):
    shards = tiny_copy / "1"
    shutil.copy(shards / "mp_rank_01_model_states.pt", shards / "mp_rank_02_model_states.pt")
    with pytest.raises(CheckpointError, match="3 tensor-parallel shards, but num_attention_heads=4"):
        read_sat_checkpoint(str(tiny_copy), _cfg())


def test_shard_count_other_than_expected(tiny_copy):
    with pytest.raises(CheckpointError, match="has 2 shards, expected 8"):
        read_sat_checkpoint(str(tiny_copy), _cfg(), expect_tp=8)


def test_truncated_file(tiny_copy):
    f = tiny_copy / "1" / "mp_rank_01_model_states.pt"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="mp_rank_01_model_states.pt: truncated or corrupt"):
        read_sat_checkpoint(str(tiny_copy), _cfg())


def test_not_a_model_states_file(tiny_copy):
    torch.save({"optimizer": {}}, tiny_copy / "1" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="no 'module' state dict"):
        read_sat_checkpoint(str(tiny_copy), _cfg())


def test_shapes_contradicting_the_config(tiny_copy):
    with pytest.raises(CheckpointError, match=r"word_embeddings.weight has shape \(512, 64\), the config "
                                              r"implies \(1024, 64\) per shard at tp=2"):
        read_sat_checkpoint(str(tiny_copy), _cfg(vocab_size=2048))


def test_more_layers_than_the_config(tiny_copy):
    with pytest.raises(CheckpointError, match="unexpected tensor 'transformer.layers.1.*more layers"):
        read_sat_checkpoint(str(tiny_copy), _cfg(num_layers=1))


def test_fewer_layers_than_the_config(tiny_copy):
    with pytest.raises(CheckpointError, match="missing tensor 'transformer.layers.2"):
        read_sat_checkpoint(str(tiny_copy), _cfg(num_layers=3))


def test_replicated_tensors_that_disagree_between_ranks(tiny_copy):
    f = tiny_copy / "1" / "mp_rank_01_model_states.pt"
    obj = torch.load(f, weights_only=True)
    obj["module"]["transformer.final_layernorm.bias"] += 1.0
    torch.save(obj, f)
    with pytest.raises(CheckpointError, match="replicated tensor transformer.final_layernorm.bias differs"):
        read_sat_checkpoint(str(tiny_copy), _cfg())
