"""GLM-130B's weight-only INT8/INT4 quantization in glmjax's layouts: the scheme against GLM-130B's own
(restated here in torch), int4 packing on the host and under jit, the quantized einsum and the parameter
tree it declares, the model on quantized parameters, GLM-130B's quantized SAT checkpoints read byte for
byte at any tensor-parallel degree, quantization at load, memory, and bad input."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import assert_close_scaled, case_dir, load_case, split_like_convert_tp, write_sat

from glmjax import checkpoint
from glmjax import config as C
from glmjax.convert import engine, run
from glmjax.convert import sat as S
from glmjax.convert.tables import sat_rules
from glmjax.errors import CheckpointError, ConfigError, GlmjaxError
from glmjax.model import api, quant
from glmjax.model.glm import GLM
from glmjax.parallel.mesh import make_mesh

CASE = "glm130b_tiny_fp16rope"  # hidden 64, 4 heads of 16, GeGLU 170 (85 per rank at tp 2), 2 layers
TINY = case_dir(CASE)
KERNEL_RULES = ("qkv_kernel", "dense_kernel", "wi_kernel", "wo_kernel")


@pytest.fixture(scope="module")
def tiny():
    cfg, ref = load_case(CASE)
    return cfg, ref, S.read_sat_checkpoint(os.path.join(TINY, "ckpt_tp1"), cfg)


@pytest.fixture(scope="module")
def test_cfg():
    return C.resolve("glm-test")  # hidden 64, 8 heads of 8, GeGLU 128: int4 splits 2 ways everywhere


def kernel_rule(cfg, name):
    return next(r for r in sat_rules(cfg) if r.path[-1] == name)


def packed_torch_to_jax(cfg, name, q):
    """Torch-layout quantized bytes [rows, in / 2] -> glmjax layout, written out per kernel (the tables'
    transforms with the packed input size): int4 pairs sit on glmjax's last input axis."""
    h, nh, d, f = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.inner_hidden_size
    return {"qkv_kernel": lambda: q.reshape(nh, 3, d, -1).transpose(3, 0, 1, 2),
            "dense_kernel": lambda: q.T.reshape(nh, -1, h),
            "wi_kernel": lambda: q.reshape(2, f, -1).transpose(2, 0, 1),
            "wo_kernel": lambda: q.T}[name]()


def torch_scale_to_jax(cfg, name, scale):
    nh, d, f = cfg.num_attention_heads, cfg.head_dim, cfg.inner_hidden_size
    return {"qkv_kernel": lambda: scale.reshape(1, nh, 3, d), "wi_kernel": lambda: scale.reshape(1, 2, f),
            "dense_kernel": lambda: scale, "wo_kernel": lambda: scale}[name]()


def glm130b_quantize(w, bits):
    """quantization/functional.py + the int4 compression, restated in torch half arithmetic."""
    w = w.half()
    scale = (w.abs().max(dim=-1).values / ((2 ** (bits - 1)) - 1)).half()
    q = torch.round(w / scale[:, None]).to(torch.int8)
    if bits == 4:
        q = (q[:, 0::2] << 4) | (q[:, 1::2] & 0x0F)
    return q, scale


def glm130b_dequantize(q, scale, bits):
    """GLM-130B's kernels restated in torch: nibbles sign-extended (w >> 4, (w << 4) >> 4), the even
    column from the high one, times the row's half scale in half arithmetic."""
    if bits == 4:
        q = torch.stack([q >> 4, (q << 4) >> 4], -1).reshape(q.shape[0], -1)
    return q.half() * scale[:, None]


def torch_rows(cfg, name, w_jax, groups):
    """The torch-layout matrix of a glmjax kernel, split into its scale groups (column shards of a
    row-parallel kernel, as tools/convert_tp.py quantizes after re-sharding)."""
    wt = kernel_rule(cfg, name).from_jax(w_jax)
    g = groups if quant.KERNELS[name].row_parallel else 1
    return [torch.from_numpy(np.ascontiguousarray(p)) for p in np.split(wt, g, axis=1)]


def reference_quantize(cfg, name, w_jax, bits, groups):
    """glm130b_quantize of the torch-layout matrix (per column shard of a row-parallel kernel), in
    glmjax's layout: scales [1, *out], or stacked [groups, out] for a row-parallel kernel."""
    parts = [[t.numpy() for t in glm130b_quantize(p, bits)] for p in torch_rows(cfg, name, w_jax, groups)]
    q = packed_torch_to_jax(cfg, name, np.concatenate([p[0] for p in parts], axis=1))
    if not quant.KERNELS[name].row_parallel:
        return q, torch_scale_to_jax(cfg, name, parts[0][1])
    return q, np.stack([p[1] for p in parts])


def random_kernel(cfg, name, seed):
    shape = engine.jax_shape(kernel_rule(cfg, name))
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 3.0, shape[-1:]).astype(np.float32)
    return w


# --- (a) the scheme ------------------------------------------------------------------------------
def test_known_values_int8_and_int4():
    w = np.array([[7.0, 3.5], [-7.0, 0.0], [1.0, -1.75], [-1.0, 0.25]], np.float32)  # wo_kernel [mlp 4, embed 2]
    q4, s4 = quant.quantize_kernel(w, "wo_kernel", 4)
    assert s4.dtype == np.float16 and s4.tolist() == [[1.0, 0.5]]
    # embed 0 column: values 7, -7, 1, -1; embed 1: 7, 0, -4 (-3.5 rounds half to even), 0 (0.5 -> 0)
    # packed along mlp, the even mlp index in the high nibble
    assert q4.dtype == np.int8 and q4.view(np.uint8).tolist() == [[0x79, 0x70], [0x1F, 0xC0]]
    q8, s8 = quant.quantize_kernel(w * 127 / 7, "wo_kernel", 8)
    assert s8.dtype == np.float16
    assert q8[:, 0].tolist() == [127, -127, 18, -18] and q8[:, 1].tolist() == [127, 0, -64, 9]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("name", KERNEL_RULES)
def test_quantize_kernel_is_glm130bs_scheme_in_glmjax_layout(test_cfg, name, bits, groups):
    cfg = test_cfg
    w = random_kernel(cfg, name, seed=len(name) + bits + groups)
    w[(0,) * w.ndim] = 0.0  # a zero weight and a half-way value stay exact
    q, s = quant.quantize_kernel(w, name, bits, groups)
    want_q, want_s = reference_quantize(cfg, name, w, bits, groups)
    spec = quant.KERNELS[name]
    g = groups if spec.row_parallel else 1
    assert q.dtype == np.int8 and s.dtype == np.float16
    assert (q.shape, s.shape) == quant.quantized_shapes(name, w.shape, bits, groups)
    assert s.shape[0] == g
    np.testing.assert_array_equal(q, want_q)
    np.testing.assert_array_equal(s, want_s)
    # values and scales: scale = max|w| / (2^(b-1) - 1) in float16 over each group's inputs
    vals = quant.unpack_int4(q, spec.n_in - 1) if bits == 4 else q
    top = 2 ** (bits - 1) - 1
    grouped = vals.reshape((g, -1) + vals.shape[spec.n_in:])
    assert np.abs(grouped).max(axis=1).min() == top and np.abs(vals).max() <= top
    w16 = np.abs(w.astype(np.float16)).reshape((g, -1) + w.shape[spec.n_in:]).max(axis=1)
    np.testing.assert_array_equal(s, (w16 / np.float16(top)).astype(np.float16))


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_int4_pack_unpack_round_trip_every_byte_on_host_and_in_jit(axis):
    """One pack/unpack pair: numpy in, numpy out on the host; jax in, the same values out under jit."""
    every = np.arange(-128, 128, dtype=np.int16).astype(np.int8).reshape(4, 8, 8)
    vals = quant.unpack_int4(every, axis)
    assert isinstance(vals, np.ndarray) and vals.dtype == np.int8
    assert vals.min() == -8 and vals.max() == 7
    assert vals.shape[axis % 3] == 2 * every.shape[axis % 3]
    packed = quant.pack_int4(vals, axis)
    assert isinstance(packed, np.ndarray) and packed.dtype == np.int8
    np.testing.assert_array_equal(packed, every)
    even, odd = quant.unpack_int4(every, axis, halves=True)
    np.testing.assert_array_equal(even, np.take(vals, np.arange(0, vals.shape[axis], 2), axis))
    np.testing.assert_array_equal(odd, np.take(vals, np.arange(1, vals.shape[axis], 2), axis))

    jit_vals, jit_even, jit_odd, jit_packed = jax.jit(lambda b: (
        quant.unpack_int4(b, axis), *quant.unpack_int4(b, axis, halves=True),
        quant.pack_int4(quant.unpack_int4(b, axis), axis)))(jnp.asarray(every))
    assert isinstance(jit_vals, jax.Array) and jit_vals.dtype == jnp.int8 and jit_packed.dtype == jnp.int8
    for got, want in ((jit_vals, vals), (jit_even, even), (jit_odd, odd), (jit_packed, every)):
        np.testing.assert_array_equal(np.asarray(got), want)


def test_int4_nibble_order_is_glm130bs():
    # even index in the high nibble, sign-extended; a uint8 view of the bytes reads the same
    np.testing.assert_array_equal(quant.unpack_int4(np.array([[0x7C]], np.uint8), 1), [[7, -4]])
    np.testing.assert_array_equal(quant.pack_int4(np.array([[7, -4], [-8, 1]], np.int8), 1).view(np.uint8),
                                  [[0x7C], [0x81]])
    with pytest.raises(ConfigError, match="int4 packing needs an even axis 1"):
        quant.pack_int4(np.zeros((2, 3), np.int8), 1)


# --- (b) dequantization --------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("name", KERNEL_RULES)
def test_dequantize_kernel_is_glm130bs_dequantization_bitwise(test_cfg, name, bits, groups):
    cfg = test_cfg
    rule = kernel_rule(cfg, name)
    w = random_kernel(cfg, name, seed=100 + len(name) + bits + groups)
    q, s = quant.quantize_kernel(w, name, bits, groups)
    got = np.asarray(jax.jit(lambda a, b: quant.dequantize_kernel(a, b, name, bits, jnp.float16))(q, s))
    assert got.dtype == np.float16 and got.shape == w.shape
    want = np.concatenate([glm130b_dequantize(*glm130b_quantize(p, bits), bits).numpy()
                           for p in torch_rows(cfg, name, w, groups)], axis=1)
    np.testing.assert_array_equal(rule.from_jax(got).view(np.uint16), want.view(np.uint16))
    host = quant.dequantize_kernel(q, s, name, bits, np.float16)  # numpy in: numpy on the host, same bits
    assert isinstance(host, np.ndarray)
    np.testing.assert_array_equal(host.view(np.uint16), got.view(np.uint16))
    f32 = np.asarray(quant.dequantize_kernel(jnp.asarray(q), jnp.asarray(s), name, bits, jnp.float32))
    np.testing.assert_array_equal(f32, got.astype(np.float32))  # float16 product, then the compute dtype


@pytest.mark.parametrize("bits", [8, 4])
def test_rows_are_the_same_scheme_in_torch_layout(bits):
    """quantize_rows / dequantize_rows (SAT's [out, in] shards) against GLM-130B's, bytes and scales."""
    w = torch.randn(12, 10, generator=torch.Generator().manual_seed(bits)) * torch.linspace(0.1, 3, 12)[:, None]
    q, s = quant.quantize_rows(w.numpy(), bits)
    want_q, want_s = glm130b_quantize(w, bits)
    np.testing.assert_array_equal(q, want_q.numpy())
    np.testing.assert_array_equal(s, want_s.numpy())
    back = quant.dequantize_rows(q, s, bits)
    assert back.dtype == np.float16 and back.shape == (12, 10)
    want = glm130b_dequantize(want_q, want_s, bits).numpy()
    np.testing.assert_array_equal(back.view(np.uint16), want.view(np.uint16))


# --- (b') the quantized einsum and the parameters it declares ----------------------------------
EQUATIONS = {"qkv_kernel": "bse,ehtd->bshtd", "dense_kernel": "bqhd,hde->bqe", "wi_kernel": "bse,etf->bstf",
             "wo_kernel": "bsf,fe->bse"}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("name", KERNEL_RULES)
def test_quant_einsum_is_einsum_with_the_dequantized_kernel(test_cfg, name, bits, groups):
    eq = EQUATIONS[name]
    w = random_kernel(test_cfg, name, seed=200 + len(name) + bits + groups)
    q, s = quant.quantize_kernel(w, name, bits, groups)
    x_axes, k_axes = eq.split("->")[0].split(",")
    sizes = dict(zip(k_axes, w.shape)) | {"b": 2, "s": 3, "q": 3}
    x = np.random.default_rng(bits + groups).standard_normal([sizes[a] for a in x_axes]).astype(np.float32)
    layer = quant.QuantEinsum(name, bits, jnp.float32, jnp.asarray(q), jnp.asarray(s))
    with jax.default_matmul_precision("highest"):
        got = np.asarray(jax.jit(lambda v: layer(eq, v))(x))
        want = np.asarray(jnp.einsum(eq, x, quant.dequantize_kernel(q, s, name, bits, jnp.float32)))
    assert got.shape == want.shape
    if bits == 8:
        np.testing.assert_array_equal(got, want)
    else:  # int4: the even and odd inputs contract separately, then add -- only the summation order differs
        assert_close_scaled(got, want, rel=1e-6)
    with jax.default_matmul_precision("highest"):
        plain = quant.QuantEinsum(name, 0, jnp.float32, jnp.asarray(w))(eq, x)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(jnp.einsum(eq, x, w)))


def test_int4_einsum_must_contract_the_packed_axis():
    q, s = quant.quantize_kernel(np.ones((4, 6), np.float32), "wo_kernel", 4)
    with pytest.raises(ConfigError, match="must contract x's last axis with the kernel's packed axis 0"):
        quant.QuantEinsum("wo_kernel", 4, jnp.float32, jnp.asarray(q), jnp.asarray(s))("bf,ef->be", jnp.ones((1, 6)))


def kernel_params(cfg):
    """(path, shape, dtype, logical axes) of the kernel parameters GLM(cfg) declares."""
    boxed = api.abstract_params(cfg)
    leaves = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    return sorted(("/".join(k.key for k in path), tuple(leaf.value.shape), str(leaf.value.dtype), tuple(leaf.names))
                  for path, leaf in leaves if "kernel" in path[-1].key)


def test_parameter_tree_of_the_linear_kernels(test_cfg):
    """Names, shapes, dtypes and logical axes as checkpoints, sharding rules and conversion know them
    (glm-test: 2 layers, hidden 64, 8 heads of 8, GeGLU 128)."""
    L, A, M = ("layers",), "layers/attention/", "layers/mlp/"
    assert kernel_params(test_cfg) == sorted([
        (A + "dense_kernel", (2, 8, 8, 64), "float32", L + ("heads", "kv", "embed")),
        (A + "qkv_kernel", (2, 64, 8, 3, 8), "float32", L + ("embed", "heads", None, "kv")),
        (M + "wi_kernel", (2, 64, 2, 128), "float32", L + ("embed", None, "mlp")),
        (M + "wo_kernel", (2, 128, 64), "float32", L + ("mlp", "embed"))])
    assert kernel_params(test_cfg.replace(quantization_bits=8, quantization_groups=2)) == sorted([
        (A + "dense_kernel_q", (2, 8, 8, 64), "int8", L + ("heads", "kv", "embed")),
        (A + "dense_kernel_scale", (2, 2, 64), "float16", L + (None, "embed")),
        (A + "qkv_kernel_q", (2, 64, 8, 3, 8), "int8", L + ("embed", "heads", None, "kv")),
        (A + "qkv_kernel_scale", (2, 1, 8, 3, 8), "float16", L + (None, "heads", None, "kv")),
        (M + "wi_kernel_q", (2, 64, 2, 128), "int8", L + ("embed", None, "mlp")),
        (M + "wi_kernel_scale", (2, 1, 2, 128), "float16", L + (None, None, "mlp")),
        (M + "wo_kernel_q", (2, 128, 64), "int8", L + ("mlp", "embed")),
        (M + "wo_kernel_scale", (2, 2, 64), "float16", L + (None, "embed"))])
    assert kernel_params(test_cfg.replace(quantization_bits=4, glu=False)) == sorted([
        (A + "dense_kernel_q", (2, 8, 4, 64), "int8", L + ("heads", "kv", "embed")),
        (A + "dense_kernel_scale", (2, 1, 64), "float16", L + (None, "embed")),
        (A + "qkv_kernel_q", (2, 32, 8, 3, 8), "int8", L + ("embed", "heads", None, "kv")),
        (A + "qkv_kernel_scale", (2, 1, 8, 3, 8), "float16", L + (None, "heads", None, "kv")),
        (M + "wi_kernel_q", (2, 32, 128), "int8", L + ("embed", "mlp")),
        (M + "wi_kernel_scale", (2, 1, 128), "float16", L + (None, "mlp")),
        (M + "wo_kernel_q", (2, 64, 64), "int8", L + ("mlp", "embed")),
        (M + "wo_kernel_scale", (2, 1, 64), "float16", L + (None, "embed"))])


# --- (c) the model on quantized parameters ------------------------------------------------------
def forward(cfg, params, ref):
    with jax.default_matmul_precision("highest"):
        logits, _ = jax.jit(lambda p: GLM(cfg).apply({"params": p}, jnp.asarray(ref["tokens"], jnp.int32),
                                                     jnp.asarray(ref["position_ids"], jnp.int32),
                                                     attention_mask=jnp.asarray(ref["attention_mask"])))(params)
    return np.asarray(logits)


@pytest.mark.parametrize("bits, groups", [(8, 1), (8, 2), (4, 1)])
def test_quantized_forward_is_the_forward_of_the_dequantized_weights(tiny, bits, groups):
    cfg, ref, float_params = tiny
    cfg = cfg.replace(dtype="float32")
    qtree = quant.quantize_params(float_params, bits, groups)
    qcfg = cfg.replace(quantization_bits=bits, quantization_groups=groups)
    jax.tree.map(lambda a, b: None, qtree, nn.unbox(api.abstract_params(qcfg)))  # same structure
    got = forward(qcfg, qtree, ref)
    want = forward(cfg, quant.dequantize_params(qtree, bits), ref)
    assert_close_scaled(got, want, rel=1e-6)
    # and it is a quantized model: close to the float one, not equal to it
    err = assert_close_scaled(got, ref["logits"], rel=0.05 if bits == 8 else 0.3)
    assert err > 1e-5


# --- (d) GLM-130B's quantized SAT checkpoints ---------------------------------------------------
def quantize_state_dict(sd, cfg, bits, keys=None):
    """tools/convert_tp.py --quantization-bit-width on one rank's state dict (all or some `keys`)."""
    out = dict(sd)
    for rule, i in engine.ordered(sat_rules(cfg), cfg):
        if rule.quantizable and (keys is None or rule.key(i) in keys):
            out[rule.key(i)], out[rule.key(i) + "_scale"] = glm130b_quantize(sd[rule.key(i)], bits)
    return out


def tiny_state_dict():
    return torch.load(os.path.join(TINY, "ckpt_tp1", "1", "mp_rank_00_model_states.pt"), weights_only=True)["module"]


def assert_trees_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)

    def eq(a, b):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)

    jax.tree.map(eq, got, want)


@pytest.mark.parametrize("bits, tp", [(8, 1), (8, 2), (4, 1)])
def test_quantized_sat_written_from_the_fixture_reads_back_exactly(tmp_path, tiny, bits, tp):
    cfg, _, float_params = tiny
    S.write_sat_checkpoint(str(tmp_path / "q"), S.sat_source(os.path.join(TINY, "ckpt_tp1"), cfg), cfg, tp,
                         quantize_bits=bits)
    assert S.sat_quantization_bits(str(tmp_path / "q"), cfg) == bits
    qcfg, tree = S.read_sat_quantized(str(tmp_path / "q"), cfg)
    assert (qcfg.quantization_bits, qcfg.quantization_groups) == (bits, tp)
    assert qcfg.replace(quantization_bits=0, quantization_groups=1) == cfg
    assert_trees_equal(tree, quant.quantize_params(float_params, bits, tp))
    assert tree["layers"]["attention"]["dense_kernel_scale"].shape == (cfg.num_layers, tp, cfg.hidden_size)


@pytest.mark.parametrize("bits, tp", [(4, 2), (8, 4), (4, 8)])
def test_glm130b_quantized_shards_read_byte_for_byte(tmp_path, test_cfg, bits, tp):
    """Shards made as GLM-130B makes them (torch: split with convert_tp.py's rules, then quantized per
    shard): the bytes and scales of each rank land where glmjax's layout puts them."""
    cfg = test_cfg.replace(param_dtype="float16")
    g = torch.Generator().manual_seed(bits * tp)
    sd = {r.key(i): torch.randn(r.shape, generator=g).half() for r, i in engine.ordered(sat_rules(cfg), cfg)}
    shards = [quantize_state_dict(s, cfg, bits) for s in split_like_convert_tp(sd, tp)]
    write_sat(str(tmp_path / "q"), shards)
    qcfg, tree = S.read_sat_quantized(str(tmp_path / "q"), cfg, expect_tp=tp)
    assert (qcfg.quantization_bits, qcfg.quantization_groups) == (bits, tp)
    write_sat(str(tmp_path / "f"), [sd])
    assert_trees_equal(tree, quant.quantize_params(S.read_sat_checkpoint(str(tmp_path / "f"), cfg), bits, tp))
    # spot check against the shard bytes themselves: rank 1's dense_4h_to_h, layer 1
    key = "transformer.layers.1.mlp.dense_4h_to_h.weight"
    per = cfg.inner_hidden_size // tp // (2 if bits == 4 else 1)
    np.testing.assert_array_equal(tree["layers"]["mlp"]["wo_kernel_q"][1][per:2 * per], shards[1][key].numpy().T)
    np.testing.assert_array_equal(tree["layers"]["mlp"]["wo_kernel_scale"][1][1], shards[1][key + "_scale"].numpy())


def logits_on(cfg, params, mesh, ref):
    batch = {"tokens": ref["tokens"].astype(np.int32), "position_ids": ref["position_ids"].astype(np.int32),
             "attention_mask": ref["attention_mask"]}
    with jax.default_matmul_precision("highest"):
        logits, _ = api.make_forward(cfg.replace(dtype="float32"), mesh)(params, batch)
    return np.asarray(logits)


@pytest.mark.parametrize("bits, tp, mesh_spec", [(8, 2, "tensor=2"), (4, 1, "fsdp=2")])
def test_load_params_quantized_sat_equals_the_dequantized_float_path(tmp_path, tiny, bits, tp, mesh_spec):
    cfg, ref, float_params = tiny
    mesh = make_mesh(mesh_spec, jax.devices()[:2])  # int4 packs the 170-wide MLP axis to 85: no tensor split
    S.write_sat_checkpoint(str(tmp_path / "q"), S.sat_source(os.path.join(TINY, "ckpt_tp1"), cfg), cfg, tp,
                         quantize_bits=bits)
    qcfg, params = checkpoint.load_params("sat", str(tmp_path / "q"), cfg, mesh, quantize=f"int{bits}")
    assert (qcfg.quantization_bits, qcfg.quantization_groups) == (bits, tp)
    assert params["layers"]["mlp"]["wo_kernel_q"].dtype == jnp.int8
    assert_trees_equal(jax.device_get(params), quant.quantize_params(float_params, bits, tp))
    dq = quant.dequantize_params(quant.quantize_params(float_params, bits, tp), bits)
    want = logits_on(cfg, api.shard_params(dq, cfg, mesh), mesh, ref)
    assert_close_scaled(logits_on(qcfg, params, mesh, ref), want, rel=1e-6)


def test_float_checkpoints_are_quantized_at_load(tmp_path, tiny):
    """SAT (tp2) and orbax float checkpoints -> GLM-130B's scheme with one scale group, on the host."""
    cfg, _, float_params = tiny
    mesh = make_mesh("tensor=2", jax.devices()[:2])
    qcfg, params = checkpoint.load_params("sat", os.path.join(TINY, "ckpt_tp2"), cfg, mesh, quantize="int8")
    assert (qcfg.quantization_bits, qcfg.quantization_groups) == (8, 1)
    assert_trees_equal(jax.device_get(params), quant.quantize_params(float_params, 8, 1))
    run.convert(f"sat:{os.path.join(TINY, 'ckpt_tp1')}", f"orbax:{tmp_path / 'ox'}", cfg=cfg)
    mesh1 = make_mesh("fsdp=2", jax.devices()[:2])
    qcfg, params = checkpoint.load_params("orbax", str(tmp_path / "ox"), None, mesh1, quantize="int4")
    assert (qcfg.quantization_bits, qcfg.quantization_groups) == (4, 1)
    assert_trees_equal(jax.device_get(params), quant.quantize_params(float_params, 4, 1))
    # a config that asks for int4 is the same request
    qcfg2, params2 = checkpoint.load_params("orbax", str(tmp_path / "ox"), qcfg, mesh1)
    assert qcfg2 == qcfg
    assert_trees_equal(jax.device_get(params2), jax.device_get(params))
    # without quantize: today's float parameters
    fcfg, fparams = checkpoint.load_params("sat", os.path.join(TINY, "ckpt_tp2"), cfg, mesh)
    assert fcfg == cfg and fparams["layers"]["mlp"]["wo_kernel"].dtype == jnp.float32


# --- (e) memory -----------------------------------------------------------------------------------
def test_param_bytes_of_quantized_trees(tiny):
    cfg, _, float_params = tiny
    kernels = lambda t: {k: v for k, v in t["layers"]["attention"].items() if "kernel" in k} | {  # noqa: E731
        k: v for k, v in t["layers"]["mlp"].items() if "kernel" in k}
    f32 = quant.param_bytes(kernels(float_params))
    n = f32 // 4
    for bits, groups in ((8, 1), (4, 1), (8, 2)):
        tree = quant.quantize_params(float_params, bits, groups)
        scales = sum(v.size for k, v in kernels(tree).items() if k.endswith("_scale"))
        assert quant.param_bytes(kernels(tree)) == n * bits // 8 + 2 * scales
        others = quant.param_bytes(float_params) - f32
        assert quant.param_bytes(tree) == others + n * bits // 8 + 2 * scales
    # GLM-130B (fp16 elsewhere): about 257 GB, 131 GB as INT8 (tp 8), 67 GB as INT4 (tp 4), scales included
    c = C.resolve("glm-130b").replace(param_dtype="float16")
    sizes = [quant.param_bytes(nn.unbox(api.abstract_params(c.replace(quantization_bits=b, quantization_groups=g))))
             / 1e9 for b, g in ((0, 1), (8, 8), (4, 4))]
    assert [round(x) for x in sizes] == [257, 131, 67]


# --- (f) bad input ------------------------------------------------------------------------------
def one_line(excinfo, *fragments):
    msg = str(excinfo.value)
    assert "\n" not in msg and all(f in msg for f in fragments), msg


def test_reading_a_float_checkpoint_as_quantized_is_an_error(tiny):
    cfg = tiny[0]
    assert S.sat_quantization_bits(os.path.join(TINY, "ckpt_tp2"), cfg) == 0
    with pytest.raises(CheckpointError) as e:
        S.read_sat_quantized(os.path.join(TINY, "ckpt_tp2"), cfg)
    one_line(e, "is not quantized")


@pytest.mark.parametrize("mix, fragment", [
    ({"transformer.layers.1.mlp.dense_4h_to_h.weight": 4}, "mixes int4 and int8 linear weights"),
    ({"transformer.layers.0.attention.dense.weight": 0}, "mixes float and int8 linear weights"),
])
def test_checkpoint_with_inconsistent_bits(tmp_path, tiny, mix, fragment):
    cfg = tiny[0]
    sd = tiny_state_dict()
    q = quantize_state_dict(sd, cfg, 8, keys={k for k in sd if k not in mix})
    for key, bits in mix.items():
        if bits:
            q[key], q[key + "_scale"] = glm130b_quantize(sd[key], bits)
    write_sat(str(tmp_path / "q"), [q])
    for call in (lambda: S.read_sat_quantized(str(tmp_path / "q"), cfg),
                 lambda: checkpoint.load_params("sat", str(tmp_path / "q"), cfg, make_mesh(), quantize="int8")):
        with pytest.raises(CheckpointError) as e:
            call()
        one_line(e, fragment)


def test_quantized_checkpoint_asked_for_another_width(tmp_path, tiny):
    cfg = tiny[0]
    write_sat(str(tmp_path / "q"), [quantize_state_dict(tiny_state_dict(), cfg, 8)])
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_params("sat", str(tmp_path / "q"), cfg, make_mesh(), quantize="int4")
    one_line(e, "is quantized to int8; it cannot be loaded as int4")
    with pytest.raises(GlmjaxError) as e:
        checkpoint.load_params("sat", str(tmp_path / "q"), cfg, make_mesh(), quantize="int3")
    one_line(e, "quantize must be int8 or int4")
    with pytest.raises(GlmjaxError) as e:
        checkpoint.load_params("sat", str(tmp_path / "q"), cfg.replace(quantization_bits=4), make_mesh(),
                               quantize="int8")
    one_line(e, "the config asks for int4 weights but int8 was requested")
    # without quantize a quantized checkpoint still reads as float (dequantized shard by shard)
    fcfg, params = checkpoint.load_params("sat", str(tmp_path / "q"), cfg, make_mesh())
    assert fcfg == cfg and params["layers"]["attention"]["qkv_kernel"].dtype == jnp.float32


def test_scales_of_the_wrong_kind(tmp_path, tiny):
    cfg = tiny[0]
    q = quantize_state_dict(tiny_state_dict(), cfg, 8)
    key = "transformer.layers.0.attention.query_key_value.weight_scale"
    q[key] = q[key].float()
    write_sat(str(tmp_path / "q"), [q])
    with pytest.raises(CheckpointError) as e:
        S.read_sat_quantized(str(tmp_path / "q"), cfg)
    one_line(e, f"{key} is float32 [192], expected float16 [192]")


def test_bad_bits_and_groups(tiny):
    cfg = tiny[0]
    w = np.ones((170, 64), np.float32)
    with pytest.raises(ConfigError, match="bits must be 4 or 8"):
        quant.quantize_kernel(w, "wo_kernel", 3)
    with pytest.raises(ConfigError, match="int4 packing needs an even input axis in each of its 2 groups, got 85"):
        quant.quantize_kernel(w, "wo_kernel", 4, groups=2)
    with pytest.raises(ConfigError, match="3 quantization groups do not divide"):
        quant.quantized_shapes("dense_kernel", (4, 16, 64), 8, 3)
    with pytest.raises(ConfigError, match="quantization_bits must be 0, 4 or 8"):
        cfg.replace(quantization_bits=2)
