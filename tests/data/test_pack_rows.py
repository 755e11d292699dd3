"""padding_mode "pack": packed Batches, the StepLoader's epochs across ranks, and attention that stays
inside each document (the same per-document loss as padding, through a tiny HF Llama)."""

import numpy as np
import pytest
import torch

from tests.helpers.paths import TINY_MODEL
from mftcore.data import IGNORE_INDEX, Sample, StepLoader, collate_packed, collate_padded
from mftcore.model.decoder import hidden_states, packed_attention_mask

X = IGNORE_INDEX


def test_collate_packed_fields():
    a = Sample([10, 11, 12], [0, 1, 1], task_id=0)
    b = Sample([20, 21], [0, 1], task_id=1)
    c = Sample([30, 31, 32, 33], [0, 0, 1, 1], task_id=2)
    batch = collate_packed([[a, b], [c]], pad_id=0)
    assert batch.input_ids.tolist() == [[10, 11, 12, 20, 21], [30, 31, 32, 33, 0]]
    # labels shifted inside each document: a's last token never predicts b's first
    assert batch.labels.tolist() == [[11, 12, X, 21, X], [X, 32, 33, X, X]]
    assert batch.task_ids.tolist() == [[0, 0, 0, 1, 1], [2, 2, 2, 2, -1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    # documents a, b | c, then c's row padding as a segment of its own: all B*L = 10 tokens covered
    assert batch.cu_seqlens.tolist() == [0, 3, 5, 9, 10] and batch.cu_seqlens.dtype == torch.int32
    assert batch.max_seqlen == 4 and batch.attention_mask is None and batch.num_tokens == 9


def test_block_diagonal_mask_from_cu_seqlens():
    a, b = Sample([1, 2, 3], [0, 1, 1], 0), Sample([4, 5], [0, 1], 0)
    batch = collate_packed([[a, b], [b]], pad_id=0)
    mask = packed_attention_mask(batch, "sdpa", torch.float32)
    T, F = True, False
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    assert mask[0, 0].tolist() == [[T, F, F, F, F], [T, T, F, F, F], [T, T, T, F, F], [F, F, F, T, F],
                                   [F, F, F, T, T]]
    assert mask[1, 0].tolist() == [[T, F, F, F, F], [T, T, F, F, F], [F, F, T, F, F], [F, F, T, T, F],
                                   [F, F, T, T, T]]  # the padding run attends only to itself
    eager = packed_attention_mask(batch, "eager", torch.float16)
    assert eager.dtype == torch.float16 and torch.equal(eager == 0, mask)
    assert packed_attention_mask(batch, "mftcore_varlen", torch.float32) is None  # varlen needs none


def token_losses(model, batch):
    """Cross-entropy of every position [B, L] (0 where there is no target)."""
    with torch.no_grad():
        logits = model.lm_head(hidden_states(model, batch)).float()
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten().clamp(min=0),
                                           reduction="none").view(batch.labels.shape)
    return torch.where(batch.labels != X, ce, 0.0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_padded_give_the_same_per_document_loss(attn):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    spec = {k: v for k, v in TINY_MODEL.items() if k != "model_type"}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=97, **spec),
                                             attn_implementation=attn).eval()
    rng = np.random.default_rng(0)
    docs = []
    for i, n in enumerate([7, 12, 3, 20, 9, 15, 1, 11]):
        mask = (rng.random(n) < 0.7).astype(int)
        docs.append(Sample(rng.integers(1, 97, n).tolist(), mask.tolist(), task_id=i % 3))
    padded = collate_padded(docs, pad_id=0)
    rows = [[0, 1, 2], [3, 4], [5, 6, 7]]
    packed = collate_packed([[docs[i] for i in row] for row in rows], pad_id=0)

    pad_loss, pack_loss = token_losses(model, padded), token_losses(model, packed)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = len(docs[i].input_ids)
            torch.testing.assert_close(pack_loss[r, start:start + n], pad_loss[i, :n], rtol=1e-5, atol=1e-5)
            start += n
    # control: the same packed rows with one causal attention over the whole row do leak between documents
    leaky = collate_packed([[docs[i] for i in row] for row in rows], pad_id=0)
    leaky.attention_mask = torch.ones_like(leaky.input_ids)
    assert not torch.allclose(token_losses(model, leaky)[0, 7:19], pad_loss[1, :12], atol=1e-4)


def make_samples(n, seed=0):
    """Samples with unique first tokens (their identity) and long-tailed lengths in [1, 40]."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(2.0, 1.0, n).astype(int), 1, 40)
    return [Sample([1000 + i] + [7] * (int(length) - 1), [0] + [1] * (int(length) - 1), task_id=i % 4)
            for i, length in enumerate(lengths)]


def documents(batch):
    """(first token, task ids, length) of every document in a Batch, from cu_seqlens."""
    flat_ids, flat_tasks = batch.input_ids.flatten(), batch.task_ids.flatten()
    cu = batch.cu_seqlens.tolist()
    out = []
    for a, b in zip(cu[:-1], cu[1:]):
        if flat_tasks[a] >= 0:
            out.append((int(flat_ids[a]), set(flat_tasks[a:b].tolist()), b - a))
    return out


@pytest.mark.parametrize("pack, n", [(True, 500), (True, 497), (False, 496)])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_sample_exactly_once_per_epoch_across_ranks(pack, n, world_size):
    """Every rank takes steps_per_epoch steps per epoch; together they use each sample once. (Padding
    mode gives a rank an empty last slice when the last global batch has fewer samples than ranks,
    a case left to the distributed engine; n=496 avoids it. Packing avoids it by itself.)"""
    samples = make_samples(n)
    loaders = [StepLoader(samples, batch_size=4, accumulation=2, pad_id=0, seed=3, rank=r, world_size=world_size,
                          pack=pack, seq_length=64) for r in range(world_size)]
    steps = loaders[0].steps_per_epoch()
    epoch_docs = []
    for epoch in range(2):
        seen = []
        for loader in loaders:
            it = iter(loader)
            loader_steps = 0
            for _ in range(steps):
                e, micro = next(it)
                assert e == epoch
                loader_steps += 1
                for batch in micro:
                    assert batch.input_ids.shape[1] <= 64
                    if pack:
                        assert batch.attention_mask is None
                    seen += documents(batch)
        first_tokens = sorted(d[0] for d in seen)
        assert first_tokens == list(range(1000, 1000 + n))  # none dropped, none duplicated
        for first, tasks, length in seen:  # each document keeps its own task and its whole length
            s = samples[first - 1000]
            assert tasks == {s.task_id} and length == len(s.input_ids)
        epoch_docs.append([d[0] for d in seen])
    assert epoch_docs[0] != epoch_docs[1]  # reshuffled every epoch


def test_rows_are_split_to_a_multiple_of_the_world_size():
    from mftcore.data.loader import split_rows_to_multiple

    rows = [np.array(r) for r in ([0, 1, 2], [3], [4, 5])]
    assert [r.tolist() for r in split_rows_to_multiple(rows, 2)] == [[0], [1, 2], [3], [4, 5]]
    assert [r.tolist() for r in split_rows_to_multiple(rows, 5)] == [[0], [1, 2], [3], [4], [5]]
    assert len(split_rows_to_multiple(rows, 3)) == 3
    single = [np.array([k]) for k in range(3)]
    assert len(split_rows_to_multiple(single, 2)) == 3  # nothing to split: fewer samples than needed


class RecordingSamples(list):
    """A sample list that remembers which samples were read (the cache's SampleView reads lazily too)."""

    def __init__(self, items):
        super().__init__(items)
        self.read = set()
        self.lengths = np.array([len(s.input_ids) for s in items])  # as SampleView: no sample read for it

    def __getitem__(self, i):
        self.read.add(int(i))
        return super().__getitem__(i)


@pytest.mark.parametrize("pack", [True, False])
def test_each_rank_reads_only_its_share(pack):
    base = make_samples(300)
    views = [RecordingSamples(base) for _ in range(2)]
    for rank, view in enumerate(views):
        loader = StepLoader(view, batch_size=4, accumulation=1, pad_id=0, seed=3, rank=rank, world_size=2,
                            pack=pack, seq_length=64)
        it = iter(loader)
        for _ in range(loader.steps_per_epoch()):
            next(it)
    assert not views[0].read & views[1].read and views[0].read | views[1].read == set(range(300))


def test_packing_fills_rows_and_steps_per_epoch_is_exact():
    samples = make_samples(2000)
    loader = StepLoader(samples, batch_size=8, accumulation=1, pad_id=0, seed=1, pack=True, seq_length=64)
    groups = [loader._epoch_groups(e) for e in range(3)]
    assert len({len(g) for g in groups}) == 1 and len(groups[0]) == loader.steps_per_epoch()
    rows = [row for g in groups[0] for row in g]
    used = sum(len(samples[int(j)].input_ids) for row in rows for j in row)
    assert used / (64 * len(rows)) > 0.97  # vs one sample per row: mean length / 64
    padded = StepLoader(samples, batch_size=8, accumulation=1, pad_id=0, seed=1)
    assert loader.steps_per_epoch() * 4 < padded.steps_per_epoch()


def test_pack_resumes_at_the_exact_next_step():
    samples = make_samples(300)
    make = lambda: StepLoader(samples, batch_size=3, accumulation=2, pad_id=0, seed=9,  # noqa: E731
                              pack=True, seq_length=48)
    full, steps_per_epoch = make(), make().steps_per_epoch()
    it = iter(full)
    steps = [next(it) for _ in range(2 * steps_per_epoch + 3)]
    resumed = make()
    it = iter(resumed)
    for _ in range(steps_per_epoch + 2):
        next(it)
    again = make()
    again.load_state_dict(resumed.state_dict())
    it = iter(again)
    for e1, b1 in steps[steps_per_epoch + 2:]:
        e2, b2 = next(it)
        assert e1 == e2 and [b.input_ids.tolist() for b in b1] == [b.input_ids.tolist() for b in b2]


def test_pack_rejects_a_sample_longer_than_a_row():
    with pytest.raises(ValueError, match="does not fit seq_length=4"):
        StepLoader([Sample([1] * 5, [1] * 5, 0)], batch_size=1, accumulation=1, pad_id=0, seed=0, pack=True,
                   seq_length=4)


def test_train_packs_and_reuses_the_cache(tiny_config, capsys):
    """`mftcore prepare` then `train` with padding_mode "pack": the cache is reused, the run learns."""
    import json
    import os

    from mftcore.cli import main

    path, cfg = tiny_config(padding_mode="pack", seq_length=128, per_device_train_batch_size=2,
                            max_train_steps=6, log_interval=1, evaluation_steps=6)
    assert main(["prepare", path]) == 0
    assert "(built)" in capsys.readouterr().err
    assert main(["train", path]) == 0
    out = capsys.readouterr()
    assert "(reused)" in out.out + out.err
    with open(os.path.join(cfg["output_dir"], "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train = [r["loss"] for r in records if r["split"] == "train"]
    assert len(train) == 6 and all(np.isfinite(train)) and train[-1] < train[0]
    assert [r["step"] for r in records if r["split"] == "valid"] == [6]
