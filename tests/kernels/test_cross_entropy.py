"""The cross-entropy op on its CPU path: hand-computed values, reductions, step normalisation, memory, edge cases.

The CPU path's peak-memory gate (chunked vs naive logits) is in test_gates.py, with bench/gates.json."""

import math

import pytest
import torch
import triton

from mftcore.data.batch import IGNORE_INDEX
from mftcore.kernels import fused_linear_cross_entropy, masked_cross_entropy, task_mean_scales
from mftcore.kernels.cross_entropy import chunk_rows


def ce(logits, target):
    return math.log(sum(math.exp(x) for x in logits)) - logits[target]


def test_hand_computed_task_mean():
    # hidden = identity rows, so logits are the weight's columns: easy to write down
    weight = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])  # V=2, H=3
    hidden = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])
    labels = torch.tensor([0, 0, 1, IGNORE_INDEX])
    tasks = torch.tensor([0, 1, 1, 1])
    out = fused_linear_cross_entropy(hidden, weight, labels, tasks, num_tasks=3)
    l0, l1, l2 = ce([1, 0], 0), ce([0, 1], 0), ce([2, -1], 1)
    expected = (l0 + (l1 + l2) / 2) / 2  # task 2 has no tokens: it does not count
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.task_loss_sum.tolist() == pytest.approx([l0, l1 + l2, 0.0], rel=1e-6)
    assert out.task_token_count.tolist() == [1.0, 2.0, 0.0]
    weighted = fused_linear_cross_entropy(hidden, weight, labels, tasks, task_weights=[3.0, 1.0, 5.0])
    assert weighted.loss.item() == pytest.approx((3 * l0 + (l1 + l2) / 2) / 4, rel=1e-6)
    tm = fused_linear_cross_entropy(hidden, weight, labels, tasks, num_tasks=3, reduction="token_mean")
    assert tm.loss.item() == pytest.approx((l0 + l1 + l2) / 3, rel=1e-6)


def test_task_mean_scales_by_hand():
    counts = torch.tensor([1.0, 2.0, 0.0])
    assert task_mean_scales(counts).tolist() == [0.5, 0.25, 0.0]  # (1/1 + 2 * 1/2) / 2 tasks present
    # w = 3, 1, 5; the absent task's 5 is not in the denominator: 3/(1*4), 1/(2*4)
    assert task_mean_scales(counts, [3.0, 1.0, 5.0]).tolist() == [0.75, 0.125, 0.0]
    weights = torch.tensor([3.0, 1.0, 5.0], dtype=torch.float64)
    got = task_mean_scales(counts, weights)
    assert got.dtype == torch.float32 and got.tolist() == [0.75, 0.125, 0.0]  # counts' dtype
    assert task_mean_scales(torch.zeros(2, dtype=torch.float64)).tolist() == [0.0, 0.0]  # no tokens: 0, not nan


def test_all_ignored_gives_zero_loss_and_zero_grad():
    hidden = torch.randn(5, 7, requires_grad=True)
    weight = torch.randn(11, 7, requires_grad=True)
    labels = torch.full((5,), IGNORE_INDEX)
    for reduction in ("token_mean", "task_mean", "sum"):
        out = fused_linear_cross_entropy(hidden, weight, labels, torch.zeros(5, dtype=torch.long),
                                         num_tasks=2, reduction=reduction)
        out.loss.backward()
        assert out.loss.item() == 0.0 and hidden.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0


def test_bias_and_logits_entry_agree():
    torch.manual_seed(0)
    h, w, b = torch.randn(6, 5), torch.randn(9, 5), torch.randn(9)
    labels, tasks = torch.randint(0, 9, (6,)), torch.randint(0, 2, (6,))
    a = fused_linear_cross_entropy(h, w, labels, tasks, bias=b, num_tasks=2)
    c = masked_cross_entropy(h @ w.T + b, labels, tasks, num_tasks=2)
    torch.testing.assert_close(a.loss, c.loss)


def test_step_scales_make_micro_batches_equal_one_batch():
    """sum over micro-batches of sum_i c_i*ce_i == case3 of the whole step, and the same gradient."""
    torch.manual_seed(0)
    N, H, V, K = 40, 8, 13, 3
    hidden = torch.randn(N, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (N,))
    labels[::7] = IGNORE_INDEX
    tasks = torch.randint(0, K, (N,))
    weights = torch.tensor([1.0, 2.0, 0.5])

    big = fused_linear_cross_entropy(hidden, weight, labels, tasks, num_tasks=K, task_weights=weights)
    (g_big,) = torch.autograd.grad(big.loss, weight)

    valid = labels != IGNORE_INDEX
    counts = torch.zeros(K).index_add(0, tasks[valid], torch.ones(int(valid.sum())))
    token_scale = torch.where(valid, task_mean_scales(counts, weights)[torch.where(valid, tasks, 0)], 0.0)
    total = 0.0
    for part in torch.tensor_split(torch.arange(N), [9, 10, 31]):  # uneven micro-batches
        out = fused_linear_cross_entropy(hidden[part], weight, labels[part], tasks[part], num_tasks=K,
                                         reduction="sum", token_scale=token_scale[part])
        out.loss.backward()
        total += out.loss.item()
    assert total == pytest.approx(big.loss.item(), rel=1e-6)
    torch.testing.assert_close(weight.grad, g_big, rtol=1e-6, atol=1e-9)


def test_token_scale_requires_sum():
    with pytest.raises(ValueError, match="token_scale"):
        fused_linear_cross_entropy(torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 1]),
                                   token_scale=torch.ones(2), reduction="task_mean")


def test_chunk_size_keeps_the_gpu_memory_goal():
    """At the goal shape the kernel-1 chunk buffer and tile statistics stay under 2*N*H*2 bytes."""
    n, h, v = 16384, 4096, 128256
    rows = chunk_rows(n, h, v, 2, triton_path=True, want_grad=True)
    stats = rows * triton.cdiv(v, 64) * 8 + rows * 32
    assert rows % 256 == 0 and rows * triton.cdiv(v, 64) * 64 * 2 + stats <= 2 * n * h * 2
    assert chunk_rows(n, h, v, 2, triton_path=True, want_grad=False) > rows  # nothing stored: bigger chunks
    assert chunk_rows(100, h, v, 2, triton_path=True, want_grad=True) == 100  # small batches: one chunk


def test_backward_twice_is_an_error_not_a_wrong_gradient():
    h, w = torch.randn(4, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    out = fused_linear_cross_entropy(h, w, torch.tensor([0, 1, 2, 3]))
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward twice"):
        out.loss.backward()


def test_empty_batch_gives_zero_loss_and_zero_gradient():
    h, w = torch.randn(0, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    out = fused_linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long), num_tasks=2)
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.task_token_count.tolist() == [0.0, 0.0] and h.grad.shape == (0, 3)


def test_batched_shapes_and_int32_ids_equal_the_flat_call():
    torch.manual_seed(0)
    h, w = torch.randn(2, 5, 6), torch.randn(11, 6)
    labels, tasks = torch.randint(0, 11, (2, 5)), torch.randint(0, 3, (2, 5))
    flat = fused_linear_cross_entropy(h.reshape(10, 6), w, labels.flatten(), tasks.flatten(), num_tasks=3)
    shaped = fused_linear_cross_entropy(h, w, labels.int(), tasks.int(), num_tasks=3)
    torch.testing.assert_close(shaped.loss, flat.loss)
    torch.testing.assert_close(shaped.task_loss_sum, flat.task_loss_sum)
