"""mftcore's Triton ops, each with its PyTorch reference (the CPU path and the test oracle).

The op files live in the checkout's top-level kernels/ (the project's layout names it); each module here
is a relative symlink to one of them, so `mftcore.kernels.<op>` is an ordinary module that editors and
static tools follow, and a wheel carries real files (setuptools copies through the link). kernels/ has
no __init__.py: from a checkout's root it is at most an empty namespace portion, so it never shadows HF's
`kernels` package, which transformers and bitsandbytes import by that name.
"""

from .cross_entropy import CrossEntropyOutput, fused_linear_cross_entropy, masked_cross_entropy
from .cross_entropy_reference import task_mean, task_mean_scales

# the function shadows its module here: reach the module as sys.modules["mftcore.kernels.varlen_attention"]
from .varlen_attention import varlen_attention

__all__ = ["CrossEntropyOutput", "fused_linear_cross_entropy", "masked_cross_entropy", "task_mean",
           "task_mean_scales", "varlen_attention"]
