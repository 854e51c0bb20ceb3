"""GLM layouts against GLM-130B's and ChatGLM-6B's own rules, restated literally from their code."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax import config as C
from glmjax.errors import InputError
from glmjax.model.api import init_params
from glmjax.model.glm import GLM
from glmjax.model.layers import blocked_from_layout
from glmjax.model.layouts import CHATGLM6B_IDS, GLM130B_IDS, batch_layout, dense_mask, lengths_layout
from glmjax.parallel.mesh import make_mesh

G = GLM130B_IDS


def glm130b_rule(seq, mask_position, context_length, gmask):
    """GLM-130B generate.py get_masks_and_position_ids, restated in numpy (True = blocked)."""
    n = len(seq)
    m = np.tril(np.ones((n, n)))
    m[:, : context_length - 1] = 1
    pos = np.arange(n)
    if not gmask:
        pos[context_length - 1:] = mask_position
    return m < 0.5, pos


def chatglm_rule(seq, mask_position, sop_index):
    """ChatGLM-6B get_masks / get_position_ids (2-D), restated in numpy (True = blocked)."""
    n = len(seq)
    m = np.tril(np.ones((n, n)))
    m[:, :sop_index] = 1
    pos = np.arange(n)
    pos[sop_index:] = mask_position
    block = np.concatenate([np.zeros(sop_index, int), np.arange(1, n - sop_index + 1)])
    return m < 0.5, np.stack([pos, block])


ROWS = [
    [11, 12, 13, G.gmask, G.sop, 21, 22, 23],  # [gMASK], continuation
    [11, 12, 13, 14, 15, 16, G.gmask, G.sop],  # [gMASK], longer prompt, nothing generated yet
    [11, G.mask, 12, 13, G.sop, 31, 32],  # [MASK] in the middle
    [11, 12, G.smask, G.sop, 41],  # [sMASK] at the end
    [11, G.smask, 12, G.mask, 13, G.sop, 51, 52, 53],  # [MASK] wins over [sMASK]
]


def test_1d_layouts_follow_glm130b_rules_per_row_with_right_padding():
    lay = batch_layout(ROWS, G, seq_len=10)
    dense = dense_mask(lay["prefix_mask"], lay["segment_ids"])
    for b, row in enumerate(ROWS):
        n, sop = len(row), row.index(G.sop)
        kind = G.mask if G.mask in row else G.smask if G.smask in row else G.gmask
        want_mask, want_pos = glm130b_rule(row, row.index(kind), sop + 1, kind == G.gmask)
        np.testing.assert_array_equal(lay["tokens"][b, :n], row)
        np.testing.assert_array_equal(lay["position_ids"][b, :n], want_pos)
        np.testing.assert_array_equal(dense[b, 0, :n, :n], want_mask)
        assert (lay["tokens"][b, n:] == G.pad).all() and (lay["segment_ids"][b, n:] == 0).all()
        assert dense[b, 0, :n, n:].all()  # real tokens never see padding


def test_2d_layout_follows_chatglm_rules_with_left_padding():
    ids = CHATGLM6B_IDS
    rows = [[5, 6, 7, ids.gmask, ids.sop, 8, 9], [5, ids.mask, 6, ids.sop, 8], [5, 6, ids.gmask, ids.sop]]
    lay = batch_layout(rows, ids, position_encoding_2d=True, padding="left")
    s = lay["tokens"].shape[1]
    dense = dense_mask(lay["prefix_mask"], lay["segment_ids"])
    for b, row in enumerate(rows):
        n = len(row)
        kind = ids.mask if ids.mask in row else ids.gmask
        want_mask, want_pos = chatglm_rule(row, row.index(kind), row.index(ids.sop))
        np.testing.assert_array_equal(lay["position_ids"][b, :, s - n:], want_pos)
        np.testing.assert_array_equal(dense[b, 0, s - n:, s - n:], want_mask)
        assert (lay["tokens"][b, : s - n] == ids.pad).all()
        assert dense[b, 0, s - n:, : s - n].all()  # left padding is invisible


def test_jitted_mask_equals_dense_builder():
    lay = batch_layout(ROWS, G, seq_len=10)
    packed_seg = np.array([[1] * 4 + [2] * 5 + [0]])  # two packed samples and a pad
    packed_pre = np.array([[1, 1, 0, 0, 1, 1, 1, 0, 0, 0]], bool)
    for pre, seg in ((lay["prefix_mask"], lay["segment_ids"]), (packed_pre, packed_seg)):
        got = blocked_from_layout(jnp.asarray(pre), jnp.asarray(seg), pre.shape[1])
        np.testing.assert_array_equal(np.asarray(got), dense_mask(pre, seg))


def test_lengths_layout_is_prefix_plus_causality():
    lay = lengths_layout([3, 6], [5, 8], 8)
    dense = dense_mask(lay["prefix_mask"], lay["segment_ids"])
    for b, (p, n) in enumerate([(3, 5), (6, 8)]):
        want, _ = glm130b_rule(list(range(n)), 0, p + 1, True)
        np.testing.assert_array_equal(dense[b, 0, :n, :n], want)


@pytest.fixture(scope="module")
def model_and_params():
    cfg = C.resolve("glm-test", overrides={"rotary_dtype": "float32"})
    return GLM(cfg), init_params(cfg, jax.random.key(0), make_mesh(None))


def _run(model, params, **inputs):
    return np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, **x)[0])(params, inputs))


def test_compact_layout_equals_dense_mask_in_the_model(model_and_params):
    model, params = model_and_params
    lay = batch_layout([[11, 12, 13, 1001, 901, 21, 22], [11, 900, 12, 901, 31]],
                       G.__class__(mask=900, gmask=1001, smask=902, sop=901), seq_len=8)
    compact = _run(model, params, tokens=lay["tokens"], position_ids=lay["position_ids"],
                   prefix_mask=lay["prefix_mask"], segment_ids=lay["segment_ids"])
    dense = _run(model, params, tokens=lay["tokens"], position_ids=lay["position_ids"],
                 attention_mask=dense_mask(lay["prefix_mask"], lay["segment_ids"]))
    np.testing.assert_allclose(compact, dense, rtol=1e-6, atol=1e-6)


def test_packed_samples_attend_only_within_themselves(model_and_params):
    """Two samples packed in one row (block-diagonal) give the logits each gives alone."""
    model, params = model_and_params
    ids = G.__class__(mask=900, gmask=1001, smask=902, sop=901)
    a, b = [11, 12, 900, 13, 901, 21, 22], [14, 15, 16, 1001, 901, 23]
    alone = [batch_layout([r], ids) for r in (a, b)]
    logits_alone = [_run(model, params, tokens=x["tokens"], position_ids=x["position_ids"],
                         prefix_mask=x["prefix_mask"], segment_ids=x["segment_ids"]) for x in alone]
    packed = {
        "tokens": np.concatenate([alone[0]["tokens"], alone[1]["tokens"]], 1),
        "position_ids": np.concatenate([alone[0]["position_ids"], alone[1]["position_ids"]], 1),
        "prefix_mask": np.concatenate([alone[0]["prefix_mask"], alone[1]["prefix_mask"]], 1),
        "segment_ids": np.concatenate([alone[0]["segment_ids"], 2 * alone[1]["segment_ids"]], 1),
    }
    got = _run(model, params, **packed)
    np.testing.assert_allclose(got[:, : len(a)], logits_alone[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[:, len(a):], logits_alone[1], rtol=1e-5, atol=1e-5)


def test_layout_errors_are_one_clear_line():
    with pytest.raises(InputError, match=r"needs a \[sop\]"):
        batch_layout([[1, 2, G.gmask]], G)
    with pytest.raises(InputError, match="needs a \\[MASK\\], \\[sMASK\\] or \\[gMASK\\]"):
        batch_layout([[1, 2, G.sop, 3]], G)
    with pytest.raises(InputError, match="does not fit seq_len=3"):
        batch_layout([[1, G.gmask, G.sop, 3]], G, seq_len=3)
    with pytest.raises(InputError, match="padding"):
        batch_layout([[1, G.gmask, G.sop]], G, padding="middle")
