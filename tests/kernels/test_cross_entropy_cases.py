"""The cross-entropy op against a float64 oracle, on awkward shapes, every reduction, with and without bias.

This module runs twice: in the normal suite (CPU tensors -> the chunked PyTorch path) and, through
tests/kernels/test_cross_entropy_interpret.py, in a subprocess with TRITON_INTERPRET=1 (CPU tensors -> the
Triton kernels in the interpreter), where every test runs on both logits paths (the Triton tile GEMM and
cuBLAS -> torch.mm plus the row kernel). fp32 and fp16 only: the interpreter computes bf16 wrongly.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from mftcore.kernels import autotune
from mftcore.kernels import cross_entropy as ce
from mftcore.kernels import cross_entropy_kernels as cek
from mftcore.kernels.cross_entropy import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
    masked_cross_entropy,
    masked_cross_entropy_reference,
)
from mftcore.kernels.dispatch import ANY_DTYPE, interpreted, uses_triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.float16]
# (loss rtol, gradient and task-sum error as a fraction of the largest reference value)
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 6e-3)}
# N, H, V, K: N=1; H and V not powers of two; V smaller than one vocabulary tile (32 in the interpreter);
# K=1 and K=9 (tasks 4 and 8 get no tokens); chunks of 13 rows cut through kernel tiles.
SHAPES = [(1, 5, 7, 1), (37, 20, 70, 9), (50, 33, 101, 3), (64, 48, 16, 2)]
REDUCTIONS = ["token_mean", "task_mean", "sum"]
PATHS = ["triton", "cublas"] if INTERPRET else ["torch"]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(ce, "chunk_rows", lambda *args: 13)


@pytest.fixture(autouse=True, params=PATHS)
def logits_path(request, monkeypatch):
    """In the interpreter the plan is the family's default; "cublas" makes it the cuBLAS path's."""
    if request.param == "cublas":
        monkeypatch.setattr(cek, "default_plan", lambda family: cek.CUBLAS_INTERPRET[0])
    autotune.reset()
    yield request.param
    autotune.reset()


def make_case(N, H, V, K, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed + 1000 * N + V)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5 * 3).to(dtype)
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.25] = -100
    if N > 1:
        labels[0] = -100
        labels[1] = V - 1  # the last vocabulary column, at the edge of the last tile
    tasks = torch.randint(0, K, (N,), generator=g)
    if K == 9:
        tasks[(tasks == 4) | (tasks == 8)] = 0
    return hidden, weight, b, labels, tasks


def reduction_kwargs(reduction, N, K):
    if reduction == "task_mean":
        return {"task_weights": torch.linspace(0.5, 2.0, K)}
    if reduction == "sum":
        return {"token_scale": torch.linspace(-0.5, 1.5, N)}
    return {}


def close(got, ref, frac):
    err = (got.double() - ref).abs().max().item()
    assert err <= frac * max(ref.abs().max().item(), 1e-6), (err, ref.abs().max().item())


def run_both(hidden, weight, bias, labels, tasks, K, **kw):
    """Our op in the case dtype, the oracle in float64 on the same values; returns both outputs and grads."""
    ours_in = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    ref_in = [t.double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    out = fused_linear_cross_entropy(ours_in[0], ours_in[1], labels, tasks, bias=ours_in[2], num_tasks=K, **kw)
    ref = fused_linear_cross_entropy_reference(ref_in[0], ref_in[1], labels, tasks, bias=ref_in[2],
                                               num_tasks=K, **kw)
    out.loss.backward()
    ref.loss.backward()
    return out, ref, ours_in, ref_in


def test_dispatch_follows_the_interpreter_switch():
    assert interpreted() == INTERPRET == (type(cek._logits_lse_kernel).__name__ == "InterpretedFunction")
    assert uses_triton(torch.zeros(1), cuda_dtypes=ANY_DTYPE) == INTERPRET
    assert not uses_triton(torch.zeros(1, dtype=torch.bfloat16), cuda_dtypes=ANY_DTYPE)  # wrong in the interpreter


def test_bf16_takes_the_pytorch_path_and_matches_the_oracle():
    """In the interpreter too: it would compute bf16 wrongly, so dispatch keeps bf16 on the PyTorch path."""
    hidden, weight, b, labels, tasks = make_case(37, 20, 70, 3, torch.bfloat16, bias=True)
    out, ref, ours, refs = run_both(hidden, weight, b, labels, tasks, 3, task_weights=[1.0, 2.0, 0.5])
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-2)
    close(out.task_loss_sum, ref.task_loss_sum, 2e-2)
    for got, want in zip(ours, refs):
        close(got.grad, want.grad, 3e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-H{}-V{}-K{}".format(*s))
def test_fused_matches_float64_oracle(shape, reduction, dtype):
    N, H, V, K = shape
    bias = SHAPES.index(shape) % 2 == 0
    hidden, weight, b, labels, tasks = make_case(N, H, V, K, dtype, bias)
    out, ref, ours, refs = run_both(hidden, weight, b, labels, tasks, K, reduction=reduction,
                                    **reduction_kwargs(reduction, N, K))
    loss_rtol, frac = TOL[dtype]
    assert out.loss.dtype == torch.float32 and out.task_loss_sum.dtype == torch.float32
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=loss_rtol, abs=1e-6)
    close(out.task_loss_sum, ref.task_loss_sum, frac)
    assert torch.equal(out.task_token_count, ref.task_token_count)
    for got, want in zip(ours, refs):
        if got is not None:
            assert got.grad.dtype == got.dtype
            close(got.grad, want.grad, frac)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_every_token_ignored(reduction, dtype):
    hidden, weight, b, labels, tasks = make_case(9, 6, 11, 2, dtype, bias=True)
    labels[:] = -100
    out, ref, ours, _ = run_both(hidden, weight, b, labels, tasks, 2, reduction=reduction)
    assert out.loss.item() == 0.0 and out.task_token_count.tolist() == [0.0, 0.0]
    assert out.task_loss_sum.tolist() == [0.0, 0.0]
    assert all(t.grad.abs().max().item() == 0 for t in ours)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_grad_and_frozen_head_paths(dtype):
    """Evaluation (no logits stored) gives the training loss; a frozen head (LoRA) gets no gradient."""
    hidden, weight, _, labels, tasks = make_case(40, 24, 90, 3, dtype, bias=False)
    with torch.no_grad():
        evaluated = fused_linear_cross_entropy(hidden, weight, labels, tasks, num_tasks=3)
    h = hidden.clone().requires_grad_()
    trained = fused_linear_cross_entropy(h, weight, labels, tasks, num_tasks=3)
    trained.loss.backward()
    assert evaluated.loss.item() == pytest.approx(trained.loss.item(), rel=1e-6)
    assert torch.equal(evaluated.task_loss_sum, trained.task_loss_sum)
    h64 = hidden.double().requires_grad_()
    fused_linear_cross_entropy_reference(h64, weight.double(), labels, tasks, num_tasks=3).loss.backward()
    close(h.grad, h64.grad, TOL[dtype][1])
    assert weight.grad is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_micro_batches_sum_to_one_big_batch(dtype):
    """With step-wide token scales and reduction="sum", split chunks add up to the whole batch."""
    N, H, V, K = 45, 16, 50, 3
    hidden, weight, _, labels, tasks = make_case(N, H, V, K, dtype, bias=False)
    scale, *_ = ce.token_scales(labels, tasks, K, "task_mean")
    w_big = weight.clone().requires_grad_()
    big = fused_linear_cross_entropy(hidden, w_big, labels, tasks, num_tasks=K)
    big.loss.backward()
    w_mb = weight.clone().requires_grad_()
    total = 0.0
    for part in torch.tensor_split(torch.arange(N), [7, 8, 30]):
        out = fused_linear_cross_entropy(hidden[part], w_mb, labels[part], tasks[part], num_tasks=K,
                                         reduction="sum", token_scale=scale[part])
        out.loss.backward()
        total += out.loss.item()
    assert total == pytest.approx(big.loss.item(), rel=TOL[dtype][0])
    close(w_mb.grad, w_big.grad.double(), 4 * TOL[dtype][1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_masked_matches_float64_oracle(reduction, dtype):
    N, V, K = 29, 45, 4
    _, _, _, labels, tasks = make_case(N, 3, V, K, dtype, bias=False)
    logits = (torch.randn(N, V, dtype=torch.float64) * 3).to(dtype)
    ours, ref = logits.clone().requires_grad_(), logits.double().requires_grad_()
    kw = reduction_kwargs(reduction, N, K)
    out = masked_cross_entropy(ours, labels, tasks, num_tasks=K, reduction=reduction, **kw)
    want = masked_cross_entropy_reference(ref, labels, tasks, num_tasks=K, reduction=reduction, **kw)
    (2.5 * out.loss).backward()  # a non-unit upstream gradient reaches every logit
    (2.5 * want.loss).backward()
    assert out.loss.item() == pytest.approx(want.loss.item(), rel=TOL[dtype][0])
    close(out.task_loss_sum, want.task_loss_sum, TOL[dtype][1])
    close(ours.grad, ref.grad, TOL[dtype][1])


def test_upstream_gradient_scales_every_gradient():
    hidden, weight, b, labels, tasks = make_case(20, 8, 30, 2, torch.float32, bias=True)
    grads = []
    for factor in (1.0, -3.0):
        ins = [t.clone().requires_grad_() for t in (hidden, weight, b)]
        out = fused_linear_cross_entropy(ins[0], ins[1], labels, tasks, bias=ins[2], num_tasks=2)
        (factor * out.loss).backward()
        grads.append([t.grad for t in ins])
    for one, three in zip(*grads):
        torch.testing.assert_close(three, -3.0 * one, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------- 16-bit consistency, labels
def confident_case(N, H, V, dtype, seed=0):
    """Hidden states pointing at their label's weight row: p_y ~ 0.99, where 1 - p_y is small."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5
    labels = torch.randint(0, V, (N,), generator=g)
    wy = w[labels]
    noise = 0.5 * torch.randn(N, H, generator=g, dtype=torch.float64) / H ** 0.5
    return (12 * wy / wy.norm(dim=1, keepdim=True) ** 2 + noise).to(dtype), w.to(dtype), labels


def gradients(loss_fn, hidden, weight, dtype):
    h, w = hidden.to(dtype).clone().requires_grad_(), weight.to(dtype).clone().requires_grad_()
    loss_fn(h, w).backward()
    return h.grad.double(), w.grad.double()


def test_confident_fp16_gradient_is_as_accurate_as_torch():
    """Statistics and gradient from the same rounded logits: a confident token's 1 - p_y is not swamped
    by its logit's fp16 rounding (that was 96x torch's grad_hidden error in the interpreter)."""
    hidden, weight, labels = confident_case(64, 64, 512, torch.float16)
    p_y = F.linear(hidden.double(), weight.double()).softmax(1).gather(1, labels[:, None])
    assert p_y.mean() > 0.98
    exact = gradients(lambda h, w: F.cross_entropy(F.linear(h, w), labels, reduction="sum"), hidden, weight,
                      torch.float64)
    torch16 = gradients(lambda h, w: F.cross_entropy(F.linear(h, w).float(), labels, reduction="sum"), hidden,
                        weight, torch.float16)
    ours = gradients(lambda h, w: fused_linear_cross_entropy(h, w, labels, reduction="sum").loss, hidden, weight,
                     torch.float16)
    for name, got, theirs, want in zip(("grad_hidden", "grad_weight"), ours, torch16, exact):
        err, torch_err = (got - want).abs().max().item(), (theirs - want).abs().max().item()
        assert err <= 4 * torch_err, f"{name}: {err:.3g} vs torch fp16 {torch_err:.3g}"
    with torch.no_grad():  # evaluation: the same rounded statistics, the same loss
        evaluated = fused_linear_cross_entropy(hidden, weight, labels, reduction="sum").loss
    trained = fused_linear_cross_entropy(hidden, weight.clone().requires_grad_(), labels, reduction="sum").loss
    assert evaluated.item() == trained.item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_out_of_range_labels_give_nan_on_every_path(dtype):
    """A valid token whose label is not in [0, V): NaN ce (loss, its task's sum, gradients), never inf or
    a finite wrong value; other tasks keep their sums. The float64 oracle raises instead."""
    hidden, weight, b, labels, tasks = make_case(30, 12, 40, 3, dtype, bias=True)
    labels[tasks == 0] = -100
    labels[3], tasks[3] = 40, 1  # V itself: inside the last kernel tile
    labels[5], tasks[5] = 1000, 1
    labels[7], tasks[7] = -5, 1
    ins = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    out = fused_linear_cross_entropy(ins[0], ins[1], labels, tasks, bias=ins[2], num_tasks=3)
    out.loss.backward()
    logits = (hidden.float() @ weight.float().T + b.float()).requires_grad_()
    masked = masked_cross_entropy(logits, labels, tasks, num_tasks=3)
    masked.loss.backward()
    for o in (out, masked):
        assert o.loss.isnan() and o.task_loss_sum[1].isnan() and o.task_loss_sum[2].isfinite()
        assert o.task_loss_sum[0] == 0
    assert all(t.grad.isnan().any() for t in ins) and logits.grad[[3, 5, 7]].isnan().all()
    assert logits.grad[tasks == 2].isfinite().all()
    with pytest.raises((IndexError, RuntimeError)):
        fused_linear_cross_entropy_reference(hidden.double(), weight.double(), labels, tasks, num_tasks=3)


# --------------------------------------------------------------------- weight-gradient accumulation
def test_fp32_master_weight_accumulates_its_gradient_in_fp32():
    """fp16 hidden states, an fp32 head (autocast over master weights): grad_W is fp32 and summed in fp32
    over the chunks (13 rows each here), so it beats the fp16 sum of the same chunk gradients."""
    N, H, V = 260, 24, 60
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(N, H, generator=g).half()
    weight = torch.randn(V, H, generator=g) / H ** 0.5
    labels = torch.randint(0, V, (N,), generator=g)
    w32 = weight.clone().requires_grad_()
    fused_linear_cross_entropy(hidden, w32, labels, reduction="sum").loss.backward()
    w16 = weight.half().requires_grad_()
    fused_linear_cross_entropy(hidden, w16, labels, reduction="sum").loss.backward()
    w16_acc = weight.half().requires_grad_()
    fused_linear_cross_entropy(hidden, w16_acc, labels, reduction="sum", accum_dtype=torch.float32).loss.backward()
    w64 = weight.half().double().requires_grad_()
    fused_linear_cross_entropy_reference(hidden.double(), w64, labels, reduction="sum").loss.backward()
    assert w32.grad.dtype == torch.float32 and w16_acc.grad.dtype == torch.float16
    err32 = (w32.grad.double() - w64.grad).abs().max().item()
    err16 = (w16.grad.double() - w64.grad).abs().max().item()
    err16_acc = (w16_acc.grad.double() - w64.grad).abs().max().item()
    # fp32 accumulation leaves the per-chunk fp16 rounding of G only; one final rounding for fp16 weights
    assert err32 * 3 < err16, (err32, err16)
    assert err16_acc * 2 < err16, (err16_acc, err16)
    with pytest.raises(ValueError, match="accum_dtype"):
        fused_linear_cross_entropy(hidden, w16, labels, accum_dtype=torch.bfloat16)


# ------------------------------------------------------------- options: smoothing, z-loss, softcap, scale
# Each option alone and all together, against the float64 oracle (torch's own F.cross_entropy smoothing and
# torch.tanh), with every reduction: task_mean with task weights, sum with signed token scales, none with a
# random signed upstream gradient. The shapes cycle through SHAPES (N=1 included), bias on every other one.
OPTIONS = [{"label_smoothing": 0.1}, {"z_loss": 0.05}, {"softcap": 2.0}, {"logit_scale": 0.6},
           {"label_smoothing": 0.2, "z_loss": 0.02, "softcap": 4.0, "logit_scale": 1.7}]
ALL_REDUCTIONS = REDUCTIONS + ["none"]


def option_id(opts):
    return "-".join(f"{k}{v}" for k, v in opts.items())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ALL_REDUCTIONS)
@pytest.mark.parametrize("opts", OPTIONS, ids=option_id)
def test_options_match_float64_oracle(opts, reduction, dtype):
    index = OPTIONS.index(opts) + ALL_REDUCTIONS.index(reduction)
    N, H, V, K = SHAPES[index % len(SHAPES)]
    hidden, weight, b, labels, tasks = make_case(N, H, V, K, dtype, bias=index % 2 == 0, seed=index)
    kw = dict(reduction=reduction, **opts, **reduction_kwargs(reduction, N, K))
    ours_in = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    ref_in = [t.double().requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    out = fused_linear_cross_entropy(ours_in[0], ours_in[1], labels, tasks, bias=ours_in[2], num_tasks=K, **kw)
    ref = fused_linear_cross_entropy_reference(ref_in[0], ref_in[1], labels, tasks, bias=ref_in[2], num_tasks=K, **kw)
    loss_rtol, frac = TOL[dtype]
    if reduction == "none":
        assert out.loss.shape == (N,) and out.z_loss.shape == (N,)
        close(out.loss, ref.loss.detach(), frac)
        upstream = torch.randn(N, generator=torch.Generator().manual_seed(index), dtype=torch.float64)
        out.loss.backward(upstream.float())
        ref.loss.backward(upstream)
    else:
        assert out.loss.item() == pytest.approx(ref.loss.item(), rel=loss_rtol, abs=1e-6)
        (2.5 * out.loss).backward()
        (2.5 * ref.loss).backward()
    close(out.z_loss, ref.z_loss, frac)
    if "z_loss" not in opts:
        assert not out.z_loss.any()
    close(out.task_loss_sum, ref.task_loss_sum, frac)
    assert torch.equal(out.task_token_count, ref.task_token_count)
    # 16-bit logits can swap a near tie of the top two; fp32 counts are exact
    assert (out.task_correct_count - ref.task_correct_count).abs().sum() <= (0 if dtype == torch.float32 else 1)
    for got, want in zip(ours_in, ref_in):
        if got is not None:
            assert got.grad.dtype == got.dtype
            close(got.grad, want.grad, frac)


@pytest.mark.parametrize("reduction", ["token_mean", "none"])
def test_label_smoothing_is_torch_cross_entropy_with_ignore_index(reduction):
    """The oracle is not the only judge: the op against F.cross_entropy(label_smoothing=, ignore_index=)."""
    hidden, weight, b, labels, tasks = make_case(50, 33, 101, 3, torch.float32, bias=True)
    out = fused_linear_cross_entropy(hidden, weight, labels, tasks, bias=b, num_tasks=3, reduction=reduction,
                                     label_smoothing=0.3)
    want = F.cross_entropy(F.linear(hidden.double(), weight.double(), b.double()), labels, ignore_index=-100,
                           label_smoothing=0.3, reduction="mean" if reduction == "token_mean" else "none")
    close(out.loss, want, 1e-5)


def test_reduction_none_weight_gradient_under_a_per_token_upstream():
    """grad_W = G^T h with u_i inside G's rows: the per-token upstream must not be applied after the
    weight-gradient GEMM (a uniform upstream would hide it; a one-hot one exposes it)."""
    hidden, weight, b, labels, tasks = make_case(37, 20, 70, 2, torch.float32, bias=True)
    labels[3] = 5
    for u in (torch.zeros(37).index_fill_(0, torch.tensor([3]), 1.0), torch.linspace(-2, 3, 37)):
        w, w64 = weight.clone().requires_grad_(), weight.double().requires_grad_()
        fused_linear_cross_entropy(hidden, w, labels, tasks, bias=b, reduction="none").loss.backward(u)
        fused_linear_cross_entropy_reference(hidden.double(), w64, labels, tasks, bias=b.double(),
                                             reduction="none").loss.backward(u.double())
        close(w.grad, w64.grad, 1e-5)


def test_accuracy_counts_the_tokens_whose_argmax_is_the_label():
    """Against argmax of the raw logits (soft-capping and scaling keep the order), with and without
    gradients; a soft-cap saturated in fp32 makes ties, which count as correct (the target is a row max)."""
    hidden, weight, b, labels, tasks = make_case(64, 48, 16, 2, torch.float32, bias=False)
    valid = labels != -100
    hit = (F.linear(hidden, weight).argmax(1) == labels) & valid
    want = torch.zeros(2).index_add_(0, tasks, hit.float())
    with torch.no_grad():
        out = fused_linear_cross_entropy(hidden, weight, labels, tasks, num_tasks=2, softcap=30.0, logit_scale=2.0)
    trained = fused_linear_cross_entropy(hidden, weight.clone().requires_grad_(), labels, tasks, num_tasks=2)
    assert torch.equal(out.task_correct_count, want) and torch.equal(trained.task_correct_count, want)
    assert 0 < want.sum() < valid.sum()
    with torch.no_grad():
        saturated = fused_linear_cross_entropy(hidden * 100, weight, labels, tasks, num_tasks=2, softcap=0.5)
    assert (saturated.task_correct_count >= want).all() and saturated.task_correct_count.sum() > want.sum()


def test_options_are_checked():
    hidden, weight, _, labels, _ = make_case(9, 6, 11, 1, torch.float32, bias=False)
    for bad in ({"label_smoothing": 1.5}, {"z_loss": -1.0}, {"softcap": 0.0}, {"logit_scale": -2.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            fused_linear_cross_entropy(hidden, weight, labels, **bad)
    with pytest.raises(ValueError, match="none"):
        masked_cross_entropy(hidden, labels, reduction="none")
