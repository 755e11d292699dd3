"""The bench/ scripts as modules for the tests: bench/ is no package, and its scripts import their
neighbour `common` by name, as `python bench/bench_<name>.py` lets them (its directory first on sys.path)."""

import importlib
import os
import sys

from tests.helpers.paths import ROOT

BENCH = os.path.join(ROOT, "bench")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)


def bench_script(name: str):
    """bench/<name>.py, imported once: "common", "gpu_check", "bench_packing", ..."""
    return importlib.import_module(name)
