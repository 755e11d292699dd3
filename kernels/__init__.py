"""mftcore kernels (installed as mftcore.kernels). Each op: Triton code and its PyTorch reference."""

if __name__ != "mftcore.kernels":
    # From a checkout's root (python -m, python -c) this directory is importable as top-level
    # `kernels`, the name of HF's `kernels` package, which transformers probes at import time. Look
    # like an empty namespace package (no __file__, no __version__) so the probe reports it absent.
    __file__ = None
else:
    from mftcore.kernels.cross_entropy import CrossEntropyOutput, fused_linear_cross_entropy, masked_cross_entropy
    # the function shadows its module here: reach the module as sys.modules["mftcore.kernels.varlen_attention"]
    from mftcore.kernels.varlen_attention import varlen_attention

    __all__ = ["CrossEntropyOutput", "fused_linear_cross_entropy", "masked_cross_entropy", "varlen_attention"]
