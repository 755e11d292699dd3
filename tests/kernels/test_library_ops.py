"""Both ops as torch.library custom ops, on their CPU paths: opcheck (schema, fake tensors, autograd
registration, AOT dispatch), torch.compile(fullgraph=True) with inductor against eager, and no host reads
of tensor values in either op's forward or backward. tests/kernels/cross_entropy_interpret_cases.py runs the
same checks on the Triton paths in the interpreter."""

import sys

import pytest
import torch

from mftcore.kernels import fused_linear_cross_entropy, varlen_attention
from mftcore.kernels.cross_entropy import token_scales
from tests.helpers.no_sync import HostRead, no_host_reads

va = sys.modules["mftcore.kernels.varlen_attention"]


def ce_args(N=20, H=8, V=30, K=3, dtype=torch.float32, bias=True, want=(True, True, True), seed=0, options=()):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype).requires_grad_(want[0])
    w = torch.randn(V, H, generator=g).to(dtype).requires_grad_(want[1])
    b = torch.randn(V, generator=g).to(dtype).requires_grad_(want[2]) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100
    tasks = torch.randint(0, K, (N,), generator=g)
    scale, t, valid, _ = token_scales(labels, tasks, K, "task_mean")
    return (h, w, b, labels, t, valid, scale, K, *want, None, False, *options)


OPTIONS = (0.1, 0.02, 3.0, 1.3)  # label_smoothing, z_loss, softcap, logit_scale


def va_args(dtype=torch.float32, causal=True, gqa=True):
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 12, 6]
    T = sum(lengths)
    q = torch.randn(T, 4, 16, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(T, 2 if gqa else 4, 16, generator=g).to(dtype).requires_grad_() for _ in range(2))
    cu = torch.tensor([0, 5, 6, 18, 24], dtype=torch.int32)
    # q, k, v, cu_q, cu_k, max_q, max_k, window left, right (0: causal), softcap, scale, deterministic, lse
    return q, k, v, cu, cu, max(lengths), max(lengths), -1, 0 if causal else -1, 0.0, 16 ** -0.5, False, False


def va_options_args():
    """Separate q/k segments (one without queries), a window, a softcap and the lse, on the reference path."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(14, 4, 16, generator=g).requires_grad_()
    k, v = (torch.randn(24, 2, 16, generator=g).requires_grad_() for _ in range(2))
    cu_q, cu_k = (torch.tensor(x, dtype=torch.int32) for x in ([0, 3, 3, 14], [0, 5, 6, 24]))
    return q, k, v, cu_q, cu_k, 11, 18, 4, 0, 2.5, 0.3, False, True


@pytest.mark.parametrize("case", ["fp32", "fp32-no-bias", "frozen-head", "fp16", "fp32-head-fp16-hidden",
                                  "options", "options-recompute"])
def test_opcheck_fused_linear_cross_entropy(case):
    kwargs = {"fp32": {}, "fp32-no-bias": {"bias": False}, "frozen-head": {"want": (True, False, False)},
              "fp16": {"dtype": torch.float16}, "fp32-head-fp16-hidden": {}, "options": {"options": OPTIONS},
              "options-recompute": {"options": OPTIONS + (True,)}}[case]
    args = list(ce_args(**kwargs))
    if case == "fp32-head-fp16-hidden":  # autocast's case: the fp32 weight's gradient accumulates in fp32
        args[0] = args[0].detach().half().requires_grad_()
    torch.library.opcheck(torch.ops.mftcore.fused_linear_cross_entropy.default, tuple(args))


@pytest.mark.parametrize("case", ["causal-gqa", "full-mha", "options"])
def test_opcheck_varlen_attention(case):
    args = {"causal-gqa": lambda: va_args(causal=True, gqa=True), "full-mha": lambda: va_args(causal=False, gqa=False),
            "options": va_options_args}[case]()
    torch.library.opcheck(torch.ops.mftcore.varlen_attention.default, args)
    q, k, v, *rest, return_lse = args
    o, lse = torch.ops.mftcore.varlen_attention(*args)
    assert lse.shape == ((4, 14) if return_lse else (0,))
    do = torch.randn_like(o)
    torch.library.opcheck(torch.ops.mftcore.varlen_attention_backward.default,
                          (do, q.detach(), k.detach(), v.detach(), o.detach(), lse, *rest))


def attention_then_loss(q, k, v, cu, weight, labels, tasks, **options):
    """A model's last steps: attention over packed documents, then the fused loss on its output."""
    o = varlen_attention(q, k, v, cu, 12, causal=True, **options)
    out = fused_linear_cross_entropy(o.flatten(1), weight, labels, tasks, num_tasks=3)
    return out.loss, out.task_loss_sum


def loss_inputs():
    q, k, v, cu, *_ = va_args()
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(50, 64, generator=g).requires_grad_()
    labels = torch.randint(0, 50, (q.shape[0],), generator=g)
    labels[::4] = -100
    return q, k, v, cu, weight, labels, torch.randint(0, 3, (q.shape[0],), generator=g)


@pytest.mark.parametrize("options", [{}, dict(window_size=(3, -1), softcap=4.0)], ids=["plain", "window-softcap"])
def test_compile_fullgraph_traces_both_ops_and_matches_eager(options):
    torch._dynamo.reset()
    inputs = loss_inputs()
    leaves = [inputs[i] for i in (0, 1, 2, 4)]
    eager = attention_then_loss(*inputs, **options)
    eager[0].backward()
    eager_grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    compiled = torch.compile(attention_then_loss, fullgraph=True, backend="inductor")(*inputs, **options)
    compiled[0].backward()
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-6, atol=1e-6)
    for a, b in zip(leaves, eager_grads):
        torch.testing.assert_close(a.grad, b, rtol=1e-5, atol=1e-6)


def loss_with_options(h, weight, labels, tasks, upstream):
    """Every option, and reduction="none" with a per-token upstream gradient (the backward's second pass)."""
    opts = dict(label_smoothing=0.1, z_loss=0.01, softcap=2.5, logit_scale=1.4)
    none = fused_linear_cross_entropy(h, weight, labels, tasks, num_tasks=3, reduction="none", **opts)
    mean = fused_linear_cross_entropy(h, weight, labels, tasks, num_tasks=3, task_weights=[1.0, 2.0, 0.5], **opts)
    return (none.loss * upstream).sum() + mean.loss, mean.task_correct_count, mean.z_loss


def test_compile_fullgraph_traces_the_options_and_matches_eager():
    torch._dynamo.reset()
    _, _, _, _, weight, labels, tasks = loss_inputs()
    g = torch.Generator().manual_seed(2)
    h = torch.randn(labels.shape[0], 64, generator=g).requires_grad_()
    upstream = torch.randn(labels.shape[0], generator=g)
    eager = loss_with_options(h, weight, labels, tasks, upstream)
    eager[0].backward()
    grads = [h.grad.clone(), weight.grad.clone()]
    h.grad = weight.grad = None
    compiled = torch.compile(loss_with_options, fullgraph=True, backend="inductor")(h, weight, labels, tasks, upstream)
    compiled[0].backward()
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip((h.grad, weight.grad), grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_host_reads_in_the_fused_loss_forward_and_backward():
    inputs = loss_inputs()
    h = torch.randn(inputs[0].shape[0], 64, requires_grad=True)
    with no_host_reads():
        out = fused_linear_cross_entropy(h, inputs[4], inputs[5], inputs[6], num_tasks=3, reduction="task_mean")
        out.loss.backward()
        with torch.no_grad():
            fused_linear_cross_entropy(h, inputs[4], inputs[5], inputs[6], num_tasks=3)
        loss_with_options(h, inputs[4], inputs[5], inputs[6], torch.ones(h.shape[0]))[0].backward()
    assert h.grad is not None and inputs[4].grad is not None
    with no_host_reads(), pytest.raises(HostRead):  # the guard sees what it should: num_tasks from task_ids
        fused_linear_cross_entropy(h, inputs[4], inputs[5], inputs[6])


def test_the_varlen_reference_reads_cu_seqlens_on_the_host():
    """The CPU path slices each segment (one read of cu_seqlens per call: on the CPU a memory read, no
    device to wait for). It runs inside the custom op, so torch.compile traces around it without a
    break; the Triton path reads nothing (the interpreter cases check it)."""
    q, k, v, cu, *_ = va_args()
    with no_host_reads(), pytest.raises(HostRead, match="tolist"):
        varlen_attention(q, k, v, cu, 12)


# ----------------------------------------------------------------------------------------- GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.py)")


def cuda_inputs(dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = [100, 900, 1, 1047]
    T = sum(lengths)
    q, k, v = (torch.randn(T, h, 128, device="cuda", dtype=dtype, generator=g).requires_grad_() for h in (8, 2, 2))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    weight = (torch.randn(32000, 1024, device="cuda", generator=g) / 32).requires_grad_()  # an fp32 head
    labels = torch.randint(0, 32000, (T,), device="cuda", generator=g)
    return q, k, v, cu, weight, labels, torch.randint(0, 3, (T,), device="cuda", generator=g)


def cuda_loss(q, k, v, cu, weight, labels, tasks):
    o = varlen_attention(q, k, v, cu, 1047)
    return fused_linear_cross_entropy(o.flatten(1), weight, labels, tasks, num_tasks=3).loss


def cuda_step(*inputs, loss_fn=cuda_loss):
    loss = loss_fn(*inputs)
    loss.backward()
    return loss


@pytest.mark.gpu
@needs_cuda
def test_gpu_nothing_syncs_once_tuned():
    """A warm-up call compiles and tunes (that synchronises, once per key); then forward and backward of
    both ops, the fp32 head's gradient accumulating in fp32, run under set_sync_debug_mode("error")."""
    inputs = cuda_inputs()
    cuda_step(*inputs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cuda_step(*inputs)
        with torch.no_grad():
            fused_linear_cross_entropy(inputs[0].detach().flatten(1), inputs[4], inputs[5], inputs[6], num_tasks=3)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert inputs[4].grad.dtype == torch.float32 and inputs[4].grad.isfinite().all()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("path", ["triton", "cublas"])
def test_gpu_both_logits_paths_match_the_fp32_reference(path, monkeypatch):
    from mftcore.kernels import cross_entropy_kernels as cek
    from mftcore.kernels.cross_entropy import fused_linear_cross_entropy_reference

    family = cek.device_family(torch.cuda.get_device_capability(), torch.bfloat16, False)
    plan = cek.default_plan(family) if path == "triton" else cek.CUBLAS_CANDIDATES[0]
    monkeypatch.setenv("MFTCORE_AUTOTUNE", "0")
    monkeypatch.setattr(cek, "default_plan", lambda fam: plan)
    g = torch.Generator(device="cuda").manual_seed(1)
    h = torch.randn(3001, 1024, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(50257, 1024, device="cuda", generator=g) / 32).bfloat16().requires_grad_()
    labels = torch.randint(0, 50257, (3001,), device="cuda", generator=g)
    out = fused_linear_cross_entropy(h, w, labels, reduction="token_mean")
    out.loss.backward()
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = fused_linear_cross_entropy_reference(h32, w32, labels, reduction="token_mean")
    ref.loss.backward()
    assert abs(out.loss.item() - ref.loss.item()) < 1e-2 * ref.loss.item()
    for got, want in ((h.grad, h32.grad), (w.grad, w32.grad)):
        assert (got.float() - want).abs().max() < 3e-2 * want.abs().max()


@pytest.mark.gpu
@needs_cuda
def test_gpu_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    inputs = cuda_inputs()
    leaves = [inputs[i] for i in (0, 1, 2, 4)]
    eager = cuda_step(*inputs).detach()
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    compiled = cuda_step(*inputs, loss_fn=torch.compile(cuda_loss, fullgraph=True)).detach()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    for t, want in zip(leaves, grads):
        torch.testing.assert_close(t.grad.float(), want.float(), rtol=2e-2, atol=2e-2)
