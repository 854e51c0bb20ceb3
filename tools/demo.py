"""`make demo` (until training lands, issue 6): run GLM-130B's architecture from a real SAT
checkpoint on an 8-device CPU mesh and show that it gives the PyTorch (SAT) logits."""
import os
import sys

import numpy as np

from glmjax.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASE = os.path.join(ROOT, "tests", "fixtures", "glm130b_long_hd128_fp16rope")
OUT = os.path.join(ROOT, "runs", "demo")


def run() -> int:
    os.makedirs(OUT, exist_ok=True)
    inputs, output = os.path.join(OUT, "inputs.npz"), os.path.join(OUT, "logits.npz")
    with np.load(os.path.join(CASE, "reference.npz")) as z:
        ref = {k: z[k] for k in ("tokens", "position_ids", "attention_mask", "logits")}
    tile = lambda x: np.concatenate([x] * 2)  # 4 rows: the mesh splits the batch over data x fsdp
    np.savez(inputs, **{k: tile(ref[k]) for k in ("tokens", "position_ids", "attention_mask")})
    rc = main(["forward", "--checkpoint", os.path.join(CASE, "ckpt_tp2"), "--config",
               os.path.join(CASE, "config.json"), "--inputs", inputs, "--output", output,
               "--mesh", "data=2,fsdp=2,tensor=2", "--hidden-states"])
    if rc:
        return rc
    with np.load(output) as z:
        got = z["logits"]
    want = tile(ref["logits"])
    rel = np.abs(got - want).max() / np.abs(want).max()
    print(f"GLM-130B architecture (2 layers, head dim 128, float16 rotary tables), SAT tp2 checkpoint, "
          f"{got.shape[1]}-token prompts on mesh data=2,fsdp=2,tensor=2")
    print(f"max |logits - SAT| / max |SAT logits| = {rel:.2e}  (tolerance 1e-5): "
          f"{'MATCH' if rel <= 1e-5 else 'MISMATCH'}")
    print(f"outputs: {OUT}/ (inputs.npz, logits.npz with per-layer hidden states)")
    return 0 if rel <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(run())
