"""Where an op runs: its Triton kernels (CUDA tensors, or CPU tensors under Triton's interpreter) or its
PyTorch reference. The one copy of both questions for every op in this package.

Whether the kernels run in the interpreter is decided by triton.jit when it decorates them: it reads
TRITON_INTERPRET then (any of 1/true/on/yes, its own parser), so a later change of the variable does
nothing. The answer is therefore read off a kernel decorated here; mftcore.kernels imports this module in
the same import as the ops' own kernels, so they were decorated alike. (A second parse of the variable
disagreed with Triton: "true" interpreted the kernels while a `== "1"` test sent the inputs elsewhere.)
"""

from __future__ import annotations

from typing import Optional

import torch
import triton


@triton.jit
def _probe_kernel():
    pass  # never launched: its type says how triton.jit decorated this import's kernels


INTERPRETED = type(_probe_kernel).__name__ == "InterpretedFunction"
# The interpreter holds bf16 as raw 16-bit integers and computes it wrongly without an error (triton
# 3.7.1, arithmetic and tl.dot alike); fp32 and fp16 come out right.
INTERPRETER_DTYPES = (torch.float32, torch.float16)
TENSOR_CORE_DTYPES = (torch.float16, torch.bfloat16)
ANY_DTYPE = None


def interpreted() -> bool:
    """Whether this process's kernels run in Triton's interpreter (TRITON_INTERPRET set at import)."""
    return INTERPRETED


def uses_triton(t: torch.Tensor, cuda_dtypes: Optional[tuple] = TENSOR_CORE_DTYPES) -> bool:
    """Whether an op runs its Triton kernels on t: a CUDA tensor of cuda_dtypes (ANY_DTYPE: every dtype;
    the default, 16-bit, is varlen attention's, whose kernels have no fp32 tiles), or a CPU tensor of
    INTERPRETER_DTYPES under the interpreter. Everything else takes the op's PyTorch reference."""
    if t.is_cuda:
        return cuda_dtypes is ANY_DTYPE or t.dtype in cuda_dtypes
    return INTERPRETED and t.device.type == "cpu" and t.dtype in INTERPRETER_DTYPES
