"""Cached generation (glmjax/infer/decode.py).

* The KV-cache path reproduces SAT's forced incremental decode (the reference fixture) and, for
  [MASK] / [sMASK] / [gMASK] rows of different lengths in one left-padded batch and for ChatGLM's
  2-D positions, a full non-cached forward over the whole sequence; `Generator.score` gives the
  log-likelihood of continuations that such a forward gives, one compiled program per bucket.
* Greedy and beam search equal a restatement of GLM-130B's generation/strategies.py written here
  as a plain loop that runs the whole model over every whole sequence at every step (no cache),
  on a small model trained with `glmjax train`.
* Sampling is reproducible per seed and on any mesh, and never leaves top-k / the nucleus.
* Every strategy gives the same tokens on one device and on data / fsdp / tensor meshes; prompts
  of one length bucket share a compiled program.
"""
import dataclasses
import os
import random
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY_CASES, assert_close_scaled, bilingual_lines, case_dir, load_case, prepared_corpus

from glmjax.convert.sat import read_sat_checkpoint
from glmjax.errors import InputError
from glmjax.infer.decode import NEG, GenerateConfig, Generator, filter_top_k_top_p, prepare
from glmjax.model.api import init_params
from glmjax.model.glm import GLM
from glmjax.model.layouts import SpecialIds, batch_layout
from glmjax.parallel.mesh import make_mesh

FIXTURE_IDS = SpecialIds(mask=-1, gmask=1000, smask=-2, sop=1001)  # the fixture's prompts use [gMASK] only
LAYOUT_IDS = SpecialIds(mask=1002, gmask=1000, smask=1003, sop=1001)  # inside the tiny vocabulary of 1024
TRAIN_STEPS = 60
MESHES = ("data=8", "data=2,fsdp=2,tensor=2", "fsdp=2,tensor=4")


def cached_step_logits(gen: Generator, prep, forced: np.ndarray) -> np.ndarray:
    """Generator.prefill, then Generator.step feeding forced [rows, T] one token at a time: the
    logits after the prompt and after each forced token, [rows, T + 1, V]."""
    d = gen.prefill(prep, forced.shape[1])
    out = [np.asarray(d.logits)[:prep.rows]]
    for t in range(forced.shape[1]):
        d = gen.step(d, forced[:, t])
        out.append(np.asarray(d.logits)[:prep.rows])
    assert d.room == 0
    return np.stack(out, 1)


def full_forward(cfg, params, rows, ids, seq_len=None, position_ids=None):
    """One non-cached forward over whole right-padded sequences: (logits [b, s, V], layout)."""
    lay = batch_layout(rows, ids, seq_len=seq_len, position_encoding_2d=cfg.position_encoding_2d)
    pos = lay["position_ids"] if position_ids is None else position_ids
    logits, _ = jax.jit(lambda p, a, pos: GLM(cfg).apply({"params": p}, a["tokens"], pos, prefix_mask=a["prefix_mask"],
                                                           segment_ids=a["segment_ids"]))(params, lay, pos)
    return np.asarray(logits), lay


# --- 1. SAT's forced decode -----------------------------------------------------------------------
@pytest.mark.parametrize("spec", [None, "data=2,fsdp=2,tensor=2"])
@pytest.mark.parametrize("case, tp", [(TINY_CASES[0], 1), (TINY_CASES[1], 1), (TINY_CASES[0], 2)])
def test_prefill_and_cached_steps_reproduce_sats_incremental_decode(case, tp, spec):
    """decode_step_logits: SAT's logits at [sop] after the context, then after each forced token fed
    with its mems; here the prompt is left-padded into a bucket of 16 and, on the mesh, the batch is
    padded to data*fsdp = 4 rows."""
    cfg, ref = load_case(case)
    params = read_sat_checkpoint(os.path.join(case_dir(case), f"ckpt_tp{tp}"), cfg)
    gen = Generator(cfg, params, make_mesh(spec))
    ctx = ref["decode_context"]
    want = ref["decode_step_logits"]
    steps = want.shape[1]
    prep = prepare([list(r) for r in ctx], FIXTURE_IDS, cfg, steps, batch_multiple=gen.batch_multiple)
    assert prep.arrays["tokens"].shape == ((4 if spec else 2), 16)
    got = cached_step_logits(gen, prep, ref["decode_sequence"][:, ctx.shape[1]:ctx.shape[1] + steps - 1])
    assert_close_scaled(got, want, what="decode_step_logits")


# --- 2. layouts: cached steps == a full forward -----------------------------------------------------
def layout_prompts(rng, ids):
    r = lambda n: rng.integers(0, 1000, n).tolist()  # noqa: E731
    return [r(3) + [ids.mask] + r(6) + [ids.sop],  # [MASK] inside the prompt
            r(9) + [ids.smask] + r(4) + [ids.sop],  # [sMASK], the longest prompt
            [ids.mask] + r(2) + [ids.sop],  # [MASK] first, the shortest
            r(6) + [ids.gmask] + [ids.sop]]  # [gMASK]: positions go on counting


@pytest.mark.parametrize("two_d, spec", [(False, None), (False, "data=2,fsdp=2,tensor=2"), (True, None)],
                         ids=["1d", "1d-mesh", "chatglm-2d"])
def test_cached_steps_equal_a_full_forward_for_mask_smask_gmask_rows_of_different_lengths(two_d, spec):
    cfg, params = layout_model(two_d)
    mesh = make_mesh(spec)
    rng = np.random.default_rng(0)
    prompts = layout_prompts(rng, LAYOUT_IDS)
    steps = 5
    forced = rng.integers(0, 1000, (len(prompts), steps))
    gen = Generator(cfg, params, mesh)
    prep = prepare(prompts, LAYOUT_IDS, cfg, steps + 1, batch_multiple=gen.batch_multiple)
    got = cached_step_logits(gen, prep, forced)

    full_rows = [p + forced[i].tolist() for i, p in enumerate(prompts)]
    logits, lay = full_forward(cfg, params, full_rows, LAYOUT_IDS)
    want = np.stack([logits[i, len(p) - 1:len(p) + steps] for i, p in enumerate(prompts)])
    assert_close_scaled(got, want, what="cached vs full-forward step logits")

    # the generated positions are not cosmetic: counting on after [MASK] (as [gMASK]) changes them
    pos = lay["position_ids"].copy()
    n0 = len(full_rows[0])
    pos[0, ..., :n0] = np.arange(n0) if not two_d else np.stack([np.arange(n0), pos[0, 1, :n0]])
    moved, _ = full_forward(cfg, params, full_rows, LAYOUT_IDS, position_ids=pos)
    gen_part = slice(len(prompts[0]), n0)
    assert np.abs(moved[0, gen_part] - logits[0, gen_part]).max() > 1e-3 * np.abs(logits).max()


# --- 2b. scoring continuations through the cache ---------------------------------------------------
def layout_model(two_d):
    """The fp32-rotary fixture checkpoint, or (two_d) ChatGLM-style 2-D positions with random weights."""
    cfg, _ = load_case(TINY_CASES[1])
    if two_d:
        cfg = cfg.replace(position_encoding_2d=True, glu=False, init_std=0.2)
        return cfg, jax.device_get(init_params(cfg, jax.random.key(7), make_mesh(None)))
    return cfg, read_sat_checkpoint(os.path.join(case_dir(TINY_CASES[1]), "ckpt_tp1"), cfg)


def full_forward_logprobs(cfg, params, prompts, continuations, ids):
    """log p(c_j | prompt, c_<j) from one non-cached forward over each whole prompt + continuation
    (layout builders, right padding), log-softmax in float64: [rows, T], 0 past each end."""
    logits, _ = full_forward(cfg, params, [p + list(c) for p, c in zip(prompts, continuations)], ids)
    logits = logits.astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    out = np.zeros((len(prompts), max(len(c) for c in continuations)))
    for i, (p, c) in enumerate(zip(prompts, continuations)):
        for j, tok in enumerate(c):
            out[i, j] = logp[i, len(p) - 1 + j, tok]  # the logits at [sop] predict c_0
    return out


@pytest.mark.parametrize("two_d, spec", [(False, None), (False, "data=2,fsdp=2,tensor=2"), (True, None)],
                         ids=["1d", "1d-mesh", "chatglm-2d"])
def test_score_equals_full_forward_log_likelihood_batched_and_one_at_a_time(two_d, spec):
    """[MASK], [sMASK] and [gMASK] prompts of different lengths with continuations of 5, 1, 9 and 3
    tokens in one batch; on the mesh the batch (and each single prompt) is padded to 4 rows."""
    cfg, params = layout_model(two_d)
    rng = np.random.default_rng(3)
    prompts = layout_prompts(rng, LAYOUT_IDS)
    conts = [rng.integers(0, 1000, n).tolist() for n in (5, 1, 9, 3)]
    gen = Generator(cfg, params, make_mesh(spec))
    got = gen.score(prepare(prompts, LAYOUT_IDS, cfg, 9), conts)
    want = full_forward_logprobs(cfg, params, prompts, conts, LAYOUT_IDS)
    assert got.token_logprobs.shape == (4, 9) and got.token_logprobs.dtype == np.float32
    np.testing.assert_array_equal(got.lengths, [5, 1, 9, 3])
    assert_close_scaled(got.token_logprobs, want, what="score token log-probs")
    assert_close_scaled(got.logprobs, want.sum(1), what="score sums")
    assert np.all(got.token_logprobs[1, 1:] == 0) and np.all(want < 0, where=want != 0)
    for i, (p, c) in enumerate(zip(prompts, conts)):
        one = gen.score(prepare([p], LAYOUT_IDS, cfg, len(c)), [c])
        assert one.token_logprobs.shape == (1, len(c))
        assert_close_scaled(one.token_logprobs[0], got.token_logprobs[i, :len(c)], what=f"prompt {i} alone")


def test_score_compiles_one_program_per_batch_prompt_and_continuation_bucket():
    cfg, params = layout_model(False)
    rng = np.random.default_rng(4)
    gen = Generator(cfg, params, make_mesh(None))
    r = lambda n: rng.integers(0, 1000, n).tolist()  # noqa: E731
    first = gen.score(prepare(layout_prompts(rng, LAYOUT_IDS), LAYOUT_IDS, cfg, 16), [r(9), r(12), r(16), r(3)])
    assert gen.programs == {"score": 1}
    other = [r(7) + [LAYOUT_IDS.gmask, LAYOUT_IDS.sop], r(2) + [LAYOUT_IDS.mask, LAYOUT_IDS.sop],
             r(12) + [LAYOUT_IDS.smask, LAYOUT_IDS.sop]]  # 3 rows: batch bucket 4; prompt bucket 16
    again = gen.score(prepare(other, LAYOUT_IDS, cfg, 16), [r(10), r(11), r(15)])
    assert gen.programs == {"score": 1}  # other lengths, the same buckets: no new program
    assert first.token_logprobs.shape == (4, 16) and again.token_logprobs.shape == (3, 15)
    gen.score(prepare(other, LAYOUT_IDS, cfg, 16), [r(1), r(8), r(4)])  # continuation bucket 8
    assert gen.programs == {"score": 2}
    with pytest.raises(InputError, match="exceeds the model's context"):
        gen.score(prepare(other, LAYOUT_IDS, cfg, 16), [r(1), r(8), r(cfg.max_sequence_length)])
    with pytest.raises(InputError, match="2 continuations for 3 prompts"):
        gen.score(prepare(other, LAYOUT_IDS, cfg, 16), [r(1), r(8)])


def test_step_checks_its_tokens_and_the_room_prefill_made():
    cfg, params = layout_model(False)
    gen = Generator(cfg, params, make_mesh(None))
    prompts = layout_prompts(np.random.default_rng(5), LAYOUT_IDS)[:3]  # batch bucket 4: one padding row
    d = gen.prefill(prepare(prompts, LAYOUT_IDS, cfg, 2), 2)
    assert d.rows == 3 and d.logits.shape == (4, cfg.vocab_size) and d.room == 2
    d = gen.step(gen.step(d, [5, 6, 7]), [8, 9, 10, 0])  # the padding row's token may be given or left out
    assert d.room == 0 and d.fed == 2
    with pytest.raises(InputError, match="the cache is full"):
        gen.step(d, [1, 2, 3])
    with pytest.raises(InputError, match="one token per row"):
        gen.step(gen.prefill(prepare(prompts, LAYOUT_IDS, cfg, 2), 2), [1, 2])
    with pytest.raises(InputError, match="unknown token id 5000"):
        gen.step(gen.prefill(prepare(prompts, LAYOUT_IDS, cfg, 2), 2), [1, 2, 5000])
    assert gen.programs == {"prefill": 1, "step": 1}


# --- a small trained model ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-layer GLM trained by `glmjax train` (60 steps, one device) on 12 bilingual lines repeated
    until it half-recites them, so its continuations depend on the prompt. ChatGLM-6B's id layout
    keeps the vocabulary small (1123 ids, padded to 1152 rows that the generator never emits)."""
    from glmjax.experiment import load_experiment

    d = tmp_path_factory.mktemp("generate")
    lines = bilingual_lines(12, 4)
    corpus = lines * 100
    random.Random(0).shuffle(corpus)
    tok = prepared_corpus(d, corpus, 800, layout="chatglm-6b")
    (d / "exp.yaml").write_text(f"""
model:
  num_layers: 2
  hidden_size: 64
  num_attention_heads: 4
  inner_hidden_size: 128
  vocab_size: {-(-tok.vocab_size // 64) * 64}
  max_sequence_length: 64
  hidden_dropout: 0.0
  attention_dropout: 0.0
data:
  path: {d / 'data'}
  seed: 3
objective:
  window: 32
optim:
  lr: 0.01
  min_lr: 0.001
  warmup_samples: 16
  decay_samples: 960
  rampup_batch_size: null
  global_batch: 16
train:
  steps: {TRAIN_STEPS}
  micro_batch: 16
  checkpoint_dir: {d / 'ckpt'}
  checkpoint_every: {TRAIN_STEPS}
  keep: 1
  log_every: 20
""")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "glmjax", "train", str(d / "exp.yaml")], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as c:
        params = jax.tree.map(np.asarray, c.restore(str(d / "ckpt" / str(TRAIN_STEPS) / "state"))["params"])
    cfg = load_experiment(str(d / "exp.yaml")).model
    ids = SpecialIds(mask=tok["MASK"], gmask=tok["gMASK"], smask=tok["sMASK"], sop=tok["sop"], pad=tok.pad_id)
    g, m, sop = tok["gMASK"], tok["MASK"], tok["sop"]
    prompts = [tok.encode(lines[1][:30]) + [g, sop],  # three lengths, [gMASK] and [MASK] rows
               tok.encode(lines[0][:5]) + [m] + tok.encode(lines[0][9:]) + [sop],
               tok.encode(lines[9][:10]) + [g, sop]]
    return {"cfg": cfg, "params": params, "tok": tok, "ids": ids, "prompts": prompts, "eop": tok["eop"]}


@pytest.fixture(scope="module")
def generators(trained):
    """One Generator per mesh spec, made on first use (their compiled programs are kept)."""
    made = {}

    def get(spec=None):
        if spec not in made:
            made[spec] = Generator(trained["cfg"], trained["params"], make_mesh(spec),
                                   vocab_limit=trained["tok"].vocab_size)
        return made[spec]

    return get


def run(gen, trained, gc, prompts=None):
    prompts = trained["prompts"] if prompts is None else prompts
    prep = prepare(prompts, trained["ids"], trained["cfg"], gc.max_new_tokens, batch_multiple=gen.batch_multiple,
                   no_repeat_ngram=gc.no_repeat_ngram)
    return gen.generate(prep, gc)


# --- the non-cached reference: GLM-130B's strategies, one full forward per step -------------------
class FullModel:
    """Runs the whole model over whole sequences (right-padded to one shape, no cache) and returns
    float32 logits at each sequence's last token."""

    def __init__(self, trained, rows=16):
        cfg = trained["cfg"]
        self.ids, self.rows, self.length, self.cfg = trained["ids"], rows, cfg.max_sequence_length, cfg
        self.params = jax.device_put(trained["params"])
        model = GLM(cfg)
        self.fn = jax.jit(lambda p, a: model.apply({"params": p}, a["tokens"], a["position_ids"],
                                                   prefix_mask=a["prefix_mask"], segment_ids=a["segment_ids"])[0])

    def __call__(self, seqs):
        out = []
        for i in range(0, len(seqs), self.rows):
            chunk = [list(s) for s in seqs[i:i + self.rows]]
            lay = batch_layout(chunk + [chunk[0]] * (self.rows - len(chunk)), self.ids, seq_len=self.length,
                               position_encoding_2d=self.cfg.position_encoding_2d)
            logits = np.asarray(self.fn(self.params, lay))
            out.append(logits[np.arange(len(chunk)), [len(s) - 1 for s in chunk]])
        return np.concatenate(out).astype(np.float32)


def banned_logits(logits, gc, t, vocab_limit):
    """invalid_slices and (before min_gen_length) the end tokens -> -65504, as GLM-130B."""
    lg = np.array(logits, np.float32)
    lg[:, vocab_limit:] = NEG
    lg[:, list(gc.invalid_ids)] = NEG
    if t < gc.min_gen_length:
        lg[:, list(gc.end_tokens)] = NEG
    return lg


def reference_greedy(model, prompts, gc, vocab_limit):
    """BaseStrategy with argmax: finished rows emit -1."""
    seqs = [list(p) for p in prompts]
    out = np.full((len(prompts), gc.max_new_tokens), -1)
    done = [False] * len(prompts)
    for t in range(gc.max_new_tokens):
        if all(done):
            break
        lg = banned_logits(model(seqs), gc, t, vocab_limit)
        for i, tok in enumerate(lg.argmax(-1)):
            if not done[i]:
                out[i, t] = tok
                seqs[i].append(int(tok))
                done[i] = int(tok) in gc.end_tokens
    return out


def log_softmax32(x):
    x = np.asarray(x, np.float32)
    m = x.max(-1, keepdims=True)
    return (x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))).astype(np.float32)


def reference_beam(model, prompts, gc, vocab_limit):
    """BeamSearchStrategy(deterministic=True, consider_end=True), restated per row:
      * logits float32; invalid ids and, while fewer than min_gen_length tokens exist, end tokens
        -> -65504; once the sequence is longer than n, tokens after a beam's last n-1 tokens that
        this beam emitted after the same n-1 tokens before -> -65504 (bans start in the context);
      * log_softmax + beam score; the first step uses beam 0 only; (max(1, #end) + 1) x beams
        candidates by top-k, sorted by score;
      * walking the sorted candidates: an end token (row not done) closes a hypothesis scored
        score / ((5 + len) / 6)^lp, len counting the context and the end token; any other token
        joins the live beams while fewer than `beams` are live, and the walk stops at the first
        one that finds them full;
      * closed hypotheses kept sorted (a new one goes before equal scores), at most `beams`;
      * a row is done when `beams` are closed and the worst >= best live / ((5 + len + 1) / 6)^lp;
      * at the end every live beam of an open row joins its hypotheses (GLM-130B's finalize meant
        to add all of them; its loop bound adds only the first batch_size).
    Returns generated tokens [rows, beams, steps] (-1 after the end), scores, lengths and steps run.
    """
    k, n, lp, steps = gc.num_beams, gc.no_repeat_ngram, gc.length_penalty, gc.max_new_tokens
    n_cand = (max(1, len(gc.end_tokens)) + 1) * k
    rows = []
    for p in prompts:
        rows.append({"ctx": len(p), "beams": [list(p)], "scores": np.zeros(1, np.float32), "bans": [{}],
                     "fin": [], "done": False})

    def close(row, score, beam):
        score = np.float32(score / ((5.0 + len(beam)) / 6) ** lp)
        i = len(row["fin"])
        while i > 0 and not score < row["fin"][i - 1][0]:
            i -= 1
        row["fin"].insert(i, (score, beam))
        del row["fin"][k:]

    t = 0
    while t < steps and not all(r["done"] for r in rows):
        open_rows = [r for r in rows if not r["done"]]  # a done row's hypotheses never change again
        logits = model([b for r in open_rows for b in r["beams"]])
        at = 0
        for r in open_rows:
            nb = len(r["beams"])
            lg = banned_logits(logits[at:at + nb], gc, t, vocab_limit)
            at += nb
            seq_len = len(r["beams"][0])
            if n and seq_len > n:
                for i, beam in enumerate(r["beams"]):
                    for banned in r["bans"][i].get(tuple(beam[len(beam) - (n - 1):]), ()):
                        lg[i, banned] = NEG
            v = lg.shape[1]
            cand = (log_softmax32(lg) + r["scores"][:, None]).reshape(-1)
            top = np.argsort(-cand, kind="stable")[:n_cand]
            top = top[np.argsort(-cand[top], kind="stable")]
            beams, scores, bans = [], [], []
            for c in top:
                parent, tok = divmod(int(c), v)
                beam = r["beams"][parent] + [tok]
                if tok in gc.end_tokens:
                    close(r, cand[c], beam)
                elif len(beams) < k:
                    beams.append(beam)
                    scores.append(cand[c])
                    if n:
                        b = dict(r["bans"][parent])
                        prefix = tuple(r["beams"][parent][seq_len - (n - 1):])
                        b[prefix] = b.get(prefix, ()) + (tok,)
                        bans.append(b)
                else:
                    break
            r["beams"], r["scores"], r["bans"] = beams, np.array(scores, np.float32), bans
            if len(r["fin"]) == k and r["fin"][-1][0] >= r["scores"].max() / ((5.0 + seq_len + 1) / 6) ** lp:
                r["done"] = True
        t += 1
    toks = np.full((len(rows), k, steps), -1)
    scores = np.zeros((len(rows), k), np.float32)
    lengths = np.zeros((len(rows), k), np.int64)
    for j, r in enumerate(rows):
        if not r["done"]:
            for s, beam in zip(r["scores"], r["beams"]):
                close(r, s, beam)
        for i, (s, beam) in enumerate(r["fin"]):
            g = beam[r["ctx"]:]
            toks[j, i, :len(g)], scores[j, i], lengths[j, i] = g, s, len(g)
    return toks, scores, lengths, t


@pytest.fixture(scope="module")
def full_model(trained):
    return FullModel(trained)


@pytest.fixture(scope="module")
def end_tokens(trained, generators):
    """Two ids the model really emits: tokens of its greedy continuations that no row starts with
    (so that rows run a few steps before they close)."""
    out = run(generators(), trained, GenerateConfig(max_new_tokens=12, invalid_ids=(trained["eop"],)))["tokens"]
    first = set(out[:, 0].tolist())
    picks = []
    for row in out:
        for tok in row[1:].tolist():
            if tok not in first and tok not in picks and len(picks) < 2:
                picks.append(tok)
    assert len(picks) >= 2, out
    return tuple(picks[:2])


@pytest.mark.parametrize("min_gen", [0, 3])
def test_greedy_equals_non_cached_argmax_decoding(trained, generators, full_model, end_tokens, min_gen):
    gc = GenerateConfig(max_new_tokens=12, end_tokens=end_tokens, invalid_ids=(trained["eop"],),
                        min_gen_length=min_gen)
    got = run(generators(), trained, gc)
    want = reference_greedy(full_model, trained["prompts"], gc, trained["tok"].vocab_size)
    np.testing.assert_array_equal(got["tokens"], want)
    closed = [(row >= 0).sum() for row in want]
    assert min(closed) < gc.max_new_tokens and min(closed) > min_gen  # rows closed, none before min_gen


BEAM_SETTINGS = [  # (beams, length_penalty, no_repeat_ngram, min_gen_length, end tokens)
    (4, 1.0, 3, 0, "picked"),
    (2, 0.0, 0, 3, "eop+picked"),
    (3, 2.0, 2, 1, "picked"),
    (4, 1.0, 0, 0, "eop"),
    (1, 1.0, 2, 0, "picked"),
    (3, 0.5, 0, 0, "eop+picked"),  # here the done test's bound decides when rows stop
]


def beam_config(trained, end_tokens, beams, lp, ngram, min_gen, ends, steps=12):
    eop = trained["eop"]
    chosen = {"picked": end_tokens, "eop+picked": (eop, end_tokens[0]), "eop": (eop,)}[ends]
    return GenerateConfig(strategy="beam", max_new_tokens=steps, num_beams=beams, length_penalty=lp,
                          no_repeat_ngram=ngram, min_gen_length=min_gen, end_tokens=chosen,
                          invalid_ids=() if eop in chosen else (eop,))


@pytest.mark.parametrize("beams, lp, ngram, min_gen, ends", BEAM_SETTINGS)
def test_beam_search_equals_glm130b_beam_strategy_without_cache(trained, generators, full_model, end_tokens,
                                                                 beams, lp, ngram, min_gen, ends):
    gc = beam_config(trained, end_tokens, beams, lp, ngram, min_gen, ends)
    got = run(generators(), trained, gc)
    toks, scores, lengths, steps = reference_beam(full_model, trained["prompts"], gc, trained["tok"].vocab_size)
    np.testing.assert_array_equal(got["beams"], toks)
    np.testing.assert_array_equal(got["tokens"], toks[:, 0])
    np.testing.assert_array_equal(got["beam_lengths"], lengths)
    np.testing.assert_allclose(got["beam_scores"], scores, rtol=2e-5)
    assert int(got["steps"]) == steps
    # the settings bite: some hypothesis closed on an end token, none before min_gen_length
    ended = [(toks[r, i, lengths[r, i] - 1] in gc.end_tokens) for r in range(len(toks)) for i in range(beams)]
    assert any(ended)
    assert lengths.min() > min_gen
    if ngram:
        for r in range(len(toks)):
            for i in range(beams):
                seq = trained["prompts"][r][-(ngram - 1):] + toks[r, i, :lengths[r, i]].tolist()
                grams = [tuple(seq[j:j + ngram]) for j in range(len(seq) - ngram + 1)]
                assert len(grams) == len(set(grams)), (r, i, seq)


# --- 4. sampling --------------------------------------------------------------------------------------
def numpy_top_k_top_p(logits, top_k, top_p):
    """SAT's top_k_logits per row: logits below the k-th -> -inf; then sort, cumulative softmax,
    drop every token after the first whose cumulative probability exceeds top_p."""
    out = np.array(logits, np.float64)
    for row in out:
        if top_k:
            row[row < np.sort(row)[-top_k]] = -np.inf
        if top_p:
            order = np.argsort(-row, kind="stable")
            p = np.exp(row[order] - row[order][0])
            cum = np.cumsum(p / p.sum())
            drop = np.concatenate([[False], cum[:-1] > top_p])
            row[order[drop]] = -np.inf
    return out


FILTER_PROBS = np.array([[0.05, 0.5, 0.1, 0.2, 0.15],  # sorted .5 .2 .15 .1 .05
                         [0.9, 0.04, 0.03, 0.02, 0.01],
                         [0.22, 0.21, 0.2, 0.19, 0.18],
                         [0.1, 0.15, 0.3, 0.05, 0.4]])  # sorted .4 .3 .15 .1 .05


@pytest.mark.parametrize("top_k, top_p, kept", [
    (0, 0.6, [{1, 3}, {0}, {0, 1, 2}, {4, 2}]),  # the first token past 0.6 stays
    (3, 0.0, [{1, 3, 4}, {0, 1, 2}, {0, 1, 2}, {4, 2, 1}]),
    (3, 0.8, [{1, 3}, {0}, {0, 1, 2}, {4, 2}]),  # top-p over the renormalised top 3
    (0, 0.92, [{1, 3, 4, 2}, {0, 1}, {0, 1, 2, 3, 4}, {4, 2, 1, 0}]),
    (1, 0.5, [{1}, {0}, {0}, {4}]),
])
def test_filter_keeps_exactly_top_k_then_the_nucleus_in_every_row(top_k, top_p, kept):
    logits = np.log(FILTER_PROBS).astype(np.float32)
    got = np.asarray(filter_top_k_top_p(jnp.asarray(logits), top_k, top_p))
    assert [set(np.flatnonzero(np.isfinite(r)).tolist()) for r in got] == kept
    np.testing.assert_array_equal(got[np.isfinite(got)], logits[np.isfinite(got)])  # kept logits untouched
    assert [set(np.flatnonzero(np.isfinite(r)).tolist()) for r in numpy_top_k_top_p(logits, top_k, top_p)] == kept


def test_filter_matches_sat_on_random_rows():
    logits = np.random.default_rng(1).normal(size=(8, 300)).astype(np.float32) * 3
    for top_k, top_p in [(0, 0.3), (20, 0.0), (50, 0.7), (0, 0.99)]:
        got = np.isfinite(np.asarray(filter_top_k_top_p(jnp.asarray(logits), top_k, top_p)))
        np.testing.assert_array_equal(got, np.isfinite(numpy_top_k_top_p(logits, top_k, top_p)), str((top_k, top_p)))
        assert len({int(r.sum()) for r in got}) > 1 or top_k  # rows keep different numbers of tokens


SAMPLE = dict(strategy="sample", max_new_tokens=6, temperature=0.8, top_k=4, top_p=0.8)


def test_sampling_is_reproducible_per_seed_and_differs_between_seeds(trained, generators):
    gen = generators()
    gc = GenerateConfig(**SAMPLE, invalid_ids=(trained["eop"],), seed=5)
    a = run(gen, trained, gc)["tokens"]
    np.testing.assert_array_equal(run(gen, trained, gc)["tokens"], a)
    np.testing.assert_array_equal(run(generators("data=2,fsdp=2,tensor=2"), trained, gc)["tokens"], a)
    others = [run(gen, trained, GenerateConfig(**SAMPLE, invalid_ids=(trained["eop"],), seed=s))["tokens"]
              for s in (6, 7)]
    assert all(not np.array_equal(o, a) for o in others)


def test_sampled_tokens_stay_in_top_k_and_the_nucleus_with_the_right_frequencies(trained, generators, full_model):
    """64 rows per prompt x 4 seeds: at every step each token lies inside the set kept by top-k and
    top-p on the non-cached logits of its own prefix; first tokens come at their probabilities."""
    eop, vocab = trained["eop"], trained["tok"].vocab_size
    gc0 = GenerateConfig(**dict(SAMPLE, max_new_tokens=3), invalid_ids=(eop,))
    prompts = [trained["prompts"][0]] * 64 + [trained["prompts"][1]] * 64
    outs = [run(generators(), trained, dataclasses.replace(gc0, seed=s), prompts)["tokens"]
            for s in range(4)]
    samples = np.concatenate(outs)  # [512, 3]
    all_prompts = prompts * 4
    prefixes = sorted({tuple(all_prompts[i]) + tuple(samples[i, :t]) for i in range(len(samples)) for t in range(3)})
    logits = full_model([list(p) for p in prefixes])
    lg = banned_logits(logits, gc0, 1, vocab) / gc0.temperature
    probs = {}
    for pre, row in zip(prefixes, numpy_top_k_top_p(lg, gc0.top_k, gc0.top_p)):
        e = np.exp(row - row.max())
        probs[pre] = e / e.sum()
    for i, row in enumerate(samples):
        for t, tok in enumerate(row):
            p = probs[tuple(all_prompts[i]) + tuple(row[:t])]
            assert p[tok] > 0, (i, t, tok, np.flatnonzero(p))
    for j, prompt in enumerate(trained["prompts"][:2]):
        first = samples[[i for i in range(len(samples)) if all_prompts[i] == prompt], 0]
        p = probs[tuple(prompt)]
        kept = np.flatnonzero(p)
        assert 2 <= len(kept) <= gc0.top_k, p[kept]  # the nucleus and top-k really cut
        for tok in kept:
            freq = (first == tok).mean()
            assert abs(freq - p[tok]) <= 4 * np.sqrt(p[tok] * (1 - p[tok]) / len(first)) + 0.01, (j, tok, freq, p[tok])


# --- 5. meshes ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_device(trained, generators, end_tokens):
    configs = {"greedy": GenerateConfig(max_new_tokens=10, end_tokens=end_tokens, invalid_ids=(trained["eop"],)),
               "beam": beam_config(trained, end_tokens, 4, 1.0, 3, 0, "picked", steps=10),
               "sample": GenerateConfig(**SAMPLE, invalid_ids=(trained["eop"],), seed=11)}
    return configs, {k: run(generators(), trained, gc) for k, gc in configs.items()}


@pytest.mark.parametrize("spec", MESHES)
def test_every_strategy_gives_the_same_tokens_on_a_mesh_as_on_one_device(trained, generators, one_device, spec):
    configs, want = one_device
    gen = generators(spec)
    for name, gc in configs.items():
        got = run(gen, trained, gc)
        np.testing.assert_array_equal(got["tokens"], want[name]["tokens"], name)
        if name == "beam":
            np.testing.assert_array_equal(got["beams"], want[name]["beams"])
            np.testing.assert_allclose(got["beam_scores"], want[name]["beam_scores"], rtol=1e-5)


# --- 6. compiled programs and input errors ----------------------------------------------------------
def test_prompts_of_one_bucket_reuse_one_program_and_too_long_prompts_fail(trained):
    tok, ids, cfg = trained["tok"], trained["ids"], trained["cfg"]
    gen = Generator(cfg, trained["params"], make_mesh(None), vocab_limit=tok.vocab_size)
    g, sop = tok["gMASK"], tok["sop"]
    words = tok.encode(" ".join(bilingual_lines(40, 9)))
    short = [words[:3] + [g, sop], words[5:14] + [g, sop]]  # 5 and 11 tokens
    longer = [words[20:32] + [g, sop], words[40:41] + [g, sop]]  # 14 and 3 tokens
    for seed in (0, 1):
        gc = GenerateConfig(strategy="sample", max_new_tokens=4, seed=seed)
        for prompts in (short, longer):
            prep = prepare(prompts, ids, cfg, gc.max_new_tokens)
            assert prep.arrays["tokens"].shape == (2, 16)
            out = gen.generate(prep, gc)
            assert out["tokens"].shape == (2, 4)
    assert gen.programs == {"generate": 1}  # two length pairs in bucket 16 and two seeds: one program
    gen.generate(prepare([words[:20] + [g, sop]], ids, cfg, 4), gc)  # 22 tokens: bucket 32, a second program
    assert gen.programs == {"generate": 2}

    too_long = words[:cfg.max_sequence_length - 4] + [g, sop]
    with pytest.raises(InputError, match="exceeds the model's context"):
        prepare([too_long], ids, cfg, 4)
    with pytest.raises(InputError, match="exceeds the model's context"):
        prepare(short, ids, cfg, cfg.max_sequence_length)
    with pytest.raises(InputError, match="end in \\[sop\\]"):
        prepare([words[:3] + [g, sop, 5]], ids, cfg, 4)
    with pytest.raises(InputError, match="no_repeat_ngram=3"):  # context tails too short for 3-gram bans
        gen.generate(prepare(short, ids, cfg, 4), dataclasses.replace(gc, no_repeat_ngram=3))
    # a batch of one on a mesh with data parallelism 2: padded to 2 rows, the same tokens back
    on_mesh = Generator(cfg, trained["params"], make_mesh("data=2,tensor=4"), vocab_limit=tok.vocab_size)
    one = prepare(short[:1], ids, cfg, 4)
    np.testing.assert_array_equal(on_mesh.generate(one, gc)["tokens"], gen.generate(one, gc)["tokens"])
