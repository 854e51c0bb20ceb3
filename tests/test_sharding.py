"""Meshes, the rules table, and sharded = unsharded on an 8-device CPU mesh (forward and gradients);
batches of any size on any mesh (padded to data*fsdp, the real rows returned)."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close_scaled, bilingual_lines, case_dir, prepared_corpus
from jax.sharding import PartitionSpec as P

from glmjax import config as C
from glmjax.convert.sat import read_sat_checkpoint
from glmjax.errors import MeshError
from glmjax.model import api
from glmjax.model.glm import GLM
from glmjax.parallel import rules
from glmjax.parallel.mesh import make_mesh, parse_mesh_spec


def test_mesh_spec_parsing():
    assert parse_mesh_spec("data=2,fsdp=2,tensor=2", 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert parse_mesh_spec("fsdp=-1,tensor=4", 8) == {"data": 1, "fsdp": 2, "tensor": 4}
    assert parse_mesh_spec(" tensor = 8 ", 8) == {"data": 1, "fsdp": 1, "tensor": 8}
    assert parse_mesh_spec(None, 8) == {"data": 1, "fsdp": 1, "tensor": 1}
    mesh = make_mesh("data=2,fsdp=-1")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("spec, msg", [
    ("data=3", "needs 3 devices, but 8 are available"),
    ("pipe=2", "unknown axis 'pipe'"),
    ("data=-1,fsdp=-1", "only one axis may be -1"),
    ("data=two", "not an integer"),
    ("data=0", "must be >= 1 or -1"),
    ("data", "is not axis=size"),
    ("data=2,data=4", "given twice"),
    ("fsdp=3,tensor=-1", "not divisible by 3"),
])
def test_bad_mesh_specs_are_one_clear_error(spec, msg):
    with pytest.raises(MeshError, match=msg):
        parse_mesh_spec(spec, 8)


def test_rules_table_places_glm_parameters_megatron_style():
    cfg = C.resolve("glm-test")
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    sh = api.param_shardings(cfg, mesh)
    att, mlp = sh["layers"]["attention"], sh["layers"]["mlp"]
    assert att["qkv_kernel"].spec == P(None, "fsdp", "tensor", None, None)  # [layers, embed, heads, 3, kv]
    assert att["dense_kernel"].spec == P(None, "tensor", None, "fsdp")  # row-parallel: heads in
    assert mlp["wi_kernel"].spec == P(None, "fsdp", None, "tensor")  # [layers, embed, 2, mlp]
    assert mlp["wo_kernel"].spec == P(None, "tensor", "fsdp")
    assert sh["word_embeddings"].spec == P("tensor", "fsdp")  # vocab-parallel embedding
    assert sh["final_layernorm"]["scale"].spec == P("fsdp")
    assert rules.named(mesh, "batch", "length", "embed").spec == P(("data", "fsdp"), None, None)


def test_dimension_not_dividing_its_axis_names_parameter_dim_and_axis():
    cfg = C.resolve("glm-tiny")  # inner_hidden_size 170
    with pytest.raises(MeshError, match=r"parameter layers/mlp/wi_bias: dimension 2 \(size 170\) is "
                                        r"not divisible by mesh axis 'tensor' \(size 4\)"):
        api.param_shardings(cfg, make_mesh("fsdp=2,tensor=4"))


@pytest.mark.parametrize("spec", ["data=2,fsdp=2,tensor=2", "data=8"])
def test_forward_pads_any_batch_to_the_mesh_and_returns_only_the_real_rows(tiny_cases, spec):
    """3 rows of the fixture batch on data parallelism 4 or 8: SAT's logits, every layer's hidden
    states and keys/values for exactly those rows; also with a dense mask of batch 1."""
    cfg, ref = tiny_cases["glm130b_tiny_fp16rope"]
    mesh = make_mesh(spec)
    params = api.shard_params(read_sat_checkpoint(os.path.join(case_dir("glm130b_tiny_fp16rope"), "ckpt_tp2"),
                                                  cfg), cfg, mesh)
    pick = [1, 0, 1]
    batch = {k: ref[k][pick] for k in ("tokens", "position_ids", "attention_mask")}
    fwd = api.make_forward(cfg, mesh, collect_hidden=True, collect_kv=True)
    logits, per_layer = fwd(params, batch)
    assert logits.shape == (3, 24, cfg.vocab_size)
    assert_close_scaled(np.asarray(logits), ref["logits"][pick])
    for i in range(cfg.num_layers):
        assert_close_scaled(np.asarray(per_layer["hidden_states"][i]), ref[f"hidden_states_layer{i}"][pick],
                            what=f"hidden_states_layer{i}")
    k, v = (np.asarray(x) for x in per_layer["kv"])  # [layers, 3, s, heads, head_dim]
    mem = np.stack([k, v], axis=3).reshape((cfg.num_layers, 3) + ref["mem_kv"].shape[2:])
    assert_close_scaled(mem, ref["mem_kv"][:, pick], what="mem_kv")
    dec = ref["decode_sequence"][pick]  # one [1, 1, s, s] mask for every row
    dec_logits, _ = fwd(params, {"tokens": dec, "position_ids": np.broadcast_to(np.arange(dec.shape[1]), dec.shape),
                                 "attention_mask": ref["decode_attention_mask"]})
    assert_close_scaled(np.asarray(dec_logits), ref["decode_full_forward_logits"][pick],
                        what="decode_full_forward_logits")


def test_heldout_loss_with_a_batch_not_dividing_the_mesh_equals_one_device(tmp_path):
    """batch_size 3 on data*fsdp = 4: the padding rows add no tokens, loss or accuracy."""
    from glmjax.data.objective import ObjectiveConfig
    from glmjax.infer.evaluate import heldout_loss

    tok = prepared_corpus(tmp_path, bilingual_lines(120, 8), 600)
    cfg = C.resolve("glm-test").replace(vocab_size=-(-tok.vocab_size // 64) * 64, max_sequence_length=64)
    params = jax.device_get(api.init_params(cfg, jax.random.key(1), make_mesh(None)))
    obj = ObjectiveConfig(seq_length=64, window=32)
    data = str(tmp_path / "data")
    want = heldout_loss(cfg, params, make_mesh(None), data, obj, batches=2, batch_size=3, seed=5)
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    got = heldout_loss(cfg, api.shard_params(params, cfg, mesh), mesh, data, obj, batches=2, batch_size=3, seed=5)
    assert got["tokens"] == want["tokens"] > 0
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
    np.testing.assert_allclose(got["accuracy"], want["accuracy"], rtol=1e-6)


def _loss(model, params, batch):
    logits, _ = model.apply({"params": params}, batch["tokens"], batch["position_ids"],
                            prefix_mask=batch["prefix_mask"])
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, batch["targets"][..., None], -1))


def _sharded_grads(cfg, params, batch, mesh):
    p_shard = api.param_shardings(cfg, mesh)
    b_shard = {k: rules.named(mesh, "batch", "length") for k in batch}
    model = GLM(cfg)

    def step(p, b):
        with nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
            return jax.value_and_grad(lambda q: _loss(model, q, b))(p)

    fn = jax.jit(step, in_shardings=(p_shard, b_shard), out_shardings=(None, p_shard))
    with jax.set_mesh(mesh):
        loss, grads = fn(jax.device_put(params, p_shard), batch)
    for g, s in zip(jax.tree.leaves(grads), jax.tree.leaves(p_shard)):
        assert g.sharding.is_equivalent_to(s, g.ndim)
    return loss, grads


@pytest.mark.parametrize("spec", ["data=8", "data=2,fsdp=2,tensor=2", "fsdp=2,tensor=4", "tensor=8"])
def test_sharded_forward_and_gradients_equal_single_device(spec):
    cfg = C.resolve("glm-test")
    one = make_mesh(None)
    params = jax.device_get(api.init_params(cfg, jax.random.key(0), one))
    rng = np.random.default_rng(0)
    b, s = 8, 16
    batch = {"tokens": rng.integers(0, cfg.vocab_size, (b, s)).astype(np.int32),
             "targets": rng.integers(0, cfg.vocab_size, (b, s)).astype(np.int32),
             "position_ids": np.broadcast_to(np.arange(s), (b, s)).astype(np.int32),
             "prefix_mask": np.arange(s)[None] < rng.integers(1, s, (b, 1))}
    want_loss, want_grads = _sharded_grads(cfg, params, batch, one)
    loss, grads = _sharded_grads(cfg, params, batch, make_mesh(spec))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert_close_scaled(np.asarray(g), np.asarray(_get(want_grads, path)),
                            what=jax.tree_util.keystr(path))


def _get(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


@pytest.mark.parametrize("spec", ["data=8", "data=2,fsdp=2,tensor=2", "fsdp=4,tensor=2"])
def test_reference_checkpoint_sharded_matches_sat(tiny_cases, spec):
    """The fixture batch (tiled to 8 rows so every mesh splits it) on a mesh gives SAT's logits."""
    cfg, ref = tiny_cases["glm130b_tiny_fp16rope"]
    mesh = make_mesh(spec)
    params = api.shard_params(read_sat_checkpoint(os.path.join(case_dir("glm130b_tiny_fp16rope"), "ckpt_tp2"),
                                                  cfg), cfg, mesh)
    tile = lambda x: np.concatenate([x] * 4)
    batch = {"tokens": tile(ref["tokens"]), "position_ids": tile(ref["position_ids"]),
             "attention_mask": tile(ref["attention_mask"])}
    logits, per_layer = api.make_forward(cfg, mesh, collect_hidden=True)(params, batch)
    assert logits.sharding.spec == rules.named(mesh, "batch", "length", "vocab").spec
    assert_close_scaled(np.asarray(logits), tile(ref["logits"]))
    for i in range(cfg.num_layers):
        assert_close_scaled(np.asarray(per_layer["hidden_states"][i]), tile(ref[f"hidden_states_layer{i}"]),
                            what=f"hidden_states_layer{i}")


def test_init_params_creates_each_parameter_in_its_shards():
    cfg = C.resolve("glm-test")
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    params = api.init_params(cfg, jax.random.key(0), mesh)
    qkv = params["layers"]["attention"]["qkv_kernel"]
    assert qkv.sharding.spec == P(None, "fsdp", "tensor", None, None)
    assert qkv.addressable_shards[0].data.shape == (2, 32, 4, 3, 8)
    abstract = nn.unbox(api.abstract_params(cfg))
    assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(lambda a: a.shape, params)
