"""Shared test setup: an 8-device CPU mesh (set before jax is imported) and the fixture cases."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
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


@pytest.fixture(scope="session")
def tiny_cases():
    return {c: load_case(c) for c in TINY_CASES}


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
