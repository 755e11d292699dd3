"""Linear + masked cross-entropy with per-task weighted reduction: Triton kernels, launchers, autograd.

Public API (DESIGN.md, stable):
    fused_linear_cross_entropy(hidden [N,H], weight [V,H], labels [N], task_ids [N] | None, *, bias,
        num_tasks, task_weights, token_scale, reduction, ignore_index) -> CrossEntropyOutput
    masked_cross_entropy(logits [N,V], labels, task_ids, ...) -> the same, for callers that hold logits.
Reductions: "token_mean" (MFTCoder case1), "task_mean" (case3: sum_t w_t*mean_t / sum_{t present} w_t),
"sum" (sum_i token_scale_i * ce_i, what the trainer uses to normalise over a whole optimizer step).
task_loss_sum and task_token_count are statistics (no gradient); gradients flow through `loss` only.
Every valid token (label != ignore_index) must carry a task id in [0, num_tasks) and a label in [0, V).

Algorithm (token chunks, gradients computed in the forward: 6*N*H*V FLOPs, no host sync). Every reduction
is a per-token scale c_i, known before any logit exists (task counts come from an index_add on the
device). We factor c_i = c_max * r_i with |r_i| <= 1, so the stored gradients stay O(1) whatever N is.
For each chunk of C tokens:
  1. `_logits_lse_kernel` (Triton, tl.dot): logits tile = h @ W^T (+ b) in fp32; per (row, vocabulary
     tile) max and sum of exp, the target logit; with gradients wanted it also stores the tile in the
     input dtype into a [C, V] chunk buffer, the only large temporary.
  2. lse from the tile statistics ([C, V/BLOCK_V], torch); ce = lse - target.
  3. `_softmax_grad_kernel` (Triton) rewrites the buffer in place: r_i * (softmax - onehot).
  4. cuBLAS: grad_hidden[chunk] = G @ W and grad_W += G^T @ h, i.e. the per-token scale is inside G
     before the weight-gradient GEMM; grad_b += column sums of G.
backward() multiplies the stored gradients by grad_output * c_max in place. The chunk size keeps the
buffer under 2*N*H*itemsize (CHUNK_BYTES_FLOOR at least). grad_W accumulates in the weight's dtype:
with bf16 weights that is one bf16 rounding per chunk (Liger does the same); an fp32 accumulator would
cost 4*V*H bytes, over the memory goal. CPU tensors run `chunk_logits_grad_torch` per chunk in the same
Function, except fp32/fp16 under TRITON_INTERPRET=1, which run the Triton code on CPU (dispatch.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import triton
import triton.language as tl

from .cross_entropy_reference import (
    REDUCTIONS,
    CrossEntropyOutput,
    check_reduction,
    chunk_logits_grad_torch,
    fused_linear_cross_entropy_reference,
    logsumexp_rows_torch,
    masked_cross_entropy_reference,
    num_tasks_of,
    softmax_grad_torch,
    task_mean_scales,
)
from .dispatch import ANY_DTYPE, interpreted, uses_triton

__all__ = ["CrossEntropyOutput", "REDUCTIONS", "fused_linear_cross_entropy", "masked_cross_entropy",
           "fused_linear_cross_entropy_reference", "masked_cross_entropy_reference", "task_mean_scales",
           "token_scales"]


# ----------------------------------------------------------------------------------------- kernels
@triton.jit
def _logits_lse_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, logits_ptr, tile_max_ptr, tile_sum_ptr, target_ptr,
    M, V, H, stride_h, stride_w, stride_logits, n_vtiles,
    HAS_BIAS: tl.constexpr, STORE_LOGITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
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
    if STORE_LOGITS:
        out = logits_ptr + rows[:, None].to(tl.int64) * stride_logits + cols[None, :]
        tl.store(out, acc.to(logits_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    acc = tl.where(col_ok[None, :], acc, float("-inf"))
    tile_max = tl.max(acc, axis=1)
    tile_sum = tl.sum(tl.exp2((acc - tile_max[:, None]) * 1.4426950408889634), axis=1)
    stat = rows.to(tl.int64) * n_vtiles + pid_v
    tl.store(tile_max_ptr + stat, tile_max, mask=row_ok)
    tl.store(tile_sum_ptr + stat, tile_sum, mask=row_ok)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    target = tl.sum(tl.where(cols[None, :] == labels[:, None], acc, 0.0), axis=1)
    mine = row_ok & (labels >= pid_v * BLOCK_V) & (labels < pid_v * BLOCK_V + BLOCK_V)
    tl.store(target_ptr + rows, target, mask=mine)


@triton.jit
def _softmax_grad_kernel(
    logits_ptr, grad_ptr, lse_ptr, scale_ptr, labels_ptr, M, V, stride_logits, stride_grad,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """grad = scale_row * (softmax - onehot(label)) for a [BLOCK_R, BLOCK_V] tile (may be in place)."""
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
    g = scale[:, None] * (p - tl.where(cols[None, :] == labels[:, None], 1.0, 0.0))
    tl.store(grad_ptr + r64 * stride_grad + cols[None, :], g.to(grad_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------ launch configurations
@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_v: int
    block_k: int
    num_warps: int
    num_stages: int


# The launcher picks one of these by device and dtype, nothing else; tests/kernels/test_cross_entropy_compile.py
# compiles each for sm_90 and sm_80 and reports registers, spills and shared memory.
LOGITS_CONFIGS = {
    # sm_90 (wgmma): 256x128 holds the fp32 tile in 253 registers without spills; 128x256 spills 24 bytes
    # once the logits store is on (cuobjdump resource usage, triton 3.7).
    "sm90_16bit": TileConfig(256, 128, 64, 8, 3),
    "sm80_16bit": TileConfig(128, 128, 32, 4, 4),  # mma.sync (HMMA) on A100 and other pre-Hopper GPUs
    "fp32": TileConfig(64, 64, 32, 4, 3),
    "interpret": TileConfig(16, 32, 16, 1, 1),  # small tiles: tests cross many tile edges on tiny shapes
}
GRAD_CONFIGS = {"gpu": TileConfig(4, 1024, 0, 4, 1), "interpret": TileConfig(4, 32, 0, 1, 1)}
CHUNK_BYTES_FLOOR = 64 << 20  # smaller chunks leave the grad_W GEMM memory-bound (K = C rows)


def logits_config_key(capability, dtype: torch.dtype, interpret: bool) -> str:
    if interpret:
        return "interpret"
    if dtype == torch.float32:
        return "fp32"
    # Hopper and datacenter Blackwell have 227 KB of shared memory per block; consumer Blackwell (sm_12x),
    # Ada and Ampere parts with 99 KB take the 48 KB tiles of sm_80.
    return "sm90_16bit" if capability[0] in (9, 10) else "sm80_16bit"


def dot_precision(dtype: torch.dtype, interpret: bool) -> str:
    """fp32 inputs: IEEE unless torch itself allows TF32 matmuls; 16-bit inputs ignore it."""
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    if dtype == torch.float32 and not interpret and tf32:
        return "tf32"
    return "ieee"


def chunk_rows(n: int, h: int, v: int, itemsize: int, triton_path: bool, want_grad: bool) -> int:
    """Tokens per chunk: the chunk's temporaries stay under max(2*N*H*itemsize, CHUNK_BYTES_FLOOR)."""
    if triton_path:
        row_bytes = (v * itemsize if want_grad else 0) + 8 * triton.cdiv(v, 64) + 32
    else:  # the fp32 logits buffer (plus the 16-bit GEMM output it is cast from)
        row_bytes = v * (4 + (itemsize if itemsize < 4 else 0))
    budget = max(2 * n * h * itemsize * 7 // 8, CHUNK_BYTES_FLOOR)
    rows = max(1, budget // row_bytes)
    return min(n, rows if rows < 256 else rows // 256 * 256)  # whole 256-row tiles of kernel 1


# -------------------------------------------------------------------------------------- launchers
def logits_lse(hidden, weight, bias, labels, logits_out, want_grad: bool):
    """Kernel 1 over one chunk: returns (lse [C], target logit [C]); fills logits_out if want_grad."""
    C, H = hidden.shape
    V = weight.shape[0]
    interp = interpreted()
    capability = (0, 0) if interp else torch.cuda.get_device_capability(hidden.device)
    cfg = LOGITS_CONFIGS[logits_config_key(capability, hidden.dtype, interp)]
    n_vtiles = triton.cdiv(V, cfg.block_v)
    tile_max = torch.empty(C, n_vtiles, dtype=torch.float32, device=hidden.device)
    tile_sum = torch.empty_like(tile_max)
    target = torch.zeros(C, dtype=torch.float32, device=hidden.device)
    grid = (triton.cdiv(C, cfg.block_m) * n_vtiles,)
    _logits_lse_kernel[grid](
        hidden, weight, tile_max if bias is None else bias, labels,
        logits_out if want_grad else tile_max, tile_max, tile_sum, target,
        C, V, H, hidden.stride(0), weight.stride(0), logits_out.stride(0) if want_grad else 0, n_vtiles,
        HAS_BIAS=bias is not None, STORE_LOGITS=want_grad, DOT_PRECISION=dot_precision(hidden.dtype, interp),
        BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    row_max = tile_max.amax(dim=1)
    lse = row_max + torch.log((tile_sum * torch.exp(tile_max - row_max.unsqueeze(1))).sum(dim=1))
    return lse, target


def softmax_grad(logits, lse, row_scale, labels, out):
    """Kernel 2: out = row_scale * (softmax(logits) - onehot(labels)); out may be logits itself."""
    M, V = logits.shape
    cfg = GRAD_CONFIGS["interpret" if interpreted() else "gpu"]
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(V, cfg.block_v))
    _softmax_grad_kernel[grid](logits, out, lse, row_scale, labels, M, V, logits.stride(0), out.stride(0),
                               BLOCK_R=cfg.block_m, BLOCK_V=cfg.block_v, num_warps=cfg.num_warps)
    return out


def chunk_logits_grad_triton(hidden, weight, bias, labels, row_scale, want_grad: bool, buffer):
    """The Triton chunk step, same contract as chunk_logits_grad_torch (buffer: [>=C, V] scratch, rows
    contiguous); the gradient it returns is a view of the buffer."""
    logits = buffer[: hidden.shape[0]] if want_grad else None
    lse, target = logits_lse(hidden, weight, bias, labels, logits, want_grad)
    if want_grad:
        softmax_grad(logits, lse, row_scale, labels, out=logits)
    return lse - target, logits


# --------------------------------------------------------------------------------- scales, autograd
def token_scales(labels, task_ids, num_tasks: int, reduction: str, task_weights=None, token_scale=None,
                 ignore_index: int = -100):
    """Per-token loss scale c_i (0 where ignored) for a reduction, plus (tasks, valid, counts)."""
    valid = labels != ignore_index
    tasks = torch.zeros_like(labels) if task_ids is None else torch.where(valid, task_ids, 0)
    counts = torch.zeros(num_tasks, dtype=torch.float32, device=labels.device).index_add_(0, tasks, valid.float())
    if reduction == "token_mean":
        scale = valid.float() / counts.sum().clamp(min=1)
    elif reduction == "sum":
        scale = valid.float() if token_scale is None else torch.where(valid, token_scale.reshape(-1).float(), 0.0)
    else:
        scale = torch.where(valid, task_mean_scales(counts, task_weights)[tasks], 0.0)
    return scale, tasks, valid, counts


def split_scale(scale):
    """c = c_max * r with |r| <= 1 (r = 0 when every c is 0): the kernels store r-scaled gradients."""
    c_max = scale.abs().amax()
    return c_max, scale / torch.where(c_max > 0, c_max, 1.0)


def run_chunks(hidden, weight, bias, labels, row_scale, want: tuple, triton_path: bool):
    """The chunk loop of the fused op: ce [N] and the r-scaled gradients (None where not wanted)."""
    N, H = hidden.shape
    V = weight.shape[0]
    want_grad = any(want)
    if torch.is_autocast_enabled(hidden.device.type):  # dtypes here are chosen, not autocast's
        with torch.autocast(hidden.device.type, enabled=False):
            return run_chunks(hidden, weight, bias, labels, row_scale, want, triton_path)
    rows = chunk_rows(N, H, V, hidden.element_size(), triton_path, want_grad)
    # Row stride padded to 64 elements: an unaligned stride (V=50257) makes kernel 1 spill 1 KB of
    # registers on sm_90 (tests/kernels/test_cross_entropy_compile.py) and slows cuBLAS on the strided G.
    buffer = hidden.new_empty(rows, triton.cdiv(V, 64) * 64)[:, :V] if triton_path and want_grad else None
    grad_h = torch.empty_like(hidden) if want[0] else None
    grad_w = torch.zeros_like(weight) if want[1] else None
    grad_b = torch.zeros(V, dtype=torch.float32, device=hidden.device) if want[2] else None
    ce = torch.empty(N, dtype=torch.float32, device=hidden.device)
    for s in range(0, N, rows):
        h = hidden[s:s + rows]
        if triton_path:
            ce[s:s + rows], g = chunk_logits_grad_triton(h, weight, bias, labels[s:s + rows],
                                                         row_scale[s:s + rows], want_grad, buffer)
        else:
            ce[s:s + rows], g = chunk_logits_grad_torch(h, weight, bias, labels[s:s + rows],
                                                        row_scale[s:s + rows], want_grad)
        if grad_h is not None:
            torch.mm(g, weight, out=grad_h[s:s + rows])
        if grad_w is not None:
            grad_w.addmm_(g.t(), h)
        if grad_b is not None:
            grad_b += g.sum(dim=0, dtype=torch.float32)
        del g  # else the CPU path holds two chunks of logits while computing the next
    return ce, grad_h, grad_w, grad_b


def reduce_ce(ce, valid, tasks, scale, num_tasks: int):
    """loss = sum_i c_i * ce_i and the per-task ce sums, both fp32."""
    ce = torch.where(valid, ce, 0.0)
    task_sum = torch.zeros(num_tasks, dtype=torch.float32, device=ce.device).index_add_(0, tasks, ce)
    return (scale * ce).sum(), task_sum


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, tasks, valid, scale, num_tasks, triton_path):
        c_max, r = split_scale(scale)
        want = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        ce, grad_h, grad_w, grad_b = run_chunks(hidden, weight, bias, labels, r, want, triton_path)
        loss, task_sum = reduce_ce(ce, valid, tasks, scale, num_tasks)
        ctx.grads = (grad_h, grad_w, grad_b, c_max, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(task_sum)
        return loss, task_sum

    @staticmethod
    def backward(ctx, grad_loss, grad_task_sum):
        if ctx.grads is None:
            raise RuntimeError("fused_linear_cross_entropy: backward twice through the same call "
                               "(its gradients are computed in the forward and scaled in place)")
        grad_h, grad_w, grad_b, c_max, bias_dtype = ctx.grads
        ctx.grads = None
        g = grad_loss.float() * c_max
        grad_h = None if grad_h is None else grad_h.mul_(g)
        grad_w = None if grad_w is None else grad_w.mul_(g)
        grad_b = None if grad_b is None else grad_b.mul_(g).to(bias_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


class MaskedCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, tasks, valid, scale, num_tasks):
        N, V = logits.shape
        lse = logsumexp_rows_torch(logits, max(1, CHUNK_BYTES_FLOOR // (8 * V)))
        target = logits.gather(1, labels.clamp(0, V - 1).unsqueeze(1)).squeeze(1).float()
        loss, task_sum = reduce_ce(lse - target, valid, tasks, scale, num_tasks)
        ctx.save_for_backward(logits, labels, lse, scale)
        ctx.mark_non_differentiable(task_sum)
        return loss, task_sum

    @staticmethod
    def backward(ctx, grad_loss, grad_task_sum):
        logits, labels, lse, scale = ctx.saved_tensors
        row_scale = scale * grad_loss.float()
        grad = torch.empty_like(logits)
        if uses_triton(logits, cuda_dtypes=ANY_DTYPE):
            softmax_grad(logits, lse, row_scale, labels, out=grad)
        else:
            rows = max(1, CHUNK_BYTES_FLOOR // (8 * logits.shape[1]))
            for s in range(0, logits.shape[0], rows):
                sl = slice(s, s + rows)
                softmax_grad_torch(logits[sl], lse[sl], row_scale[sl], labels[sl], out=grad[sl])
        return grad, None, None, None, None, None


# ------------------------------------------------------------------------------------ public API
def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    task_ids: Optional[torch.Tensor] = None,
    *,
    bias: Optional[torch.Tensor] = None,
    num_tasks: Optional[int] = None,
    task_weights: Union[None, Sequence[float], torch.Tensor] = None,
    token_scale: Optional[torch.Tensor] = None,
    reduction: str = "task_mean",
    ignore_index: int = -100,
) -> CrossEntropyOutput:
    """Cross-entropy of hidden @ weight.T (+ bias) against labels, reduced per task, never holding the
    N x V logits. See the module docstring."""
    check_reduction(reduction, token_scale)
    K = num_tasks_of(task_ids, num_tasks, task_weights)
    hidden = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    labels = labels.reshape(-1).long()
    task_ids = None if task_ids is None else task_ids.reshape(-1).long()
    # Autocast-style: a bf16 decoder and an fp32 head run in bf16; autograd casts the gradient back.
    weight = weight.to(hidden.dtype).contiguous()
    bias = None if bias is None else bias.to(hidden.dtype).contiguous()
    scale, tasks, valid, counts = token_scales(labels, task_ids, K, reduction, task_weights, token_scale,
                                               ignore_index)
    triton_path = uses_triton(hidden, cuda_dtypes=ANY_DTYPE)  # fp32 has its own tiles (LOGITS_CONFIGS)
    if hidden.shape[0] == 0:  # an empty micro-batch (e.g. a rank without loss tokens): zero, but connected
        return CrossEntropyOutput(hidden.sum().float() * 0, torch.zeros_like(counts), counts)
    grad_wanted = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if grad_wanted:
        loss, task_sum = FusedLinearCrossEntropyFunction.apply(
            hidden, weight, bias, labels, tasks, valid, scale, K, triton_path)
    else:
        ce = run_chunks(hidden, weight, bias, labels, scale, (False, False, False), triton_path)[0]
        loss, task_sum = reduce_ce(ce, valid, tasks, scale, K)
    return CrossEntropyOutput(loss, task_sum, counts)


def masked_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    task_ids: Optional[torch.Tensor] = None,
    *,
    num_tasks: Optional[int] = None,
    task_weights: Union[None, Sequence[float], torch.Tensor] = None,
    token_scale: Optional[torch.Tensor] = None,
    reduction: str = "task_mean",
    ignore_index: int = -100,
) -> CrossEntropyOutput:
    """For callers that already hold logits [N, V]: the same reductions as the fused op. Holds one fp32
    row chunk at a time (never an fp32 copy of bf16 logits); the gradient kernel is Triton on a GPU."""
    check_reduction(reduction, token_scale)
    K = num_tasks_of(task_ids, num_tasks, task_weights)
    logits = logits.reshape(-1, logits.shape[-1]).contiguous()
    labels = labels.reshape(-1).long()
    task_ids = None if task_ids is None else task_ids.reshape(-1).long()
    scale, tasks, valid, counts = token_scales(labels, task_ids, K, reduction, task_weights, token_scale,
                                               ignore_index)
    loss, task_sum = MaskedCrossEntropyFunction.apply(logits, labels, tasks, valid, scale, K)
    return CrossEntropyOutput(loss, task_sum, counts)

