"""GLM-130B's blank-infilling objective: proportions, Part A / Part B rules, packing, and agreement
with the model's layout builders."""
import jax
import numpy as np
import pytest

from glmjax import config as C
from glmjax.data.objective import (
    Ids,
    ObjectiveConfig,
    TokenStream,
    gmask_sample,
    make_sequence,
    mask_sample,
    pack,
    smask_sample,
)
from glmjax.model.api import init_params
from glmjax.model.glm import GLM
from glmjax.model.layouts import SpecialIds, batch_layout, dense_mask
from glmjax.parallel.mesh import make_mesh

IDS = Ids(mask=1000, gmask=1001, smask=1002, sop=1004, eop=1005, pad=0, sentence_ends=(7,))


def stream(seed=0, n_docs=300):
    rng = np.random.default_rng(seed)
    return TokenStream([list(rng.integers(10, 900, rng.integers(20, 1500))) for _ in range(n_docs)], sep=2)


def reconstruct(sample, ids=IDS):
    """The text a [MASK]/[sMASK] sample was made from: every mask token replaced by its span."""
    a = sample.tokens[sample.prefix]
    b_tok, b_pos = sample.tokens[~sample.prefix], sample.positions[~sample.prefix]
    spans, k = {}, 0
    while k < len(b_tok):
        assert b_tok[k] == ids.sop
        j = k + 1
        while j < len(b_tok) and b_tok[j] != ids.sop:
            j += 1
        spans[int(b_pos[k])] = list(b_tok[k + 1:j])
        k = j
    out = []
    for i, t in enumerate(a):
        out += spans.pop(i) if t in (ids.mask, ids.smask) else [int(t)]
    assert not spans
    return out


@pytest.fixture(scope="module")
def many():
    cfg = ObjectiveConfig()  # GLM-130B's: 2048 tokens, [MASK] windows of 512
    rng, st = np.random.default_rng(1), stream()
    instr = [(list(range(10, 40)), list(range(40, 55))), (list(range(100, 300)), list(range(300, 320)))]
    return cfg, [make_sequence(st, cfg, IDS, rng, instr) for _ in range(6000)]


def test_proportions_match_glm130b(many):
    cfg, seqs = many
    kinds = [samples[0].kind for _, samples in seqs]
    n_instr, n_gmask, n_mask = kinds.count("instruction"), kinds.count("gmask"), kinds.count("mask")
    assert abs(n_instr / len(seqs) - cfg.multitask_ratio) < 0.01
    assert abs(n_gmask / (n_gmask + n_mask) - cfg.gpt_prob) < 0.02
    mask_samples = [s for _, samples in seqs for s in samples if s.kind == "mask"]
    ratio = sum(s.masked for s in mask_samples) / sum(s.text for s in mask_samples)
    spans = [length for s in mask_samples for length in s.spans]
    assert abs(ratio - 0.15) < 0.01 and abs(np.mean(spans) - 3.0) < 0.2
    gm = [s.masked / s.text for _, samples in seqs for s in samples if s.kind == "gmask"]
    assert min(gm) >= 0.2 - 1e-3 and abs(np.mean(gm) - 0.6) < 0.02  # Uniform[0.2, 1]


def test_targets_are_part_b_and_part_a_never_sees_it(many):
    cfg, seqs = many
    for seq, samples in seqs[:120]:
        loss = seq["loss_mask"].astype(bool)
        assert not (loss & seq["prefix_mask"]).any()  # every target is in Part B
        assert (seq["segment_ids"][loss] > 0).all()
        blocked = dense_mask(seq["prefix_mask"][None], seq["segment_ids"][None])[0, 0]
        part_a = seq["prefix_mask"] & (seq["segment_ids"] > 0)
        part_b = ~seq["prefix_mask"] & (seq["segment_ids"] > 0)
        assert blocked[np.ix_(part_a, part_b)].all()  # Part A never sees Part B
        seg = seq["segment_ids"]
        cross = (seg[:, None] != seg[None, :]) & (seg[:, None] > 0)
        assert blocked[cross].all()  # packed samples never see each other
        for s in samples:  # Part B predicts the next token, each span ends in [eop]
            b = ~s.prefix
            nxt = np.append(s.tokens[1:], IDS.eop)
            starts = np.append(s.tokens[1:], IDS.sop) == IDS.sop
            np.testing.assert_array_equal(s.targets[b], np.where(starts, IDS.eop, nxt)[b])


def test_mask_samples_hide_exactly_their_spans():
    cfg, rng = ObjectiveConfig(), np.random.default_rng(3)
    for _ in range(200):
        text = list(rng.integers(10, 900, rng.integers(50, 480)))
        s = mask_sample(text, cfg, IDS, rng)
        assert reconstruct(s) == text
        a = s.tokens[s.prefix]
        assert (a == IDS.mask).sum() == len(s.spans)
    text = [11, 12, 7, 13, 14, 15, 7, 16, 7, 17, 18, 7]
    s = smask_sample(text, cfg.__class__(mask_prob=0.3), IDS, rng)
    assert reconstruct(s) == text and (s.tokens == IDS.smask).sum() >= 1
    for span in s.spans:
        assert span in (3, 4, 2)  # whole sentences


def _layout_of(sample, ids, two_d):
    lay = batch_layout([list(sample.tokens)], ids, position_encoding_2d=two_d)
    return lay


@pytest.mark.parametrize("two_d", [False, True])
def test_objective_layout_equals_the_models_layout_builder(two_d):
    """Single-blank samples: the objective and the core layout builder agree on positions and
    attention, and so the model gives the same logits."""
    cfg = ObjectiveConfig(seq_length=64, window=64, position_encoding_2d=two_d)
    rng = np.random.default_rng(5)
    ids = SpecialIds(mask=IDS.mask, gmask=IDS.gmask, smask=IDS.smask, sop=IDS.sop, pad=IDS.pad)
    text = list(rng.integers(10, 900, 40))
    samples = [gmask_sample(text, cfg, IDS, rng),
               mask_sample(text, ObjectiveConfig(mask_prob=0.05, average_block_length=10.0,
                                                 position_encoding_2d=two_d), IDS, rng)]
    assert len(samples[1].spans) == 1
    model_cfg = C.resolve("glm-test", overrides={"position_encoding_2d": two_d, "rotary_dtype": "float32"})
    params = init_params(model_cfg, jax.random.key(0), make_mesh(None))
    run = jax.jit(lambda p, x: GLM(model_cfg).apply({"params": p}, **x)[0])
    for s in samples:
        seq = pack([s], cfg, IDS)
        lay = _layout_of(s, ids, two_d)
        n = len(s.tokens)
        np.testing.assert_array_equal(seq["position_ids"][..., :n], lay["position_ids"][0][..., :n])
        np.testing.assert_array_equal(seq["prefix_mask"][:n], lay["prefix_mask"][0][:n])
        ours = run(params, {"tokens": seq["tokens"][None, :n], "position_ids": seq["position_ids"][None, ..., :n],
                            "prefix_mask": seq["prefix_mask"][None, :n], "segment_ids": seq["segment_ids"][None, :n]})
        theirs = run(params, {k: lay[k] for k in ("tokens", "position_ids", "prefix_mask", "segment_ids")})
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_same_seed_same_sequences():
    cfg = ObjectiveConfig(seq_length=256, window=64)
    a = [make_sequence(stream(), cfg, IDS, np.random.default_rng(9))[0] for _ in range(1)]
    b = [make_sequence(stream(), cfg, IDS, np.random.default_rng(9))[0] for _ in range(1)]
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
