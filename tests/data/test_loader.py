"""The StepLoader: each epoch's micro-batches (padded or packed rows) across ranks, exactly once per
epoch, resumable at the exact next step; and the Prefetcher that runs it one step ahead."""

import numpy as np
import pytest
import torch

from mftcore.data import IGNORE_INDEX, Sample, StepLoader

X = IGNORE_INDEX


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


def epoch_groups(loader, epoch: int) -> list:
    """This rank's micro-batches of one epoch, each a list of rows (pack) or of sample indices."""
    units = loader._epoch_units(epoch)
    return [g for start in range(0, len(units), loader.units_per_step) for g in loader._step_groups(units, start)]


def test_packing_fills_rows_and_steps_per_epoch_is_exact():
    samples = make_samples(2000)
    loader = StepLoader(samples, batch_size=8, accumulation=1, pad_id=0, seed=1, pack=True, seq_length=64)
    groups = [epoch_groups(loader, e) for e in range(3)]
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


def test_step_loader_resumes_at_the_exact_next_step():
    from mftcore.data import StepLoader

    samples = [Sample([i, i + 1, i + 2], [0, 1, 1], task_id=i % 2) for i in range(0, 300, 3)]
    make = lambda: StepLoader(samples, batch_size=4, accumulation=3, pad_id=0, seed=7)  # noqa: E731
    full = make()
    assert full.steps_per_epoch() == 9  # 100 samples -> 25 micro-batches -> 9 steps, the last short
    it = iter(full)
    steps = [next(it) for _ in range(20)]  # crosses two epoch boundaries
    assert [e for e, _ in steps] == [0] * 9 + [1] * 9 + [2] * 2
    assert len(steps[8][1]) == 1  # the last step of an epoch holds the leftover micro-batch only

    resumed = make()
    it = iter(resumed)
    for _ in range(13):
        next(it)
    state = resumed.state_dict()
    again = make()
    again.load_state_dict(state)
    it = iter(again)
    rest = [next(it) for _ in range(7)]
    for (e1, b1), (e2, b2) in zip(steps[13:], rest):
        assert e1 == e2 and [b.input_ids.tolist() for b in b1] == [b.input_ids.tolist() for b in b2]


def test_prefetcher_hands_out_the_loaders_steps_in_order_with_their_positions():
    from mftcore.data.loader import Prefetcher

    samples = make_samples(60)
    make = lambda: StepLoader(samples, batch_size=4, accumulation=2, pad_id=0, seed=3)  # noqa: E731
    plain = make()
    it = iter(plain)
    want = []
    for _ in range(12):  # crosses an epoch boundary (8 steps per epoch)
        epoch, batches = next(it)
        want.append((epoch, [b.input_ids.tolist() for b in batches], plain.state_dict()))
    with Prefetcher(make().steps(), torch.device("cpu")) as steps:
        got = [next(steps) for _ in range(12)]
    assert [(s.epoch, [b.input_ids.tolist() for b in s.batches], s.position) for s in got] == want
    assert all(s.tokens == sum(b.num_tokens for b in s.batches) for s in got)


def test_prefetcher_raises_the_loaders_error_and_stops_its_thread():
    from mftcore.data.loader import Prefetcher

    def steps():
        yield "first"
        raise ValueError("bad row")

    class Step:  # the Prefetcher moves .batches; a stand-in with none
        def __init__(self, name):
            self.name, self.batches = name, []

    prefetcher = Prefetcher((Step(s) for s in ["a"]), torch.device("cpu"))
    assert next(prefetcher).name == "a"
    prefetcher.close()
    assert not prefetcher.thread.is_alive()
    failing = Prefetcher((Step(x) for x in steps()), torch.device("cpu"))
    assert next(failing).name == "first"
    with pytest.raises(ValueError, match="bad row"):
        next(failing)
    failing.close()


def first_tokens(loaders, steps) -> list:
    """Documents' first tokens over `steps` steps of every rank's loader (one list per step)."""
    its = [iter(loader) for loader in loaders]
    out = []
    for _ in range(steps):
        step = []
        for it in its:
            step += [d[0] for b in next(it)[1] for d in documents(b)]
        out.append(step)
    return out


# Packed rows depend on the number of ranks: that resume mid-epoch is refused (the next test).
@pytest.mark.parametrize("pack,new", [(pack, dict(batch_size=b, accumulation=a, world_size=w))
                                      for pack in (False, True) for b, a, w in ((3, 1, 1), (2, 3, 1), (4, 2, 2))
                                      if not (pack and w > 1)])
def test_resume_with_another_step_size_continues_the_epoch_exactly(pack, new):
    """Stopped after 5 steps of 8 x 2 units, resumed with another batch size, accumulation or (padding)
    number of ranks: the epoch's remaining samples come next, every one once, none repeated."""
    samples = make_samples(300)
    make = lambda batch_size, accumulation, world_size, rank=0: StepLoader(  # noqa: E731
        samples, batch_size=batch_size, accumulation=accumulation, pad_id=0, seed=5, rank=rank,
        world_size=world_size, pack=pack, seq_length=48)
    first = make(8, 2, 1)
    done = [t for step in first_tokens([first], 5) for t in step]
    state = first.state_dict()
    resumed = [make(**new, rank=r) for r in range(new["world_size"])]
    for loader in resumed:
        loader.load_state_dict(state)
    rest = [t for step in first_tokens(resumed, resumed[0].steps_left(state["consumed"])) for t in step]
    assert sorted(done + rest) == sorted(1000 + i for i in range(300)), "a sample skipped or repeated"
    assert resumed[0].epoch_ended(resumed[0].state_dict())


def test_resume_refuses_what_cannot_continue_exactly():
    from mftcore.errors import ConfigError

    samples = make_samples(300)
    packed = StepLoader(samples, batch_size=4, accumulation=1, pad_id=0, seed=5, world_size=2, pack=True,
                        seq_length=48)
    state = {**packed.state_dict(), "consumed": 8, "step_in_epoch": 1}
    other_ranks = StepLoader(samples, batch_size=4, accumulation=1, pad_id=0, seed=5, world_size=1, pack=True,
                             seq_length=48)
    with pytest.raises(ConfigError, match="packed rows split for 2 ranks"):
        other_ranks.load_state_dict(state)
    fewer = StepLoader(samples[:200], batch_size=4, accumulation=1, pad_id=0, seed=5)
    with pytest.raises(ConfigError, match="mid-epoch after 8 of its 300 training samples, this run has 200"):
        fewer.load_state_dict({**StepLoader(samples, batch_size=4, accumulation=1, pad_id=0, seed=5).state_dict(),
                               "consumed": 8, "step_in_epoch": 2})
    fewer.load_state_dict({"epoch": 1, "step_in_epoch": 0, "consumed": 0, "units": 300})  # an epoch's start: fine
