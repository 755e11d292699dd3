"""Compile every Triton kernel of the cross-entropy op for sm_90 (H100/H200) and sm_80 (A100), at every
configuration its launcher can pick, without a GPU: triton.compile with a GPUTarget gives PTX and a
cubin, and the cuobjdump in Triton's wheel dumps their SASS and resource usage.

Asserts: each compile succeeds, without register spills, within the architecture's shared memory;
every tl.dot on 16-bit inputs (and TF32) becomes HGMMA (wgmma) on sm_90 and HMMA (mma.sync) on sm_80.
The table of registers and shared memory per kernel and configuration is printed in the test output.
"""

import itertools
import re

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mftcore.kernels import cross_entropy as ce
from tests.helpers.compile_check import dump_cubin

TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # max dynamic shared memory per block (CUDA guide)
K1_ALIGNED = ("h_ptr", "w_ptr", "b_ptr", "labels_ptr", "logits_ptr", "tile_max_ptr", "tile_sum_ptr",
              "target_ptr", "M", "V", "H", "stride_h", "stride_w", "stride_logits")
K2_ALIGNED = ("logits_ptr", "grad_ptr", "lse_ptr", "scale_ptr", "labels_ptr", "M", "V", "stride_logits",
              "stride_grad")


def compile_kernel(fn, signature, constexprs, aligned, arch, num_warps, num_stages):
    """Compile for cuda:arch; aligned names get Triton's divisible-by-16 specialisation, as the JIT gives
    16-byte aligned pointers and multiple-of-16 ints (H=4096, V=128256)."""
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def inspect_cubin(compiled) -> dict:
    """SASS instruction counts and resource usage of a compiled kernel (cuobjdump, via compile_check)."""
    sass, usage = dump_cubin(compiled.asm["cubin"])
    return {"hgmma": len(re.findall(r"\bHGMMA\b", sass)), "hmma": len(re.findall(r"\bHMMA\b", sass)),
            "regs": usage["REG"], "stack": usage["STACK"], "local": usage["LOCAL"], "smem": compiled.metadata.shared}


def logits_variants(arch):
    """Kernel 1 as the launcher can launch it on this architecture."""
    for dtype in TYPES:
        key = ce.logits_config_key((arch // 10, arch % 10), dtype, interpret=False)
        cfg = ce.LOGITS_CONFIGS[key]
        precisions = ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)
        for precision, bias, store in itertools.product(precisions, (False, True), (False, True)):
            # V not a multiple of 16 (GPT-2's 50257) too; the launcher pads the logits row stride.
            for v_aligned in ((True, False) if (store and not bias and dtype != torch.float32) else (True,)):
                yield dtype, key, cfg, precision, bias, store, v_aligned


def compile_logits_kernel(arch, dtype, cfg, precision, bias, store, v_aligned):
    t = TYPES[dtype]
    sig = {"h_ptr": f"*{t}", "w_ptr": f"*{t}", "b_ptr": f"*{t}" if bias else "*fp32", "labels_ptr": "*i64",
           "logits_ptr": f"*{t}" if store else "*fp32", "tile_max_ptr": "*fp32", "tile_sum_ptr": "*fp32",
           "target_ptr": "*fp32", "M": "i32", "V": "i32", "H": "i32", "stride_h": "i32", "stride_w": "i32",
           "stride_logits": "i32", "n_vtiles": "i32", "HAS_BIAS": "constexpr", "STORE_LOGITS": "constexpr",
           "DOT_PRECISION": "constexpr", "BLOCK_M": "constexpr", "BLOCK_V": "constexpr", "BLOCK_K": "constexpr"}
    consts = {"HAS_BIAS": bias, "STORE_LOGITS": store, "DOT_PRECISION": precision, "BLOCK_M": cfg.block_m,
              "BLOCK_V": cfg.block_v, "BLOCK_K": cfg.block_k}
    aligned = K1_ALIGNED if v_aligned else tuple(n for n in K1_ALIGNED if n != "V")
    return compile_kernel(ce._logits_lse_kernel, sig, consts, aligned, arch, cfg.num_warps, cfg.num_stages)


def compile_grad_kernel(arch, dtype):
    t = TYPES[dtype]
    cfg = ce.GRAD_CONFIGS["gpu"]
    sig = {"logits_ptr": f"*{t}", "grad_ptr": f"*{t}", "lse_ptr": "*fp32", "scale_ptr": "*fp32",
           "labels_ptr": "*i64", "M": "i32", "V": "i32", "stride_logits": "i32", "stride_grad": "i32",
           "BLOCK_R": "constexpr", "BLOCK_V": "constexpr"}
    consts = {"BLOCK_R": cfg.block_m, "BLOCK_V": cfg.block_v}
    return compile_kernel(ce._softmax_grad_kernel, sig, consts, K2_ALIGNED, arch, cfg.num_warps, cfg.num_stages)


@pytest.mark.parametrize("arch", [90, 80], ids=lambda a: f"sm_{a}")
def test_every_launch_configuration_compiles(arch, capsys):
    rows = []
    for dtype, key, cfg, precision, bias, store, v_aligned in logits_variants(arch):
        info = inspect_cubin(compile_logits_kernel(arch, dtype, cfg, precision, bias, store, v_aligned))
        tensor_core = dtype != torch.float32 or precision == "tf32"
        if tensor_core and arch == 90:
            assert info["hgmma"] > 0 and info["hmma"] == 0, (key, dtype, precision, info)
        if tensor_core and arch == 80:
            assert info["hmma"] > 0 and info["hgmma"] == 0, (key, dtype, precision, info)
        label = (f"logits_lse {key} {TYPES[dtype]} {precision} bias={int(bias)} store={int(store)} "
                 f"{'V%16=0' if v_aligned else 'V%16>0'} {cfg.block_m}x{cfg.block_v}x{cfg.block_k} "
                 f"w{cfg.num_warps} s{cfg.num_stages}")
        rows.append((label, info))
    for dtype in TYPES:
        cfg = ce.GRAD_CONFIGS["gpu"]
        rows.append((f"softmax_grad {TYPES[dtype]} {cfg.block_m}x{cfg.block_v} w{cfg.num_warps}",
                     inspect_cubin(compile_grad_kernel(arch, dtype))))
    with capsys.disabled():
        print(f"\n[sm_{arch}] kernel / configuration: registers, spill stack, shared memory, HGMMA, HMMA")
        for label, info in rows:
            print(f"  {label:80s} regs={info['regs']:3d} stack={info['stack']} smem={info['smem']:6d} "
                  f"HGMMA={info['hgmma']} HMMA={info['hmma']}")
    for label, info in rows:
        assert info["stack"] == 0 and info["local"] == 0, f"register spills in {label}: {info}"
        assert info["smem"] <= SMEM_LIMIT[arch], f"{label} needs {info['smem']} bytes of shared memory"
