"""Run GLM-130B's real PyTorch model class (SwissArmyTransformer's GLM130B) on a SAT checkpoint.

Executed by the SAT environment's python (../shared/reference/setup.sh), not by glmjax's:
    python sat_forward.py REFERENCE_DIR CONFIG.json CKPT_DIR INPUTS.npz OUT.npy
REFERENCE_DIR holds make_reference.py, whose build_sat_model loads the checkpoint through SAT's own
load_checkpoint (the loader GLM-130B's initialize.py calls) with its CPU/float32 run-time patches.
"""
import json
import sys

import numpy as np
import torch

ref_dir, config, ckpt, inputs, out = sys.argv[1:6]
sys.path.insert(0, ref_dir)
import make_reference  # noqa: E402

with open(config) as f:
    cfg = dict(make_reference.DEFAULT_CONFIG, **json.load(f))
model = make_reference.build_sat_model(cfg, 1, ckpt)
d = np.load(inputs)
logits, _, _ = make_reference.sat_forward(model, torch.from_numpy(d["tokens"]), torch.from_numpy(d["position_ids"]),
                                          torch.from_numpy(d["attention_mask"]))
np.save(out, logits.numpy())
