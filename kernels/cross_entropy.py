"""Linear + masked cross-entropy with per-task weighted reduction: the public functions, the torch.library op.

Public API (DESIGN.md, stable):
    fused_linear_cross_entropy(hidden [N,H], weight [V,H], labels [N], task_ids [N] | None, *, bias,
        num_tasks, task_weights, token_scale, reduction, ignore_index, accum_dtype) -> CrossEntropyOutput
    masked_cross_entropy(logits [N,V], labels, task_ids, ...) -> the same, for callers that hold logits.
Reductions: "token_mean" (MFTCoder case1), "task_mean" (case3: sum_t w_t*mean_t / sum_{t present} w_t),
"sum" (sum_i token_scale_i * ce_i, what the trainer uses to normalise over a whole optimizer step).
task_loss_sum and task_token_count are statistics (no gradient); gradients flow through `loss` only.

Preconditions: every valid token (label != ignore_index) carries a task id in [0, num_tasks) and a label in
[0, V). Checking them would read the device, so the op does not raise; a valid token whose label lies
outside [0, V) gets ce = NaN on every path (its task's sum, the loss and every gradient become NaN, which
the trainer counts as a non-finite step and skips) instead of the +inf of one path and the finite, wrong
value of another. (The trainer checks token ids when it loads the data.)

Algorithm (token chunks, gradients computed in the forward: 6*N*H*V FLOPs, no host sync). Every reduction
is a per-token scale c_i, known before any logit exists (task counts come from an index_add on the
device). We factor c_i = c_max * r_i with |r_i| <= 1, so the stored gradients stay O(1) whatever N is.
Per chunk of C tokens, on the plan's path (kernels/cross_entropy_kernels.py, chosen by timing):
logits, lse, target logit and r_i * (softmax - onehot) in a [C, V] buffer, then cuBLAS
grad_hidden[chunk] = G @ W and grad_W += G^T @ h, i.e. the per-token scale is inside G before the
weight-gradient GEMM; grad_b += column sums of G. backward() multiplies the stored gradients by
grad_output * c_max. The chunk keeps its buffer under 2*N*H*itemsize (CHUNK_BYTES_FLOOR at least).

grad_W's accumulation dtype (accum_dtype): None accumulates in fp32 when the weight is fp32 (autocast over
fp32 master weights, the trainer's default: that fp32 gradient exists anyway, so it costs nothing), and in
the weight's 16-bit dtype otherwise, one rounding per chunk (Liger does the same; loss curves are reported
to drift from it). accum_dtype=torch.float32 accumulates a 16-bit weight's gradient in fp32 too, at
4*V*H bytes more (2 GB at V=128k, H=4096), rounded once at the end.

The op is `torch.ops.mftcore.fused_linear_cross_entropy` (torch.library.custom_op, a fake implementation
and registered autograd), so torch.compile(fullgraph=True) traces a model calling it without a graph
break; everything around it (scales, counts) is plain tensor code without host reads. CPU tensors run
`chunk_logits_grad_torch` per chunk, except fp32/fp16 under TRITON_INTERPRET=1, which run the Triton code.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import triton

from .cross_entropy_kernels import accumulate_grad_weight, choose_grad_tile, choose_plan, chunk_step, softmax_grad
from .cross_entropy_reference import (
    REDUCTIONS,
    CrossEntropyOutput,
    LossOptions,
    check_options,
    check_reduction,
    chunk_logits_grad_torch,
    fused_linear_cross_entropy_reference,
    logsumexp_rows_torch,
    masked_cross_entropy_reference,
    num_tasks_of,
    softmax_grad_torch,
    task_mean_scales,
    token_loss,
)
from .dispatch import ANY_DTYPE, uses_triton

__all__ = ["CrossEntropyOutput", "REDUCTIONS", "fused_linear_cross_entropy", "masked_cross_entropy",
           "fused_linear_cross_entropy_reference", "masked_cross_entropy_reference", "task_mean_scales",
           "token_scales"]

CHUNK_BYTES_FLOOR = 64 << 20  # smaller chunks leave the grad_W GEMM memory-bound (K = C rows)


def chunk_rows(n: int, h: int, v: int, itemsize: int, triton_path: bool, want_grad: bool) -> int:
    """Tokens per chunk: the chunk's temporaries stay under max(2*N*H*itemsize, CHUNK_BYTES_FLOOR).
    want_grad: whether the chunk's logits are stored (for the gradient, or on the cuBLAS path)."""
    if triton_path:
        row_bytes = (v * itemsize if want_grad else 0) + 8 * triton.cdiv(v, 64) + 32
    else:  # the fp32 logits buffer (plus the 16-bit GEMM output it is cast from)
        row_bytes = v * (4 + (itemsize if itemsize < 4 else 0))
    budget = max(2 * n * h * itemsize * 7 // 8, CHUNK_BYTES_FLOOR)
    rows = max(1, budget // row_bytes)
    return min(n, rows if rows < 256 else rows // 256 * 256)  # whole 256-row tiles of kernel 1


def chunk_buffer(hidden, rows: int, V: int):
    """The [rows, V] chunk buffer. Row stride padded to 64 elements: an unaligned stride (V=50257) makes
    kernel 1 spill 1 KB of registers on sm_90 (tests/kernels/test_cross_entropy_compile.py) and slows
    cuBLAS on the strided G."""
    return hidden.new_empty(rows, triton.cdiv(V, 64) * 64)[:, :V]


# --------------------------------------------------------------------------------- scales
def token_scales(labels, task_ids, num_tasks: int, reduction: str, task_weights=None, token_scale=None,
                 ignore_index: int = -100):
    """Per-token loss scale c_i (0 where ignored) for a reduction, plus (tasks, valid, counts)."""
    valid = labels != ignore_index
    tasks = torch.zeros_like(labels) if task_ids is None else torch.where(valid, task_ids, 0)
    counts = torch.zeros(num_tasks, dtype=torch.float32, device=labels.device).index_add_(0, tasks, valid.float())
    if reduction == "token_mean":
        scale = valid.float() / counts.sum().clamp(min=1)
    elif reduction in ("sum", "none"):
        scale = valid.float() if token_scale is None else torch.where(valid, token_scale.reshape(-1).float(), 0.0)
    else:
        scale = torch.where(valid, task_mean_scales(counts, task_weights)[tasks], 0.0)
    return scale, tasks, valid, counts


def split_scale(scale):
    """c = c_max * r with |r| <= 1 (r = 0 when every c is 0): the kernels store r-scaled gradients."""
    c_max = scale.abs().amax()
    return c_max, scale / torch.where(c_max > 0, c_max, 1.0)


def out_of_range(labels, valid, V: int):
    """Valid tokens whose label is not a vocabulary index: their ce and gradients become NaN (module doc)."""
    return valid & ((labels < 0) | (labels >= V))


def accumulation_dtype(weight_dtype, compute_dtype, accum_dtype) -> torch.dtype:
    """grad_W's accumulator: fp32 for fp32 weights, fp32 compute, or accum_dtype=torch.float32."""
    if accum_dtype not in (None, torch.float32, weight_dtype):
        raise ValueError(f"accum_dtype must be None, torch.float32 or the weight's dtype, got {accum_dtype}")
    if torch.float32 in (weight_dtype, compute_dtype, accum_dtype):
        return torch.float32
    return compute_dtype


# ---------------------------------------------------------------------------------- chunk loop
def run_chunks(hidden, weight, bias, labels, row_scale, want: tuple, triton_path: bool, acc_dtype=None,
               opts: LossOptions = LossOptions()):
    """The chunk loop of the fused op: per-token loss [N], lse [N], hit [N] (target is the row max) and the
    r-scaled gradients (None where not wanted); grad_W in acc_dtype (default hidden's)."""
    N, H = hidden.shape
    V = weight.shape[0]
    want_grad = any(want)
    if torch.is_autocast_enabled(hidden.device.type):  # dtypes here are chosen, not autocast's
        with torch.autocast(hidden.device.type, enabled=False):
            return run_chunks(hidden, weight, bias, labels, row_scale, want, triton_path, acc_dtype, opts)
    acc_dtype = acc_dtype or hidden.dtype
    itemsize = hidden.element_size()
    plan = grad_tile = None
    rows = chunk_rows(N, H, V, itemsize, triton_path, want_grad)
    if triton_path:
        def rows_for(p):
            return chunk_rows(N, H, V, itemsize, True, want_grad or p.path == "cublas")

        plan = choose_plan(hidden, weight, bias, labels, row_scale, want_grad, rows_for,
                           lambda p, r: chunk_buffer(hidden, r, V), opts)
        rows = rows_for(plan)
    buffer = chunk_buffer(hidden, rows, V) if triton_path and (want_grad or plan.path == "cublas") else None
    grad_h = torch.empty_like(hidden) if want[0] else None
    grad_w = torch.zeros(V, H, dtype=acc_dtype, device=hidden.device) if want[1] else None
    grad_b = torch.zeros(V, dtype=torch.float32, device=hidden.device) if want[2] else None
    ce = torch.empty(N, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(ce)
    hit = torch.empty(N, dtype=torch.bool, device=hidden.device)
    for s in range(0, N, rows):
        h = hidden[s:s + rows]
        if triton_path:
            stats, g = chunk_step(h, weight, bias, labels[s:s + rows], row_scale[s:s + rows], want_grad,
                                  buffer, plan, opts)
        else:
            stats, g = chunk_logits_grad_torch(h, weight, bias, labels[s:s + rows], row_scale[s:s + rows],
                                               want_grad, opts)
        ce[s:s + rows] = token_loss(stats, V, opts)
        lse[s:s + rows] = stats.lse
        hit[s:s + rows] = stats.target >= stats.row_max
        if grad_h is not None:
            torch.mm(g, weight, out=grad_h[s:s + rows])
        if grad_w is not None:
            if acc_dtype == hidden.dtype:
                grad_w.addmm_(g.t(), h)
            elif triton_path:  # 16-bit G and h summed into the fp32 accumulator (one Triton GEMM)
                grad_tile = grad_tile or choose_grad_tile(g, h)
                accumulate_grad_weight(grad_w, g, h, grad_tile)
            else:
                grad_w.addmm_(g.t().float(), h.float())
        if grad_b is not None:
            grad_b += g.sum(dim=0, dtype=torch.float32)
        del g  # else the CPU path holds two chunks of logits while computing the next
    return ce, lse, hit, grad_h, grad_w, grad_b


def reduce_ce(ce, valid, tasks, scale, num_tasks: int, bad=None):
    """loss = sum_i c_i * ce_i and the per-task ce sums, both fp32; `bad` tokens' ce is NaN. Also returns
    the masked per-token ce."""
    ce = torch.where(valid, ce, 0.0)
    if bad is not None:
        ce = torch.where(bad, float("nan"), ce)
    task_sum = torch.zeros(num_tasks, dtype=torch.float32, device=ce.device).index_add_(0, tasks, ce)
    return (scale * ce).sum(), task_sum, ce


# ---------------------------------------------------------------------------- the custom op
@torch.library.custom_op("mftcore::fused_linear_cross_entropy", mutates_args=())
def fused_linear_cross_entropy_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
    tasks: torch.Tensor, valid: torch.Tensor, scale: torch.Tensor, num_tasks: int, grad_hidden: bool,
    grad_weight: bool, grad_bias: bool, accum_dtype: Optional[torch.dtype], scale_in_place: bool,
    label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float = 0.0, logit_scale: float = 1.0,
    recompute: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """-> (loss, task_sum, grad_hidden, grad_weight, grad_bias, c_max, token_loss [N], token_z_loss [N],
    task_correct [K]): loss = sum_i scale_i * l_i, token_loss the masked l_i, token_z_loss the masked
    z_loss * lse_i^2 (a part of l_i); the gradients r-scaled (with respect to the scaled hidden / bias: the backward applies
    logit_scale), each an empty [0] tensor when not asked for or with `recompute`; grad_weight in
    accumulation_dtype(...). scale_in_place: the caller never reads the gradient outputs, so the backward may
    scale them in place (see _backward). recompute (reduction="none"): no gradient is made here; the
    backward runs this op again with the upstream per-token gradient as the scale."""
    opts = LossOptions(label_smoothing, z_loss, softcap, logit_scale)
    h = hidden.contiguous() if logit_scale == 1.0 else hidden * logit_scale  # folded into the GEMM's input
    w = weight.to(hidden.dtype).contiguous()
    b = None if bias is None else bias.to(hidden.dtype).contiguous()
    if b is not None and logit_scale != 1.0:
        b = b * logit_scale
    c_max, r = split_scale(scale)
    bad = out_of_range(labels, valid, w.shape[0])
    r = torch.where(bad, float("nan"), r)
    acc = accumulation_dtype(weight.dtype, hidden.dtype, accum_dtype)
    want = (False, False, False) if recompute else (grad_hidden, grad_weight, grad_bias and bias is not None)
    ce, lse, hit, gh, gw, gb = run_chunks(h, w, b, labels, r, want, uses_triton(h, cuda_dtypes=ANY_DTYPE), acc,
                                          opts)
    loss, task_sum, tok = reduce_ce(ce, valid, tasks, scale, num_tasks, bad)
    zl = torch.where(valid, z_loss * lse * lse, 0.0)
    correct = torch.zeros(num_tasks, dtype=torch.float32, device=hidden.device).index_add_(
        0, tasks, (valid & hit & ~bad).float())

    def empty(dtype=hidden.dtype):  # a fresh one each: the outputs of a custom op may not alias
        return hidden.new_empty(0, dtype=dtype)

    return loss, task_sum, empty() if gh is None else gh, empty() if gw is None else gw, \
        empty(torch.float32) if gb is None else gb, c_max, tok, zl, correct


@fused_linear_cross_entropy_op.register_fake
def _fused_linear_cross_entropy_fake(hidden, weight, bias, labels, tasks, valid, scale, num_tasks, grad_hidden,
                                     grad_weight, grad_bias, accum_dtype, scale_in_place, label_smoothing=0.0,
                                     z_loss=0.0, softcap=0.0, logit_scale=1.0, recompute=False):
    f32 = dict(dtype=torch.float32, device=hidden.device)
    acc = accumulation_dtype(weight.dtype, hidden.dtype, accum_dtype)
    want = not recompute
    gh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if grad_hidden and want \
        else hidden.new_empty(0)
    gw = weight.new_empty(weight.shape, dtype=acc) if grad_weight and want else hidden.new_empty(0)
    gb = torch.empty(weight.shape[0], **f32) if grad_bias and bias is not None and want else torch.empty(0, **f32)
    return (torch.empty((), **f32), torch.empty(num_tasks, **f32), gh, gw, gb, scale.new_empty(()),
            torch.empty(hidden.shape[0], **f32), torch.empty(hidden.shape[0], **f32), torch.empty(num_tasks, **f32))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, tasks, valid, scale = inputs[:7]
    _, task_sum, gh, gw, gb, c_max, tok, z_tok, correct = output
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.wanted, ctx.in_place = inputs[8:11], inputs[12]
    ctx.options, ctx.recompute = inputs[13:17], inputs[17]
    ctx.num_tasks, ctx.accum_dtype = inputs[7], inputs[11]
    ctx.spent = False
    if ctx.recompute:
        ctx.save_for_backward(hidden, weight, bias, labels, tasks, valid, scale)
        ctx.mark_non_differentiable(task_sum, gh, gw, gb, c_max, z_tok, correct)
    else:
        ctx.save_for_backward(gh, gw, gb, c_max)
        ctx.mark_non_differentiable(task_sum, gh, gw, gb, c_max, tok, z_tok, correct)


def _scaled(ctx, grads, f, in_place: bool):
    """Each wanted gradient times f (hidden's and bias's times logit_scale too), in its input's dtype."""
    logit_scale = ctx.options[3]
    out = []
    for i, (wanted, g, dtype) in enumerate(zip(ctx.wanted, grads, ctx.dtypes)):
        if not wanted or dtype is None:
            out.append(None)
            continue
        fi = f if i == 1 or logit_scale == 1.0 else f * logit_scale
        out.append((g.mul_(fi) if in_place else g * fi).to(dtype))  # a 16-bit gradient is scaled in its dtype
    return out


def _backward(ctx, grad_loss, _task_sum, _gh, _gw, _gb, _c_max, grad_token_loss, *unused):
    """Stored gradients (every reduction but "none"): the stored ones times grad_output * c_max. In place
    when the caller said it drops them (scale_in_place; the public function does) and this is eager mode:
    no second copy of grad_W, which is 2 GB in fp32 at V=128k, H=4096. Out of place otherwise: a traced
    graph (torch.compile, opcheck) must not mutate saved tensors, and a caller holding the outputs must not
    see them change. Traced tensors are subclasses (FunctionalTensor, FakeTensor); eager ones are plain.

    recompute ("none"): the per-token upstream gradient u (plus grad_loss * scale) is only known now, so the
    op runs again with u as the token scale, which puts u_i into row i of the logits gradient before both
    GEMMs (grad_W = G^T h with G's rows already scaled: the weight gradient Liger's "none" once got wrong)."""
    if ctx.recompute:
        hidden, weight, bias, labels, tasks, valid, scale = ctx.saved_tensors
        u = torch.zeros_like(scale) if grad_token_loss is None else grad_token_loss.float()
        if grad_loss is not None:
            u = u + grad_loss.float() * scale
        out = torch.ops.mftcore.fused_linear_cross_entropy(
            hidden, weight, bias, labels, tasks, valid, torch.where(valid, u, 0.0), ctx.num_tasks, *ctx.wanted,
            ctx.accum_dtype, True, *ctx.options, False)
        grads, c_max = out[2:5], out[5]
        return (*_scaled(ctx, grads, c_max, type(c_max) is torch.Tensor), *(None,) * 15)
    if ctx.spent:
        raise RuntimeError("fused_linear_cross_entropy: backward twice through the same call "
                           "(its gradients are computed in the forward and scaled in place)")
    gh, gw, gb, c_max = ctx.saved_tensors
    in_place = ctx.in_place and type(c_max) is torch.Tensor
    ctx.spent = in_place
    return (*_scaled(ctx, (gh, gw, gb), grad_loss.float() * c_max, in_place), *(None,) * 15)


fused_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


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
    accum_dtype: Optional[torch.dtype] = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    logit_scale: Optional[float] = None,
) -> CrossEntropyOutput:
    """Cross-entropy of hidden @ weight.T (+ bias) against labels, reduced per task, never holding the
    N x V logits. See the module docstring (accum_dtype: grad_W's accumulator).

    Options (cross_entropy_reference's docstring has the formulas): logit_scale multiplies the logits
    (Cohere; Granite's 1/logits_scaling), softcap soft-caps them (c * tanh(x / c), Gemma2), label_smoothing
    is F.cross_entropy's, z_loss adds z_loss * lse^2 to each valid token's loss. The z-loss enters every
    reduction as a part of the per-token loss l_i: token_mean sum_i l_i / n, task_mean through each task's
    mean, sum sum_i c_i l_i, none l_i itself; `out.z_loss` is that part alone, reduced the same way (for
    logging: no gradient flows through it), and task_loss_sum includes it.
    reduction="none": out.loss [N] (0 for ignored tokens), any upstream gradient; its gradients are made in
    the backward by a second pass (8*N*H*V FLOPs instead of 6). out.task_correct_count: per task, the valid
    tokens whose target logit is the row's largest, from the same pass (no second look at the logits)."""
    check_reduction(reduction, token_scale)
    opts = check_options(label_smoothing, z_loss, softcap, logit_scale)
    K = num_tasks_of(task_ids, num_tasks, task_weights)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).long()
    task_ids = None if task_ids is None else task_ids.reshape(-1).long()
    scale, tasks, valid, counts = token_scales(labels, task_ids, K, reduction, task_weights, token_scale,
                                               ignore_index)
    if hidden.shape[0] == 0:  # an empty micro-batch (e.g. a rank without loss tokens): zero, but connected
        zero = hidden.sum(dim=1).float() * 0 if reduction == "none" else hidden.sum().float() * 0
        return CrossEntropyOutput(zero, torch.zeros_like(counts), counts, zero.detach().clone(),
                                  torch.zeros_like(counts))
    grad = torch.is_grad_enabled()
    want = [grad and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    # Autocast-style: a bf16 decoder and an fp32 head run in bf16; the op returns each gradient in its
    # input's dtype (the fp32 head's accumulated in fp32).
    loss, task_sum, _, _, _, _, tok, zl, correct = torch.ops.mftcore.fused_linear_cross_entropy(
        hidden, weight, bias, labels, tasks, valid, scale, K, *want, accum_dtype, True, *opts,
        reduction == "none" and any(want))
    if reduction == "none":
        return CrossEntropyOutput(tok, task_sum, counts, zl, correct)
    return CrossEntropyOutput(loss, task_sum, counts, (scale * zl).sum(), correct)


# ------------------------------------------------------------------------- for callers with logits
class MaskedCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, tasks, valid, scale, num_tasks):
        N, V = logits.shape
        lse = logsumexp_rows_torch(logits, max(1, CHUNK_BYTES_FLOOR // (8 * V)))
        target = logits.gather(1, labels.clamp(0, V - 1).unsqueeze(1)).squeeze(1).float()
        bad = out_of_range(labels, valid, V)
        loss, task_sum, _ = reduce_ce(lse - target, valid, tasks, scale, num_tasks, bad)
        ctx.save_for_backward(logits, labels, lse, torch.where(bad, float("nan"), scale))
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
    row chunk at a time (never an fp32 copy of bf16 logits); the gradient kernel is Triton on a GPU. No
    options and no reduction="none" here (the fused op has them)."""
    check_reduction(reduction, token_scale)
    if reduction == "none":
        raise ValueError("reduction='none' is fused_linear_cross_entropy's only")
    K = num_tasks_of(task_ids, num_tasks, task_weights)
    logits = logits.reshape(-1, logits.shape[-1]).contiguous()
    labels = labels.reshape(-1).long()
    task_ids = None if task_ids is None else task_ids.reshape(-1).long()
    scale, tasks, valid, counts = token_scales(labels, task_ids, K, reduction, task_weights, token_scale,
                                               ignore_index)
    loss, task_sum = MaskedCrossEntropyFunction.apply(logits, labels, tasks, valid, scale, K)
    return CrossEntropyOutput(loss, task_sum, counts)
