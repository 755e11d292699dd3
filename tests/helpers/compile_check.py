"""Compile Triton kernels for GPUs on a machine without one, and read back what ptxas made of them.

A kernel module routes every launch through a module-level `launch(spec, grid, *args)`; `captured_launches`
swaps it for a recorder, so calling the module's launchers with CPU tensors lists the exact kernels,
compile-time constants and runtime arguments a GPU run would use. `compile_launch` then specialises the
arguments with the JIT's own binder (same signature, constexprs and divisibility attributes as a real
launch) and compiles for a GPUTarget: PTX and cubin come out here, and the cuobjdump in Triton's wheel
gives SASS and the resource usage (registers, spills).

    python -m tests.helpers.compile_check   # the varlen attention tables (bench/results/ keeps a copy)
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import tempfile
from contextlib import contextmanager
from typing import NamedTuple

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
# Largest dynamic shared memory one block may opt into: A100 (sm_80) 163 KiB, H100/H200 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


class Launch(NamedTuple):
    spec: object  # the module's LaunchSpec: kernel, constexprs, num_warps, num_stages
    args: tuple


class CompileReport(NamedTuple):
    kernel: str
    dtype: str  # element type of the kernel's first pointer argument
    constexprs: dict
    capability: int
    num_warps: int
    num_stages: int
    registers: int
    spill_bytes: int  # local memory per thread: register spills
    shared: int  # bytes of shared memory per block
    ttgir_dots: int  # tt.dot left after the GPU passes (MMAv2 or FMA)
    wgmma_dots: int  # ttng.warp_group_dot in TTGIR (Hopper wgmma)
    hgmma: int  # HGMMA instructions in SASS
    hmma: int  # HMMA instructions in SASS (Ampere-style mma.sync)
    spill_stores: int = 0  # STL instructions in SASS: stores of registers to local memory

    def row(self) -> str:
        consts = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs.items())
        return (f"| sm_{self.capability} | {self.kernel} | {self.dtype} | {consts} | "
                f"{self.num_warps}/{self.num_stages} | {self.registers} | {self.spill_bytes} | {self.shared} | "
                f"{self.hgmma} | {self.hmma} |")


TABLE_HEADER = ("| target | kernel | dtype | constexprs | warps/stages | registers | spill B | shared B | HGMMA "
                "| HMMA |\n|---|---|---|---|---|---|---|---|---|---|")
STL_HEADER = TABLE_HEADER.replace("| HMMA |", "| HMMA | STL |").replace("|---|---|\n", "") + "---|"


@contextmanager
def captured_launches(module):
    """Within the block, module.launch records Launch(spec, args) into the yielded list instead of running."""
    seen: list[Launch] = []
    original = module.launch
    module.launch = lambda spec, grid, *args: seen.append(Launch(spec, args))
    try:
        yield seen
    finally:
        module.launch = original


def launch_key(launch: Launch, capability: int = 90) -> tuple:
    """What makes two launches compile to the same binary: kernel, constants, options and specialisation."""
    signature, constexprs, attrs, options = specialise(launch, capability)
    return (launch.spec.kernel.fn.__name__, tuple(sorted(signature.items())),
            tuple(sorted(map(str, constexprs.items()))), tuple(sorted(map(str, attrs.items()))),
            launch.spec.num_warps, launch.spec.num_stages)


def specialise(launch: Launch, capability: int):
    """signature, constexprs, attrs, options exactly as the JIT derives them from these arguments."""
    kernel, backend = launch.spec.kernel, make_backend(GPUTarget("cuda", capability, 32))
    kwargs = dict(launch.spec.constexprs, num_warps=launch.spec.num_warps, num_stages=launch.spec.num_stages)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


def compile_launch(launch: Launch, capability: int) -> CompileReport:
    signature, constexprs, attrs, options = specialise(launch, capability)
    kernel = launch.spec.kernel
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                              target=GPUTarget("cuda", capability, 32), options=options.__dict__)
    sass, usage = dump_cubin(compiled.asm["cubin"])
    ttgir = compiled.asm["ttgir"]
    return CompileReport(
        kernel=kernel.fn.__name__, dtype=next(iter(signature.values())).lstrip("*"),
        constexprs=dict(launch.spec.constexprs), capability=capability,
        num_warps=launch.spec.num_warps, num_stages=launch.spec.num_stages,
        registers=usage["REG"], spill_bytes=usage["LOCAL"] + usage["STACK"], shared=compiled.metadata.shared,
        ttgir_dots=len(re.findall(r"= tt\.dot ", ttgir)), wgmma_dots=len(re.findall(r"ttng\.warp_group_dot ", ttgir)),
        hgmma=len(re.findall(r"\bHGMMA\.", sass)), hmma=len(re.findall(r"\bHMMA\.", sass)),
        spill_stores=len(re.findall(r"\bSTL\b", sass)))


def dump_cubin(cubin: bytes) -> tuple[str, dict]:
    """SASS text and the resource usage line (REG, STACK, SHARED, LOCAL, ...) of a one-kernel cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([CUOBJDUMP, "--dump-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    usage = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", res)}
    return sass, usage


def varlen_attention_launches() -> list[Launch]:
    """Every distinct launch the varlen attention launchers make for CUDA's dtypes (fp16, bf16) and head dim
    buckets (64, 128, 256), plus head dim 80 in bf16 for the masked-column path of dims below a power of
    two; each for MHA and GQA, causal or not, a sliding window or not, separate q/k segments or not,
    deterministic or not (those are runtime arguments), with and without a softcap (a constexpr)."""
    import importlib

    import torch

    va = importlib.import_module("mftcore.kernels.varlen_attention")
    cases = [(dtype, d) for dtype in (torch.float16, torch.bfloat16) for d in (64, 128, 256)]
    cases.append((torch.bfloat16, 80))
    cu = torch.tensor([0, 100, 300, 1024], dtype=torch.int32)
    cu_k = torch.tensor([0, 200, 300, 1024], dtype=torch.int32)
    # runtime variety (one binary serves all): causal, full, a window over separate q/k segments
    variants = (((-1, 0), cu), ((-1, -1), cu), ((255, 0), cu_k))
    launches, keys = [], set()
    with captured_launches(va) as seen:
        for dtype, d in cases:
            for hq, hkv in ((8, 8), (8, 2)):
                q = torch.zeros(1024, hq, d, dtype=dtype)
                k = torch.zeros(1024, hkv, d, dtype=dtype)
                for ((left, right), ck), softcap in itertools.product(variants, (0.0, 50.0)):
                    seg = va.Segments(cu, ck, 724, 724, left, right, softcap)
                    o, lse = va.varlen_attention_forward(q, k, k, seg, d ** -0.5)
                    for det in (False, True):
                        va.varlen_attention_backward(o, q, k, k, o, lse, seg, d ** -0.5, det)
    for launch in seen:
        key = launch_key(launch)
        if key not in keys:
            keys.add(key)
            launches.append(launch)
    return launches


def distinct(launches) -> list[Launch]:
    """One launch per binary (launch_key)."""
    out, keys = [], set()
    for launch in launches:
        key = launch_key(launch)
        if key not in keys:
            keys.add(key)
            out.append(launch)
    return out


def varlen_attention_candidate_launches() -> list[Launch]:
    """Every candidate block configuration of each varlen kernel (the tuner's choices), compiled in bf16 for
    head dims 64/128/256, with and without softcap, each with the arguments of a captured default launch."""
    import importlib

    va = importlib.import_module("mftcore.kernels.varlen_attention")
    defaults = {}
    for launch in varlen_attention_launches():
        consts = launch.spec.constexprs
        if str(launch.args[0].dtype) == "torch.bfloat16" and consts["HEAD_DIM"] in (64, 128, 256):
            defaults[(launch.spec.kernel.fn.__name__, consts["D_PAD"], consts.get("ATOMIC_DQ"),
                      consts.get("SOFTCAP"))] = launch
    out = []
    for (name, d, atomic, cap), launch in defaults.items():
        if name == "_fwd_kernel":
            specs = [va.forward_spec(d, cfg, cap) for cfg in va.FWD_CONFIGS[d]]
        elif name == "_bwd_dkdv_kernel":
            specs = [va.dkdv_spec(d, not atomic, cfg, cap) for cfg in va.DKDV_CONFIGS[d]]
        elif name == "_bwd_dq_kernel":
            specs = [va.dq_spec(d, cfg, cap) for cfg in va.DQ_CONFIGS[d]]
        else:
            continue
        out += [Launch(spec, launch.args) for spec in specs]
    return distinct(out)


def ce_option_sets(family: str) -> list:
    """The plain loss on a family; on its "/options" family, options that make every constexpr combination:
    kernel 1's (SOFTCAP, SUM_LOGITS) and the row and gradient kernels' (SOFTCAP, EXTRA)."""
    from mftcore.kernels.cross_entropy_reference import LossOptions

    if not family.endswith("/options"):
        return [LossOptions()]
    return [LossOptions(softcap=30.0), LossOptions(label_smoothing=0.1), LossOptions(z_loss=1e-4),
            LossOptions(label_smoothing=0.1, z_loss=1e-4, softcap=30.0)]


def ce_variant_compiled(cek, plan, is_default: bool, dtype, options: bool, bias: int, want_grad: int, V: int) -> bool:
    """Which launches the compile test makes: fp16 compiles as bf16 does, so one plan of each path stands
    for the others (with options: with bias and gradient, and without either); V=1000 (unaligned) at the
    default of the plain family only."""
    import torch

    if V == 1000:
        return is_default and not options
    if dtype == torch.float16:
        first = cek.CUBLAS_OPTION_CANDIDATES[0] if options else cek.CUBLAS_CANDIDATES[0]
        return (is_default or plan == first) and (not options or bias == want_grad)
    return True


def cross_entropy_launches(families=None) -> list[Launch]:
    """Every launch the fused cross-entropy makes at every candidate of its tuner, per device family
    ({family: [Launch]}): kernel 1 and the cuBLAS path's row kernel with and without stored logits, bias
    or not, the softmax-gradient kernel, and the fp32 weight-gradient GEMM; 16-bit families in bf16 (and
    fp16 at the default tile), fp32 with IEEE and TF32 dots."""
    import importlib

    import torch

    cek = importlib.import_module("mftcore.kernels.cross_entropy_kernels")
    ce = importlib.import_module("mftcore.kernels.cross_entropy")
    families = families or ("sm90_16bit", "sm80_16bit", "fp32", "sm90_16bit/options", "sm80_16bit/options",
                            "fp32/options")
    out = {}
    for family in families:
        dtypes = [torch.float32] if family.startswith("fp32") else [torch.bfloat16, torch.float16]
        plans = cek.plan_candidates(family)
        with captured_launches(cek) as seen:
            for dtype in dtypes:
                for tf32 in ((False, True) if dtype == torch.float32 else (False,)):
                    torch.backends.cuda.matmul.allow_tf32 = tf32
                    for plan in plans:
                        is_default = plan == cek.default_plan(family)
                        for opts in ce_option_sets(family):
                            for bias, want_grad, V in ((0, 0, 1024), (0, 1, 1024), (1, 1, 1024), (1, 0, 1024),
                                                       (0, 1, 1000)):
                                if not ce_variant_compiled(cek, plan, is_default, dtype, family.endswith("/options"),
                                                           bias, want_grad, V):
                                    continue
                                h = torch.zeros(64, 256, dtype=dtype)
                                w = torch.zeros(V, 256, dtype=dtype)
                                b = torch.zeros(V, dtype=dtype) if bias else None
                                labels, scale = torch.zeros(64, dtype=torch.long), torch.zeros(64)
                                buf = ce.chunk_buffer(h, 64, V)
                                cek.chunk_step(h, w, b, labels, scale, bool(want_grad), buf, plan, opts)
                    if dtype != torch.float32 and family in cek.GRAD_W_CANDIDATES:
                        for tile in cek.GRAD_W_CANDIDATES[family]:
                            cek.accumulate_grad_weight(torch.zeros(1024, 256), torch.zeros(64, 1024, dtype=dtype),
                                                       torch.zeros(64, 256, dtype=dtype), tile)
            torch.backends.cuda.matmul.allow_tf32 = False
        out[family] = distinct(seen)
    return out


if __name__ == "__main__":
    print("# varlen attention: every launch compiled for sm_90 and sm_80\n")
    print("Triton 3.7.1 and the ptxas/cuobjdump of its wheel, on a CPU-only machine: "
          "`python -m tests.helpers.compile_check`.\nregisters per thread; spill B = local memory and stack bytes "
          "per thread; STL = register spill stores in the SASS;\nshared B = bytes per block (limits: sm_80 166912, "
          "sm_90 232448); HGMMA / HMMA = wgmma / mma.sync instructions in the SASS.\nCausal, windows, separate "
          "q/k segments, GQA group and sizes are runtime arguments (one binary serves all); SOFTCAP is a\n"
          "constexpr (its own binaries); head dim 80 (bf16) stands for the head dims below their power of two "
          "(masked columns).\n\n## Default launches\n")
    print(STL_HEADER)
    for launch in varlen_attention_launches():
        for cap in (90, 80):
            report = compile_launch(launch, cap)
            print(report.row() + f" {report.spill_stores} |", flush=True)
    print("\n## Every tuning candidate (bf16)\n")
    print(STL_HEADER)
    for launch in varlen_attention_candidate_launches():
        for cap in (90, 80):
            report = compile_launch(launch, cap)
            print(report.row() + f" {report.spill_stores} |", flush=True)
