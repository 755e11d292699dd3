"""The Batch of DESIGN.md: padded and packed collation."""


import torch

from mftcore.data import IGNORE_INDEX, Sample, collate_packed, collate_padded

X = IGNORE_INDEX


def test_collate_padded_fields():
    a = Sample([10, 11, 12, 13], [0, 0, 1, 1], task_id=0)
    b = Sample([20, 21], [0, 1], task_id=2)
    batch = collate_padded([a, b], pad_id=0)
    assert batch.input_ids.tolist() == [[10, 11, 12, 13], [20, 21, 0, 0]]
    # labels: the next token where that token is a target; never across the end of a document
    assert batch.labels.tolist() == [[X, 12, 13, X], [21, X, X, X]]
    assert batch.task_ids.tolist() == [[0, 0, 0, 0], [2, 2, -1, -1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    # segments over the flattened 8 tokens: doc a, doc b, then b's padding run
    assert batch.cu_seqlens.tolist() == [0, 4, 6, 8] and batch.cu_seqlens.dtype == torch.int32
    assert batch.max_seqlen == 4
    assert batch.num_tokens == 6


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
