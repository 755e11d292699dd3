"""`mftcore bench NAME`: run the checkout's bench/bench_NAME.py and hand back its exit code.

The benchmarks live in the checkout's bench/ directory, one script per kernel or stage, beside their
gates and results; bench/ is not an installed package. This command finds it next to the installed
`mftcore` package, which is where it is for the editable install of a checkout (`pip install -e .`, as
the README says), or at $MFTCORE_BENCH_DIR, and runs the script in a fresh interpreter with the
standard flags. It knows the benchmarks' names and nothing of what they measure: the script prints
its table, checks its gates and writes its results (exit code 1 when a gate failed).
"""

from __future__ import annotations

import os
import subprocess
import sys

from mftcore.errors import MftcoreError
from mftcore.outputs import check_output

# One entry per bench/bench_<name>.py; a name stays here when a build lacks its script, so that the
# command can say so (tests/bench/test_bench.py checks this table against the checkout's files).
BENCHMARKS = ("cross_entropy", "varlen_attention", "packing", "train_step", "data", "sandbox", "threads",
              "memory")
MARKER = "common.py"  # what every script imports: a directory without it holds no benchmarks


def find_bench_dir() -> str:
    """$MFTCORE_BENCH_DIR, or bench/ beside the package; a one-line error when it holds no benchmarks."""
    path = os.environ.get("MFTCORE_BENCH_DIR") or os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench")
    if not os.path.isfile(os.path.join(path, MARKER)):
        raise MftcoreError(f"bench: {path}: no benchmarks here; `mftcore bench` runs from a checkout "
                           "(pip install -e .) or with MFTCORE_BENCH_DIR set to its bench/ directory")
    return path


def find_script(name: str, directory: str) -> str:
    path = os.path.join(directory, f"bench_{name}.py")
    if not os.path.isfile(path):
        raise MftcoreError(f"bench {name}: not available in this build: {path} is missing")
    return path


def bench_command(script: str, device: str, quick: bool, out: str | None) -> list:
    return [sys.executable, script, "--device", device, *(["--quick"] if quick else []),
            *(["--json", out] if out else [])]


def run_benchmark(name: str, device: str = "auto", quick: bool = False, out: str | None = None) -> int:
    """Run bench/bench_<name>.py here, its output on this terminal; its exit code (128+N if killed by N)."""
    if out is not None:  # the script writes it: refused here if it would land on a run or an input
        check_output(out, "--json", {"benchmark scripts": find_bench_dir()}, file=True)
    code = subprocess.run(bench_command(find_script(name, find_bench_dir()), device, quick, out)).returncode
    return code if code >= 0 else 128 - code
