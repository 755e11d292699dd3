"""The padded Batch of DESIGN.md and the data loading around it."""

import json

import pytest
import torch

from mftcore.config import TrainConfig
from mftcore.data import IGNORE_INDEX, Sample, collate_padded, epoch_order, load_tasks, micro_batches
from mftcore.data.cache import task_names
from mftcore.data.dataset import split_counts
from mftcore.errors import DataError


def test_collate_padded_fields():
    a = Sample([10, 11, 12, 13], [0, 0, 1, 1], task_id=0)
    b = Sample([20, 21], [0, 1], task_id=2)
    batch = collate_padded([a, b], pad_id=0)
    assert batch.input_ids.tolist() == [[10, 11, 12, 13], [20, 21, 0, 0]]
    X = IGNORE_INDEX
    # labels: the next token where that token is a target; never across the end of a document
    assert batch.labels.tolist() == [[X, 12, 13, X], [21, X, X, X]]
    assert batch.task_ids.tolist() == [[0, 0, 0, 0], [2, 2, -1, -1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    # segments over the flattened 8 tokens: doc a, doc b, then b's padding run
    assert batch.cu_seqlens.tolist() == [0, 4, 6, 8] and batch.cu_seqlens.dtype == torch.int32
    assert batch.max_seqlen == 4
    assert batch.num_tokens == 6


def test_task_names_are_unique():
    assert task_names(["a/code", "b/code/", "c/sql", "d/code"]) == ["code", "code_2", "sql", "code_3"]


def test_split_counts_use_fractions_of_the_sum():
    assert split_counts(100, 0.98, 0.02) == (98, 2)
    assert split_counts(10, 0.9, 0.1) == (9, 1)
    assert split_counts(3, 0.98, 0.02) == (3, 0)


def test_epoch_order_reshuffles_and_covers_everything():
    a, b = epoch_order(50, 1, 0), epoch_order(50, 1, 1)
    assert sorted(a.tolist()) == list(range(50)) and a.tolist() != b.tolist()
    batches = micro_batches(a, 8)
    assert [len(x) for x in batches] == [8] * 6 + [2]
    assert sorted(sum(batches, [])) == list(range(50))


def write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def config_for(tmp_path, paths):
    return TrainConfig.from_dict({"data_paths": [str(p) for p in paths], "tokenizer_path": "x",
                                  "model_config": {"model_type": "llama"}, "seq_length": 16,
                                  "output_dir": str(tmp_path / "out"), "tokenize_workers": 1})


def good(q="q", a="a"):
    return json.dumps({"chat_rounds": [{"role": "human", "content": q}, {"role": "bot", "content": a}]})


def test_load_tasks_truncates_and_reports(tmp_path, tokenizer):
    write(tmp_path / "t1" / "x.jsonl", [good(), good(a="word " * 40)])
    write(tmp_path / "t2" / "sub" / "y.jsonl", [good()])
    data = load_tasks(config_for(tmp_path, [tmp_path / "t1", tmp_path / "t2"]), tokenizer, tokenizer.eos_token_id)
    assert data.names == ["t1", "t2"]
    assert data.report["t1"]["truncated"] == 1 and data.report["t1"]["samples"] == 2
    assert all(len(s.input_ids) <= 16 for s in list(data.train) + list(data.valid))
    assert {s.task_id for s in data.train} == {0, 1}


@pytest.mark.parametrize("content, expected", [
    (b'{"chat_rounds": [}\n', r"x\.jsonl:2: invalid JSON"),
    (b'{"text_only": 1}\n', r"x\.jsonl:2: record has no known shape"),
    (b'{"chat_rounds": [{"role": "bot", "content": "a"}]}\n', r"x\.jsonl:2: chat_rounds\[0\] has role 'bot'"),
    (b'\xff\xfe\n', r"x\.jsonl:2: invalid UTF-8"),
])
def test_bad_lines_name_file_and_line(tmp_path, tokenizer, content, expected):
    f = tmp_path / "t" / "x.jsonl"
    f.parent.mkdir()
    f.write_bytes(good().encode() + b"\n" + content)
    with pytest.raises(DataError, match=expected):
        load_tasks(config_for(tmp_path, [tmp_path / "t"]), tokenizer, tokenizer.eos_token_id)


def test_missing_and_empty_task_dirs(tmp_path, tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        load_tasks(config_for(tmp_path, [tmp_path / "nope"]), tokenizer, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no \\*.jsonl files"):
        load_tasks(config_for(tmp_path, [tmp_path / "empty"]), tokenizer, 0)


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
