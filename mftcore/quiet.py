"""Third-party output that does not concern a mftcore user, silenced where it starts: each entry names
its source and matches its exact message, so every other warning of those libraries still shows.

- DeepSpeed logs "Setting accelerator to CPU. If you have GPU ..." (a WARNING of its "DeepSpeed" logger)
  the first time anything imports it on a machine without CUDA; mftcore's start-up report names the
  device. A filter on that logger, added before DeepSpeed creates it, survives its set-up.
- bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community ... pip install kernels"
  on CPUs with AVX512-BF16: an optional faster kernel of HF's `kernels` package (the name `kernels`
  can also resolve to this repository's kernels/ folder when run from its root), its own fallback runs.
- transformers warns "`is_gradient_checkpointing` is deprecated" (FutureWarning) when peft wraps a model:
  peft's call, not the user's code.
"""

from __future__ import annotations

import logging
import re
import warnings

# (logger name, regex the whole message must match from its start)
LOG_LINES = [
    ("DeepSpeed", r"Setting accelerator to CPU\. If you have GPU or other accelerator, we were unable to detect it\."),
    ("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward from kernels-community: "),
]
# (category, message regex) for warnings.filterwarnings
WARNINGS = [
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated and will be removed in v6"),
]


class DropLines(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def silence_third_party() -> None:
    """Install the filters (idempotent); call before DeepSpeed, bitsandbytes or peft are imported."""
    for name, pattern in LOG_LINES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropLines) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(DropLines(pattern))
    for category, message in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
