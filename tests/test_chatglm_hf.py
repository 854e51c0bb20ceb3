"""ChatGLM-6B's Hugging Face layout: bit-exact conversion both ways (.bin and .safetensors), and
glmjax's forward against a PyTorch restatement of ChatGLM-6B's modeling_chatglm.py."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_scaled

from glmjax.cli import main
from glmjax.convert import hf_chatglm, orbax_format
from glmjax.model import api
from glmjax.model.layouts import SpecialIds, batch_layout, dense_mask
from glmjax.parallel.mesh import make_mesh

HF_CONFIG = {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "bos_token_id": 1004,
             "eos_token_id": 1005, "mask_token_id": 1000, "gmask_token_id": 1001, "pad_token_id": 3,
             "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "inner_hidden_size": 256,
             "vocab_size": 1024, "max_sequence_length": 64, "layernorm_epsilon": 1e-5,
             "position_encoding_2d": True, "torch_dtype": "float32", "use_cache": True,
             "quantization_bit": 0, "pre_seq_len": None, "prefix_projection": False}
IDS = SpecialIds(mask=1000, gmask=1001, smask=1002, sop=1004, pad=3)


def chatglm_state_dict(seed=0):
    """Random weights under ChatGLM-6B's key names and order (with its rotary buffers)."""
    g = torch.Generator().manual_seed(seed)
    c = HF_CONFIG
    h, f, v = c["hidden_size"], c["inner_hidden_size"], c["vocab_size"]
    rot_dim = h // (c["num_attention_heads"] * 2)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    sd = {"transformer.word_embeddings.weight": r(v, h, scale=0.125)}
    for i in range(c["num_layers"]):
        p = f"transformer.layers.{i}."
        sd.update({
            p + "input_layernorm.weight": 1 + r(h, scale=0.2), p + "input_layernorm.bias": r(h, scale=0.2),
            p + "attention.rotary_emb.inv_freq":
                (1.0 / (10000 ** (torch.arange(0, rot_dim, 2).float() / rot_dim))).half(),
            p + "attention.query_key_value.weight": r(3 * h, h, scale=h ** -0.5),
            p + "attention.query_key_value.bias": r(3 * h, scale=0.1),
            p + "attention.dense.weight": r(h, h, scale=h ** -0.5), p + "attention.dense.bias": r(h, scale=0.1),
            p + "post_attention_layernorm.weight": 1 + r(h, scale=0.2),
            p + "post_attention_layernorm.bias": r(h, scale=0.2),
            p + "mlp.dense_h_to_4h.weight": r(f, h, scale=h ** -0.5), p + "mlp.dense_h_to_4h.bias": r(f, scale=0.1),
            p + "mlp.dense_4h_to_h.weight": r(h, f, scale=f ** -0.5), p + "mlp.dense_4h_to_h.bias": r(h, scale=0.1),
        })
    sd["transformer.final_layernorm.weight"] = 1 + r(h, scale=0.2)
    sd["transformer.final_layernorm.bias"] = r(h, scale=0.2)
    sd["lm_head.weight"] = r(v, h, scale=0.125)
    return sd


def write_hf_bin(folder, sd, shards=2):
    """Hugging Face layout as ChatGLM-6B ships it: config.json, shards and their index."""
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(HF_CONFIG, f)
    keys = list(sd)
    per = math.ceil(len(keys) / shards)
    weight_map = {}
    for s in range(shards):
        name = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k] for k in keys[s * per:(s + 1) * per]}
        torch.save(part, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


# --- ChatGLM-6B's forward, restated in PyTorch from modeling_chatglm.py (not imported from it) ---
def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def chatglm_forward(sd, input_ids, position_ids, attention_mask):
    """input_ids [b, s]; position_ids [b, 2, s]; attention_mask [b, 1, s, s] bool, True = masked."""
    c = HF_CONFIG
    nl, h, nh = c["num_layers"], c["hidden_size"], c["num_attention_heads"]
    hn = h // nh
    ln = lambda x, p: F.layer_norm(x, (h,), sd[p + ".weight"], sd[p + ".bias"], c["layernorm_epsilon"])  # noqa: E731
    x = F.embedding(input_ids, sd["transformer.word_embeddings.weight"]).transpose(0, 1)  # [s, b, h]
    s, b = x.shape[:2]
    # RotaryEmbedding(hidden // (heads * 2), precision=torch.half): inv_freq, t, angles, cos/sin in half
    dim = hn // 2
    inv_freq = (1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))).half()
    t = torch.arange(int(position_ids.max()) + 1, dtype=inv_freq.dtype)
    emb = torch.cat([torch.einsum("i,j->ij", t, inv_freq)] * 2, dim=-1)
    cos_t, sin_t = emb.cos(), emb.sin()
    pos, block = position_ids[:, 0, :].transpose(0, 1), position_ids[:, 1, :].transpose(0, 1)

    def rope(q, ids):
        cos, sin = F.embedding(ids, cos_t).unsqueeze(2), F.embedding(ids, sin_t).unsqueeze(2)
        return q * cos + rotate_half(q) * sin

    alpha = (2 * 28) ** 0.5  # GLMBlock(num_layers=28) default: modeling_chatglm.py never passes it
    for i in range(nl):
        p = f"transformer.layers.{i}."
        a_in = ln(x, p + "input_layernorm")
        qkv = F.linear(a_in, sd[p + "attention.query_key_value.weight"], sd[p + "attention.query_key_value.bias"])
        q, k, v = qkv.view(s, b, nh, 3 * hn).split(hn, dim=-1)
        q1, q2 = q.chunk(2, dim=-1)
        k1, k2 = k.chunk(2, dim=-1)
        q = torch.cat([rope(q1, pos), rope(q2, block)], -1)
        k = torch.cat([rope(k1, pos), rope(k2, block)], -1)
        coeff = float(i + 1)
        scores = torch.einsum("sbnd,tbnd->bnst", q / (math.sqrt(hn) * coeff), k)
        scores = scores.masked_fill(attention_mask, -10000.0).float() * coeff
        probs = F.softmax(scores, dim=-1)
        ctx = torch.einsum("bnst,tbnd->sbnd", probs, v).reshape(s, b, h)
        a_out = F.linear(ctx, sd[p + "attention.dense.weight"], sd[p + "attention.dense.bias"])
        x = a_in * alpha + a_out
        m_in = ln(x, p + "post_attention_layernorm")
        m = F.linear(m_in, sd[p + "mlp.dense_h_to_4h.weight"], sd[p + "mlp.dense_h_to_4h.bias"])
        x = m_in * alpha + F.linear(gelu_tanh(m), sd[p + "mlp.dense_4h_to_h.weight"], sd[p + "mlp.dense_4h_to_h.bias"])
    x = ln(x, "transformer.final_layernorm")
    return F.linear(x, sd["lm_head.weight"]).permute(1, 0, 2)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "chatglm"
    sd = chatglm_state_dict()
    write_hf_bin(str(d), sd)
    return str(d), sd


def _read_all(folder):
    cfg, src = hf_chatglm.hf_source(folder)
    from glmjax.convert import engine
    from glmjax.convert.tables import hf_chatglm_rules

    return {r.key(i): r.from_jax(src.get(r.path, i)) for r, i in engine.ordered(hf_chatglm_rules(cfg), cfg)}


@pytest.mark.parametrize("safetensors", [False, True])
def test_hf_to_orbax_to_hf_is_bit_exact(tmp_path, hf_dir, safetensors):
    folder, sd = hf_dir
    assert main(["convert", "--from", f"hf-chatglm:{folder}", "--to", f"orbax:{tmp_path / 'ox'}"]) == 0
    argv = ["convert", "--from", f"orbax:{tmp_path / 'ox'}", "--to", f"hf-chatglm:{tmp_path / 'hf'}"]
    assert main(argv + (["--safetensors"] if safetensors else [])) == 0
    back = _read_all(str(tmp_path / "hf"))
    for k, v in sd.items():
        if k.endswith("inv_freq"):
            continue
        np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)
    with open(tmp_path / "hf" / "config.json") as f:
        written = json.load(f)
    assert {k: written[k] for k in ("num_layers", "hidden_size", "inner_hidden_size", "vocab_size",
                                    "position_encoding_2d")} == {k: HF_CONFIG[k] for k in (
        "num_layers", "hidden_size", "inner_hidden_size", "vocab_size", "position_encoding_2d")}
    if not safetensors:  # the .bin files are the state dicts ChatGLM's loader expects, buffers included
        loaded = torch.load(tmp_path / "hf" / "pytorch_model.bin", weights_only=True)
        assert list(loaded) == list(sd)
        assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_glmjax_forward_matches_chatglm_pytorch_restatement(tmp_path, hf_dir):
    folder, sd = hf_dir
    assert main(["convert", "--from", f"hf-chatglm:{folder}", "--to", f"orbax:{tmp_path / 'ox'}"]) == 0
    rng = np.random.default_rng(0)
    text = lambda n: [int(t) for t in rng.integers(5, 999, n)]  # noqa: E731
    rows = [text(30) + [IDS.gmask, IDS.sop] + text(20),  # [gMASK], continuation
            text(12) + [IDS.mask] + text(25) + [IDS.sop] + text(9)]  # [MASK] in the middle
    lay = batch_layout(rows, IDS, position_encoding_2d=True)
    mask = dense_mask(lay["prefix_mask"], lay["segment_ids"])
    want = chatglm_forward(sd, torch.from_numpy(lay["tokens"]).long(),
                           torch.from_numpy(lay["position_ids"]).long(), torch.from_numpy(mask)).numpy()
    mesh = make_mesh("data=2,tensor=4")
    cfg, params = orbax_format.restore_params(str(tmp_path / "ox"), mesh)
    cfg = cfg.replace(dtype="float32")
    got, _ = api.make_forward(cfg, mesh)(params, {k: lay[k] for k in ("tokens", "position_ids", "prefix_mask",
                                                                      "segment_ids")})
    n0 = len(rows[0])  # row 0's padded tail is not part of the comparison
    assert_close_scaled(np.asarray(got)[0, :n0], want[0, :n0])
    assert_close_scaled(np.asarray(got)[1], want[1])


def test_hf_errors(tmp_path, hf_dir):
    folder, _ = hf_dir
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    os.remove(broken / "pytorch_model-00002-of-00002.bin")
    with pytest.raises(Exception, match="names pytorch_model-00002-of-00002.bin, which is missing"):
        hf_chatglm.hf_source(str(broken))
    os.remove(broken / "config.json")
    with pytest.raises(Exception, match="has no config.json"):
        hf_chatglm.hf_source(str(broken))
    trunc = tmp_path / "trunc"
    shutil.copytree(folder, trunc)
    f = trunc / "pytorch_model-00001-of-00002.bin"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(Exception, match="truncated or corrupt"):
        hf_chatglm.hf_source(str(trunc))


@pytest.mark.parametrize("safetensors", [False, True])
def test_sharded_hf_output_with_index_reads_back(tmp_path, hf_dir, safetensors):
    folder, sd = hf_dir
    cfg, src = hf_chatglm.hf_source(folder)
    written = hf_chatglm.write_hf(str(tmp_path), src, cfg, safetensors=safetensors, shard_bytes=100_000)
    assert len(written) > 2
    index = "model.safetensors.index.json" if safetensors else "pytorch_model.bin.index.json"
    with open(tmp_path / index) as f:
        weight_map = json.load(f)["weight_map"]
    assert set(weight_map) == set(sd) and set(weight_map.values()) == {os.path.basename(w) for w in written}
    back = _read_all(str(tmp_path))
    for k, v in sd.items():
        if not k.endswith("inv_freq"):
            np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)
