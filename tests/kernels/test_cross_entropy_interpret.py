"""Run tests/kernels/test_cross_entropy_cases.py again with TRITON_INTERPRET=1 (the Triton kernels on CPU tensors,
both logits paths), and tests/kernels/cross_entropy_interpret_cases.py (every tuning candidate, the tuner, opcheck
and no host reads on the Triton paths), which only runs there.

TRITON_INTERPRET is read when a kernel is decorated, so it needs a fresh interpreter: a subprocess keeps
it out of the rest of the suite, which goes on using the PyTorch path.
"""

import os
import re
import subprocess
import sys

from tests.helpers.paths import ROOT


def test_cases_pass_in_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         os.path.join("tests", "kernels", "test_cross_entropy_cases.py"),
         os.path.join("tests", "kernels", "cross_entropy_interpret_cases.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)  # a hang guard, not a speed test
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 120, summary
    assert not re.search(r"skipped|xfail|deselected|error", summary), summary
