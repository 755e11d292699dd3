"""The Triton side of the fused linear cross-entropy: kernels, launch plans and their candidates, launchers.

One token chunk of C rows goes one of two ways (a `ChunkPlan`'s path), with the same outputs:
  "triton"  `_logits_lse_kernel` computes the logits tile h @ W^T (+ b) with tl.dot and, in the same
            program, each tile's row max, row sum of exp and the target logit; with gradients it stores the
            tile into the [C, V] chunk buffer, and `_softmax_grad_kernel` rewrites the buffer in place.
  "cublas"  torch.mm (cuBLAS; torch.mm on CPU under the interpreter) writes the logits into the buffer, then
            `_rows_lse_grad_kernel` makes one program per row: an online max/sum pass for the log-sum-exp and
            the target logit, and (with gradients) a second pass that writes the gradient in place.
Which is faster depends on the GPU and the shape (cuBLAS against our tile GEMM), so the plan is chosen by
timing, per device, dtype and shape bucket (kernels/autotune.py); with tuning off, DEFAULT_PLANS.

16-bit inputs: the statistics are computed from the logits rounded to the input dtype, the values the
gradient pass reads back (and what cuBLAS writes), so lse, target and gradient are consistent: without it
a confident token's softmax gradient 1 - p_y carried the full rounding error of its logit (27x torch's
fp16 error, measured in the interpreter at N,H,V = 128,256,4096, p_y ~ 0.97; within 1x after).

`_grad_weight_kernel` accumulates grad_W += G^T @ h into an fp32 buffer from 16-bit G and h, for fp32
master weights (the trainer's default: their fp32 gradient exists anyway) and accum_dtype=torch.float32.
Every launch goes through `launch(spec, grid, *args)`, which tests/helpers/compile_check.py intercepts to
compile each launch (and each candidate) for sm_90 and sm_80.

Options (cross_entropy_reference's module docstring; constexprs, so the plain loss compiles as before):
SOFTCAP soft-caps each logit where it is made (kernel 1 after the bias; the row kernel as it reads the cuBLAS
logits) and multiplies the gradient by 1 - (z/c)^2; tanh is written with exp2 (libdevice's fails in the
interpreter). SUM_LOGITS (label smoothing) adds each tile's row sum of z to kernel 1's statistics. EXTRA
(label smoothing or z-loss) makes the gradient a * p - b * onehot - c per row instead of scale * (p - onehot).
logit_scale never reaches a kernel: the op folds it into hidden and bias. Accuracy needs nothing new: the
row max and target logit are statistics the loss computes anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import autotune
from .cross_entropy_reference import LossOptions, RowStats, grad_coefficients
from .dispatch import interpreted

LOG2E = 1.4426950408889634


@triton.jit
def _softcap(x, cap):
    """cap * tanh(x / cap), by exp2 of a non-positive argument (no overflow)."""
    t = tl.exp2(tl.abs(x / cap) * -2.8853900817779268)  # exp(-2|x/c|)
    th = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -th, th) * cap


# ----------------------------------------------------------------------------------------- kernels
@triton.jit
def _logits_lse_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, logits_ptr, tile_max_ptr, tile_sum_ptr, target_ptr, tile_zsum_ptr,
    M, V, H, stride_h, stride_w, stride_logits, n_vtiles, softcap,
    HAS_BIAS: tl.constexpr, STORE_LOGITS: tl.constexpr, ROUND_LOGITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    SOFTCAP: tl.constexpr = False, SUM_LOGITS: tl.constexpr = False,
):
    """One [BLOCK_M, BLOCK_V] logits tile: its row max, row sum of exp, the target logits it holds."""
    pid = tl.program_id(0)
    n_mtiles = tl.cdiv(M, BLOCK_M)
    # Row tiles vary fastest: the (few) row tiles sharing one W tile run together, so W is read from
    # DRAM about once while the chunk of h (C*H*2 bytes, 8 MB at C=1024, H=4096) stays in L2.
    pid_m = pid % n_mtiles
    pid_v = pid // n_mtiles
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < V
    # int64 offsets: V*H passes 2**31 at V=256k, H=8192.
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_h + ks[None, :]
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_w + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k in range(0, tl.cdiv(H, BLOCK_K)):
        k_ok = ks < H - k * BLOCK_K
        a = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        acc = _softcap(acc, softcap)
    if ROUND_LOGITS:  # the module docstring: statistics of the values the gradient pass will read
        acc = acc.to(h_ptr.dtype.element_ty).to(tl.float32)
    if STORE_LOGITS:
        out = logits_ptr + rows[:, None].to(tl.int64) * stride_logits + cols[None, :]
        tl.store(out, acc.to(logits_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    acc = tl.where(col_ok[None, :], acc, float("-inf"))
    tile_max = tl.max(acc, axis=1)
    tile_sum = tl.sum(tl.exp2((acc - tile_max[:, None]) * 1.4426950408889634), axis=1)
    stat = rows.to(tl.int64) * n_vtiles + pid_v
    tl.store(tile_max_ptr + stat, tile_max, mask=row_ok)
    tl.store(tile_sum_ptr + stat, tile_sum, mask=row_ok)
    if SUM_LOGITS:
        tl.store(tile_zsum_ptr + stat, tl.sum(tl.where(col_ok[None, :], acc, 0.0), axis=1), mask=row_ok)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    target = tl.sum(tl.where(cols[None, :] == labels[:, None], acc, 0.0), axis=1)
    mine = row_ok & (labels >= pid_v * BLOCK_V) & (labels < pid_v * BLOCK_V + BLOCK_V)
    tl.store(target_ptr + rows, target, mask=mine)


@triton.jit
def _softmax_grad_kernel(
    logits_ptr, grad_ptr, lse_ptr, scale_ptr, labels_ptr, M, V, stride_logits, stride_grad,
    b_ptr, c_ptr, softcap,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, SOFTCAP: tl.constexpr = False, EXTRA: tl.constexpr = False,
):
    """grad = scale_row * (softmax - onehot(label)) for a [BLOCK_R, BLOCK_V] tile (may be in place); with
    EXTRA, a * softmax - b * onehot - c (a = scale_ptr, b = b_ptr, c = c_ptr per row); with SOFTCAP, times
    1 - (z / softcap)^2 of the stored capped logits z."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < V)[None, :]
    r64 = rows[:, None].to(tl.int64)
    x = tl.load(logits_ptr + r64 * stride_logits + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    p = tl.exp2((x - lse[:, None]) * 1.4426950408889634)
    if EXTRA:
        b = tl.load(b_ptr + rows, mask=row_ok, other=0.0)
        c = tl.load(c_ptr + rows, mask=row_ok, other=0.0)
        g = scale[:, None] * p - tl.where(cols[None, :] == labels[:, None], b[:, None], 0.0) - c[:, None]
    else:
        g = scale[:, None] * (p - tl.where(cols[None, :] == labels[:, None], 1.0, 0.0))
    if SOFTCAP:
        y = x / softcap
        g = g * (1.0 - y * y)
    tl.store(grad_ptr + r64 * stride_grad + cols[None, :], g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rows_lse_grad_kernel(
    logits_ptr, lse_ptr, target_ptr, scale_ptr, labels_ptr, V, stride_logits,
    max_ptr, zsum_ptr, softcap, z_coef, smoothing,
    WANT_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, SOFTCAP: tl.constexpr = False, EXTRA: tl.constexpr = False,
):
    """One row of stored logits: lse, the target logit and the row max by an online max/sum over BLOCK_V
    lanes (with EXTRA also the row sum), then (WANT_GRAD) the gradient written over the logits: scale *
    (softmax - onehot), or with EXTRA the z-loss / smoothing form; SOFTCAP caps each logit as it is read
    and multiplies the gradient by the cap's slope."""
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_logits
    label = tl.load(labels_ptr + row)
    lanes = tl.arange(0, BLOCK_V)
    # A finite floor, not -inf: a lane that never sees a column (V < BLOCK_V) must not make inf - inf.
    m = tl.full([BLOCK_V], -1e30, dtype=tl.float32)
    s = tl.zeros([BLOCK_V], dtype=tl.float32)
    t = tl.zeros([BLOCK_V], dtype=tl.float32)
    zs = tl.zeros([BLOCK_V], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + lanes
        x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
        if SOFTCAP:
            x = _softcap(x, softcap)
        if EXTRA:
            zs += x  # masked lanes hold 0
        x = tl.where(cols < V, x, float("-inf"))
        m_new = tl.maximum(m, x)
        s = s * tl.exp2((m - m_new) * 1.4426950408889634) + tl.exp2((x - m_new) * 1.4426950408889634)
        t += tl.where(cols == label, x, 0.0)
        m = m_new
    row_max = tl.max(m, axis=0)
    lse = row_max + tl.log(tl.sum(s * tl.exp2((m - row_max) * 1.4426950408889634), axis=0))
    tl.store(lse_ptr + row, lse)
    tl.store(target_ptr + row, tl.sum(t, axis=0))
    tl.store(max_ptr + row, row_max)
    if EXTRA:
        tl.store(zsum_ptr + row, tl.sum(zs, axis=0))
    if WANT_GRAD:
        scale = tl.load(scale_ptr + row)
        a = scale * (1.0 + 2.0 * z_coef * lse)
        b = scale * (1.0 - smoothing)
        c = scale * (smoothing / V)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + lanes
            x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            if SOFTCAP:
                x = _softcap(x, softcap)
            p = tl.exp2((x - lse) * 1.4426950408889634)
            if EXTRA:
                g = a * p - tl.where(cols == label, b, 0.0) - c
            else:
                g = scale * (p - tl.where(cols == label, 1.0, 0.0))
            if SOFTCAP:
                y = x / softcap
                g = g * (1.0 - y * y)
            tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=cols < V)


@triton.jit
def _grad_weight_kernel(
    g_ptr, x_ptr, gw_ptr, C, V, H, stride_g, stride_x, stride_gw,
    BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """gw[V, H] (fp32) += g[C, V]^T @ x[C, H] for one [BLOCK_V, BLOCK_H] tile, the sum over C in fp32."""
    pid = tl.program_id(0)
    n_htiles = tl.cdiv(H, BLOCK_H)
    pid_v = pid // n_htiles
    pid_h = pid % n_htiles
    vs = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    ks = tl.arange(0, BLOCK_K)
    v_ok = vs < V
    h_ok = hs < H
    g_ptrs = g_ptr + ks[:, None].to(tl.int64) * stride_g + vs[None, :]
    x_ptrs = x_ptr + ks[:, None].to(tl.int64) * stride_x + hs[None, :]
    out = gw_ptr + vs[:, None].to(tl.int64) * stride_gw + hs[None, :]
    acc = tl.load(out, mask=v_ok[:, None] & h_ok[None, :], other=0.0)
    for k in range(0, tl.cdiv(C, BLOCK_K)):
        k_ok = ks < C - k * BLOCK_K
        g = tl.load(g_ptrs, mask=k_ok[:, None] & v_ok[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=k_ok[:, None] & h_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(g), x, acc)
        g_ptrs += BLOCK_K * stride_g
        x_ptrs += BLOCK_K * stride_x
    tl.store(out, acc, mask=v_ok[:, None] & h_ok[None, :])


# ------------------------------------------------------------------------------ launch plans
@dataclass(frozen=True)
class ChunkPlan:
    """How one chunk's logits, statistics and gradient are made: path "triton" with kernel 1's tile
    (block_m x block_v x block_k), or path "cublas" with the row kernel's block_v (block_m = block_k = 0)."""
    path: str
    block_m: int
    block_v: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class GemmTile:
    """A tile of `_grad_weight_kernel`: block_v x block_h outputs, block_k rows of the chunk per step."""
    block_v: int
    block_h: int
    block_k: int
    num_warps: int
    num_stages: int


def triton_plan(*cfg) -> ChunkPlan:
    return ChunkPlan("triton", *cfg)


def cublas_plan(block_v: int, num_warps: int) -> ChunkPlan:
    return ChunkPlan("cublas", 0, block_v, 0, num_warps, 1)


# Kernel 1's candidates per device family; tests/kernels/test_cross_entropy_compile.py compiles each for
# its architecture (registers, spills, shared memory in bench/results/compile-sm90-sm80/cross_entropy.txt).
TRITON_CANDIDATES = {
    # sm_90 (wgmma). 256x128 holds the fp32 tile in 253 registers without spills; 128x256 spilled 24 bytes
    # once the logits store is on (cuobjdump resource usage, triton 3.7), so it is not a candidate.
    "sm90_16bit": [triton_plan(256, 128, 64, 8, 3), triton_plan(128, 128, 64, 8, 4),
                   triton_plan(128, 128, 64, 4, 4), triton_plan(256, 128, 64, 8, 4)],
    # mma.sync (HMMA) on A100 and other pre-Hopper GPUs, 99 KB of shared memory on the smaller parts
    "sm80_16bit": [triton_plan(128, 128, 32, 4, 4), triton_plan(128, 64, 32, 4, 4),
                   triton_plan(64, 128, 32, 4, 4), triton_plan(128, 128, 64, 8, 3)],
    "fp32": [triton_plan(64, 64, 32, 4, 3), triton_plan(128, 64, 32, 4, 3), triton_plan(64, 128, 32, 4, 3)],
    "interpret": [triton_plan(16, 32, 16, 1, 1)],  # small tiles: tests cross many tile edges on tiny shapes
}
# With an option on (softcap, label smoothing, z-loss: option_family), kernel 1's epilogue holds more live
# values: 256x128 spilled up to 120 bytes on sm_90 and 128x128x32/4 warps up to 224 on sm_80 (triton 3.7,
# bench/results/compile-sm90-sm80/cross_entropy.txt), so those calls choose among tiles that compiled
# without spills in every option combination; fp32 inputs with options take the cuBLAS path only.
TRITON_CANDIDATES.update({
    "sm90_16bit/options": [triton_plan(128, 128, 64, 8, 4)],
    "sm80_16bit/options": [triton_plan(128, 128, 64, 8, 3), triton_plan(64, 128, 32, 4, 4)],
    "fp32/options": [],
    "interpret/options": TRITON_CANDIDATES["interpret"],
})
CUBLAS_CANDIDATES = [cublas_plan(bv, w) for bv in (1024, 2048, 4096) for w in (4, 8)]
# the row kernel with options: 2048 lanes / 4 warps spilled 8 bytes on sm_80 with softcap and z-loss
CUBLAS_OPTION_CANDIDATES = [cublas_plan(1024, 8), cublas_plan(4096, 8)]
CUBLAS_INTERPRET = [cublas_plan(32, 1)]
# The weight-gradient GEMM's tiles; 128x256 and 256x128 spilled 8 bytes on sm_90, 128x128x32 with 4
# warps 200 bytes and 64x64 8 bytes on sm_80 (triton 3.7), so they are not candidates.
GRAD_W_CANDIDATES = {
    "sm90_16bit": [GemmTile(128, 128, 64, 8, 3), GemmTile(128, 128, 64, 8, 4), GemmTile(64, 128, 64, 4, 3),
                   GemmTile(128, 64, 64, 4, 3)],
    "sm80_16bit": [GemmTile(128, 128, 32, 8, 3), GemmTile(128, 64, 32, 4, 4), GemmTile(64, 128, 32, 4, 4)],
    "interpret": [GemmTile(32, 16, 16, 1, 1)],
}
# Softmax-gradient kernel: rows, columns, warps. 4x1024 with 4 warps spilled 8 bytes (2 STL) for fp16 with
# an unaligned V on sm_80; 8 warps hold it in at most 62 registers.
GRAD_CONFIG = {"gpu": (4, 1024, 8), "interpret": (4, 32, 1)}


def device_family(capability, dtype: torch.dtype, interpret: bool) -> str:
    if interpret:
        return "interpret"
    if dtype == torch.float32:
        return "fp32"
    # Hopper and datacenter Blackwell have 227 KB of shared memory per block; consumer Blackwell (sm_12x),
    # Ada and Ampere parts with 99 KB take the 48 KB tiles of sm_80.
    return "sm90_16bit" if capability[0] in (9, 10) else "sm80_16bit"


def option_family(family: str, opts: LossOptions) -> str:
    """The family whose candidates a call with these options chooses from ("<family>/options" when any
    option constexpr is on; logit_scale never reaches a kernel)."""
    return family + "/options" if opts.softcap or opts.extra else family


def plan_candidates(family: str) -> list:
    """Every plan the tuner may pick on a device family: kernel 1's tiles, then the cuBLAS path's."""
    if family.startswith("interpret"):
        return TRITON_CANDIDATES[family] + CUBLAS_INTERPRET
    return TRITON_CANDIDATES[family] + (CUBLAS_OPTION_CANDIDATES if family.endswith("/options") else CUBLAS_CANDIDATES)


def default_plan(family: str) -> ChunkPlan:
    """With tuning off: today's tile GEMM at the first candidate of the family (MFTCORE_AUTOTUNE=0); the
    cuBLAS path where the family has no tile (fp32 with options)."""
    return plan_candidates(family)[0]


def dot_precision(dtype: torch.dtype, interpret: bool) -> str:
    """fp32 inputs: IEEE unless torch itself allows TF32 matmuls; 16-bit inputs ignore it."""
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    if dtype == torch.float32 and not interpret and tf32:
        return "tf32"
    return "ieee"


def capability_of(t: torch.Tensor, interpret: bool):
    return (0, 0) if interpret else torch.cuda.get_device_capability(t.device)


# -------------------------------------------------------------------------------------- launchers
class LaunchSpec(NamedTuple):
    """A kernel and its compile-time choices: what the launcher runs and the compile test compiles."""
    kernel: object
    constexprs: dict
    num_warps: int
    num_stages: int


def launch(spec: LaunchSpec, grid, *args):
    """The one place kernels start (the compile test intercepts it to see every launch)."""
    spec.kernel[grid](*args, **spec.constexprs, num_warps=spec.num_warps, num_stages=spec.num_stages)


def option_constexprs(opts: LossOptions) -> dict:
    """The option constexprs, present only when on: the plain loss launches exactly what it did before."""
    return {k: True for k, on in (("SOFTCAP", bool(opts.softcap)), ("EXTRA", opts.extra)) if on}


def logits_lse(hidden, weight, bias, labels, logits_out, want_grad: bool, plan: ChunkPlan,
               opts: LossOptions = LossOptions()):
    """Kernel 1 over one chunk: returns RowStats; fills logits_out (capped logits with softcap) if want_grad."""
    C, H = hidden.shape
    V = weight.shape[0]
    interp = interpreted()
    n_vtiles = triton.cdiv(V, plan.block_v)
    tile_max = torch.empty(C, n_vtiles, dtype=torch.float32, device=hidden.device)
    tile_sum = torch.empty_like(tile_max)
    tile_zsum = torch.empty_like(tile_max) if opts.label_smoothing else tile_max
    target = torch.zeros(C, dtype=torch.float32, device=hidden.device)
    consts = dict(
        HAS_BIAS=bias is not None, STORE_LOGITS=want_grad, ROUND_LOGITS=hidden.dtype != torch.float32,
        DOT_PRECISION=dot_precision(hidden.dtype, interp), BLOCK_M=plan.block_m, BLOCK_V=plan.block_v,
        BLOCK_K=plan.block_k)
    if opts.softcap:
        consts["SOFTCAP"] = True
    if opts.label_smoothing:
        consts["SUM_LOGITS"] = True
    spec = LaunchSpec(_logits_lse_kernel, consts, plan.num_warps, plan.num_stages)
    launch(spec, (triton.cdiv(C, plan.block_m) * n_vtiles,), hidden, weight, tile_max if bias is None else bias,
           labels, logits_out if want_grad else tile_max, tile_max, tile_sum, target, tile_zsum, C, V, H,
           hidden.stride(0), weight.stride(0), logits_out.stride(0) if want_grad else 0, n_vtiles,
           opts.softcap or 1.0)
    row_max = tile_max.amax(dim=1)
    lse = row_max + torch.log((tile_sum * torch.exp(tile_max - row_max.unsqueeze(1))).sum(dim=1))
    return RowStats(lse, target, row_max, tile_zsum.sum(dim=1) if opts.label_smoothing else None)


def softmax_grad(logits, lse, row_scale, labels, out, opts: LossOptions = LossOptions()):
    """Kernel 2: out = row_scale * (softmax(logits) - onehot(labels)) (the options' form with them, logits
    then the capped ones); out may be logits itself."""
    M, V = logits.shape
    rows, cols, warps = GRAD_CONFIG["interpret" if interpreted() else "gpu"]
    a = b = c = row_scale
    if opts.extra:
        a, b, c = grad_coefficients(lse, row_scale, V, opts)
    spec = LaunchSpec(_softmax_grad_kernel, dict(BLOCK_R=rows, BLOCK_V=cols, **option_constexprs(opts)), warps, 1)
    launch(spec, (triton.cdiv(M, rows), triton.cdiv(V, cols)), logits, out, lse, a, labels, M, V,
           logits.stride(0), out.stride(0), b, c, opts.softcap or 1.0)
    return out


def rows_lse_grad(logits, row_scale, labels, want_grad: bool, plan: ChunkPlan, opts: LossOptions = LossOptions()):
    """The cuBLAS path's Triton pass over stored logits [C, V]: RowStats; the gradient in place."""
    C, V = logits.shape
    lse = torch.empty(C, dtype=torch.float32, device=logits.device)
    target, row_max = torch.empty_like(lse), torch.empty_like(lse)
    row_sum = torch.empty_like(lse) if opts.extra else lse
    spec = LaunchSpec(_rows_lse_grad_kernel, dict(WANT_GRAD=want_grad, BLOCK_V=plan.block_v,
                                                  **option_constexprs(opts)), plan.num_warps, 1)
    launch(spec, (C,), logits, lse, target, row_scale, labels, V, logits.stride(0), row_max, row_sum,
           opts.softcap or 1.0, opts.z_loss, opts.label_smoothing)
    return RowStats(lse, target, row_max, row_sum if opts.label_smoothing else None)


def chunk_step(hidden, weight, bias, labels, row_scale, want_grad: bool, buffer, plan: ChunkPlan,
               opts: LossOptions = LossOptions()):
    """RowStats and (want_grad) the r-scaled logits gradient, a view of buffer ([>=C, V], rows contiguous),
    by the plan's path; the same contract as chunk_logits_grad_torch."""
    C = hidden.shape[0]
    if plan.path == "cublas":
        logits = buffer[:C]
        if bias is None:
            torch.mm(hidden, weight.t(), out=logits)
        else:
            torch.addmm(bias, hidden, weight.t(), out=logits)
        stats = rows_lse_grad(logits, row_scale, labels, want_grad, plan, opts)
        return stats, logits if want_grad else None
    logits = buffer[:C] if want_grad else None
    stats = logits_lse(hidden, weight, bias, labels, logits, want_grad, plan, opts)
    if want_grad:
        softmax_grad(logits, stats.lse, row_scale, labels, out=logits, opts=opts)
    return stats, logits


def accumulate_grad_weight(grad_w, g, h, tile: GemmTile):
    """grad_w (fp32 [V, H]) += g^T @ h with 16-bit g [C, V] and h [C, H], summed in fp32."""
    C, V = g.shape
    H = h.shape[1]
    spec = LaunchSpec(_grad_weight_kernel, dict(BLOCK_V=tile.block_v, BLOCK_H=tile.block_h, BLOCK_K=tile.block_k),
                      tile.num_warps, tile.num_stages)
    launch(spec, (triton.cdiv(V, tile.block_v) * triton.cdiv(H, tile.block_h),), g, h, grad_w, C, V, H,
           g.stride(0), h.stride(0), grad_w.stride(0))
    return grad_w


# ------------------------------------------------------------------------------------------ tuning
def tuning_mode(t: torch.Tensor) -> str:
    return autotune.env_mode(t.device, interpreted())


def timer():
    return autotune.counting_timer if interpreted() else autotune.cuda_median_ms


def plan_key(hidden, weight, bias, want_grad: bool, opts: LossOptions = LossOptions()) -> dict:
    """(device, dtype, H, V, bias, gradients, token bucket, options when on): what the plan's speed depends
    on (options: their own candidates, option_family)."""
    N, H = hidden.shape
    key = {"device": autotune.device_label(hidden.device, interpreted()), "dtype": str(hidden.dtype)[6:], "H": H,
           "V": weight.shape[0], "bias": int(bias is not None), "grad": int(want_grad),
           "N": autotune.shape_bucket(N, 256, 1 << 17)}
    if opts.softcap or opts.extra:
        key["options"] = int(bool(opts.softcap)) + 2 * int(bool(opts.label_smoothing)) + 4 * int(bool(opts.z_loss))
    return key


def choose_plan(hidden, weight, bias, labels, row_scale, want_grad: bool, rows_for, buffer_for,
                opts: LossOptions = LossOptions()) -> ChunkPlan:
    """The chunk plan for this call (tuned on first use of its key). rows_for(plan) is the plan's chunk
    size, buffer_for(plan, rows) a scratch buffer: each candidate is timed on this call's first chunk, and
    compared by its time for all N rows (ceil(N / C) chunks)."""
    family = option_family(device_family(capability_of(hidden, interpreted()), hidden.dtype, interpreted()), opts)
    N = hidden.shape[0]

    def measure(plan: ChunkPlan) -> float:
        rows = rows_for(plan)
        buf = buffer_for(plan, rows)
        args = (hidden[:rows], weight, bias, labels[:rows], row_scale[:rows], want_grad, buf, plan, opts)
        return timer()(lambda: chunk_step(*args)) * triton.cdiv(N, rows)

    return autotune.choose("cross_entropy", plan_key(hidden, weight, bias, want_grad, opts), plan_candidates(family),
                           default_plan(family), measure, mode=tuning_mode(hidden))


def choose_grad_tile(g, h) -> GemmTile:
    """The tile of the fp32 weight-gradient GEMM for this chunk shape (tuned on first use)."""
    interp = interpreted()
    family = device_family(capability_of(h, interp), h.dtype, interp)
    family = "sm80_16bit" if family == "fp32" else family  # never reached: fp32 inputs accumulate with addmm_
    C, V = g.shape
    key = {"device": autotune.device_label(h.device, interp), "dtype": str(h.dtype)[6:], "H": h.shape[1], "V": V,
           "C": autotune.shape_bucket(C, 64, 1 << 15)}

    # Timed on the first 16k vocabulary rows into a scratch accumulator: the tiles are alike across V,
    # and a full [V, H] fp32 scratch would be 2 GB at V=128k, H=4096.
    part = g[:, :16384]
    scratch = torch.zeros(part.shape[1], h.shape[1], dtype=torch.float32, device=h.device)

    def measure(tile: GemmTile) -> float:
        return timer()(lambda: accumulate_grad_weight(scratch, part, h, tile))

    candidates = GRAD_W_CANDIDATES[family]
    return autotune.choose("cross_entropy_grad_weight", key, candidates, candidates[0], measure, mode=tuning_mode(h))
