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
