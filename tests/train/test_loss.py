"""MFT loss modes: each against a float64 oracle written from MFTCoder's definitions, and normalised over
the optimizer step: one big batch == the same samples in micro-batches == split over 2 gloo ranks."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mftcore.config import TrainConfig
from mftcore.data import IGNORE_INDEX, Batch, Sample, collate_padded, shift_labels
from mftcore.errors import ConfigError
from mftcore.kernels import fused_linear_cross_entropy
from mftcore.kernels.cross_entropy import masked_cross_entropy_reference
from mftcore.loss import BASE_MODES as MODES
from mftcore.loss import MFTLoss, step_token_scales

VOCAB, H, K = 23, 8, 3
WEIGHTS = torch.tensor([1.0, 3.0, 0.5])
CASES = [(m, None) for m in MODES] + [("case3", WEIGHTS), ("case4", WEIGHTS)]


def make_samples(n=14, seed=0):
    """Samples of random length and task; some without any loss token, task 2 only in a few."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        length = int(torch.randint(2, 12, (1,), generator=g))
        ids = torch.randint(0, VOCAB, (length,), generator=g).tolist()
        mask = (torch.rand(length, generator=g) < 0.6).long().tolist()
        if i % 5 == 4:
            mask = [0] * length
        samples.append(Sample(ids, mask, task_id=2 if i % 6 == 1 else i % 2))
    return samples


def make_params(seed=1):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(VOCAB, H, generator=g, dtype=torch.float64)
    return emb, torch.randn(VOCAB, H, generator=g, dtype=torch.float64)


def step_loss_and_grads(batches, mode, weights, params):
    """Run one optimizer step's micro-batches as the trainer does; returns (loss, grad_emb, grad_head)."""
    emb, head = [p.clone().requires_grad_() for p in params]
    scales, _ = step_token_scales(batches, mode, K, weights)
    total = torch.zeros((), dtype=torch.float64)
    for b, scale in zip(batches, scales):
        hidden = torch.tanh(emb[b.input_ids])  # a non-linear "decoder", so hidden's gradient matters
        out = fused_linear_cross_entropy(hidden.flatten(0, 1), head, b.labels.flatten(), b.task_ids.flatten(),
                                         num_tasks=K, reduction="sum", token_scale=scale)
        out.loss.backward()
        total += out.loss.detach()
    return total, emb.grad, head.grad


def oracle_loss(batch, mode, weights, params):
    """MFTCoder's definitions, sample by sample (documents of cu_seqlens), in float64."""
    emb, head = params
    logits = torch.tanh(emb[batch.input_ids]).flatten(0, 1) @ head.T
    return oracle_from_logits(batch, logits, mode, weights)


def oracle_from_logits(batch, logits, mode, weights):
    labels, tasks = batch.labels.flatten(), batch.task_ids.flatten()
    ce = masked_cross_entropy_reference(logits, labels, reduction="sum", token_scale=None)  # sanity of the op
    token_ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none", ignore_index=IGNORE_INDEX)
    assert ce.loss.item() == pytest.approx(token_ce.sum().item())
    samples = []  # (task, sum of ce, loss tokens) per document with loss tokens
    cu = batch.cu_seqlens.tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        valid = labels[a:b] != IGNORE_INDEX
        if valid.any():
            samples.append((int(tasks[a:b][valid][0]), token_ce[a:b].sum().item(), int(valid.sum())))
    w = [1.0] * K if weights is None else weights.tolist()
    if mode == "case1":
        return sum(s for _, s, _ in samples) / sum(n for _, _, n in samples)
    if mode == "case2":
        return sum(s / n for _, s, n in samples) / len(samples)
    per_task = {}
    for t, s, n in samples:
        per_task.setdefault(t, []).append((s, n))
    if mode == "case3":
        L = {t: sum(s for s, _ in v) / sum(n for _, n in v) for t, v in per_task.items()}
    else:
        L = {t: sum(s / n for s, n in v) / len(v) for t, v in per_task.items()}
    return sum(w[t] * L[t] for t in L) / sum(w[t] for t in L)


def packed_batch(samples):
    """Two rows holding several documents each (a hand-packed Batch): a sample is a document, not a row."""
    groups = (samples[:6], samples[6:])
    L = max(sum(len(s.input_ids) for s in g) for g in groups)
    ids, labels, tasks, seglens = [], [], [], []
    for g in groups:
        row_ids, row_labels, row_tasks = [], [], []
        for s in g:
            row_ids += s.input_ids
            row_labels += shift_labels(s.input_ids, s.loss_mask)
            row_tasks += [s.task_id] * len(s.input_ids)
            seglens.append(len(s.input_ids))
        pad = L - len(row_ids)
        if pad:
            seglens.append(pad)
        ids.append(row_ids + [0] * pad)
        labels.append(row_labels + [IGNORE_INDEX] * pad)
        tasks.append(row_tasks + [-1] * pad)
    cu = torch.tensor([0] + torch.tensor(seglens).cumsum(0).tolist(), dtype=torch.int32)
    ids = torch.tensor(ids)
    return Batch(ids, torch.tensor(labels), torch.tensor(tasks), torch.zeros_like(ids), cu, max(seglens))


@pytest.mark.parametrize("mode,weights", CASES, ids=[f"{m}-{'w' if w is not None else 'uniform'}" for m, w in CASES])
def test_modes_match_mftcoder_definitions(mode, weights):
    samples, params = make_samples(), make_params()
    for batch in (collate_padded(samples, 0), packed_batch(samples)):
        loss, _, _ = step_loss_and_grads([batch], mode, weights, params)
        assert loss.item() == pytest.approx(oracle_loss(batch, mode, weights, params), rel=1e-6)


def test_modes_differ_from_each_other():
    """Guards the oracle test against a mode silently falling back to another."""
    samples, params = make_samples(), make_params()
    batch = collate_padded(samples, 0)
    losses = [step_loss_and_grads([batch], m, w, params)[0].item() for m, w in CASES]
    assert len({round(x, 9) for x in losses}) == len(losses)


@pytest.mark.parametrize("mode,weights", CASES, ids=[f"{m}-{'w' if w is not None else 'uniform'}" for m, w in CASES])
def test_micro_batches_give_the_big_batch(mode, weights):
    samples, params = make_samples(), make_params()
    big = step_loss_and_grads([collate_padded(samples, 0)], mode, weights, params)
    micro = [collate_padded(samples[a:b], 0) for a, b in ((0, 3), (3, 4), (4, 10), (10, 14))]
    small = step_loss_and_grads(micro, mode, weights, params)
    assert small[0].item() == pytest.approx(big[0].item(), rel=1e-6)
    for got, want in zip(small[1:], big[1:]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def _rank_worker(rank, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    samples, params = make_samples(), make_params()
    micro = [collate_padded(samples[a:b], 0) for a, b in ((0, 3), (3, 4), (4, 10), (10, 14))]
    results = {}
    for mode, weights in CASES:
        loss, g_emb, g_head = step_loss_and_grads(micro[rank::2], mode, weights, params)
        for t in (loss, g_emb, g_head):
            dist.all_reduce(t)  # gradients summed over ranks, as the step normalisation requires
        results[f"{mode}-{weights is not None}"] = (loss, g_emb, g_head)
    if rank == 0:
        torch.save(results, out_file)
    dist.destroy_process_group()


def test_two_gloo_ranks_give_the_big_batch(tmp_path):
    out_file = tmp_path / "ranks.pt"
    mp.spawn(_rank_worker, args=(str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    results = torch.load(out_file)
    samples, params = make_samples(), make_params()
    for mode, weights in CASES:
        big = step_loss_and_grads([collate_padded(samples, 0)], mode, weights, params)
        got = results[f"{mode}-{weights is not None}"]
        assert got[0].item() == pytest.approx(big[0].item(), rel=1e-6), mode
        for g, w in zip(got[1:], big[1:]):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_bad_mode_and_weights_for_unweighted_modes():
    batch = collate_padded(make_samples(3), 0)
    with pytest.raises(ValueError, match="case9"):
        step_token_scales([batch], "case9", K)
    with pytest.raises(ValueError, match="case1"):
        step_token_scales([batch], "case1", K, WEIGHTS)
    with pytest.raises(ValueError, match="case2"):
        MFTLoss(K, mode="case2", task_weights=[1, 2, 3])


@pytest.mark.parametrize("mode", MODES)
def test_mft_loss_module_on_padded_rows_and_per_row_tasks(mode):
    """MFTLoss on a [B, L] batch with one task id per row equals the step-scale path on its Batch."""
    samples, params = make_samples(), make_params()
    batch = collate_padded(samples, 0)
    weights = WEIGHTS if mode in ("case3", "case4") else None
    want = oracle_loss(batch, mode, weights, params)
    emb, head = params
    hidden = torch.tanh(emb[batch.input_ids])
    row_tasks = torch.tensor([s.task_id for s in samples])
    out = MFTLoss(K, mode=mode, task_weights=weights)(hidden, head, batch.labels, row_tasks)
    assert out.loss.item() == pytest.approx(want, rel=1e-6)
    assert out.task_token_count.sum().item() == (batch.labels != IGNORE_INDEX).sum().item()


def test_config_accepts_the_modes_and_rejects_weights_they_ignore():
    base = {"data_paths": ["a", "b"], "tokenizer_path": "t", "model_config": {"model_type": "llama"}}
    for mode in MODES:
        assert TrainConfig.from_dict({**base, "weighted_loss_mode": mode}).weighted_loss_mode == mode
    weighted = TrainConfig.from_dict({**base, "weighted_loss_mode": "case4", "task_weights": "[1,2]"})
    assert weighted.task_weights == [1, 2]
    with pytest.raises(ConfigError, match="task_weights: weighted_loss_mode case1 ignores"):
        TrainConfig.from_dict({**base, "weighted_loss_mode": "case1", "task_weights": [1, 2]})
    with pytest.raises(ConfigError, match="weighted_loss_mode"):
        TrainConfig.from_dict({**base, "weighted_loss_mode": "case5"})


@pytest.mark.parametrize("mode,weights", [("case1", None), ("case2", None), ("case4", WEIGHTS)])
def test_trainer_step_uses_the_configured_mode(mode, weights):
    """mftcore.train.train_step over two micro-batches returns the mode's loss of the whole step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mftcore.model.loss_model import LossModel
    from mftcore.parallel import Engine
    from mftcore.train import train_step

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))
    samples = make_samples()
    with torch.no_grad():
        big = collate_padded(samples, 0)
        logits = model(input_ids=big.input_ids, attention_mask=big.attention_mask,
                       position_ids=big.position_ids).logits
        want = oracle_from_logits(big, logits.double().flatten(0, 1), mode, weights)
    cfg = TrainConfig.from_dict({"data_paths": ["a", "b", "c"], "tokenizer_path": "t",
                                 "model_config": {"model_type": "llama"}, "weighted_loss_mode": mode,
                                 "task_weights": None if weights is None else weights.tolist()})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    micro = [collate_padded(samples[:5], 0), collate_padded(samples[5:], 0)]
    res = train_step(Engine(LossModel(model, K), model, optimizer), micro, scheduler, cfg, K, weights)
    assert res.loss.item() == pytest.approx(want, rel=1e-5)
    assert res.task_token_count.sum().item() == (big.labels != IGNORE_INDEX).sum().item()
