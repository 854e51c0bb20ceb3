"""Shared test setup: an 8-device CPU mesh (set before jax is imported) and the fixture cases."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
from helpers import TINY_CASES, load_case  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cases():
    return {c: load_case(c) for c in TINY_CASES}
