"""Dispatch (kernels/dispatch.py): which inputs reach the Triton kernels, and the interpreter switch as
triton.jit reads it. Inside the interpreter, test_cross_entropy_cases.py and varlen_attention_cases.py
check the CPU side again."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from mftcore.kernels.dispatch import ANY_DTYPE, TENSOR_CORE_DTYPES, interpreted, uses_triton
from tests.helpers.paths import ROOT

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def on_cuda(dtype):
    """What uses_triton reads of a CUDA tensor, without a GPU."""
    return SimpleNamespace(is_cuda=True, dtype=dtype, device=torch.device("cuda"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_rules_per_op(dtype):
    sixteen_bit = dtype in (torch.float16, torch.bfloat16)
    assert uses_triton(on_cuda(dtype), cuda_dtypes=TENSOR_CORE_DTYPES) == sixteen_bit  # varlen attention
    assert uses_triton(on_cuda(dtype)) == sixteen_bit  # the default: mftcore/model/attention.py's warning
    assert uses_triton(on_cuda(dtype), cuda_dtypes=ANY_DTYPE)  # cross-entropy: fp32 tiles of its own


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_takes_the_reference_outside_the_interpreter(dtype):
    assert not interpreted()
    assert not uses_triton(torch.zeros(1, dtype=dtype), cuda_dtypes=ANY_DTYPE)
    assert not uses_triton(torch.zeros(1, dtype=dtype, device="meta"), cuda_dtypes=ANY_DTYPE)


def test_every_spelling_triton_accepts_switches_every_op_alike():
    """TRITON_INTERPRET=true makes triton.jit interpret the kernels; dispatch must agree with the kernels'
    own decoration (a separate `== "1"` test sent such inputs to the reference while CE ran Triton)."""
    code = ("import sys, torch\nfrom mftcore.kernels import dispatch\n"
            "kernels = [sys.modules['mftcore.kernels.cross_entropy_kernels']._logits_lse_kernel,\n"
            "           sys.modules['mftcore.kernels.varlen_attention']._fwd_kernel]\n"
            "print(dispatch.interpreted(), *sorted({type(k).__name__ for k in kernels}))\n"
            "print(*(dispatch.uses_triton(torch.zeros(1, dtype=d), cuda_dtypes=rule) for rule in\n"
            "        (dispatch.ANY_DTYPE, dispatch.TENSOR_CORE_DTYPES) for d in (torch.float32, torch.bfloat16)))")
    env = dict(os.environ, TRITON_INTERPRET="true")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["True InterpretedFunction", "True False True False"]
