"""Varlen (packed) flash attention: launch configurations, launchers, the torch.library op, the public function.

Public API (DESIGN.md's call is unchanged; the keywords after softmax_scale are extensions):
    o = varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, causal=True, softmax_scale=None, deterministic=None,
                         cu_seqlens_k=None, max_seqlen_k=None, window_size=(-1, -1), softcap=0.0,
                         return_lse=False)                       # -> o, or (o, lse) with return_lse
    q [Tq, Hq, D], k/v [Tk, Hkv, D] (Hq % Hkv == 0, D <= 256), cu_seqlens int32 [S+1] -> o [Tq, Hq, D],
    lse [Tq, Hq] fp32 (natural log; no gradient)

Segment i is the queries cu_seqlens[i]:cu_seqlens[i+1] and the keys cu_seqlens_k[i]:cu_seqlens_k[i+1]
(the same boundaries when cu_seqlens_k is None); each cu_seqlens runs from 0 to its T, and a query attends
only to keys of its own segment. Masking is flash-attn >= 2.1's: with lq queries and lk keys, query r sees
key c iff r + lk - lq - left <= c <= r + lk - lq + right, (left, right) = window_size with -1 unbounded and
causal forcing right = 0 (bottom-right alignment; with lq = lk, the usual causal mask). A query that sees no
key outputs 0 with lse -inf. softcap > 0 caps the scaled scores at softcap * tanh(s / softcap) (Gemma2).
Outputs of padding segments are computed like any other and ignored.

Layout: the Triton kernels are in varlen_attention_kernels.py; the PyTorch reference (per-segment SDPA,
varlen_attention_reference.py) is the CPU path and the test oracle. Dispatch: CUDA fp16/bf16 -> Triton;
everything else -> reference, except that with TRITON_INTERPRET=1 CPU fp32/fp16 run the Triton code (bf16
is computed wrongly by the interpreter, so it stays on the reference).

The op is `torch.ops.mftcore.varlen_attention` (forward: o and lse) with registered autograd calling
`torch.ops.mftcore.varlen_attention_backward` (both torch.library.custom_op with fake implementations), so
torch.compile(fullgraph=True) traces a model using it without a graph break. Inputs the kernels do not
take run the reference: in eager mode directly under autograd (as always), when compiled inside the op,
whose backward is `varlen_attention_reference_backward` (autograd is off inside a custom op).

Kernels (FA2's algorithm, log2 domain): the forward keeps a running max and sum per query row and saves
lse = log2(sum exp2) per (head, token) for the backward. The backward recomputes P from lse; one program
per (key block, query head) accumulates dK, dV over the query blocks (with GQA into per-query-head
buffers that torch sums over each group, FA2's scheme: no atomics), and dQ is either added with fp32
atomics from the same program (default, 5 matmuls per block pair) or, when deterministic, computed by a
second kernel that walks the key blocks of each query block (7 matmuls, no atomics, bitwise reproducible).
Looping over a KV group inside one program instead spilled 0.4-0.5 KiB of registers per thread (sm_90).
Grids index blocks by (segment, block) with early exit past a segment's end, so the host never reads
cu_seqlens: no synchronisation. A window is not a mask over every block: each program visits only the
key (or query) blocks its window meets, so a window shorter than the documents costs less than causal.
Offsets inside a segment are int32, so max_seqlen * Hq * D must stay below 2**31.

Block sizes are chosen by timing on the device the op meets (kernels/autotune.py), per dtype, head dim,
causality, GQA, softcap and token bucket, among the candidates below; MFTCORE_AUTOTUNE=0 takes the first
of each.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton

from . import autotune
from .dispatch import TENSOR_CORE_DTYPES, interpreted, uses_triton
from .varlen_attention_kernels import _bwd_dkdv_kernel, _bwd_dq_kernel, _bwd_preprocess_kernel, _fwd_kernel
from .varlen_attention_reference import (
    segments,
    varlen_attention_reference,
    varlen_attention_reference_backward,
    window_bounds,
)

MAX_HEAD_DIM = 256


class BlockConfig(NamedTuple):
    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int


B = BlockConfig
# Candidates per padded head dim, the first of each the default (MFTCORE_AUTOTUNE=0). Each compiles for
# sm_90 and sm_80 (tests/kernels/test_varlen_attention.py): within sm_80's 163 KiB of shared memory, every
# tl.dot with M >= 64 (wgmma's minimum), no register spills for D <= 128 except those in
# tests/kernels/test_varlen_attention.py's KNOWN_SPILLS: dK/dV with atomic dQ at D = 64 on sm_80 (32 bytes
# since windows and q/k segments, 8 before) and at D = 80 on sm_90 (24), and the SOFTCAP variants (up to
# 48 bytes at D = 128 on sm_90, 104 at D = 80); D = 256 spills in the backward (0.2-2 KiB per thread at
# every size tried), so it has its default only. Tried and dropped for spills (triton 3.7):
# fwd 128x128 w8 and 64x64 w4 at D=128 and 128x32 at D=256 (sm_80); dK/dV 128x128 at D=64, 64x128 and
# 64x64 w4 at D=128; dQ 128x32 w4 at D=64, 128x64 at D=128. Causal masking needs fwd/dq
# block_m % block_n == 0 and dkdv block_n % block_m == 0.
FWD_CONFIGS = {64: [B(128, 64, 4, 3), B(128, 128, 8, 3), B(64, 64, 4, 3)],
               128: [B(128, 64, 8, 3), B(128, 32, 8, 3)],
               256: [B(64, 32, 8, 2), B(64, 64, 8, 2)]}
DKDV_CONFIGS = {64: [B(64, 128, 8, 2), B(64, 64, 8, 2)],
                128: [B(64, 64, 8, 2), B(64, 64, 8, 3)],
                256: [B(64, 64, 8, 1)]}
DQ_CONFIGS = {64: [B(128, 64, 8, 2), B(64, 64, 4, 2)],
              128: [B(128, 32, 8, 2), B(64, 64, 4, 2)],
              256: [B(64, 32, 4, 2)]}
del B
PREPROCESS_BLOCK = 64  # tokens per program of the rowsum(O * dO) kernel

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def padded_head_dim(head_dim: int) -> int:
    """The tile width for a head dim: the next power of two, at least 64 (smaller heads are toy models;
    each bucket is one more set of kernels to compile and check)."""
    return max(64, triton.next_power_of_2(head_dim))


# --------------------------------------------------------------------------------------- launchers

class LaunchSpec(NamedTuple):
    """A kernel and its compile-time choices: what the launcher runs and the compile test compiles."""
    kernel: object
    constexprs: dict
    num_warps: int
    num_stages: int


def forward_spec(head_dim: int, cfg: Optional[BlockConfig] = None, softcap: bool = False) -> LaunchSpec:
    d_pad = padded_head_dim(head_dim)
    cfg = cfg or FWD_CONFIGS[d_pad][0]
    return LaunchSpec(_fwd_kernel, dict(HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                        SOFTCAP=softcap), cfg.num_warps, cfg.num_stages)


def dkdv_spec(head_dim: int, deterministic: bool, cfg: Optional[BlockConfig] = None,
              softcap: bool = False) -> LaunchSpec:
    d_pad = padded_head_dim(head_dim)
    cfg = cfg or DKDV_CONFIGS[d_pad][0]
    return LaunchSpec(_bwd_dkdv_kernel, dict(HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_M=cfg.block_m,
                                             BLOCK_N=cfg.block_n, ATOMIC_DQ=not deterministic, SOFTCAP=softcap),
                      cfg.num_warps, cfg.num_stages)


def dq_spec(head_dim: int, cfg: Optional[BlockConfig] = None, softcap: bool = False) -> LaunchSpec:
    d_pad = padded_head_dim(head_dim)
    cfg = cfg or DQ_CONFIGS[d_pad][0]
    return LaunchSpec(_bwd_dq_kernel, dict(HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                           SOFTCAP=softcap), cfg.num_warps, cfg.num_stages)


def backward_specs(head_dim: int, deterministic: bool, softcap: bool = False) -> list[LaunchSpec]:
    """The backward's launches in order at the default configurations: rowsum(O * dO), dK/dV (+ atomic dQ
    unless deterministic), [dQ]."""
    dims = dict(HEAD_DIM=head_dim, D_PAD=padded_head_dim(head_dim))
    specs = [LaunchSpec(_bwd_preprocess_kernel, dict(dims, BLOCK=PREPROCESS_BLOCK), 4, 1),
             dkdv_spec(head_dim, deterministic, softcap=softcap)]
    return specs + ([dq_spec(head_dim, softcap=softcap)] if deterministic else [])


def launch(spec: LaunchSpec, grid, *args):
    """The one place kernels start (the compile test intercepts it to see every launch)."""
    spec.kernel[grid](*args, **spec.constexprs, num_warps=spec.num_warps, num_stages=spec.num_stages)


class Segments(NamedTuple):
    """Where the segments are and what each query sees: the arguments every kernel shares."""
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    left: int  # keys before the (bottom-right aligned) diagonal a query sees, -1 unbounded
    right: int  # keys after it, -1 unbounded (causal: 0)
    softcap: float  # 0: none

    def kernel_window(self) -> tuple[int, int]:
        """(left, right) as the kernels take them: unbounded as a bound no segment reaches."""
        return (self.left if self.left >= 0 else self.max_k), (self.right if self.right >= 0 else self.max_q)

    def score_args(self, sm_scale: float) -> tuple[float, float, float]:
        """qk_scale (log2 domain), tanh_scale, cap_log2 for _scores."""
        if self.softcap:
            return sm_scale * LOG2E, sm_scale / self.softcap, self.softcap * LOG2E
        return sm_scale * LOG2E, 0.0, 0.0


def tuned(kernel: str, table: dict, q, k, seg: Segments, measure) -> BlockConfig:
    """The block configuration of one kernel for these inputs (timed on first use of the key)."""
    interp = interpreted()
    candidates = table[padded_head_dim(q.shape[2])]
    key = {"device": autotune.device_label(q.device, interp), "dtype": str(q.dtype)[6:], "D": q.shape[2],
           "causal": int(seg.right == 0), "gqa": int(q.shape[1] != k.shape[1]), "softcap": int(seg.softcap > 0),
           "T": autotune.shape_bucket(q.shape[0], 1024, 1 << 18)}
    return autotune.choose(f"varlen_attention_{kernel}", key, candidates, candidates[0], measure,
                           mode=autotune.env_mode(q.device, interp))


def timer():
    return autotune.counting_timer if interpreted() else autotune.cuda_median_ms


def launch_forward(spec: LaunchSpec, q, k, v, o, lse, seg: Segments, sm_scale):
    num_m = triton.cdiv(seg.max_q, spec.constexprs["BLOCK_M"])
    launch(spec, (num_m * (seg.cu_q.numel() - 1), q.shape[1]), q, k, v, o, lse, seg.cu_q, seg.cu_k,
           *seg.score_args(sm_scale), *seg.kernel_window(), q.shape[1] // k.shape[1], q.shape[0], num_m,
           *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *o.stride()[:2])


def varlen_attention_forward(q, k, v, seg: Segments, sm_scale: float):
    """Triton forward: o [Tq, Hq, D] and lse [Hq, Tq] (fp32, log2 units; -inf where a query sees no key)."""
    Tq, Hq, D = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((Hq, Tq), dtype=torch.float32, device=q.device)
    capped = seg.softcap > 0

    def measure(cfg):  # writes o and lse, which the chosen configuration then overwrites
        spec = forward_spec(D, cfg, capped)
        return timer()(lambda: launch_forward(spec, q, k, v, o, lse, seg, sm_scale))

    spec = forward_spec(D, tuned("forward", FWD_CONFIGS, q, k, seg, measure), capped)
    launch_forward(spec, q, k, v, o, lse, seg, sm_scale)
    return o, lse


def launch_dkdv(spec, q, k, v, do, lse, delta, seg: Segments, dk, dv, dq, sm_scale):
    num_n = triton.cdiv(seg.max_k, spec.constexprs["BLOCK_N"])
    launch(spec, (num_n * (seg.cu_k.numel() - 1), q.shape[1]), q, k, v, do, lse, delta, seg.cu_q, seg.cu_k, dk, dv,
           dq, sm_scale, *seg.score_args(sm_scale), *seg.kernel_window(), q.shape[1] // k.shape[1], q.shape[0],
           num_n, *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *do.stride()[:2], *dk.stride()[:2],
           *dv.stride()[:2], *dq.stride()[:2])


def launch_dq(spec, q, k, v, do, lse, delta, seg: Segments, dq, sm_scale):
    num_m = triton.cdiv(seg.max_q, spec.constexprs["BLOCK_M"])
    launch(spec, (num_m * (seg.cu_q.numel() - 1), q.shape[1]), q, k, v, do, lse, delta, seg.cu_q, seg.cu_k, dq,
           sm_scale, *seg.score_args(sm_scale), *seg.kernel_window(), q.shape[1] // k.shape[1], q.shape[0], num_m,
           *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *do.stride()[:2], *dq.stride()[:2])


def varlen_attention_backward(do, q, k, v, o, lse, seg: Segments, sm_scale: float, deterministic: bool):
    """Triton backward: dq, dk, dv. Deterministic: dQ by its own kernel instead of fp32 atomics."""
    Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[:2]
    capped = seg.softcap > 0
    pre = LaunchSpec(_bwd_preprocess_kernel, dict(HEAD_DIM=D, D_PAD=padded_head_dim(D), BLOCK=PREPROCESS_BLOCK), 4, 1)
    delta = torch.empty_like(lse)
    launch(pre, (triton.cdiv(Tq, PREPROCESS_BLOCK), Hq), o, do, delta, Tq, *o.stride()[:2], *do.stride()[:2])
    # GQA: per-query-head partials, summed over each group below (FA2's scheme: no atomics, deterministic)
    dk, dv = (torch.empty((Tk, Hq, D), dtype=k.dtype, device=k.device) for _ in range(2))
    if Hq == Hkv:
        dk, dv = torch.empty_like(k), torch.empty_like(v)
    # atomic dQ accumulates in fp32; the deterministic dQ kernel writes q's dtype directly
    dq = torch.empty_like(q) if deterministic else torch.zeros(q.shape, dtype=torch.float32, device=q.device)

    def measure_dkdv(cfg):  # into scratch copies: atomic dQ adds up, so the real dq must see one launch only
        spec = dkdv_spec(D, deterministic, cfg, capped)
        scratch = torch.zeros_like(dq)
        return timer()(lambda: launch_dkdv(spec, q, k, v, do, lse, delta, seg, dk, dv, scratch, sm_scale))

    spec = dkdv_spec(D, deterministic, tuned(f"dkdv{'_det' if deterministic else ''}", DKDV_CONFIGS, q, k, seg,
                                             measure_dkdv), capped)
    launch_dkdv(spec, q, k, v, do, lse, delta, seg, dk, dv, dq, sm_scale)
    if Hq != Hkv:
        dk, dv = (x.view(Tk, Hkv, Hq // Hkv, D).sum(2, dtype=torch.float32).to(k.dtype) for x in (dk, dv))
    if not deterministic:
        return (dq * sm_scale).to(q.dtype), dk, dv

    def measure_dq(cfg):
        spec = dq_spec(D, cfg, capped)
        return timer()(lambda: launch_dq(spec, q, k, v, do, lse, delta, seg, dq, sm_scale))

    spec = dq_spec(D, tuned("dq", DQ_CONFIGS, q, k, seg, measure_dq), capped)
    launch_dq(spec, q, k, v, do, lse, delta, seg, dq, sm_scale)
    return dq, dk, dv


# ------------------------------------------------------------------------------- the custom ops

def reference_kwargs(cu_seqlens_k, max_seqlen_k, window_left, window_right, softcap) -> dict:
    """The reference's keywords for the op's arguments (its window as given; causal is right = 0)."""
    return dict(causal=False, cu_seqlens_k=cu_seqlens_k, max_seqlen_k=max_seqlen_k,
                window_size=(window_left, window_right), softcap=softcap)


@torch.library.custom_op("mftcore::varlen_attention", mutates_args=())
def varlen_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                        cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, window_left: int,
                        window_right: int, softcap: float, softmax_scale: float, deterministic: bool,
                        return_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (o, lse): lse [Hq, Tq] fp32 in log2 units on the Triton path (and on the reference path when
    return_lse), else an empty [0] tensor. Causal is window_right = 0 (see window_bounds)."""
    if not uses_triton(q, cuda_dtypes=TENSOR_CORE_DTYPES):  # no fp32 tiles: fp32 on CUDA takes the reference
        out = varlen_attention_reference(q, k, v, cu_seqlens_q, max_seqlen_q, softmax_scale=softmax_scale,
                                         return_lse=return_lse, **reference_kwargs(
                                             cu_seqlens_k, max_seqlen_k, window_left, window_right, softcap))
        if not return_lse:
            return out, q.new_empty(0, dtype=torch.float32)
        return out[0], (out[1] * LOG2E).t().contiguous()
    if not q.is_cuda:  # the interpreter does not bounds-check: validate here, where a host read costs nothing
        segments(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    seg = Segments(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_left, window_right, softcap)
    return varlen_attention_forward(q, k, v, seg, softmax_scale)


@varlen_attention_op.register_fake
def _varlen_attention_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_left,
                           window_right, softcap, softmax_scale, deterministic, return_lse):
    lse_shape = (q.shape[1], q.shape[0]) if return_lse or uses_triton(q, cuda_dtypes=TENSOR_CORE_DTYPES) else (0,)
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("mftcore::varlen_attention_backward", mutates_args=())
def varlen_attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 o: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                 cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                 window_left: int, window_right: int, softcap: float, softmax_scale: float,
                                 deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv) for the forward's (o, lse)."""
    if not uses_triton(q, cuda_dtypes=TENSOR_CORE_DTYPES):
        return varlen_attention_reference_backward(do, q, k, v, cu_seqlens_q, max_seqlen_q, softmax_scale=softmax_scale,
                                                   **reference_kwargs(cu_seqlens_k, max_seqlen_k, window_left,
                                                                      window_right, softcap))
    seg = Segments(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_left, window_right, softcap)
    return varlen_attention_backward(do.contiguous(), q, k, v, o, lse, seg, softmax_scale, deterministic)


@varlen_attention_backward_op.register_fake
def _varlen_attention_backward_fake(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    window_left, window_right, softcap, softmax_scale, deterministic):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, *args, _return_lse = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k)
    ctx.args = tuple(args)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, dlse):
    q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = torch.ops.mftcore.varlen_attention_backward(do, q, k, v, o, lse, cu_q, cu_k, *ctx.args)
    return (dq, dk, dv) + (None,) * 10


varlen_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------ public

def check_inputs(q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, window_size, softcap) -> None:
    """Shape and argument checks that need no synchronisation."""
    separate = cu_seqlens_k is not None
    if q.ndim != 3 or k.ndim != 3 or k.shape != v.shape or q.shape[2] != k.shape[2] or (
            not separate and q.shape[0] != k.shape[0]):
        raise ValueError(f"expected q [Tq, Hq, D] and k, v [Tk, Hkv, D] (Tq = Tk unless cu_seqlens_k is given); "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if q.shape[2] > MAX_HEAD_DIM:
        raise ValueError(f"head dim {q.shape[2]} > {MAX_HEAD_DIM} is not supported")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, cu, n in (("cu_seqlens", cu_seqlens, None), ("cu_seqlens_k", cu_seqlens_k, cu_seqlens.numel())):
        if cu is None:
            continue
        if cu.dtype != torch.int32 or cu.ndim != 1 or cu.numel() < 2:
            raise ValueError(f"{name} must be a 1-D int32 tensor of at least 2 boundaries")
        if n is not None and cu.numel() != n:
            raise ValueError(f"cu_seqlens_k has {cu.numel()} boundaries and cu_seqlens {n}: one segment each")
    for name, m in (("max_seqlen", max_seqlen), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ValueError(f"{name} must be a positive host int (no sync), got {m!r}")
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size)):
        raise ValueError(f"window_size must be (left, right), ints >= -1 (-1 = unbounded), got {window_size!r}")
    if not isinstance(softcap, (int, float)) or isinstance(softcap, bool) or not softcap >= 0:
        raise ValueError(f"softcap must be a number >= 0 (0 = none), got {softcap!r}")


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, *, causal: bool = True, softmax_scale: Optional[float] = None,
                     deterministic: Optional[bool] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
                     max_seqlen_k: Optional[int] = None, window_size: tuple[int, int] = (-1, -1),
                     softcap: float = 0.0, return_lse: bool = False):
    """Attention within each segment. cu_seqlens / max_seqlen are the queries' (and the keys', unless
    cu_seqlens_k / max_seqlen_k are given: flash-attn's cu_seqlens_q/k, causal aligned bottom-right).
    window_size=(left, right): keys at most `left` before and `right` after a query's diagonal (-1 =
    unbounded; causal forces right = 0). softcap > 0: scores -> softcap * tanh(score / softcap).
    return_lse: also the softmax log-sum-exp [Tq, Hq] fp32 (natural log, -inf for a query that sees no
    key, no gradient) -> (o, lse). deterministic=None follows torch.are_deterministic_algorithms_enabled();
    it only changes how the Triton backward sums dQ."""
    if max_seqlen_k is None and cu_seqlens_k is None:
        max_seqlen_k = max_seqlen
    elif (max_seqlen_k is None) != (cu_seqlens_k is None):
        raise ValueError("cu_seqlens_k and max_seqlen_k come together")
    check_inputs(q, k, v, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, window_size, softcap)
    scale = q.shape[2] ** -0.5 if softmax_scale is None else float(softmax_scale)
    left, right = window_bounds(causal, window_size)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if not uses_triton(q, cuda_dtypes=TENSOR_CORE_DTYPES) and not torch.compiler.is_compiling():
        # eager: the reference under autograd, as it always ran (no recomputation; CPU losses unchanged)
        return varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen, softmax_scale=scale, return_lse=return_lse,
                                          **reference_kwargs(cu_seqlens_k, max_seqlen_k, left, right, float(softcap)))
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    o, lse = torch.ops.mftcore.varlen_attention(q, k, v, cu_seqlens, cu_k, max_seqlen, max_seqlen_k, left, right,
                                                float(softcap), scale, bool(deterministic), bool(return_lse))
    return (o, (lse * LN2).t()) if return_lse else o
