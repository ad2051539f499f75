"""Every test runs `deit` under jaxtyping's beartype import hook: shapes and dtypes of all
annotated public functions in every `deit` module are checked at call time."""

import os
import shutil
import sys
import tempfile
from pathlib import Path

# 8 fake CPU devices, so sharding tests run on any machine; set before JAX initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole session, shared by the xdist workers and the
# CLI subprocesses the end-to-end tests start (they inherit the environment): most of the
# suite's time is XLA compiling the same tiny programs again. A fresh directory per session,
# so no test ever sees an executable from an older checkout.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="deit-tests-jax-cache-")
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]  # this process made it: it removes it
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from jaxtyping import install_import_hook  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
sys.path.insert(0, str(SRC))

install_import_hook("deit", "beartype.beartype")  # stays installed for the whole session
import deit  # noqa: E402,F401


def pytest_collection_modifyitems(config, items):
    """Slow end-to-end tests first: with pytest-xdist (`-n auto` in pyproject) they start at
    once and the rest of the suite runs beside them, instead of after them."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_unconfigure(config):
    if "_OWN_CACHE" in globals():
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
