"""A SAT checkpoint exported by glmjax, loaded by GLM-130B's real model class, gives the logits of
the original weights. Needs the SAT environment of ../shared/reference/setup.sh (`make sat-env`);
GLMJAX_SAT_PYTHON may point at its python, GLMJAX_SAT_REFERENCE at the folder of make_reference.py."""
import os
import subprocess

import numpy as np
import pytest
from helpers import LONG_CASE, assert_close_scaled, case_dir

from glmjax import config as C
from glmjax.convert import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAT_PYTHON = os.environ.get("GLMJAX_SAT_PYTHON", os.path.join(ROOT, ".venv-sat", "bin", "python"))
SAT_REFERENCE = os.environ.get("GLMJAX_SAT_REFERENCE", os.path.join(ROOT, "..", "shared", "reference"))
have_sat = os.path.isfile(SAT_PYTHON) and os.path.isfile(os.path.join(SAT_REFERENCE, "make_reference.py"))


@pytest.mark.slow
@pytest.mark.skipif(not have_sat, reason="SAT environment absent: run `make sat-env` (or set GLMJAX_SAT_PYTHON)")
@pytest.mark.parametrize("quantize", [None])
def test_exported_sat_checkpoint_runs_in_glm130b_model_class(tmp_path, quantize):
    case = case_dir(LONG_CASE)
    cfg_path = os.path.join(case, "config.json")
    # tp2 SAT -> glmjax orbax -> tp1 SAT: the exported file is what SAT loads
    run.convert(f"sat:{os.path.join(case, 'ckpt_tp2')}", f"orbax:{tmp_path / 'ox'}", cfg=C.resolve(path=cfg_path))
    run.convert(f"orbax:{tmp_path / 'ox'}", f"sat:{tmp_path / 'export'}", tp=1)
    with np.load(os.path.join(case, "reference.npz")) as z:
        ref = {k: z[k] for k in ("tokens", "position_ids", "attention_mask", "logits")}
    np.savez(tmp_path / "in.npz", **ref)
    r = subprocess.run([SAT_PYTHON, os.path.join(ROOT, "tests", "helpers", "sat_forward.py"), SAT_REFERENCE,
                        cfg_path, str(tmp_path / "export"), str(tmp_path / "in.npz"), str(tmp_path / "out.npy")],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert_close_scaled(np.load(tmp_path / "out.npy"), ref["logits"])
