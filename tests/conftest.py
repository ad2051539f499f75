"""Every test runs `deit` under jaxtyping's beartype import hook: shapes and dtypes of all
annotated public functions in every `deit` module are checked at call time."""

import os
import sys
from pathlib import Path

# 8 fake CPU devices, so sharding tests run on any machine; set before JAX initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
