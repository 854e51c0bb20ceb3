"""Helpers shared by the tests: fixture cases, the project's scaled tolerance, small corpora, SAT
checkpoints written as GLM-130B's tools write them."""
import os
import random

import numpy as np

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures")
TINY_CASES = ("glm130b_tiny_fp16rope", "glm130b_tiny_fp32rope")
LONG_CASE = "glm130b_long_hd128_fp16rope"


def case_dir(case: str) -> str:
    return os.path.join(FIXTURES, case)


def load_case(case: str):
    """(config, reference arrays) of a fixture case made by ../shared/reference/make_reference.py."""
    from glmjax import config as C

    d = case_dir(case)
    cfg = C.resolve(path=os.path.join(d, "config.json"))
    with np.load(os.path.join(d, "reference.npz")) as z:
        ref = {k: z[k] for k in z.files}
    return cfg, ref


def assert_close_scaled(got, want, rel=1e-5, what="logits"):
    """max |got - want| <= rel * max |want|: the project's whole-model tolerance, never loosened."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err, scale = np.abs(got - want).max(), np.abs(want).max()
    assert err <= rel * scale, f"{what}: max|diff| {err:.3g} > {rel:g} x max|ref| {scale:.3g}"
    return err / scale


def prepared_corpus(d, lines, pieces, layout="glm-130b"):
    """d/corpus.txt from `lines`, a tokenizer trained on it in d/tok, token shards in d/data."""
    from glmjax.data import pipeline
    from glmjax.data.tokenizer import train_tokenizer

    (d / "corpus.txt").write_text("\n\n".join(lines) + "\n", encoding="utf-8")
    tok = train_tokenizer([str(d / "corpus.txt")], pieces, str(d / "tok"), layout=layout)
    pipeline.prepare([str(d / "corpus.txt")], str(d / "tok"), str(d / "data"))
    return tok


def split_like_convert_tp(sd, tp):
    """GLM-130B tools/convert_tp.py (original tp 1 -> target tp), restated with torch."""
    import torch

    sequential = {"input_layernorm.weight", "input_layernorm.bias", "attention.dense.bias",
                  "post_attention_layernorm.weight", "post_attention_layernorm.bias",
                  "mlp.dense_4h_to_h.bias", "attention.rotary_emb.inv_freq",
                  "final_layernorm.weight", "final_layernorm.bias"}
    glu = {"mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias"}
    dim1 = {"attention.dense.weight", "mlp.dense_4h_to_h.weight"}
    shards = []
    for r in range(tp):
        out = {}
        for key, t in sd.items():
            name = ".".join(key.split(".")[3 if key.startswith("transformer.layers") else 1:])
            if name in sequential:
                out[key] = t
            elif name in glu:
                chunks = torch.chunk(t, 2 * tp, dim=0)
                out[key] = torch.cat([chunks[r], chunks[tp + r]], 0)
            else:
                out[key] = torch.chunk(t, tp, dim=1 if name in dim1 else 0)[r].clone()
        shards.append(out)
    return shards


def write_sat(folder, shards, iteration="7"):
    """A SAT checkpoint written with torch.save, as GLM-130B's tools do."""
    import torch

    os.makedirs(os.path.join(folder, iteration))
    with open(os.path.join(folder, "latest"), "w") as f:
        f.write(iteration)
    for r, sd in enumerate(shards):
        torch.save({"module": {k: v.contiguous() for k, v in sd.items()}},
                   os.path.join(folder, iteration, f"mp_rank_{r:02d}_model_states.pt"))


# common characters for a synthetic Chinese corpus (no Chinese text ships with the machine)
HANZI = ("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可也你能下过子说产种面而方后多定"
         "行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它"
         "合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命")


def bilingual_lines(n, seed):
    """English from Python's own documentation (pydoc_data) and synthetic Chinese sentences."""
    from pydoc_data.topics import topics

    english = [line.strip() for text in topics.values() for line in text.splitlines() if len(line.strip()) > 20]
    rng = random.Random(seed)
    lines = []
    for k in range(n):
        if k % 2:
            lines.append(rng.choice(english))
        else:
            lines.append("".join(rng.choice(HANZI) for _ in range(rng.randint(8, 30))) + rng.choice("。，！？"))
    return lines


TINY_MODEL = """  num_layers: 2
  hidden_size: 64
  num_attention_heads: 4
  inner_hidden_size: 128
"""


def tiny_experiment(path, data, ckpt, vocab, *, model=TINY_MODEL, steps=2, every=1, seq=64, mesh=None,
                    extra=""):
    """An experiment file for a tiny GLM trained in seconds on the corpus in `data`; returns its path."""
    path.write_text(f"""model:
{model}  vocab_size: {vocab}
  max_sequence_length: {seq}
  hidden_dropout: 0.0
  attention_dropout: 0.0
data:
  path: {data}
objective:
  window: 16
optim:
  lr: 0.01
  min_lr: 0.001
  warmup_samples: 8
  decay_samples: 100
  rampup_batch_size: null
  global_batch: 8
train:
  steps: {steps}
  micro_batch: 8
{f"  mesh: {mesh}" + chr(10) if mesh else ""}  checkpoint_dir: {ckpt}
  checkpoint_every: {every}
{extra}""")
    return str(path)
