"""Shared test setup: an 8-device CPU mesh (set before jax is imported), a persistent XLA
compilation cache for the session, and the fixture cases.

The cache lives in a fresh temporary directory per pytest session (removed at exit) and is named in
the environment, so the subprocesses the tests start (`python -m glmjax ...`, tests/helpers/*.py)
share it: the same small programs (the training step, generation, ...) are compiled once per
session instead of once per Trainer and per process. A hit returns the very executable the miss
compiled, so results are unchanged (programs with host callbacks are never stored). Every variable
is only a default: JAX_ENABLE_COMPILATION_CACHE=false turns the cache off, and
JAX_COMPILATION_CACHE_DIR=path uses (and keeps) a cache of your own."""
import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # set by an outer session (xdist, nested pytest): share it
    _cache_dir = tempfile.mkdtemp(prefix="glmjax-test-xla-cache-")
    _owner = os.getpid()
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    atexit.register(lambda: os.getpid() == _owner and shutil.rmtree(_cache_dir, ignore_errors=True))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # default 1 s: tiny programs too
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")  # no size floor
if "jax" in sys.modules:  # a plugin imported jax first, before these were read from the environment
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"] or None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                      int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))

import pytest  # noqa: E402
from helpers import TINY_CASES, load_case  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cases():
    return {c: load_case(c) for c in TINY_CASES}
