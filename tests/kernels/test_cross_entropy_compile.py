"""Compile every Triton kernel of the cross-entropy op for sm_90 (H100/H200) and sm_80 (A100), at every
candidate its tuner can pick and every launch variant, without a GPU: the launchers run on CPU tensors with
their launches captured (tests/helpers/compile_check.py), and each distinct launch is compiled with the
JIT's own specialisation for a GPUTarget; the cuobjdump in Triton's wheel gives SASS and resource usage.

Asserts: each compile succeeds, without register spills (no local memory, no STL in SASS), within the
architecture's shared memory; every tl.dot on 16-bit inputs (and TF32) becomes HGMMA (wgmma) on sm_90 and
HMMA (mma.sync) on sm_80. The table is printed in the test output (a copy in
bench/results/compile-sm90-sm80/cross_entropy.txt: python -m tests.kernels.test_cross_entropy_compile).
"""

import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from mftcore.kernels import cross_entropy_kernels as cek
from tests.helpers import compile_check

# where each family's plans run; "/options": the candidates of calls with softcap / smoothing / z-loss on
ARCHES = {"sm90_16bit": (90,), "sm80_16bit": (80,), "fp32": (90, 80), "sm90_16bit/options": (90,),
          "sm80_16bit/options": (80,), "fp32/options": (90, 80)}
TENSOR_CORE_KERNELS = ("_logits_lse_kernel", "_grad_weight_kernel")


def reports(family: str) -> list:
    jobs = [(launch, arch) for launch in compile_check.cross_entropy_launches((family,))[family]
            for arch in ARCHES[family]]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # ptxas and LLVM release the GIL
        return list(pool.map(lambda job: compile_check.compile_launch(*job), jobs))


def tensor_core(report) -> bool:
    if report.kernel not in TENSOR_CORE_KERNELS:
        return False
    return report.dtype != "fp32" or report.constexprs.get("DOT_PRECISION") == "tf32"


def option_flags(r, names):
    return tuple(int(r.constexprs.get(n, False)) for n in names)


@pytest.mark.parametrize("family", list(ARCHES))
def test_every_candidate_and_variant_compiles_without_spills(family, capsys):
    found = reports(family)
    names = {r.kernel for r in found}
    options = family.endswith("/options")
    expected = {"_rows_lse_grad_kernel"} | (set() if family == "fp32/options" else
                                            {"_logits_lse_kernel", "_softmax_grad_kernel"})
    assert names == (expected if family.startswith("fp32") or options else expected | {"_grad_weight_kernel"}), names
    tiles = {(r.constexprs["BLOCK_M"], r.constexprs["BLOCK_V"], r.constexprs["BLOCK_K"], r.num_warps, r.num_stages)
             for r in found if r.kernel == "_logits_lse_kernel"}
    assert tiles == {(p.block_m, p.block_v, p.block_k, p.num_warps, p.num_stages)
                     for p in cek.TRITON_CANDIDATES[family]}
    rows = {(r.constexprs["BLOCK_V"], r.num_warps) for r in found if r.kernel == "_rows_lse_grad_kernel"
            and r.dtype in ("bf16", "fp32")}
    assert rows == {(p.block_v, p.num_warps) for p in
                    (cek.CUBLAS_OPTION_CANDIDATES if options else cek.CUBLAS_CANDIDATES)}
    if options:  # every option constexpr combination at every candidate, with and without bias / gradient
        combos = {(1, 0), (0, 1), (1, 1)}
        for tile in tiles:
            for bias_store in ((0, 0), (0, 1), (1, 0), (1, 1)):
                got = {option_flags(r, ("SOFTCAP", "SUM_LOGITS")) for r in found if r.kernel == "_logits_lse_kernel"
                       and r.dtype == "bf16" and (r.constexprs["BLOCK_M"], r.constexprs["BLOCK_V"],
                                                  r.constexprs["BLOCK_K"], r.num_warps, r.num_stages) == tile
                       and (int(r.constexprs["HAS_BIAS"]), int(r.constexprs["STORE_LOGITS"])) == bias_store}
                assert combos <= got, (tile, bias_store, got)
        for row in rows:
            for grad in (0, 1):
                got = {option_flags(r, ("SOFTCAP", "EXTRA")) for r in found if r.kernel == "_rows_lse_grad_kernel"
                       and r.dtype in ("bf16", "fp32") and (r.constexprs["BLOCK_V"], r.num_warps) == row
                       and int(r.constexprs["WANT_GRAD"]) == grad}
                assert combos <= got, (row, grad, got)
    with capsys.disabled():
        print(f"\n[{family}]\n{compile_check.STL_HEADER}")
        for r in found:
            print(r.row() + f" {r.spill_stores} |")
    for r in found:
        where = f"{r.kernel} {r.dtype} {r.constexprs} w{r.num_warps}/s{r.num_stages} sm_{r.capability}"
        assert r.spill_bytes == 0 and r.spill_stores == 0, f"register spills in {where}: {r}"
        assert 0 <= r.shared <= compile_check.SHARED_LIMIT[r.capability], where
        if tensor_core(r) and r.capability == 90:
            assert r.hgmma > 0 and r.hmma == 0, where
        elif tensor_core(r):
            assert r.hmma > 0 and r.hgmma == 0, where


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    print("# python -m tests.kernels.test_cross_entropy_compile: every launch of the fused cross-entropy at "
          "every tuner candidate, compiled for sm_90 / sm_80 without a GPU (triton.compile + cuobjdump).")
    print("# last column: STL instructions (register spills) in SASS")
    for fam in ARCHES:
        print(f"\n## {fam}\n{compile_check.STL_HEADER}")
        for rep in reports(fam):
            print(rep.row() + f" {rep.spill_stores} |", flush=True)
